"""The project's own one-row fp32 kernels for CPU decode (``csrc/gemv.c``), built at run time
with the system's C compiler and called through ctypes: a matrix product (``CpuGemv``), and the
whole network for one decoding token in one call (``OneTokenForward``: PyTorch's eager forward
pays ~15 calls a block around the products, ~3 ms of a GPT-2-small step here).

Why: a decode step of one sequence is bound by reading the weights, once each. On this project's
AMD EPYC VM (``bench/floor.py``, GPT-2-small's 494 MB of matrices, one row, 2 threads), oneDNN's
prepacked products took 26.3-26.5 ms, MKL's (``F.linear``) 36.8-37.4 ms, and this kernel
18.1-21.0 ms, about a plain read of every weight (16.8-17.2 ms) (docs/BENCHMARKS.md, "One-row
kernel and huge pages"). OpenBLAS's GEMV (numpy's) was fast alone but lost inside a step: its
thread pool and torch's fought for the cores. This kernel runs on torch's own OpenMP pool
instead: it is linked with ``-fopenmp``, so it needs ``libgomp.so.1``, which the dynamic loader
resolves to the copy torch has already loaded (``load_cpu_gemv`` refuses the kernel if a second
OpenMP runtime appears).

The engine does not take it on faith: its warm-up times a one-row step with each product and
keeps the fastest (``service.engine.runner``). Where the kernel cannot be built (no C compiler,
a CPU without AVX2 and FMA, not x86-64 Linux) ``load_cpu_gemv`` raises ``KernelUnavailable``
with the reason, and the engine uses PyTorch's products.

The compiled library is cached in ``GPTSERVE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/gptserve/
kernels``, else ``~/.cache/gptserve/kernels``, under a name that hashes the source and the
flags, written atomically (a temporary file renamed into place), so concurrent engines never load
a half-written library. ``python -m model.cpu_gemv`` builds it ahead of time (the Dockerfile
does, so its runtime image needs no compiler).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm")
_SYMBOL, _FORWARD1 = "gptserve_gemv_f32", "gptserve_forward1_f32"
_ATTEND = "gptserve_attend_rows_f32"
CACHE_VARIABLE = "GPTSERVE_KERNEL_CACHE"  # not a server flag: the library reads it (see above)


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


class CpuGemv:
    """``y = x @ w.T + b`` for one fp32 row ``x`` (1, in), weight ``w`` (out, in) and bias ``b``
    (out,) or None, all contiguous on the CPU, on torch's intra-op threads."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        fn = getattr(library, _SYMBOL)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        self._fn = fn
        forward1 = getattr(library, _FORWARD1)
        forward1.restype = None
        forward1.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_int]
                             + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
                             + [ctypes.c_void_p] * 2 + [ctypes.c_int])
        self._forward1 = forward1
        attend = getattr(library, _ATTEND)
        attend.restype = None
        attend.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
                           + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4
                           + [ctypes.c_void_p] * 2 + [ctypes.c_int])
        self._attend = attend
        self._library = library  # keeps the library loaded while this object lives
        self.path = path

    def __repr__(self) -> str:
        return f"CpuGemv({str(self.path)!r})"

    def accepts(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
        """Whether the kernel can multiply these exactly as given: it reads raw memory, so every
        shape, dtype, device and layout is checked before it runs."""
        return self.accepts_weight(w, b) and self.accepts_row(x, w.shape[1])

    @staticmethod
    def accepts_weight(w: torch.Tensor, b: torch.Tensor | None) -> bool:
        """The weight's half of ``accepts``: a contiguous fp32 CPU (out, in) matrix and bias. A
        model checks its weights once (``GPT._inference_weights``), not at every product."""
        f32 = torch.float32
        return (w.dtype == f32 and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous()
                and (b is None or (b.dtype == f32 and b.device.type == "cpu" and b.dim() == 1
                                   and b.shape[0] == w.shape[0] and b.is_contiguous())))

    @staticmethod
    def accepts_row(x: torch.Tensor, cols: int) -> bool:
        """The input's half of ``accepts``, checked at every product: one contiguous fp32 CPU
        row of ``cols`` values, outside autograd."""
        return (x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] == 1
                and x.shape[1] == cols and x.is_contiguous() and x.device.type == "cpu"
                and not x.requires_grad)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.accepts(x, w, b):
            raise ValueError(f"CpuGemv takes one contiguous fp32 CPU row against a contiguous "
                             f"(out, in) weight; got x {tuple(x.shape)} {x.dtype}, w "
                             f"{tuple(w.shape)} {w.dtype}")
        return self.multiply(x, w, b)

    def multiply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The product, unchecked: only after ``accepts(x, w, b)`` said yes."""
        rows, cols = w.shape
        y = torch.empty((1, rows), dtype=torch.float32)
        self._fn(w.data_ptr(), x.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                 rows, cols, torch.get_num_threads())
        return y

    def attend_rows(self, q: torch.Tensor, kv, layer: int, slots: torch.Tensor | None,
                    lengths: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Decode attention (one query per row) over layer ``layer`` of ``kv`` (a
        ``model.kv_cache.KVCache``): row r of ``q`` (R, C) reads slot ``slots[r]`` (None: slot
        r) and that slot's first ``lengths[slot]`` keys (None: ``length`` each); returns (R, C),
        or None where the inputs do not suit it (``rows_readable`` and ``row_queries``)."""
        if not (self.rows_readable(kv, q.shape[0], slots, lengths, length)
                and self.row_queries(q, kv, layer)):
            return None
        return self.attend_checked(q, kv, layer, slots, lengths, length)

    @staticmethod
    def rows_readable(kv, rows: int, slots: torch.Tensor | None, lengths: torch.Tensor | None,
                      length: int) -> bool:
        """The step's half of ``attend_rows``' checks (the same for every layer: a model checks
        them once a step): an fp32 CPU cache, int64 index tensors whose values the cache holds."""
        d = kv.data
        if not (d.dtype == torch.float32 and d.device.type == "cpu" and d.is_contiguous()
                and 1 <= length <= kv.max_len):
            return False
        width = rows if slots is None else slots.shape[0]
        for index, top, size in ((slots, kv.n_slots + 1, rows), (lengths, kv.max_len + 1, None)):
            if index is None:
                continue
            if not (index.dtype == torch.int64 and index.device.type == "cpu"
                    and index.dim() == 1 and index.is_contiguous()
                    and (size is None or index.shape[0] == size)):
                return False
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < top):
                return False
        return lengths is None or (
            lengths.shape[0] >= (width if slots is None else int(slots.max()) + 1)
            and int(lengths.min()) >= 1)

    @staticmethod
    def row_queries(q: torch.Tensor, kv, layer: int) -> bool:
        """The layer's half: fp32 CPU query rows of the cache's width with unit stride."""
        return (q.dtype == torch.float32 and q.device.type == "cpu" and q.dim() == 2
                and q.stride(1) == 1 and q.shape[1] == kv.n_embd and 0 <= layer < kv.n_layer
                and not q.requires_grad)

    def attend_checked(self, q: torch.Tensor, kv, layer: int, slots: torch.Tensor | None,
                       lengths: torch.Tensor | None, length: int) -> torch.Tensor:
        """``attend_rows`` after both its checks said yes."""
        rows, C = q.shape
        out = torch.empty((rows, C), dtype=torch.float32)
        threads = torch.get_num_threads()
        scratch = torch.empty(threads * kv.max_len, dtype=torch.float32)
        self._attend(q.data_ptr(), q.stride(0), kv.data[layer].data_ptr(), kv.max_len,
                     None if slots is None else slots.data_ptr(),
                     None if lengths is None else lengths.data_ptr(), length, rows, C, kv.n_head,
                     out.data_ptr(), scratch.data_ptr(), threads)
        return out

    def one_token(self, wte: torch.Tensor, wpe: torch.Tensor, ln_f: torch.Tensor,
                  ln_f_bias: torch.Tensor | None,
                  layers: tuple[tuple[torch.Tensor | None, ...], ...], n_head: int,
                  gelu_tanh: bool) -> OneTokenForward | None:
        """The whole network for one decode token in one call (``OneTokenForward``), over these
        weights (a GPT's, as ``GPT._inference_weights`` gathers them: per layer ln_1 weight and
        bias, c_attn weight and bias, attn c_proj, ln_2, c_fc, mlp c_proj), or None if any of them
        does not suit it (it reads raw memory: every shape, dtype and layout is checked here)."""
        V, C = wte.shape
        vectors = [ln_f, ln_f_bias] + [layer[j] for layer in layers for j in (0, 1, 6, 7)]
        mats = [(layer[j], layer[j + 1], shape) for layer in layers
                for j, shape in ((2, (3 * C, C)), (4, (C, C)), (8, (4 * C, C)), (10, (C, 4 * C)))]
        f32 = torch.float32
        ok = (C % n_head == 0 and self.accepts_weight(wte, None) and self.accepts_weight(wpe, None)
              and wpe.shape[1] == C
              and all(v is None or (v.dtype == f32 and v.device.type == "cpu"
                                    and v.shape == (C,) and v.is_contiguous()) for v in vectors)
              and ln_f is not None and all(layer[0] is not None and layer[6] is not None
                                          for layer in layers)
              and all(w is not None and self.accepts_weight(w, b) and w.shape == shape
                      for w, b, shape in mats))
        if not ok:
            return None
        return OneTokenForward(self._forward1, (wte, wpe, ln_f, ln_f_bias,
                                                *[t for layer in layers for t in layer]),
                               len(layers), n_head, gelu_tanh)


