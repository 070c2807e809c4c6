"""The real ``openai`` client against a real uvicorn server running the real engine."""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest
from conftest import live_server, wait_until

from model import load_checkpoint, reference_generate

pytestmark = pytest.mark.timeout(120)
PROMPT = "ROMEO: what light"


@pytest.fixture(scope="module", params=["thread", "process"])
def server(tiny_checkpoint, request):
    """The whole API over both ways of running the engine: on a thread of the server's process,
    and in an engine-core process of its own (the default of ``python -m service``)."""
    with live_server(tiny_checkpoint, window_shift=1, engine_core=request.param) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _greedy(client, prompt=PROMPT, **kw):
    return client.completions.create(model="tiny", prompt=prompt, temperature=0, **kw)


def test_non_streaming_completion_has_openai_shape_and_usage(client):
    resp = _greedy(client, max_tokens=12)
    assert resp.object == "text_completion" and resp.model == "tiny"
    (choice,) = resp.choices
    assert choice.finish_reason == "length" and len(choice.text) == 12  # char model
    assert resp.usage.prompt_tokens == len(PROMPT)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == len(PROMPT) + 12


def test_streamed_chunks_concatenate_to_the_same_text_and_end_with_usage(client):
    full = _greedy(client, max_tokens=20).choices[0].text
    chunks = list(
        _greedy(client, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_raw_stream_is_sse_with_usage_then_done(server):
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), raw
    assert events[-1] == b"data: [DONE]"
    usage = json.loads(events[-2][6:].decode("utf-8"))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_a_repeated_prompt_reports_its_cached_prefix_in_usage(client):
    """The second request finds the first one's slot still cached: every prompt token but the
    last (computed for its logits) is reused, and usage says so in OpenAI's field, streamed or
    not, and once per prompt for n choices."""
    prompt = "Q: which prefix?"  # no other test sends it
    first = _greedy(client, prompt=prompt, max_tokens=3)
    assert first.usage.prompt_tokens_details.cached_tokens == 0, "nothing was cached yet"
    again = _greedy(client, prompt=prompt, max_tokens=3)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    assert again.choices[0].text == first.choices[0].text, "reuse changed the greedy text"
    chunks = list(_greedy(client, prompt=prompt, max_tokens=3, stream=True,
                          stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    both = _greedy(client, prompt=prompt, max_tokens=3, n=2)
    assert both.usage.prompt_tokens == len(prompt)
    assert both.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1


def test_n_choices_come_back_indexed_and_seeded_choices_differ(client):
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, n=3, seed=7, temperature=1.0
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert len({c.text for c in resp.choices}) > 1, "n seeded choices all sampled the same text"
    assert resp.usage.completion_tokens == 48


def _choice_seed(seed: int, j: int) -> int:
    """docs/API.md's derivation of choice j's seed (written out here, not imported)."""
    if j == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def test_nearby_seeds_share_no_choice_and_each_choice_replays_alone(client):
    def texts(seed, n):
        resp = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, n=n, seed=seed, temperature=1.0
        )
        return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]

    one, two = texts(1, 3), texts(2, 3)
    shared = set(one) & set(two)
    assert not shared, f"seed=1 and seed=2 (n=3) returned the same texts {shared}: seed + j?"
    # choice j of a seeded request is the single request seeded as docs/API.md says
    assert [texts(_choice_seed(1, j), 1)[0] for j in range(3)] == one


def test_same_seed_same_text_different_seed_different_text(client):
    def run(seed):
        return (
            client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=24, seed=seed, temperature=1.0
            )
            .choices[0]
            .text
        )

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_logprobs_report_the_chosen_token_and_top_k(client):
    resp = _greedy(client, max_tokens=6, logprobs=3)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3
        assert logprob <= 0 and max(top.values()) == pytest.approx(logprob, abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5), "greedy picks the top token"
    assert lp.text_offset == list(range(6))


def test_stop_string_cuts_the_text_before_it(client):
    full = _greedy(client, max_tokens=24).choices[0].text
    stop = full[9:12]
    resp = _greedy(client, max_tokens=24, stop=[stop, "never-there"])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text for c in _greedy(client, max_tokens=24, stop=stop, stream=True)
    )
    assert streamed == resp.choices[0].text


def test_echo_prepends_the_prompt(client):
    plain = _greedy(client, max_tokens=5).choices[0].text
    echoed = _greedy(client, max_tokens=5, echo=True).choices[0].text
    assert echoed == PROMPT + plain


