"""Prometheus metrics: the one module that imports ``prometheus_client``.

The engine reports data (``EngineStats`` after each step, ``RequestMetrics`` when a choice
finishes); ``Metrics`` turns them into series in its own ``CollectorRegistry``, built by the app
factory (no process-global registry, so several apps can live in one test process). Label values
come from small fixed sets (finish reasons, rejection reasons), never from request data.

The same registry carries the process (``process_*``: CPU, memory, open files against their limit)
and the HTTP edge (``gptserve_http_*``: open connections, their cap, and connections closed on a
transport limit), fed by ``service.transport``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.engine.types import EngineStats, RequestMetrics

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = (
    "queue_full",  # the engine's waiting queue is at its bound (503)
    "not_ready",  # loading or draining (503)
    "invalid",  # validation failed (400/404/413)
    "unauthorized",  # missing or wrong API key (401)
)
CLOSE_REASONS = (  # why the HTTP edge closed a client connection (service/transport)
    "header_too_large",  # request line + headers over --max-header-bytes (431)
    "too_many_headers",  # more than --max-headers fields (431)
    "header_timeout",  # headers not in within --header-timeout (408, or closed if silent)
    "body_timeout",  # body not in within --body-timeout (408)
    "malformed",  # bad HTTP framing: Content-Length, chunk sizes, request line (400)
    "evicted",  # idle, or slow with its headers or body: closed at --max-connections for a new one
    "pipeline_full",  # more than --max-pipelined requests queued: closed after answering them
)
_LATENCY = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_BATCH = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)


class Metrics:
    """Owns the registry and every ``gptserve_*`` series; fed by the engine and the API layer."""

    def __init__(self, multiprocess: bool = False) -> None:
        """``multiprocess``: one of several API-server processes (``--api-servers N``), every
        series kept in prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by
        ``python -m service`` before anything imports prometheus_client) and /metrics answering
        with all processes' sums, whichever process a scrape reaches. Gauges say how to combine:
        the engine's load and the live model are the same everywhere (the most recent value),
        open connections add up over the live processes. There are no ``process_*`` series then
        (prometheus_client cannot combine them)."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "gptserve_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "gptserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one choice.",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "gptserve_e2e_request_latency_seconds",
            "Time from arrival to the last token of a choice.",
            buckets=_LATENCY,
            registry=r,
        )
        self.queue_time = Histogram(
            "gptserve_request_queue_time_seconds",
            "Time a request waited before its first engine step.",
            buckets=_LATENCY,
            registry=r,
        )
        self.step_time = Histogram(
            "gptserve_engine_step_seconds",
            "Wall time of one engine step (prefill and/or decode).",
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "gptserve_batch_size", "Sequences in one engine step.", buckets=_BATCH, registry=r
        )
        self.prompt_tokens_hist = Histogram(
            "gptserve_request_prompt_tokens",
            "Prompt tokens per request.",
            buckets=_TOKENS,
            registry=r,
        )
        self.generation_tokens_hist = Histogram(
            "gptserve_request_generation_tokens",
            "Generated tokens per choice.",
            buckets=_TOKENS,
            registry=r,
        )
        self.running = Gauge(
            "gptserve_num_requests_running",
            "Sequences holding a KV slot (prefilling or decoding).",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.waiting = Gauge(
            "gptserve_num_requests_waiting", "Sequences queued for a KV slot.", registry=r,
            multiprocess_mode="mostrecent",
        )
        self.kv_usage = Gauge(
            "gptserve_kv_cache_usage_ratio", "Fraction of the KV cache in use (0..1).", registry=r,
            multiprocess_mode="mostrecent",
        )
        self.prompt_tokens = Counter(
            "gptserve_prompt_tokens",
            "Prompt tokens the engine encoded, once per choice (computed, or reused from the "
            "prefix cache: gptserve_prefix_cache_hits).",
            registry=r,
        )
        # vLLM's vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens, not requests)
        self.prefix_cache_queries = Counter(
            "gptserve_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "gptserve_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (reused, not computed).",
            registry=r,
        )
        self.recomputed_tokens = Counter(
            "gptserve_recomputed_tokens",
            "Window tokens re-encoded after a sliding-window crop (not prompt tokens).",
            registry=r,
        )
        self.generation_tokens = Counter(
            "gptserve_generation_tokens", "Tokens generated by the engine.", registry=r
        )
        self.success = Counter(
            "gptserve_request_success",
            "Finished choices by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "gptserve_request_rejected",
            "Requests refused before reaching the engine, by reason.",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "gptserve_client_disconnects",
            "Requests cancelled because the client went away.",
            registry=r,
        )
        self.crops = Counter(
            "gptserve_context_crops", "Sliding-window crops of a sequence's context.", registry=r
        )
        # Live checkpoint reload (service/reload.py): which checkpoint serves, and reload results.
        self.model_info = Gauge(
            "gptserve_model_info",
            "The live checkpoint (value 1) with its provenance: iteration and val loss.",
            ["checkpoint", "format", "iteration", "val_loss"],
            registry=r,
            multiprocess_mode="max",
        )
        self.model_loaded = Gauge(
            "gptserve_model_loaded_timestamp_seconds",
            "Unix time the live checkpoint started serving.",
            registry=r,
            multiprocess_mode="max",
        )
        self.reloads = Counter(
            "gptserve_model_reloads", "Checkpoint reloads by result.", ["result"], registry=r
        )
        for result in ("success", "failed"):
            self.reloads.labels(result=result)
        for reason in FINISH_REASONS:  # export every label value from the start
            self.success.labels(finish_reason=reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self._add_edge_metrics()

    def _add_edge_metrics(self) -> None:
        """The process and the HTTP edge (connections), beside the engine's series."""
        r = self.registry
        if not self.multiprocess:  # process_cpu_seconds_total, process_open_fds, ... (Linux)
            ProcessCollector(registry=r)
        self.connections = Gauge(
            "gptserve_http_connections", "Open client connections.", registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_limit = Gauge(
            "gptserve_http_connections_limit",
            "The cap on open client connections in force (--max-connections, fitted to the "
            "open-file limit; summed over the API-server processes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "gptserve_http_connections_closed",
            "Client connections the server closed on a transport limit, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in CLOSE_REASONS:
            self.connections_closed.labels(reason=reason)

    def observe_step(self, stats: EngineStats) -> None:
        """Record one engine step (called from the engine thread; prometheus_client is
        thread-safe)."""
        self.step_time.observe(stats.step_time)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.recomputed_tokens.inc(stats.recomputed_tokens)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.generation_tokens.inc(stats.generation_tokens)
        self.crops.inc(stats.crops)
        self.set_load(stats)

    def set_load(self, stats: EngineStats) -> None:
        """Refresh the gauges from a stats snapshot (also done at every scrape)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)

    def observe_finished(
        self, finish_reason: str, metrics: RequestMetrics | None, num_generated: int
    ) -> None:
        """Record one finished choice."""
        self.success.labels(finish_reason=finish_reason).inc()
        self.generation_tokens_hist.observe(num_generated)
        if metrics is None:
            return
        self.queue_time.observe(metrics.queue_time)
        if metrics.time_to_first_token is not None:
            self.ttft.observe(metrics.time_to_first_token)
        observe_many(self.itl, metrics.inter_token_times)
        self.e2e.observe(metrics.e2e_latency)

    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens_hist.observe(num_tokens)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def disconnect(self) -> None:
        self.disconnects.inc()

    def set_model(
        self,
        checkpoint: str,
        source_format: str,
        iteration: int | None,
        val_loss: float | None,
        loaded_at: float,
    ) -> None:
        """Show which checkpoint is live: one ``gptserve_model_info`` series at a time."""
        if not self.multiprocess:  # (several front ends never reload: nothing to clear)
            self.model_info.clear()
        self.model_info.labels(
            checkpoint=checkpoint,
            format=source_format,
            iteration="" if iteration is None else str(iteration),
            val_loss="" if val_loss is None else f"{val_loss:.4f}",
        ).set(1)
        self.model_loaded.set(loaded_at)

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels(result="success" if ok else "failed").inc()

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason=reason).inc()

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # every API-server process's files, summed
        return generate_latest(registry)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every ``v``, with one update per bucket rather than one per
    value (a finished choice reports one inter-token gap per token: per value, the server spent
    more time in the histogram than in the token's text). prometheus_client has no bulk observe,
    so this adds to the buckets and the sum it keeps (``_upper_bounds``, ``_buckets``, ``_sum``;
    tests/test_metrics.py checks the result equals ``observe`` one value at a time)."""
    if not values:
        return
    counts: dict[int, int] = {}
    bounds = histogram._upper_bounds
    for value in values:
        i = bisect.bisect_left(bounds, value)  # the first bound >= value, as observe finds it
        counts[i] = counts.get(i, 0) + 1
    histogram._sum.inc(sum(values))
    for i, count in counts.items():
        histogram._buckets[i].inc(count)