class OneTokenForward:
    """The logits of one decoding token, the whole network in one call of the kernel library
    (``gptserve_forward1_f32``: embedding, every block, the final LayerNorm and the tied LM head
    in one OpenMP parallel region, the token's keys and values written into its cache rows). The
    same arithmetic as ``GPT.forward_packed`` on one decode row, in another order (results agree
    to float rounding). Built by ``CpuGemv.one_token`` over checked weights; the cache is checked
    at each call (cheap: its dtype and geometry)."""

    def __init__(self, fn, tensors: tuple[torch.Tensor | None, ...], n_layer: int, n_head: int,
                 gelu_tanh: bool) -> None:
        self._fn = fn
        self._tensors = tensors  # keeps every weight alive while the pointers below are used
        self._pointers = (ctypes.c_void_p * len(tensors))(
            *(None if t is None else t.data_ptr() for t in tensors))
        self.vocab_size, self.n_embd = tensors[0].shape
        self.block_size = tensors[1].shape[0]
        self.n_layer, self.n_head, self.gelu_tanh = n_layer, n_head, int(gelu_tanh)

    def accepts_cache(self, kv) -> bool:
        """Whether ``kv`` (a ``model.kv_cache.KVCache``) is this network's fp32 CPU cache."""
        d = kv.data
        return (d.dtype == torch.float32 and d.device.type == "cpu" and d.is_contiguous()
                and kv.n_layer == self.n_layer and kv.n_head == self.n_head
                and kv.n_embd == self.n_embd and kv.max_len <= self.block_size)

    def __call__(self, token: int, position: int, slot: int, kv) -> torch.Tensor:
        """Logits (1, V) of ``token`` at ``position`` of the sequence in cache slot ``slot``
        (which reads its keys 0..position-1 and gets this token's at ``position``)."""
        if not (0 <= token < self.vocab_size and 0 <= position < kv.max_len
                and 0 <= slot <= kv.n_slots and self.accepts_cache(kv)):
            raise ValueError(f"one-token forward: token {token}, position {position}, slot "
                             f"{slot} out of range, or a cache it cannot read")
        C, row = self.n_embd, 2 * self.n_embd * kv.max_len  # floats of one slot's layer
        logits = torch.empty((1, self.vocab_size), dtype=torch.float32)
        scratch = torch.empty(10 * C + self.n_head * (position + 1), dtype=torch.float32)
        self._fn(self._pointers, self.n_layer, C, self.n_head, self.vocab_size, self.gelu_tanh,
                 kv.data.data_ptr() + slot * row * 4, (kv.n_slots + 1) * row, token, position,
                 scratch.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits


def kernel_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where built kernels are kept (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_VARIABLE):
        return Path(env[CACHE_VARIABLE])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "gptserve" / "kernels"


def _compiler(environ: Mapping[str, str]) -> str:
    for name in (environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name, path=environ.get("PATH"))):
            return path
    raise KernelUnavailable("no C compiler found (set CC, or install gcc)")


