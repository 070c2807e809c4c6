"""The GPT network: nanoGPT's architecture and parameter names, with an explicit KV cache.

References: karpathy/nanoGPT model.py (names, init), OpenAI GPT-2 (pre-LayerNorm blocks, tied LM
head), Hugging Face GPT-2 (the parity oracle in tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig
from model.kv_cache import CacheBatch, KVCache


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

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        kv: KVCache | None = None,
        cache: CacheBatch | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            k_all, v_all = kv.update(layer, cache, k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), cache.mask)
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

    def forward(
        self, x: torch.Tensor, layer: int, kv: KVCache | None, cache: CacheBatch | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, kv, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT with parameter names ``transformer.{wte,wpe,h.i,ln_f}`` and a tied ``lm_head``.

    ``forward(idx, targets=None, kv_cache=None, positions=None, slots=None)``:
    - without a cache: the full causal forward used in training (``positions`` must be None);
    - with a cache: each token at ``positions[b, t]`` (absolute, < block_size; negative = padding)
      of row ``b`` bound to cache slot ``slots[b]`` (default: slot b). Its keys/values are written
      to the cache and it attends to that slot's cached keys at positions <= its own.
    Returns ``(logits, loss)``; without targets only the last position's logits are computed
    when ``last_only`` is True (generation), else all positions' logits.
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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        cache = None
        if kv_cache is None:
            if positions is not None or slots is not None:
                raise ValueError("positions and slots are only meaningful with a kv_cache")
            if T > self.config.block_size:
                raise ValueError(
                    f"cannot forward a sequence of {T} tokens, block_size is {self.config.block_size}"
                )
            pos_emb = self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, n_embd)
        else:
            if positions is None:
                positions = torch.arange(T, device=idx.device).expand(B, T)
            if positions.shape != idx.shape:
                raise ValueError(f"positions {tuple(positions.shape)} must match idx {(B, T)}")
            cache = kv_cache.prepare(positions, slots)
            pos_emb = self.transformer.wpe(positions.clamp(min=0))  # (B, T, n_embd)
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, kv_cache, cache)
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

    def estimate_flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token, PaLM appendix B convention: 6N + 12·L·H·Q·T."""
        cfg = self.config
        T = context or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
