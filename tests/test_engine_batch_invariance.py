"""A seeded request gives the same tokens (and logprobs) alone and inside a busy batch."""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    request,
    tiny_checkpoint,
)


def _traffic(n: int) -> list:
    """Other requests with every kind of setting: greedy, filters, penalties, bias, n > 1."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_p=0.5),
        dict(temperature=1.1, top_k=3, presence_penalty=1.0),
        dict(temperature=0.8, min_p=0.2, frequency_penalty=0.5, repetition_penalty=1.3),
        dict(temperature=1.0, logit_bias={4: 5.0, 9: -100.0}),
        dict(temperature=1.0, n=2, seed=5),
    ]
    return [request(f"other{i}", prompt_of(3 + (7 * i) % 40, 50 + i), max_tokens=10 + 3 * i,
                    **kinds[i % len(kinds)]) for i in range(n)]


def _outputs(events):
    return [(e.token_id, e.logprob, e.top_logprobs) for e in events if e.token_id is not None]


@pytest.mark.parametrize("threads", [1, 2])
def test_seeded_request_is_identical_alone_and_in_a_batch_of_16(threads):
    torch.set_num_threads(threads)  # MKL splits work differently with more threads
    ck = tiny_checkpoint()
    target = request("target", prompt_of(23, 7), max_tokens=40, temperature=0.9, top_p=0.9,
                     top_k=20, seed=1234, logprobs=3)
    alone = engine(ck, max_batch_size=16, window_shift=4, prefill_chunk=8, batch_invariant=True,
                   max_tokens_per_step=24).run([target])["target"]
    busy = engine(ck, max_batch_size=16, window_shift=4, prefill_chunk=8, max_tokens_per_step=24,
                  batch_invariant=True)
    traffic = _traffic(15)
    events = busy.run([*traffic[:9], target, *traffic[9:]],
                      arrival_steps=[0] * 5 + [1, 2, 2, 3] + [3] + [4, 6, 6, 8, 9, 12])
    assert _outputs(events["target"]) == _outputs(alone), "the batch changed a seeded request"
    assert len(_outputs(alone)) == 40


def test_unrelated_sampler_settings_in_the_batch_do_not_touch_a_row():
    """top-p 1.0 must not be applied to a row just because another row asked for top-p."""
    ck = tiny_checkpoint()
    target = request("t", prompt_of(5, 1), max_tokens=30, temperature=1.5, seed=9)
    alone = engine(ck, max_batch_size=4).run([target])["t"]
    other = request("o", prompt_of(5, 2), max_tokens=30, temperature=1.0, top_p=0.3, seed=1)
    together = engine(ck, max_batch_size=4).run([target, other])["t"]
    assert _outputs(together) == _outputs(alone)