def _cpu_supported() -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"built for x86-64 Linux only (this is {sys.platform} "
                                f"{platform.machine()})")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise KernelUnavailable(f"needs AVX2 and FMA (this CPU: {capability})")


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux)."""
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps
                if any(n in line for n in ("libgomp", "libiomp", "libomp"))}


def library_path(directory: Path) -> Path:
    """The library's file in ``directory``: named by a hash of the source and the flags."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return directory / f"gemv-{key}.so"


def build(cache_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it."""
    env = os.environ if environ is None else environ
    _cpu_supported()
    directory = kernel_cache_dir(env) if cache_dir is None else cache_dir
    path = library_path(directory)
    if path.is_file():
        return path
    compiler = _compiler(env)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".gemv-", suffix=".so", dir=directory)
    except OSError as e:
        raise KernelUnavailable(f"cannot write the kernel cache {directory}: {e}") from e
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed ({done.returncode}): "
                                    f"{done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
        raise KernelUnavailable(f"{compiler} ran over 120 s") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_cpu_gemv(cache_dir: Path | None = None,
                  environ: Mapping[str, str] | None = None) -> CpuGemv:
    """The kernel, built if needed, loaded and checked against ``F.linear`` on odd shapes (so a
    bad build or a wrong OpenMP runtime is refused here, not found in a user's tokens)."""
    path = build(cache_dir, environ)
    before = _openmp_runtimes()
    try:
        kernel = CpuGemv(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError) as e:
        raise KernelUnavailable(f"cannot load {path}: {e}") from e
    after = _openmp_runtimes()
    if not before or after != before:
        raise KernelUnavailable(f"the kernel's OpenMP runtime is not torch's ({sorted(after)}): "
                                "two thread pools would fight for the cores")
    g = torch.Generator().manual_seed(0)
    for rows, cols, bias in ((37, 203, True), (64, 768, False), (5, 16, True)):
        x = torch.randn(1, cols, generator=g)
        w = torch.randn(rows, cols, generator=g)
        b = torch.randn(rows, generator=g) if bias else None
        want = torch.nn.functional.linear(x.double(), w.double(),
                                          None if b is None else b.double())
        if not torch.allclose(kernel(x, w, b).double(), want, rtol=1e-4, atol=1e-4):
            raise KernelUnavailable(f"{path} gave wrong products in its self-check")
    return kernel


def main(argv: list[str] | None = None) -> int:
    """Build (and check) the kernel into the cache: ``python -m model.cpu_gemv``."""
    import argparse

    p = argparse.ArgumentParser(description="Build gptserve's one-row CPU kernel into its cache.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where to put it (default: GPTSERVE_KERNEL_CACHE, else ~/.cache/...)")
    args = p.parse_args(argv)
    try:
        kernel = load_cpu_gemv(args.cache_dir)
    except KernelUnavailable as e:
        print(f"not built: {e}", file=sys.stderr)
        return 1
    print(kernel.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
