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

from model.kv_cache import KVCache
from service.engine import EngineConfig, FinishReason
from service.engine.memory import plan_slots


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(window_shift=0), "window_shift"),
    (dict(prefill_chunk=64, max_tokens_per_step=32), "max_tokens_per_step"),
    (dict(max_batch_size=64, max_tokens_per_step=64), "max_tokens_per_step"),
    (dict(max_request_sequences=0), "max_request_sequences"),
    (dict(kv_memory_fraction=1.5), "kv_memory_fraction"),
    (dict(batch_invariant="yes"), "batch_invariant"),
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
    cpu = torch.device("cpu")
    per_slot = KVCache.bytes_per_slot(cfg, torch.float32)
    assert per_slot == 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * 4
    plan = lambda batch, kv: plan_slots(  # noqa: E731
        cfg, torch.float32, EngineConfig(max_batch_size=batch, kv_memory=kv), cpu)
    assert plan(8, None) == 8
    assert plan(8, 3 * per_slot + 1) == 3
    assert plan(2, 100 * per_slot) == 2
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        plan(8, per_slot - 1)
    eng = engine(max_batch_size=8, kv_memory=3 * per_slot)
    assert eng.n_slots == 3 and eng._core.runner.kv.nbytes == 4 * per_slot  # + scratch slot


def test_a_kv_cache_larger_than_free_memory_is_refused_before_allocation(monkeypatch):
    from service.engine import memory

    cfg = tiny_checkpoint().config
    per_slot = KVCache.bytes_per_slot(cfg, torch.float32)
    packed = memory.prepacked_bytes(cfg, torch.float32, EngineConfig(device="cpu"),
                                    torch.device("cpu"))
    assert packed > 0, "an fp32 CPU engine plans room for its prepacked weights"
    bf16 = memory.prepacked_bytes(cfg, torch.bfloat16, EngineConfig(device="cpu"),
                                  torch.device("cpu"))
    assert bf16 == (packed // 2 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0)
    assert memory.prepacked_bytes(cfg, torch.float16, EngineConfig(device="cpu"),
                                  torch.device("cpu")) == 0
    free = (5 * per_slot + packed) / 0.9
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    with pytest.raises(ValueError, match="prepacked CPU weights.*--max-batch-size or --kv-memory"):
        engine(max_batch_size=8)
    assert engine(max_batch_size=3).n_slots == 3
    # the same free memory without the prepacked copy to plan for (batch invariance uses MKL)
    assert engine(max_batch_size=4, batch_invariant=True).n_slots == 4


def test_window_shift_is_capped_at_half_the_block_and_defaults_to_half():
    assert engine(window_shift=1000).window_shift == 16  # block_size 32
    assert engine(window_shift=3).window_shift == 3
    assert engine().window_shift == 16


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    eng = engine(max_batch_size=2)
    real_execute = eng._core.runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_execute(plan)

    eng._core.runner.execute = flaky
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
