"""int8 weights for CPU inference: every matrix product's weight as int8 with one scale per output
channel, multiplied by fbgemm's dynamic-quantization GEMM.

Why fbgemm's dynamic int8 (``torch.ops.quantized.linear_dynamic``, what ``torch.ao``'s
``quantize_dynamic`` calls): on this project's AVX2 CPU it was the only int8 product PyTorch ships
that beats fp32 at both row counts (1.7-3.8x on GPT-2-small's shapes at one row, 2.5-3.9x at
32); gpt-fast's weight-only ``aten._weight_int8pack_mm`` ran 2-50x *slower* than fp32 here,
``torch._int_mm`` ~100x slower, and oneDNN's dynamic int8 lost to fbgemm at every shape (and to
fp32 at one row on a block's shapes) (``bench/int8.py``; docs/BENCHMARKS.md, "int8 weights").
Dynamic quantization also quantizes each product's input on the fly: one scale and zero point
for the whole input (every row of the step) in 7 bits (``reduce_range``: AVX2 without VNNI sums
u8 x s8 pairs in int16, which 8 bits could overflow), the int32 sums rescaled to fp32 with the
weight's per-channel scales, the bias added in fp32. So the results of a row depend slightly on
the other rows of its step: ``quantize_int8`` models are not batch invariant.

    q = quantize_int8(model)   # a new GPT for inference; ``model`` is left as it was
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.config import GPTConfig


def int8_supported() -> bool:
    """Whether this PyTorch build has fbgemm's int8 kernels (x86 CPU builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]``, q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def prepack(weight: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of ``weight`` (out, in) quantized per output channel, with its fp32
    ``bias``: the opaque object ``int8_linear`` multiplies by."""
    if not int8_supported():
        raise RuntimeError("int8 weights need PyTorch's fbgemm kernels (an x86 CPU build)")
    q, scale = quantize_weight(weight)
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch.ao's quantized tensors carry a deprecation notice
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"  # the packed object keeps its engine's kernels
    try:
        return torch.ops.quantized.linear_prepack(
            qweight, None if bias is None else bias.detach().float())
    finally:
        torch.backends.quantized.engine = engine


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """``x @ W.T + b`` for a ``prepack``-ed W: x (..., in) fp32 or bf16, result in x's dtype."""
    y = torch.ops.quantized.linear_dynamic(x.float(), packed, True)  # reduce_range: see above
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference with its weight (and bias) held only in ``prepack``-ed
    int8 form; no parameters, so ``.to(dtype)`` leaves it as it is."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = prepack(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_weight_bytes(config: GPTConfig) -> int:
    """Bytes one decode step reads in int8 form: every block's four matrices and the LM head
    (one byte a weight; the scales and biases are a rounding error)."""
    C = config.n_embd
    return config.n_layer * 12 * C * C + config.vocab_size * C
