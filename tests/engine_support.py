"""Tiny random checkpoints for the engine tests (CPU, fp32, built in milliseconds)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

from model import GPT, CharTokenizer, Checkpoint, GPTConfig
from service.engine import Engine, EngineConfig, Request, SamplingParams

CHARS = list(string.ascii_letters + string.digits + " .,;:!?\n")  # 70 characters


def tiny_checkpoint(block_size: int = 32, vocab_size: int = 72, seed: int = 0) -> Checkpoint:
    """A 2-layer, 32-wide char model with large position and token embeddings: its logits are
    peaked (greedy has clear winners, so rounding differences between the cached and the full
    forward cannot flip an argmax) and depend on position, so a wrong crop shows."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2,
                       n_embd=32, bias=True)
    model = GPT(config)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(30.0)
        model.transformer.wte.weight.mul_(10.0)  # tied with lm_head
    tokenizer = CharTokenizer(CHARS)  # 70 < vocab_size: the embedding rows 70, 71 are padding
    return Checkpoint(model.eval(), tokenizer, config, "gptserve", Path("tiny"), {"test": True})


def engine(checkpoint: Checkpoint | None = None, **config) -> Engine:
    """An engine on the CPU, or on ``GPTSERVE_TEST_DEVICE`` (e.g. ``cuda``: the oracle tests run
    there unchanged, in fp32, when a GPU machine runs them)."""
    device = os.environ.get("GPTSERVE_TEST_DEVICE")
    config.setdefault("device", device or "cpu")
    if device:
        config.setdefault("dtype", "float32")
    return Engine(checkpoint or tiny_checkpoint(), EngineConfig(**config))


def request(rid: str, prompt: list[int] | str, **params) -> Request:
    if isinstance(prompt, str):
        prompt = [CHARS.index(c) for c in prompt]
    return Request(rid, tuple(prompt), SamplingParams.create(**params))


def record_prefill_chunks(eng: Engine) -> list[tuple[int, int]]:
    """Spy on ``eng``'s packed forwards: the returned list fills with (start, tokens) of every
    chunk the model encodes."""
    encoded: list[tuple[int, int]] = []
    real = eng._core.runner.model.forward_packed

    def spy(batch, kv):
        encoded.extend((c.start, c.num_tokens) for c in batch.chunks)
        return real(batch, kv)

    eng._core.runner.model.forward_packed = spy
    return encoded


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(CHARS), (length,), generator=g).tolist()


class EosCharTokenizer(CharTokenizer):
    """A char tokenizer whose newline doubles as an end-of-text token (char models have none)."""

    @property
    def eot_id(self) -> int | None:
        return CHARS.index("\n")


def with_eos(checkpoint: Checkpoint) -> Checkpoint:
    return Checkpoint(checkpoint.model, EosCharTokenizer(CHARS), checkpoint.config,
                      checkpoint.source_format, checkpoint.path, checkpoint.provenance)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; on a busy 2-core CI machine, OpenMP's
    barriers make them many times slower with two (docs/BENCHMARKS.md, "A busy neighbour").
    Tests that need more threads set them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
