"""What one measurement of one system on one workload yields, whoever measured it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figures:
    """One round of one (system, workload).

    ``rate`` is the headline: with one stream, decode tokens/s with the first token's latency
    left out, ``(tokens - 1) / (t_last - t_first)``; with several, total tokens/s over the whole
    run (first request sent to last token received). Latencies are in seconds. In-process batch
    calls give no per-token timing: ``ttft_p50`` is the 1-token call, ``itl_p50`` the mean step,
    and the p99s are ``None``.
    """

    streams: int
    rate: float
    ttft_p50: float
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    tokens: int  # generated, as the system reported them
    expected: int  # streams x new tokens: anything else means a system stopped early

    @property
    def complete(self) -> bool:
        return self.tokens == self.expected


def pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]
