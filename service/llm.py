"""Offline batch generation, like vLLM's ``LLM`` class: the engine in the caller's thread, no server.

    from service import LLM, SamplingParams
    llm = LLM("weights/shakespeare-char")
    for result in llm.generate(["ROMEO:", "JULIET:"], SamplingParams(max_tokens=64, seed=0)):
        print(result.outputs[0].text)

``generate`` takes every prompt at once and runs the same engine the server runs (continuous
batching, KV cache, sliding window), stepping it on the calling thread until every choice is
done. Text goes through the server's own path (``service.text`` and ``service.choices``), so a
request gives the same tokens and text offline as over HTTP; stop strings end a choice and free
its slot at once. There is no queue limit: a batch job may hand over any number of prompts, and
they are admitted as slots free up.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import Checkpoint, load_checkpoint
from service.choices import Job, TokenEntry
from service.engine import Engine, EngineConfig, InvalidRequestError, Request, SamplingParams
from service.text import encode_text


@dataclass(frozen=True)
class Completion:
    """One choice: its text, token ids, why it ended, and its log-probabilities when asked."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    cumulative_logprob: float | None
    logprobs: tuple[TokenEntry, ...] | None  # per released token, when params.logprobs is set


@dataclass(frozen=True)
class GenerationResult:
    """The choices generated for one prompt (``n`` of them), in choice order."""

    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[Completion, ...]


class LLM:
    """Owns a loaded checkpoint and an engine driven synchronously by ``generate``."""

    def __init__(
        self, checkpoint: str | Path | Checkpoint, config: EngineConfig | None = None, **knobs
    ) -> None:
        """``checkpoint``: a path (native, Hugging Face GPT-2 or nanoGPT) or a loaded one.
        ``config`` or keyword knobs (``max_batch_size=64``, ``device="cpu"``...) set the engine."""
        if config is not None and knobs:
            raise TypeError("give an EngineConfig or keyword knobs, not both")
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.engine = Engine(ck, config or EngineConfig(**knobs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        stop: str | Sequence[str] = (),
    ) -> list[GenerationResult]:
        """Generate for every prompt (text, or token ids), ``params.n`` choices each; ``stop``
        (one string, or several) ends a choice before it, as the API's ``stop`` does. Results in
        prompt order."""
        params = params or SamplingParams()
        stop = _stop_strings(stop)
        if isinstance(prompts, str):
            prompts = [prompts]
        job_id = f"offline-{next(self._ids)}"
        job = Job(id=job_id, created=int(time.time()), model="offline", n=params.n,
                  tokenizer=self.tokenizer)
        requests, texts = [], []
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else None
            ids = encode_text(self.tokenizer, text) if text is not None else list(prompt)
            if not ids:
                raise InvalidRequestError("prompt", f"prompt {i} holds no token")
            request = Request(f"{job_id}-{i}", tuple(ids), params, group=job_id)
            requests.append(request)
            texts.append(text)
            job.add_prompt(request.request_id, None, ids, stop=stop, echo=False,
                           logprobs=params.logprobs is not None)
        for events in self.engine.steps(requests):
            for update in job.apply(events):
                if update.stopped_early:  # a stop string ended it
                    self.engine.cancel(update.request_id, update.engine_index)
        return [self._result(job, i, request, texts[i]) for i, request in enumerate(requests)]

    def _result(self, job: Job, i: int, request: Request, text: str | None) -> GenerationResult:
        n = job.n
        outputs = []
        for j, choice in enumerate(job.choices[i * n : (i + 1) * n]):
            outputs.append(Completion(
                index=j,
                text=choice.generated_text,
                token_ids=tuple(choice.token_ids),
                finish_reason=choice.finish_reason,
                cumulative_logprob=choice.cumulative_logprob if choice.want_logprobs else None,
                logprobs=tuple(choice.entries) if choice.want_logprobs else None,
            ))
        return GenerationResult(text, request.prompt_token_ids, tuple(outputs))


def _stop_strings(stop: str | Sequence[str]) -> tuple[str, ...]:
    """A string is one stop string (as in the OpenAI API and vLLM), never its characters."""
    stop = (stop,) if isinstance(stop, str) else stop
    if isinstance(stop, (bytes, bytearray)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop", f"stop must be non-empty strings, got {stop!r}")
    return tuple(stop)
