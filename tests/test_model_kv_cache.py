"""The packed cached forward (the engine's fast path) must equal the full causal forward."""

from __future__ import annotations

import random

import pytest
import torch

from model import GPT, GPTConfig, KVCache
from model.cpu_gemv import KernelUnavailable, load_cpu_gemv


def _tiny(bias: bool = True, n_layer: int = 2) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=53, n_layer=n_layer, n_head=2, n_embd=16, bias=bias)
    return GPT(cfg).eval()


def _full_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return logits[0]  # (T, V)


def _run_packed(model, seqs, slots, chunk, n_slots, *, fixed: bool = False, seed: int = 0):
    """Feed each sequence into its slot through packed steps that mix decode rows (a sequence
    with one token left) and prefill chunks of up to ``chunk`` tokens; returns each sequence's
    logits at every position, in the order the steps produced them."""
    rng = random.Random(seed)
    cache = KVCache.for_model(model.config, n_slots)
    done = [0] * len(seqs)
    got: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        decode, chunks, owners = [], [], []
        for i in sorted(range(len(seqs)), key=lambda i: slots[i]):
            left = len(seqs[i]) - done[i]
            if left == 1:
                decode.append((slots[i], done[i], seqs[i][done[i]]))
                owners.append(("d", i))
        for i in rng.sample(range(len(seqs)), len(seqs)):  # chunk order does not matter
            left = len(seqs[i]) - done[i]
            if left > 1:
                take = min(chunk, left - 1) if rng.random() < 0.5 else min(chunk, left)
                toks = seqs[i][done[i] : done[i] + take]
                chunks.append((slots[i], done[i], toks, True))
                owners.append(("c", i, take))
        batch = cache.pack(
            decode, chunks,
            decode_width=n_slots if fixed and decode else None,
            decode_length=model.config.block_size if fixed and decode else None,
        )
        with torch.no_grad():
            logits = model.forward_packed(batch, cache)
        if fixed and decode and not chunks:  # fixed shapes: logits of every slot, row i = slot i
            logits = logits[[slot for slot, _, _ in decode]]
        assert logits.shape[0] == len(owners)
        for row, owner in zip(logits, owners, strict=True):
            i = owner[1]
            take = 1 if owner[0] == "d" else owner[2]
            done[i] += take
            got[i][done[i] - 1] = row
    return got


