"""The GPT network: nanoGPT's architecture and parameter names, with an explicit KV cache.

References: karpathy/nanoGPT model.py (names, init), OpenAI GPT-2 (pre-LayerNorm blocks, tied LM
head), Hugging Face GPT-2 (the parity oracle in tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import decode_kernel, packed_attention
from model.config import GPTConfig
from model.cpu_gemv import CpuGemv, OneTokenForward
from model.huge_pages import HugePageArena, move_to_huge_pages
from model.kv_cache import KVCache, PackedBatch
from model.quantize import Int8Linear, int8_linear


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no ``bias=False`` before 2.1; nanoGPT)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full causal attention over ``x`` (B, T, C): training and the reference generator."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class _InferenceWeights:
    """Every parameter ``GPT.forward_packed`` reads, as plain tensors (views of the parameters)."""

    wte: torch.Tensor
    wpe: torch.Tensor
    layers: tuple[tuple[torch.Tensor | None, ...], ...]
    ln_f: torch.Tensor
    ln_f_bias: torch.Tensor | None
    gelu: str
    # oneDNN-prepacked copies of each layer's (c_attn, attn c_proj, c_fc, mlp c_proj) weights and
    # of the LM head, when ``GPT.prepack_cpu_weights`` asked for them; in an int8 model
    # (``GPT.quantize_int8``) their fbgemm-packed int8 forms (the only copy; the weights and
    # biases above are then None); None otherwise
    packed: tuple[tuple[torch.Tensor | torch.ScriptObject, ...], ...] | None = None
    lm_head_packed: torch.Tensor | torch.ScriptObject | None = None
    # whether a product of (one row, several rows) uses them
    packed_for: tuple[bool, bool] = (False, True)
    # the project's one-row kernel (``model.cpu_gemv``), when ``GPT.use_cpu_gemv`` set it: one-row
    # products then use it instead of the above
    gemv: CpuGemv | None = None
    # with it, the whole network for one decode token in one call (``CpuGemv.one_token``)
    one_token: OneTokenForward | None = None


def _linear(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
            packed: torch.Tensor | torch.ScriptObject | None, use: tuple[bool, bool],
            gemv: CpuGemv | None = None) -> torch.Tensor:
    """``F.linear``; or for one row the project's own kernel (``gemv``, ``model.cpu_gemv``: set
    only when every weight suits it, so only the row is checked here); or oneDNN's matmul over a
    prepacked weight when there is one and ``use`` says so for this row count (one row, several):
    which wins depends on the CPU, the width and the dtype, so the engine's warm-up measures them
    (figures: docs/BENCHMARKS.md, "One-row kernel and huge pages", "Where a step's time goes" and
    "Choices (measured)"); or, in an int8 model, fbgemm's int8 product over the packed int8
    weight and its bias (``model.quantize``)."""
    if gemv is not None and x.shape[0] == 1 and gemv.accepts_row(x, w.shape[1]):
        return gemv.multiply(x, w, b)
    if packed is not None and use[x.shape[0] > 1]:
        if isinstance(packed, torch.Tensor):
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return int8_linear(x, packed)
    return F.linear(x, w, b)


def _kernel_for(kernel: CpuGemv | None, layers: tuple[tuple[torch.Tensor | None, ...], ...],
                wte: torch.Tensor) -> CpuGemv | None:
    """``kernel`` if it can multiply by every weight of ``layers`` and the LM head ``wte`` (it
    reads raw memory: the weights are checked here, once, and only the row at each product), else
    None (another dtype or device, a non-contiguous weight, an int8 model's missing matrices)."""
    if kernel is None:
        return None
    pairs = [(layer[j], layer[j + 1]) for layer in layers for j in (2, 4, 8, 10)] + [(wte, None)]
    ok = all(w is not None and kernel.accepts_weight(w, b) for w, b in pairs)
    return kernel if ok else None


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``GPT.prepack_cpu_weights`` can reorder weights on this device and dtype: CPU with
    oneDNN, fp32, or bf16 where oneDNN has bf16 kernels."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu`` through PyTorch's own vectorised kernel. For a contiguous fp32 CPU tensor and
    exact (erf) GELU, PyTorch calls a oneDNN primitive instead, several times slower than the
    native kernel on a decode step's few rows (docs/BENCHMARKS.md, "Where a step's time goes");
    results differ by an ulp at most.

    The switch is PyTorch's process-wide oneDNN flag, turned off for this one call and back on
    only by the call that turned it off, so it is never left off; an op on another thread in
    that window may take its non-oneDNN path (the same math)."""
    if (approximate != "none" or x.device.type != "cpu" or torch.compiler.is_compiling()
            or not torch._C._get_mkldnn_enabled()):
        return F.gelu(x, approximate=approximate)  # compiled: Inductor writes its own GELU
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.gelu(x)
    finally:
        torch._C._set_mkldnn_enabled(True)


class GPT(nn.Module):
    """nanoGPT's GPT with parameter names ``transformer.{wte,wpe,h.i,ln_f}`` and a tied ``lm_head``.

    ``forward(idx, targets=None)`` is the full causal forward (training, the reference
    generator); ``forward_packed(batch, kv_cache)`` is the inference step: the tokens of many
    sequences packed into one batch, each at its own slot and position of the cache.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._weights: _InferenceWeights | None = None
        self._prepack = False  # see prepack_cpu_weights
        self._gemv: CpuGemv | None = None  # see use_cpu_gemv
        self._fuse_one_token = True  # see use_cpu_gemv
        self._prepack_rows = (False, True)
        self.quantization = "none"  # "int8" in the copies ``quantize_int8`` returns
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (GPT-2; nanoGPT)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual init, per the GPT-2 paper
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full causal forward over ``idx`` (B, T), T <= block_size: training and the
        reference generator. Returns ``(logits, loss)``; without targets and with ``last_only``
        only the last position's logits are computed (generation)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of {T} tokens, block_size is {self.config.block_size}"
            )
        pos_emb = self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, n_embd)
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
            return logits, loss
        if last_only:
            x = x[:, [-1], :]  # inference-time mini-optimisation (nanoGPT)
        return self.lm_head(x), None

    def forward_packed(self, batch: PackedBatch, kv_cache: KVCache) -> torch.Tensor:
        """One inference step over a packed batch (see ``model.kv_cache``): every token's keys
        and values are written to ``kv_cache``; returns the logits (R, V) of the batch's
        ``logit_rows`` only (the final LayerNorm and the LM head run on those rows alone).

        The same network as ``forward``, written with functional calls over the parameters
        (``_inference_weights``): at decode time a step is a few hundred small kernels, and
        module dispatch, attribute lookups and no-op dropouts would cost as much as the math.
        """
        w = self._inference_weights()
        if w.one_token is not None and batch.decode is not None and not batch.chunks and \
                batch.tokens.shape[0] == 1 and w.one_token.accepts_cache(kv_cache):
            slot, position = divmod(int(batch.write_index[0]), kv_cache.max_len)
            if slot != kv_cache.scratch_slot:  # (a padding row attends slot 0: see pack)
                return w.one_token(int(batch.tokens[0]), position, slot, kv_cache)
        C, eps = self.config.n_embd, 1e-5
        attend = decode_kernel(w.gemv, kv_cache, batch)
        x = F.embedding(batch.tokens, w.wte) + F.embedding(batch.positions, w.wpe)  # (N, C)
        for i, (ln1, ln1_b, attn, attn_b, proj, proj_b, ln2, ln2_b, fc, fc_b, fc2, fc2_b) in (
            enumerate(w.layers)
        ):
            p_attn, p_proj, p_fc, p_fc2 = (None,) * 4 if w.packed is None else w.packed[i]
            use, gemv = w.packed_for, w.gemv
            qkv = _linear(F.layer_norm(x, (C,), ln1, ln1_b, eps), attn, attn_b, p_attn, use, gemv)
            kv_cache.write(i, batch, qkv[:, C:])  # qkv: (N, 3C)
            x += _linear(packed_attention(qkv[:, :C], i, kv_cache, batch, attend), proj, proj_b,
                         p_proj, use, gemv)
            h = _linear(F.layer_norm(x, (C,), ln2, ln2_b, eps), fc, fc_b, p_fc, use, gemv)
            x += _linear(_gelu(h, w.gelu), fc2, fc2_b, p_fc2, use, gemv)
        if batch.logit_rows is not None:
            x = x.index_select(0, batch.logit_rows)  # (R, C)
        x = F.layer_norm(x, (C,), w.ln_f, w.ln_f_bias, eps)
        return _linear(x, w.wte, None, w.lm_head_packed, w.packed_for, w.gemv)

    def prepack_cpu_weights(self, on: bool = True, rows: tuple[bool, bool] = (False, True)
                            ) -> bool:
        """Have ``forward_packed`` multiply with oneDNN over weights reordered once into its
        blocked layout (a second copy of every matrix: the parameters stay as they are for
        ``forward``), for products of one row and/or of several (``rows``), or stop (``on=False``
        frees the copies; ``rows=(False, False)`` keeps them unused, for timing without a new
        reorder). CPU, fp32 or (where oneDNN has bf16 kernels) bf16 only; returns whether
        prepacked weights are now in use. The rows' results then depend on the row count (use
        it only when batch invariance is off). An int8 model has no fp32 matrices to reorder."""
        if self.quantization != "none":
            return False
        p = self.lm_head.weight
        on = on and can_prepack(p.device, p.dtype)
        if on != self._prepack:
            self._prepack, self._weights = on, None
        self._prepack_rows = rows
        if self._weights is not None:
            self._weights = replace(self._weights, packed_for=rows)
        return on and any(rows)

    def move_weights_to_huge_pages(self) -> HugePageArena | None:
        """Move the CPU parameters into one arena of 2 MiB pages (``model.huge_pages``: fewer TLB
        misses when a one-row step streams every weight); the values are unchanged."""
        arena = move_to_huge_pages(self)
        self._weights = None  # the gathered views point at the old storage
        return arena

    def use_cpu_gemv(self, kernel: CpuGemv | None, fused: bool = True) -> bool:
        """Make ``forward_packed`` multiply one-row products with ``kernel`` (``model.cpu_gemv``;
        None: stop) and, with ``fused``, run a step of one decode token as one call of it
        (``CpuGemv.one_token``). Contiguous fp32 CPU weights only (the kernel's one dtype; an
        int8 model has its own products): returns whether the kernel is now in use. Like
        prepacking, it makes a row's results depend on the step's row count (use it only when
        batch invariance is off)."""
        self._gemv, self._fuse_one_token = kernel, fused
        if self._weights is not None:
            w = self._weights
            gemv = _kernel_for(kernel, w.layers, w.wte)
            self._weights = replace(w, gemv=gemv, one_token=self._one_token(gemv, w))
        return self._inference_weights().gemv is not None

    def _one_token(self, gemv: CpuGemv | None, w: _InferenceWeights) -> OneTokenForward | None:
        if gemv is None or not self._fuse_one_token:
            return None
        return gemv.one_token(w.wte, w.wpe, w.ln_f, w.ln_f_bias, w.layers, self.config.n_head,
                              w.gelu == "tanh")

    def quantize_int8(self) -> GPT:
        """A copy for inference with every matrix product's weight in int8, one scale per output
        channel (``model.quantize``: fbgemm's dynamic int8 GEMM, fp32 in and out; bf16 after
        ``.to(torch.bfloat16)``). Both ``forward`` and ``forward_packed`` run on the int8
        weights. The embeddings and LayerNorms stay as they are, shared with this model, which
        is left unchanged; the LM head is quantized apart from the token embedding it is tied
        to (so the copy is for inference only). CPU weights in (any float dtype)."""
        with torch.device("meta"):  # the skeleton only: every tensor comes from this model
            q = GPT(self.config)
        q.load_state_dict(self.state_dict(), assign=True)
        for block in q.transformer.h:
            block.attn.c_attn = Int8Linear(block.attn.c_attn)
            block.attn.c_proj = Int8Linear(block.attn.c_proj)
            block.mlp.c_fc = Int8Linear(block.mlp.c_fc)
            block.mlp.c_proj = Int8Linear(block.mlp.c_proj)
        q.lm_head = Int8Linear(q.lm_head)
        q.quantization = "int8"
        return q.eval()

    def _inference_weights(self) -> _InferenceWeights:
        """The parameters as plain tensors, gathered once (again after ``.to()``/``.half()``)."""
        if self._weights is None:
            t = self.transformer
            bias = lambda m: None if m.bias is None else m.bias.detach()  # noqa: E731
            # an int8 model's products read only their packed form (its bias included)
            mat = lambda m: (None, None) if isinstance(m, Int8Linear) else (  # noqa: E731
                m.weight.detach(), bias(m))
            layers = tuple(
                (b.ln_1.weight.detach(), bias(b.ln_1), *mat(b.attn.c_attn), *mat(b.attn.c_proj),
                 b.ln_2.weight.detach(), bias(b.ln_2), *mat(b.mlp.c_fc), *mat(b.mlp.c_proj))
                for b in t.h
            )
            packed = lm_head_packed = None
            rows = self._prepack_rows
            if self.quantization == "int8":
                packed = tuple((b.attn.c_attn.packed, b.attn.c_proj.packed, b.mlp.c_fc.packed,
                                b.mlp.c_proj.packed) for b in t.h)
                lm_head_packed, rows = self.lm_head.packed, (True, True)
            elif self._prepack:
                pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 32)  # noqa: E731
                packed = tuple(tuple(pack(layer[j]) for j in (2, 4, 8, 10)) for layer in layers)
                lm_head_packed = pack(t.wte.weight.detach())
            w = _InferenceWeights(
                wte=t.wte.weight.detach(), wpe=t.wpe.weight.detach(), layers=layers,
                ln_f=t.ln_f.weight.detach(), ln_f_bias=bias(t.ln_f),
                gelu="tanh" if self.config.activation == "gelu_tanh" else "none",
                packed=packed, lm_head_packed=lm_head_packed, packed_for=rows,
                gemv=_kernel_for(self._gemv, layers, t.wte.weight),
            )
            self._weights = replace(w, one_token=self._one_token(w.gemv, w))
        return self._weights

    def _apply(self, fn, recurse: bool = True):
        self._weights = None  # .to(), .half(), .cuda() replace the parameter tensors
        return super()._apply(fn, recurse)

    def estimate_flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token, PaLM appendix B convention: 6N + 12·L·H·Q·T."""
        cfg = self.config
        T = context or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
