"""The project's one-row CPU kernel (model/cpu_gemv.py): its products against float64, the checks
before each call, the cache it builds into, and the libraries it refuses to load."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from model import cpu_gemv
from model.cpu_gemv import KernelUnavailable, load_cpu_gemv


def _skip_unless_buildable() -> None:
    """Skip where the kernel is not meant to run (not x86-64 Linux with AVX2 and FMA, or no C
    compiler); anywhere else a refusal is a failure."""
    try:
        cpu_gemv._cpu_supported()
        cpu_gemv._compiler(os.environ)
    except KernelUnavailable as e:
        pytest.skip(f"the one-row kernel is not built here: {e}")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    _skip_unless_buildable()
    return load_cpu_gemv(tmp_path_factory.mktemp("kernels"))


def _want(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# every tail: rows % 4 (the 4-row blocks), cols % 16 and % 8 (the vector loops), tiny and wide
SHAPES = [(1, 1), (3, 7), (4, 8), (5, 16), (7, 24), (13, 33), (64, 768), (2304, 768),
          (768, 3072), (72, 32), (50257, 64)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_products_equal_float64_at_every_tail_and_thread_count(kernel, rows, cols, bias, threads):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(1, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    b = torch.randn(rows, generator=g) if bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (1, rows) and got.dtype == torch.float32
    err = (got.double() - _want(x, w, b)).abs().max().item()
    assert err < 1e-4 * max(1.0, cols ** 0.5), f"max error {err} at {rows}x{cols}"


def test_a_bias_is_added_once_and_only_where_given(kernel):
    x = torch.zeros(1, 16)
    w = torch.zeros(6, 16)
    b = torch.arange(6, dtype=torch.float32)
    assert kernel(x, w, b).tolist() == [b.tolist()]
    assert kernel(x, w, None).tolist() == [[0.0] * 6]


@pytest.mark.parametrize("case", ["two rows", "strided row", "float64", "bf16 weight",
                                  "short row", "transposed weight", "bias too short",
                                  "grad"])
def test_anything_but_one_contiguous_fp32_row_is_refused_before_the_kernel_reads_it(kernel, case):
    x, w, b = torch.randn(1, 32), torch.randn(8, 32), torch.randn(8)
    if case == "two rows":
        x = torch.randn(2, 32)
    elif case == "strided row":
        x = torch.randn(1, 64)[:, ::2]
    elif case == "float64":
        x = x.double()
    elif case == "bf16 weight":
        w = w.bfloat16()
    elif case == "short row":
        x = torch.randn(1, 31)
    elif case == "transposed weight":
        w = torch.randn(32, 8).t()
    elif case == "bias too short":
        b = torch.randn(7)
    elif case == "grad":
        x.requires_grad_(True)
    assert not kernel.accepts(x, w, b)
    with pytest.raises(ValueError, match="one contiguous fp32 CPU row"):
        kernel(x, w, b)


def test_the_kernel_runs_on_torchs_openmp_runtime_not_a_second_one(kernel):
    runtimes = cpu_gemv._openmp_runtimes()
    assert len(runtimes) == 1, f"OpenMP runtimes mapped: {sorted(runtimes)}"
    assert os.path.dirname(torch.__file__) in next(iter(runtimes)), runtimes


def test_a_cached_library_is_reused_without_a_compiler(kernel, tmp_path):
    built = cpu_gemv.build(tmp_path)
    mtime = built.stat().st_mtime_ns
    # no compiler on PATH now: the cached file is enough
    again = cpu_gemv.build(tmp_path, {"PATH": str(tmp_path / "nothing-here")})
    assert again == built and again.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [built.name], "temporary files left behind"


def test_no_compiler_and_a_failing_compiler_are_clear_reasons(tmp_path):
    _skip_unless_buildable()
    with pytest.raises(KernelUnavailable, match="no C compiler found"):
        cpu_gemv.build(tmp_path / "a", {"PATH": str(tmp_path / "nothing-here")})
    with pytest.raises(KernelUnavailable, match="failed"):
        cpu_gemv.build(tmp_path / "b", {"CC": shutil.which("false") or "/bin/false"})
    assert not any((tmp_path / "b").iterdir()), "a failed build left a file in the cache"


def _write_cached(cache, content: bytes | None = None, source: str | None = None) -> None:
    target = cpu_gemv.library_path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    if content is not None:
        target.write_bytes(content)
        return
    src = cache / "bad.c"
    src.write_text(source)
    subprocess.run([shutil.which("cc") or "gcc", *cpu_gemv.FLAGS, "-o", str(target), str(src)],
                   check=True)


def test_a_corrupt_cached_library_is_refused_not_loaded(kernel, tmp_path):
    _write_cached(tmp_path, content=b"\x7fELF not really a library" * 40)
    with pytest.raises(KernelUnavailable, match="cannot load"):
        load_cpu_gemv(tmp_path)


def test_a_cached_library_that_computes_wrong_products_is_refused(kernel, tmp_path):
    _write_cached(tmp_path, source=(
        "#include <stdint.h>\n"
        "void gptserve_gemv_f32(const float *W, const float *x, const float *b, float *y,\n"
        "                       int64_t rows, int64_t cols, int threads) {\n"
        "    for (int64_t r = 0; r < rows; r++) y[r] = 0.0f;\n"
        "}\n"
        "void gptserve_forward1_f32(void) {}\n"
        "void gptserve_attend_rows_f32(void) {}\n"))
    with pytest.raises(KernelUnavailable, match="wrong products"):
        load_cpu_gemv(tmp_path)


def test_the_cache_folder_follows_the_environment(tmp_path):
    assert cpu_gemv.kernel_cache_dir({"GPTSERVE_KERNEL_CACHE": str(tmp_path)}) == tmp_path
    assert cpu_gemv.kernel_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "gptserve" / "kernels")


def test_a_cache_folder_that_cannot_be_made_is_a_clear_reason(tmp_path):
    _skip_unless_buildable()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(KernelUnavailable, match="cannot write the kernel cache"):
        cpu_gemv.build(blocker / "kernels")
