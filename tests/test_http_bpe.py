"""A byte-level BPE model (GPT-2's tokenizer, padded vocab) over HTTP: every chunk is valid UTF-8
and characters split across tokens come out whole."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import live_server, save_tiny_bpe_checkpoint

pytestmark = pytest.mark.timeout(120)
PROMPT = "Ça va? 世界 🎉 naïve"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("bpe") / "bpe", block_size=32)
    with live_server(path, max_batch_size=4) as srv:
        yield srv


def _events(url: str, body: dict) -> list[bytes]:
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    return [e for e in raw.split(b"\n\n") if e]


def test_streamed_bpe_chunks_are_valid_utf8_and_match_the_full_text(server):
    body = {"prompt": PROMPT, "max_tokens": 48, "temperature": 1.0, "seed": 3}
    full = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    events = _events(server.url, body)
    texts = []
    for event in events[:-1]:
        decoded = event.decode("utf-8", errors="strict")  # raises on any invalid byte
        texts.append(json.loads(decoded[6:])["choices"][0]["text"])
    assert "".join(texts) == full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] == 48


def test_multibyte_prompt_round_trips_and_echoes_whole(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    body = {"prompt": PROMPT, "max_tokens": 1, "echo": True, "temperature": 0}
    events = _events(server.url, body)
    first = json.loads(events[0][6:])["choices"][0]["text"]
    assert first == PROMPT, "the echoed prompt should arrive whole in the first chunk"


def test_padded_vocab_rows_are_outside_the_vocabulary(server):
    for body in ({"prompt": [50300]}, {"prompt": "a", "logit_bias": {"50300": 5}}):
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] in ("prompt", "logit_bias")


def test_a_lone_surrogate_is_a_400_naming_the_prompt_not_a_silent_replacement(server):
    for path, body, param in (
        ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("/tokenize", b'{"prompt": "\\udc00"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}',
            "messages",
        ),
    ):
        resp = httpx.post(
            server.url + path,
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert resp.status_code == 400, (path, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"], error
