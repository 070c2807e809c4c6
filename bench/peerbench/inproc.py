"""In-process generation: gptserve's engine facade, CTranslate2 and Hugging Face ``generate``.

Each builder returns ``generate(prompts, new_tokens) -> token ids per prompt`` (greedy, exactly
``new_tokens`` each, prompts of equal length run as one batch). ``measure`` times a call for one
token and a call for all of them, so every system is timed the same way without per-token
callbacks: TTFT = the 1-token call, decode tokens/s = streams x (new - 1) / (T_new - T_1), and the
inter-token latency is the mean step, (T_new - T_1) / (new - 1) (no percentiles).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from peerbench.figures import Figures

Generate = Callable[[list[list[int]], int], list[list[int]]]


def gptserve(checkpoint: Path, device: str, dtype: str, slots: int,
             threads: int | None = None) -> Generate:
    """gptserve's engine through its public facade only (``Engine(...).generate``), with the
    engine's default config apart from the slot count, device, dtype and ``threads`` (None: its
    own thread plan). The engine's internals are being redesigned; this function is the one
    place that knows how to drive it."""
    from model.checkpoint import load_checkpoint
    from service.engine import Engine, EngineConfig, Request, SamplingParams

    engine = Engine(load_checkpoint(checkpoint),
                    EngineConfig(max_batch_size=slots, device=device, dtype=dtype,
                                 threads=threads))
    ids = itertools.count()

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return engine.generate([Request(f"bench-{next(ids)}", tuple(p), params) for p in prompts])

    return generate


def ctranslate2(folder: Path, device: str, dtype: str, threads: int) -> Generate:
    """A CTranslate2 ``Generator`` (compute type = ``dtype``, ``intra_threads`` = ``threads``)."""
    import ctranslate2 as ct2

    vocab = json.loads((folder / "vocabulary.json").read_text())
    gen = ct2.Generator(str(folder), device=device, compute_type=dtype, intra_threads=threads)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        results = gen.generate_batch(
            [[vocab[i] for i in p] for p in prompts], max_length=new_tokens, sampling_topk=1,
            end_token=[],  # no end token: exactly max_length tokens (the prompt not counted)
            include_prompt_in_result=False)  # the prompt goes through in one forward
        return [r.sequences_ids[0] for r in results]

    return generate


def huggingface(folder: Path, device: str, dtype: str) -> Generate:
    """``GPT2LMHeadModel.generate`` (SDPA attention, KV cache, greedy)."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=getattr(torch, dtype),
                                            attn_implementation="sdpa").to(device).eval()

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return generate


def measure(generate: Generate, prompts: list[list[int]], new_tokens: int,
            repeats: int = 1) -> Figures:
    """TTFT and tokens/s of ``prompts`` as one batch; the median of ``repeats`` timings each."""
    first, full, outputs = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(prompts, 1)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outputs = generate(prompts, new_tokens)
        full.append(time.perf_counter() - t0)
    t1, tn = statistics.median(first), statistics.median(full)
    n = len(prompts)
    tokens = sum(len(o) for o in outputs)
    # one stream: decode rate without the first token; several: total over the whole call
    rate = n * (new_tokens - 1) / (tn - t1) if n == 1 and tn > t1 else tokens / tn
    step = (tn - t1) / (new_tokens - 1) if new_tokens > 1 else None  # every stream, every step
    return Figures(n, rate, t1, None, step, None, tokens, n * new_tokens)
