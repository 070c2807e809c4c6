"""The persistent decode batch (``DecodeInputs``) is the batch ``KVCache.pack`` would build."""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    request,
)

from model import KVCache
from service.engine.input_batch import DecodeInputs


def _assert_same_batch(got, want, note: str) -> None:
    for name in ("tokens", "positions", "write_index"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{note}: {name} differ"
    assert got.logit_rows is None and want.logit_rows is None, f"{note}: logit rows"
    assert got.chunks == want.chunks == (), note
    g, w = got.decode, want.decode
    assert (g.width, g.length) == (w.width, w.length), note
    assert (g.slots is None) == (w.slots is None), f"{note}: slots {g.slots} vs {w.slots}"
    if g.slots is not None:
        assert torch.equal(g.slots, w.slots), f"{note}: slots differ"
    assert (g.mask is None) == (w.mask is None), f"{note}: mask {g.mask} vs {w.mask}"
    if g.mask is not None:
        assert torch.equal(g.mask, w.mask), f"{note}: masks differ"
    for a, b in ((g.keys, w.keys), (g.values, w.values)):
        assert (a.shape, a.stride(), a.data_ptr()) == (b.shape, b.stride(), b.data_ptr()), note


def test_the_persistent_batch_equals_a_fresh_pack_as_rows_join_advance_and_leave():
    kv = KVCache(n_layer=2, n_slots=6, n_head=2, max_len=16, head_dim=4)
    inputs = DecodeInputs(kv)
    # (tokens, positions) of slots 0..W-1 per step: rows advance, join (wider), leave (narrower,
    # stale columns left behind), restart at position 0 (a crop), and share one position (no mask)
    steps = [([5], [3]), ([7], [4]), ([7, 2, 9], [5, 0, 11]), ([1, 2, 3], [6, 1, 12]),
             ([4], [7]), ([4, 8], [8, 8]), ([0, 0, 0, 0, 0, 0], [9, 9, 9, 9, 9, 15]),
             ([3, 3], [0, 10])]
    for i, (tokens, positions) in enumerate(steps):
        want = kv.pack(list(zip(range(len(tokens)), positions, tokens, strict=True)))
        got = inputs.batch(tokens, positions)
        _assert_same_batch(got, want, f"step {i}")


def test_a_step_of_a_shape_seen_before_reuses_its_batch_and_reads_this_steps_inputs():
    kv = KVCache(n_layer=2, n_slots=4, n_head=2, max_len=16, head_dim=4)
    inputs = DecodeInputs(kv)
    inputs.MAX_BATCHES = 3  # the kept shapes overflow below: every batch is made again
    # shapes (width, keys read, masked) repeat with other tokens and positions: a reused batch
    # must show this step's, not the step's that made it
    steps = [([5], [3]), ([6], [3]), ([7, 2], [4, 4]), ([8, 3], [4, 4]), ([1, 2], [1, 4]),
             ([3, 4], [4, 2]), ([9], [3]), ([1, 1, 1], [5, 5, 5]), ([2], [7]), ([4], [3]),
             ([5, 6], [0, 4])]
    made = {}
    for i, (tokens, positions) in enumerate(steps):
        want = kv.pack(list(zip(range(len(tokens)), positions, tokens, strict=True)))
        got = inputs.batch(tokens, positions)
        _assert_same_batch(got, want, f"step {i}")
        shape = (len(tokens), max(positions) + 1, len(set(positions)) > 1)
        if i in (1, 3, 5):  # the shape of the step before: the same batch object
            assert got is made[shape], f"step {i}: shape {shape} was made again"
        made[shape] = got
    assert len(inputs._batches) <= inputs.MAX_BATCHES, "kept more shapes than allowed"


def test_a_batch_with_holes_equals_a_fresh_pack_and_reads_each_rows_own_slot():
    kv = KVCache(n_layer=2, n_slots=8, n_head=2, max_len=16, head_dim=4)
    inputs = DecodeInputs(kv)
    # (slots, tokens, positions) per step: holes open below the busy width (finished
    # sequences), close again, move, and alternate with steps whose row i is slot i; a shape
    # seen before is reused with this step's slots
    steps = [([0, 1, 2], [5, 6, 7], [3, 4, 5]), ([0, 2], [1, 2], [4, 6]),
             ([1, 2], [3, 4], [5, 7]), ([0, 1, 2], [1, 1, 1], [0, 6, 8]),
             ([0, 3, 7], [4, 5, 6], [2, 2, 2]), ([1, 5], [8, 9], [9, 15]),
             ([0, 4], [3, 3], [10, 1]), ([0, 2], [7, 7], [5, 7])]
    for i, (slots, tokens, positions) in enumerate(steps):
        want = kv.pack(list(zip(slots, positions, tokens, strict=True)))
        identity = slots == list(range(len(slots)))
        got = inputs.batch(tokens, positions, None if identity else slots)
        _assert_same_batch(got, want, f"step {i}")


def test_attention_over_a_batch_with_holes_matches_packing():
    torch.manual_seed(0)
    from model.config import GPTConfig
    from model.gpt import GPT

    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=8)
    model = GPT(config).eval()
    kv = KVCache.for_model(config, 6)
    kv.data.normal_()  # every slot holds keys and values already (earlier positions)
    inputs = DecodeInputs(kv)
    slots, tokens, positions = [0, 2, 5], [3, 9, 4], [7, 2, 11]
    with torch.inference_mode():
        want = model.forward_packed(kv.pack(list(zip(slots, positions, tokens, strict=True))), kv).clone()
        got = model.forward_packed(inputs.batch(tokens, positions, slots), kv)
    assert got.shape == (3, config.vocab_size)
    assert torch.equal(got, want)


