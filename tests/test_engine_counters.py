"""The engine core's counts (service/engine/counters.py): a known workload gives the counts the
old per-token path gave, front-end aborts are not the core's to count, and a core process's
counts file is read by its front end."""

from __future__ import annotations

import pytest
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    request,
)

from service.engine.counters import AT, CoreCounters, counter, histogram
from service.engine.types import FinishReason


def _count(snapshot, name: str) -> int:
    counts, _ = histogram(snapshot, name)
    return int(sum(counts))


@pytest.mark.parametrize("n, m", [(1, 7), (5, 4), (3, 1)])
def test_n_requests_of_m_tokens_count_n_times_m_minus_1_inter_token_gaps(n, m):
    eng = engine(max_batch_size=2)  # some requests wait for a slot
    events = eng.run([request(f"r{i}", "hello", max_tokens=m) for i in range(n)])
    assert all(e[-1].finish_reason is FinishReason.LENGTH for e in events.values())
    got = eng.counters.snapshot()
    assert _count(got, "inter_token_latency") == n * (m - 1), "one gap between two tokens"
    for name in ("time_to_first_token", "e2e_latency", "queue_time"):
        assert _count(got, name) == n, f"{name}: one per finished choice"
    assert counter(got, "generation_tokens") == n * m
    assert counter(got, "prompt_tokens") == n * len("hello")
    steps = _count(got, "step_time")
    assert steps == eng._core.total_steps and steps >= m
    # every sequence of every step: m decode-or-prefill rows per request, and its prompt's
    # prefill step (its first token comes from it)
    _, batch_sum = histogram(got, "batch_size")
    assert batch_sum == n * m
    # the inter-token sum is each choice's first-to-last token time, as the gaps add up
    _, itl_sum = histogram(got, "inter_token_latency")
    _, ttft_sum = histogram(got, "time_to_first_token")
    _, e2e_sum = histogram(got, "e2e_latency")
    assert 0 <= itl_sum <= e2e_sum - ttft_sum + 1e-9


def test_a_front_ends_abort_is_not_counted_but_a_drains_is():
    eng = engine(max_batch_size=4)
    core = eng._core
    core.add_request(request("kept", "abc", max_tokens=1000))
    core.add_request(request("gone", "abc", max_tokens=1000))
    for _ in range(5):
        core.step()
    core.abort("gone")  # a stop string or a client gone: the API counts that end itself
    got = core.counters.snapshot()
    assert _count(got, "e2e_latency") == 0 and _count(got, "inter_token_latency") == 0
    core.abort_all(FinishReason.ABORT)  # a drain's deadline: the core ended it
    got = core.counters.snapshot()
    assert _count(got, "e2e_latency") == 1 and _count(got, "time_to_first_token") == 1
    assert _count(got, "inter_token_latency") == 5 - 1


def test_a_counts_file_reads_back_what_the_core_wrote_and_outlives_its_name(tmp_path):
    path = str(tmp_path / "core.counters")
    CoreCounters.create(path)
    writer, reader = CoreCounters.open(path, writable=True), CoreCounters.open(path)
    writer.add_step(0.003, 4, 10, 4, 0, 10, 6, 1)
    (tmp_path / "core.counters").unlink()  # a stopped core's folder is removed
    writer.add_step(0.2, 2, 0, 2, 3, 0, 0, 0)
    got = reader.snapshot()
    assert [counter(got, k) for k in ("prompt_tokens", "generation_tokens", "recomputed_tokens",
                                      "prefix_cache_queries", "prefix_cache_hits", "crops")] \
        == [10, 6, 3, 10, 6, 1]
    counts, total = histogram(got, "step_time")
    assert sum(counts) == 2 and total == pytest.approx(0.203)
    assert AT["prompt_tokens"] == 0
    with pytest.raises(ValueError):
        reader.array[0] = 1.0  # the front end's map is read-only
