"""Sampling is a pure, per-row function of (logits, params, seed, counter).

The engine's sampler (service/engine/sampler.py) composes these pieces; tests/test_sampling_oracle.py
checks it against the definitions, including greedy rows and penalties."""

from __future__ import annotations

import torch

from model.sampling import counter_uniforms, logits_to_probs, mask_padded_vocab, sample_from_probs


def _logits(B=4, V=50, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, V) * 3


def _seeds(*values):
    return torch.tensor(values, dtype=torch.long)


def sample(logits, temperature, seeds, counters, **filters):
    """A draw per row, composed as the engine's sampler does (temperature > 0)."""
    k = filters.get("top_k")
    probs = logits_to_probs(logits, temperature, **filters,
                            top_k_max=int(k.max()) if k is not None else None)
    return sample_from_probs(probs, counter_uniforms(seeds, counters))


def test_top_k_one_and_tiny_top_p_and_min_p_one_are_greedy():
    logits = _logits()
    seeds, counters = _seeds(0, 1, 2, 3), torch.zeros(4, dtype=torch.long)
    t = torch.ones(4)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, t, seeds, counters, top_k=torch.ones(4, dtype=torch.long)),
                       greedy)
    assert torch.equal(sample(logits, t, seeds, counters, top_p=torch.full((4,), 1e-6)), greedy)
    assert torch.equal(sample(logits, t, seeds, counters, min_p=torch.ones(4)), greedy)


def test_filters_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    t = torch.ones(1)
    p = logits_to_probs(logits, t, top_k=torch.tensor([2]), top_k_max=2)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, t, top_k=torch.tensor([2]))  # no bound given: whole vocabulary
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, t, top_p=torch.tensor([0.8]))  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, t, min_p=torch.tensor([0.2]))  # threshold 0.1 drops 0.05
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


def test_a_row_without_a_filter_is_untouched_by_its_neighbours_filter():
    logits = _logits(B=2, V=100)
    one = torch.ones(1)
    alone = logits_to_probs(logits[:1], one)
    both = logits_to_probs(logits, torch.ones(2), top_k=torch.tensor([0, 3]), top_k_max=3,
                           top_p=torch.tensor([1.0, 0.5]), min_p=torch.tensor([0.0, 0.1]))
    assert torch.equal(both[:1], alone), "a filter another row asked for changed row 0"


def test_padded_vocabulary_rows_are_never_sampled():
    logits = torch.zeros(2, 64)
    logits[:, 60:] = 50.0  # padded rows would dominate
    masked = mask_padded_vocab(logits, 60)
    for step in range(200):
        tokens = sample(masked, torch.full((2,), 2.0), _seeds(1, 2), torch.full((2,), step))
        assert int(tokens.max()) < 60
    assert int(masked.argmax(-1).max()) < 60


def test_seeded_rows_are_batch_invariant():
    logits = _logits(B=8, V=100)
    temps = torch.linspace(0.5, 1.5, 8)
    counters = torch.arange(8) * 3
    alone = [int(sample(logits[i : i + 1], temps[i : i + 1], _seeds(7), counters[i : i + 1],
                        top_p=torch.tensor([0.9]))) for i in range(8)]
    batched = sample(logits, temps, torch.full((8,), 7), counters,
                     top_p=torch.full((8,), 0.9)).tolist()
    assert alone == batched


def test_counter_uniforms_are_uniform_and_depend_on_seed_and_counter():
    n = 20000
    u = counter_uniforms(torch.full((n,), 12345), torch.arange(n))
    assert u.dtype == torch.float64 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0) / n
    assert torch.allclose(hist, torch.full((10,), 0.1), atol=0.01), f"histogram {hist}"
    v = counter_uniforms(torch.arange(n) * 7919 + 2**62, torch.zeros(n, dtype=torch.long))
    assert len(set(v.tolist())) == n, "different seeds gave equal draws"
    lag = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(lag)) < 0.03, f"consecutive draws correlate: {lag}"


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    for step in range(3000):
        counts[int(sample(logits, torch.ones(1), _seeds(0), torch.tensor([step])))] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03), f"frequencies {freq}"