@pytest.mark.parametrize("positions", [[16], [2, -1]])
def test_the_persistent_batch_refuses_a_position_outside_the_cache(positions):
    kv = KVCache(n_layer=1, n_slots=2, n_head=1, max_len=16, head_dim=4)
    with pytest.raises(ValueError, match="past the KV cache"):
        DecodeInputs(kv).batch([1] * len(positions), positions)


def _served(persistent: bool):
    """Every event of a mixed workload: staggered joins, finishes at different lengths (holes
    below the busy width), window crops (block 32), n=2 siblings, greedy and seeded sampling
    with logprobs; and how many steps ran on the persistent batch."""
    eng = engine(max_batch_size=4, threads=1)  # a fixed count: the rounding is the same
    runner = eng._core.runner
    used = []
    if persistent:
        real = runner.inputs.batch

        def spy(tokens, positions, slots=None):
            used.append((len(tokens), slots is not None))
            return real(tokens, positions, slots)

        runner.inputs.batch = spy
    else:
        runner.inputs = None
    requests = [
        request("a", prompt_of(5, 1), max_tokens=40, temperature=0.0, logprobs=2),
        request("b", prompt_of(12, 2), max_tokens=7, temperature=0.0),
        request("c", prompt_of(3, 3), max_tokens=30, temperature=0.9, seed=4, logprobs=1),
        request("d", prompt_of(30, 4), max_tokens=12, temperature=0.0, n=2),
        request("e", prompt_of(8, 5), max_tokens=25, temperature=0.7, top_k=5, seed=6),
    ]
    events = eng.run(requests, arrival_steps=[0, 0, 3, 6, 20])
    return {rid: [(o.index, o.token_id, o.logprob, o.top_logprobs, o.finish_reason, o.crops)
                  for o in outs] for rid, outs in events.items()}, used


def test_an_engine_on_the_persistent_batch_serves_what_packing_every_step_serves():
    want, _ = _served(persistent=False)
    got, used = _served(persistent=True)
    assert got == want, "the persistent decode batch changed what the engine served"
    assert len(used) > 20 and len({rows for rows, _ in used}) > 1, (
        f"persistent batch rows per step: {used}")
    assert any(holes for _, holes in used), f"no step with holes below its width: {used}"
    assert any(o[5] for outs in want.values() for o in outs), "no window crop was exercised"


def test_the_persistent_mask_follows_rows_that_advance_jump_restart_idle_and_leave_holes():
    kv = KVCache(n_layer=1, n_slots=8, n_head=1, max_len=32, head_dim=4)
    inputs = DecodeInputs(kv)
    g = torch.Generator().manual_seed(0)
    positions = [0] * 8
    for step in range(200):
        width = int(torch.randint(1, 9, (1,), generator=g))
        for s in range(width):
            move = int(torch.randint(0, 10, (1,), generator=g))
            # mostly one key a step; sometimes a new sequence or a crop (back to a low
            # position) or a jump (a row that decoded while the mask was not built)
            positions[s] = (int(torch.randint(0, 32, (1,), generator=g)) if move == 0
                            else min(31, positions[s] + (1 if move > 1 else 7)))
        # every other step, some slots below the last have no row (holes)
        slots = [s for s in range(width) if s == width - 1 or step % 2 or
                 int(torch.randint(0, 3, (1,), generator=g))]
        tokens = [step % 5] * len(slots)
        rows = [positions[s] for s in slots]
        want = kv.pack(list(zip(slots, rows, tokens, strict=True)))
        got = inputs.batch(tokens, rows, None if len(slots) == width else slots)
        _assert_same_batch(got, want, f"step {step}")
