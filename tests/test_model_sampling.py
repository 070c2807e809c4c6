"""Sampling is a pure, per-row function of (logits, params, generator)."""

from __future__ import annotations

import torch

from model.sampling import logits_to_probs, mask_padded_vocab, sample, seeded_generator


def _logits(B=4, V=50, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, V) * 3


def test_temperature_zero_is_argmax():
    logits = _logits()
    out = sample(logits, torch.zeros(4), [None] * 4)
    assert torch.equal(out, logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_and_min_p_one_are_greedy():
    logits = _logits()
    gens = [seeded_generator(i) for i in range(4)]
    t = torch.ones(4)
    assert torch.equal(sample(logits, t, gens, top_k=torch.ones(4, dtype=torch.long)), logits.argmax(-1))
    assert torch.equal(sample(logits, t, gens, top_p=torch.full((4,), 1e-6)), logits.argmax(-1))
    assert torch.equal(sample(logits, t, gens, min_p=torch.ones(4)), logits.argmax(-1))


def test_filters_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    t = torch.ones(1)
    p = logits_to_probs(logits, t, top_k=torch.tensor([2]))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, t, top_p=torch.tensor([0.8]))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, t, min_p=torch.tensor([0.2]))  # threshold 0.1 drops 0.05
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_padded_vocabulary_rows_are_never_sampled():
    logits = torch.zeros(2, 64)
    logits[:, 60:] = 50.0  # padded rows would dominate
    masked = mask_padded_vocab(logits, 60)
    gens = [seeded_generator(s) for s in (1, 2)]
    for _ in range(200):
        tokens = sample(masked, torch.full((2,), 2.0), gens)
        assert int(tokens.max()) < 60
    assert int(masked.argmax(-1).max()) < 60


def test_seeded_rows_are_batch_invariant():
    logits = _logits(B=8, V=100)
    temps = torch.linspace(0.5, 1.5, 8)
    alone = [int(sample(logits[i : i + 1], temps[i : i + 1], [seeded_generator(7)],
                        top_p=torch.tensor([0.9]))) for i in range(8)]
    batched = sample(logits, temps, [seeded_generator(7) for _ in range(8)],
                     top_p=torch.full((8,), 0.9)).tolist()
    assert alone == batched


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = seeded_generator(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[int(sample(logits, torch.ones(1), [gen]))] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03), f"frequencies {freq}"
