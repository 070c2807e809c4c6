"""model/huge_pages.py: a model's CPU weights moved into one 2 MiB-aligned arena marked for huge
pages, with the same values, the same ties, and the arena really marked."""

from __future__ import annotations

import sys

import pytest
import torch

from model import GPT, GPTConfig
from model.huge_pages import HUGE_PAGE, huge_page_zeros, mapping_fields, move_to_huge_pages
from model.kv_cache import KVCache

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages: Linux")


def _model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=128, bias=True)
    return GPT(cfg).eval()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` (``hg``: marked MADV_HUGEPAGE)."""
    fields = mapping_fields(address)
    assert fields, f"no mapping holds {address:#x}"
    return fields["VmFlags"].split()


def test_moved_weights_give_the_same_logits_and_keep_the_tie():
    model = _model()
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(tokens)
        before = {n: p.clone() for n, p in model.named_parameters()}
        arena = model.move_weights_to_huge_pages()
        got, _ = model(tokens)
    assert arena is not None
    assert torch.equal(got, want), "moving the weights changed the logits"
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
    assert model.lm_head.weight is model.transformer.wte.weight, "the LM head lost its tie"


def test_every_parameter_lives_in_the_arena_aligned_and_the_arena_is_marked_for_huge_pages():
    model = _model()
    arena = move_to_huge_pages(model)
    assert arena.address % HUGE_PAGE == 0 and arena.size % HUGE_PAGE == 0
    params = list(model.parameters())
    assert arena.moved == sum(p.numel() * p.element_size() for p in params)
    for p in params:
        start = p.data_ptr()
        assert arena.address <= start and start + p.numel() * p.element_size() <= (
            arena.address + arena.size), "a parameter outside the arena"
        assert start % 64 == 0, "a parameter not on a cache line"
    assert "hg" in _vm_flags(arena.address), "the arena is not marked MADV_HUGEPAGE"
    assert 0 <= arena.huge <= arena.size


def test_the_packed_forward_reads_the_moved_weights():
    """``_inference_weights`` caches views of the parameters: moving must drop them, or the
    forward would read the old storage (freed, or stale after a reload)."""
    model = _model()
    model._inference_weights()
    model.move_weights_to_huge_pages()
    w = model._inference_weights()
    assert w.wte.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert w.layers[0][2].data_ptr() == model.transformer.h[0].attn.c_attn.weight.data_ptr()


def test_a_model_without_cpu_parameters_is_left_alone():
    assert move_to_huge_pages(torch.nn.ReLU()) is None


def test_the_cpu_kv_cache_is_zeroed_and_marked_for_huge_pages():
    cache = KVCache(n_layer=2, n_slots=3, n_head=4, max_len=64, head_dim=32)
    assert cache.data.shape == (2, 4, 64, 2, 128) and cache.data.dtype == torch.float32
    assert not cache.data.any(), "a new cache must be zeros"
    assert cache.data.data_ptr() % HUGE_PAGE == 0
    assert "hg" in _vm_flags(cache.data.data_ptr()), "the cache is not marked MADV_HUGEPAGE"
    cache.data[1, 2, 3, 1, 5] = 7.0  # writable, and its own memory
    assert cache.data.sum().item() == 7.0


def test_huge_page_zeros_of_any_size_and_dtype():
    for shape, dtype in (((1,), torch.float32), ((3, 5, 7), torch.bfloat16), ((0, 4), torch.float16)):
        t = huge_page_zeros(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and not t.any()