@pytest.mark.parametrize("chunk", [1, 3, 32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fixed", [False, True], ids=["tight", "fixed-shape"])
@pytest.mark.parametrize("prepack", ["mkl", "onednn-prepacked", "kernel"])
def test_packed_forward_equals_full_forward_for_ragged_mixed_steps(chunk, bias, fixed, prepack):
    model = _tiny(bias)
    if prepack == "onednn-prepacked" and not model.prepack_cpu_weights(True, (True, True)):
        pytest.skip("no oneDNN in this torch build")  # (one row and several)
    if prepack == "kernel":  # the project's one-row kernel for every one-row product
        try:
            model.use_cpu_gemv(load_cpu_gemv())
        except KernelUnavailable as e:
            pytest.skip(f"the one-row kernel is not built here: {e}")
    g = torch.Generator().manual_seed(1)
    lengths = [32, 17, 5, 1, 9]
    seqs = [torch.randint(0, 53, (n,), generator=g).tolist() for n in lengths]
    slots = [4, 0, 2, 1, 5]  # arbitrary slots, with a gap (slot 3 is free)
    got = _run_packed(model, seqs, slots, chunk, n_slots=6, fixed=fixed)
    for i, tokens in enumerate(seqs):
        want = _full_logits(model, tokens)
        for pos, row in got[i].items():
            err = (row - want[pos]).abs().max().item()
            assert err < 1e-5, f"seq {i} (slot {slots[i]}) position {pos}: |packed - full| = {err}"


def test_decode_rows_in_slot_order_from_zero_take_the_no_scatter_path():
    model = _tiny()
    cache = KVCache.for_model(model.config, 3)
    prompts = [[1, 2, 3], [4, 5], [6]]
    with torch.no_grad():
        model.forward_packed(
            cache.pack([], [(s, 0, p[:-1], False) for s, p in enumerate(prompts) if len(p) > 1]),
            cache,
        )
        batch = cache.pack([(s, len(p) - 1, p[-1]) for s, p in enumerate(prompts)])
        assert batch.decode.slots is None and batch.logit_rows is None
        logits = model.forward_packed(batch, cache)
    for s, p in enumerate(prompts):
        assert torch.allclose(logits[s], _full_logits(model, p)[-1], atol=1e-5), f"slot {s}"


def test_position_past_cache_is_rejected():
    model = _tiny()
    cache = KVCache.for_model(model.config, 1)
    with pytest.raises(ValueError, match="past the KV cache"):
        cache.pack([(0, 32, 0)])
    with pytest.raises(ValueError, match="past the KV cache"):
        cache.pack([], [(0, 30, [1, 2, 3], True)])


def test_decode_slots_must_be_distinct_and_increasing():
    cache = KVCache.for_model(_tiny().config, 4)
    with pytest.raises(ValueError, match="distinct and increasing"):
        cache.pack([(2, 0, 1), (1, 0, 1)])


def test_full_forward_rejects_sequences_longer_than_block_size():
    model = _tiny()
    with pytest.raises(ValueError, match="block_size is 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_the_one_row_kernel_is_set_and_dropped_and_refused_outside_fp32():
    model = _tiny()
    try:
        kernel = load_cpu_gemv()
    except KernelUnavailable as e:
        pytest.skip(f"the one-row kernel is not built here: {e}")
    assert model.use_cpu_gemv(kernel) and model._inference_weights().gemv is kernel
    assert not model.use_cpu_gemv(None) and model._inference_weights().gemv is None
    assert not model.to(torch.float64).use_cpu_gemv(kernel), "fp32 only"
    assert not _tiny().quantize_int8().use_cpu_gemv(kernel), "an int8 model has its own products"


def test_prepacked_weights_are_dropped_on_request_and_after_a_move():
    model = _tiny()
    if not model.prepack_cpu_weights():
        pytest.skip("no oneDNN in this torch build")
    packed = model._inference_weights().packed
    assert packed is not None
    # unused for every row count, for timing: the same copies stay (no second reorder)
    assert not model.prepack_cpu_weights(True, (False, False))
    assert model._inference_weights().packed is packed
    assert model._inference_weights().packed_for == (False, False)
    assert not model.prepack_cpu_weights(False) and model._inference_weights().packed is None
    assert not model.to(torch.float64).prepack_cpu_weights(), "fp32 only"


def test_decode_rows_reading_the_same_keys_attend_without_a_mask():
    model = _tiny()
    cache = KVCache.for_model(model.config, 3)
    prompts = {0: [1, 2, 3, 4], 1: [5, 6, 7, 8], 2: [9, 10]}
    with torch.no_grad():
        model.forward_packed(cache.pack([], [(s, 0, p[:-1], False) for s, p in prompts.items()]),
                             cache)
        alone = cache.pack([(0, 3, 4)])
        same = cache.pack([(0, 3, 4), (1, 3, 8)])
        ragged = cache.pack([(0, 3, 4), (1, 3, 8), (2, 1, 10)])
        assert alone.decode.mask is None and same.decode.mask is None
        assert ragged.decode.mask is not None and ragged.decode.mask.shape == (3, 1, 1, 4)
        for batch, slots in ((same, [0, 1]), (ragged, [0, 1, 2])):
            logits = model.forward_packed(batch, cache)
            for row, s in enumerate(slots):
                want = _full_logits(model, prompts[s])[-1]
                assert torch.allclose(logits[row], want, atol=1e-5), f"slot {s}"


@pytest.mark.parametrize("mkldnn", [True, False])
def test_exact_gelu_takes_the_native_kernel_and_leaves_onednn_as_it_was(mkldnn):
    from model.gpt import _gelu

    x = torch.randn(3, 64) * 4
    want = torch.nn.functional.gelu(x.double()).float()
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(mkldnn)
    try:
        got = _gelu(x, "none")
        assert torch._C._get_mkldnn_enabled() is mkldnn
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.equal(_gelu(x, "tanh"), torch.nn.functional.gelu(x, approximate="tanh"))
    finally:
        torch._C._set_mkldnn_enabled(before)


def test_bf16_prepacked_weights_give_the_plain_bf16_logits_at_one_row_and_several():
    model = _tiny().to(torch.bfloat16)
    supported = torch.backends.mkldnn.is_available() and (
        torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert model.prepack_cpu_weights(True, (True, True)) is supported
    cache = KVCache.for_model(model.config, 3, dtype=torch.bfloat16)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    with torch.no_grad():
        model.forward_packed(cache.pack([], [(s, 0, p[:-1], False) for s, p in enumerate(prompts)]),
                             cache)
        steps = [cache.pack([(0, 4, 5)]), cache.pack([(s, len(p) - 1, p[-1])
                                                     for s, p in enumerate(prompts)])]
        packed = [model.forward_packed(b, cache).float() for b in steps]
        assert (model._inference_weights().packed is not None) is supported
        model.prepack_cpu_weights(False)
        plain = [model.forward_packed(b, cache).float() for b in steps]
    for got, want in zip(packed, plain, strict=True):
        assert torch.allclose(got, want, atol=0.05, rtol=0.05), (got - want).abs().max()