def test_prompt_lists_and_token_ids_give_one_choice_block_per_prompt(client, server):
    tokenizer = server.state.engine.tokenizer
    resp = _greedy(client, prompt=[PROMPT, "abc"], max_tokens=4, n=2)
    assert [c.index for c in sorted(resp.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_ids = _greedy(client, prompt=tokenizer.encode(PROMPT), max_tokens=4)
    assert by_ids.choices[0].text == resp.choices[0].text
    assert resp.usage.prompt_tokens == len(PROMPT) + 3


def test_greedy_text_over_http_equals_the_reference_generator_past_the_window(
    client, tiny_checkpoint
):
    ckpt = load_checkpoint(tiny_checkpoint)
    block = ckpt.config.block_size
    max_tokens = 2 * block + 5  # well past the 32-token window
    ids = reference_generate(
        ckpt.model, ckpt.tokenizer.encode(PROMPT), max_tokens, vocab_size=ckpt.tokenizer.vocab_size
    )
    resp = _greedy(client, max_tokens=max_tokens)
    assert resp.choices[0].text == ckpt.tokenizer.decode(ids)
    window = resp.choices[0].model_extra["context_window"]
    assert window["crops"] > 0 and window["prompt_cropped"] is False


def test_prompt_longer_than_the_window_is_reported_cropped(client):
    resp = _greedy(client, prompt="a" * 40, max_tokens=2)
    assert resp.choices[0].model_extra["context_window"]["prompt_cropped"] is True


def test_models_tokenize_detokenize_round_trip(client, server):
    (card,) = client.models.list().data
    assert card.id == "tiny"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "héllo €"}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == "héllo €"


def test_n_choices_stop_independently_and_free_the_engine(client, server):
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=200, n=4, seed=11, temperature=1.0, stop=["e", "a"]
    )
    for choice in resp.choices:
        assert "e" not in choice.text and "a" not in choice.text, choice.text
        assert choice.finish_reason in ("stop", "length")
    assert any(c.finish_reason == "stop" for c in resp.choices)
    engine = server.state.engine
    wait_until(
        lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0,
        what="stopped choices to leave the engine",
    )


def test_best_of_returns_the_n_candidates_with_the_highest_total_logprob(client):
    """best_of runs best_of candidates and keeps the n best by cumulative logprob; the same seed
    with n=best_of and logprobs shows every candidate and its total."""
    reordered = False
    for seed in range(5, 15):  # until the ranking differs from the candidates' own order
        kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": seed}
        best = client.completions.create(best_of=4, n=2, **kw)
        candidates = client.completions.create(n=4, logprobs=0, **kw).choices
        ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
        assert [c.text for c in best.choices] == [c.text for c in ranked[:2]], seed
        assert [c.index for c in best.choices] == [0, 1]
        assert all(c.logprobs is None for c in best.choices), "logprobs were not asked for"
        assert best.usage.completion_tokens == 4 * 8, "every candidate's tokens count"
        reordered = [c.index for c in ranked[:2]] != [0, 1]
        if reordered:
            break
    assert reordered, "no seed put a later candidate first: the test proves nothing"


def test_best_of_works_per_prompt_and_keeps_asked_logprobs(client):
    resp = client.completions.create(
        model="tiny", prompt=[PROMPT, "abc"], max_tokens=5, best_of=3, seed=1, logprobs=2
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 5 for c in resp.choices)
    assert resp.usage.completion_tokens == 2 * 3 * 5


def test_suffix_is_refused_as_openai_does_for_models_without_insertion(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, suffix="THE END")
    assert "insertion" in str(err.value) and err.value.body["param"] == "suffix"
    assert _greedy(client, max_tokens=3, suffix="").choices[0].text  # empty: nothing to insert


def test_stream_chunks_report_each_window_slide_as_it_happens(server, client):
    """Endless generation (the web page's endless mode) sees where the window slid: every chunk
    whose token needed a new crop carries the choice's ``context_window`` at once."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "temperature": 0}
    final = client.completions.create(**body).choices[0].model_extra["context_window"]
    assert final["crops"] > 5  # window_shift=1: one crop per token past the 32-token window
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30
    ) as resp:
        events = [e for e in resp.read().split(b"\n\n") if e][:-1]
    reported = [
        json.loads(e[6:])["choices"][0].get("context_window", {}).get("crops") for e in events
    ]
    slides = [c for c in reported if c is not None]
    # each slide as it happens: a chunk that carries new tokens past a slide carries the new crop
    # count (a reader that lags gets several tokens, and maybe several slides, in one chunk: then
    # the count jumps); the last chunk (which always carries it) may repeat it
    if len(slides) > 1 and slides[-1] == slides[-2]:
        slides.pop()
    assert slides == sorted(set(slides)) and slides[0] >= 1, (slides, final)
    assert slides[-1] == final["crops"] == reported[-1], (slides, final)
