"""Engine configuration: validation, KV sizing from a memory budget, failure handling."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    request,
    tiny_checkpoint,
)

from service.engine import EngineConfig, FinishReason
from service.engine.kv_cache import bytes_per_slot, plan_slots


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(window_shift=0), "window_shift"),
    (dict(prefill_chunk=64, max_tokens_per_step=32), "max_tokens_per_step"),
    (dict(kv_memory=0), "kv_memory"),
    (dict(device="tpu"), "device"),
    (dict(dtype="int8"), "dtype"),
    (dict(max_queue=True), "max_queue"),
])
def test_bad_engine_config_is_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_kv_memory_budget_sets_the_slot_count():
    cfg = tiny_checkpoint().config
    per_slot = bytes_per_slot(cfg, torch.float32)
    assert per_slot == 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * 4
    assert plan_slots(cfg, torch.float32, 8, None) == 8
    assert plan_slots(cfg, torch.float32, 8, 3 * per_slot + 1) == 3
    assert plan_slots(cfg, torch.float32, 2, 100 * per_slot) == 2
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        plan_slots(cfg, torch.float32, 8, per_slot - 1)
    eng = engine(max_batch_size=8, kv_memory=3 * per_slot)
    assert eng.n_slots == 3 and eng._core.runner.kv.nbytes == 3 * per_slot


def test_window_shift_is_capped_at_half_the_block():
    assert engine(window_shift=1000).window_shift == 16  # block_size 32
    assert engine(window_shift=3).window_shift == 3


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    eng = engine(max_batch_size=2)
    real_decode = eng._core.runner.decode
    calls = {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_decode(seqs)

    eng._core.runner.decode = flaky
    eng.start()

    async def main():
        first = [o async for o in eng.add_request(request("a", "hello", max_tokens=10))]
        second = [o async for o in eng.add_request(request("b", "hello", max_tokens=5))]
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        eng.shutdown()
    assert first[-1].finish_reason is FinishReason.ERROR
    assert second[-1].finish_reason is FinishReason.LENGTH and len(second) == 5
    assert eng.stats().kv_cache_usage == 0.0
