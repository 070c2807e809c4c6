"""The cached forward (the engine's fast path) must equal the full causal forward."""

from __future__ import annotations

import pytest
import torch

from model import GPT, GPTConfig, KVCache


def _tiny(bias: bool = True) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=53, n_layer=2, n_head=2, n_embd=16, bias=bias)
    return GPT(cfg).eval()


def _feed_in_chunks(model, idx, lengths, chunk, slots=None, n_slots=None):
    """Feed each row its own tokens `chunk` at a time, right-padded with position -1."""
    B = idx.size(0)
    cache = KVCache.for_model(model.config, n_slots or B)
    outs = [[] for _ in range(B)]
    done = [0] * B
    while any(done[b] < lengths[b] for b in range(B)):
        take = [min(chunk, lengths[b] - done[b]) for b in range(B)]
        T = max(take)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), -1)
        for b in range(B):
            ids[b, : take[b]] = idx[b, done[b] : done[b] + take[b]]
            pos[b, : take[b]] = torch.arange(done[b], done[b] + take[b])
        with torch.no_grad():
            logits, _ = model(ids, kv_cache=cache, positions=pos, slots=slots)
        for b in range(B):
            outs[b].append(logits[b, : take[b]])
            done[b] += take[b]
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("chunk", [1, 3, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_cached_forward_equals_full_forward_for_ragged_batch(chunk, bias):
    model = _tiny(bias)
    lengths = [32, 17, 5, 1]
    idx = torch.randint(0, 53, (4, 32))
    got = _feed_in_chunks(model, idx, lengths, chunk)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            want, _ = model(idx[b : b + 1, :n])
        err = (got[b] - want[0]).abs().max().item()
        assert err < 1e-5, f"row {b} (len {n}, chunk {chunk}): max |cached - full| = {err}"


def test_rows_bound_to_arbitrary_slots_do_not_interfere():
    model = _tiny()
    idx = torch.randint(0, 53, (2, 12))
    slots = torch.tensor([4, 1])
    got = _feed_in_chunks(model, idx, [12, 9], 4, slots=slots, n_slots=6)
    for b, n in enumerate([12, 9]):
        with torch.no_grad():
            want, _ = model(idx[b : b + 1, :n])
        assert torch.allclose(got[b], want[0], atol=1e-5), f"row {b} in slot {int(slots[b])} differs"


def test_position_past_cache_is_rejected():
    model = _tiny()
    cache = KVCache.for_model(model.config, 1)
    with pytest.raises(ValueError, match="past the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache, positions=torch.tensor([[32]]))


def test_full_forward_rejects_sequences_longer_than_block_size():
    model = _tiny()
    with pytest.raises(ValueError, match="block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
