"""The one load generator for every HTTP server: OpenAI completions, streamed over SSE.

Each request sends token ids as the prompt, greedy, a fixed ``max_tokens``, with
``stream_options.include_usage`` so the server says how many tokens it generated. Every SSE event
that carries a choice is one token's arrival; the usage chunk gives the count. vLLM sends one event
per token, with empty text while a multi-byte character is incomplete; gptserve sends nothing for
such a token and the completed character with the next one, so with byte-level BPE (random
weights emit partial characters) a run can count a few events fewer than tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from peerbench.figures import Figures, pct


@dataclass
class Stream:
    """One request as the client saw it."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0  # from the usage chunk


@dataclass(frozen=True)
class Target:
    """Where to send requests. ``ignore_eos``: add vLLM's ``ignore_eos`` and ``min_tokens`` to
    each body (gptserve's API has no such fields and needs none: see ``models``)."""

    url: str
    model: str
    ignore_eos: bool = False


async def _complete(client: httpx.AsyncClient, target: Target, prompt: list[int],
                    new_tokens: int) -> Stream:
    body = {"model": target.model, "prompt": prompt, "max_tokens": new_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if target.ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": new_tokens}
    stream = Stream(sent=time.perf_counter())
    async with client.stream("POST", f"{target.url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"{target.url} answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            # parse JSON only where needed: both servers write compact JSON
            if '"choices":[]' in line or '"choices": []' in line:
                stream.tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                stream.arrivals.append(now)
    return stream


async def _burst(target: Target, prompts: list[list[int]],
                 new_tokens: int) -> tuple[list[Stream], float]:
    """All ``prompts`` sent at once; the streams and the time the first one was sent."""
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=0)
    timeout = httpx.Timeout(connect=30.0, read=900.0, write=30.0, pool=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(_complete(client, target, p, new_tokens) for p in prompts))
    return list(streams), start


def burst(target: Target, prompts: list[list[int]], new_tokens: int) -> Figures:
    """``len(prompts)`` concurrent streams: total tokens/s over the run, TTFT and inter-token
    latency percentiles (gaps between one stream's consecutive tokens, pooled over streams)."""
    streams, start = asyncio.run(_burst(target, prompts, new_tokens))
    end = max(s.arrivals[-1] for s in streams if s.arrivals)
    tokens = sum(s.tokens for s in streams)
    return _figures(streams, len(prompts), tokens / (end - start), new_tokens)


def sequential(target: Target, prompts: list[list[int]], new_tokens: int) -> Figures:
    """One stream at a time, one request per prompt: decode tokens/s without the first token,
    ``sum(tokens - 1) / sum(t_last - t_first)``, and the latencies."""
    streams = [asyncio.run(_burst(target, [p], new_tokens))[0][0] for p in prompts]
    decode_tokens = sum(s.tokens - 1 for s in streams)
    decode_time = sum(s.arrivals[-1] - s.arrivals[0] for s in streams if s.arrivals)
    rate = decode_tokens / decode_time if decode_time > 0 else float("nan")
    return _figures(streams, 1, rate, new_tokens, per_stream=len(prompts))


def _figures(streams: list[Stream], n: int, rate: float, new_tokens: int,
             per_stream: int = 1) -> Figures:
    events, tokens = sum(len(s.arrivals) for s in streams), sum(s.tokens for s in streams)
    if events != tokens:  # then the inter-token latencies span several tokens at places
        print(f"warning: {events} token events for {tokens} tokens", flush=True)
    ttft = [s.arrivals[0] - s.sent for s in streams if s.arrivals]
    itl = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    return Figures(n, rate, pct(ttft, 50), pct(ttft, 99), pct(itl, 50), pct(itl, 99),
                   tokens, n * per_stream * new_tokens)
