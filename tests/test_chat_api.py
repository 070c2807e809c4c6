"""``/v1/chat/completions`` against a real server: the real ``openai`` client (sync and streaming),
LangChain's ``ChatOpenAI``, the builtin plain-text template and its implied stop, logprobs, n,
seed, stop, usage and errors. A scripted checkpoint makes the greedy reply known in advance."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from chat_support import save_scripted_checkpoint
from conftest import live_server, wait_until

pytestmark = pytest.mark.timeout(120)
PROMPT = "User: hi\nAssistant:"  # the builtin template's rendering of HI
HI = [{"role": "user", "content": "hi"}]
SCRIPT = " Hello there.\nUser: and more"
REPLY = " Hello there."  # the script up to the implied stop "\nUser:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_scripted_checkpoint(tmp_path_factory.mktemp("chat") / "scripted", len(PROMPT), SCRIPT)


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **kw):
    kw.setdefault("messages", HI)
    return client.chat.completions.create(model="tiny", temperature=0, **kw)


def test_reply_has_openai_shape_and_stops_before_the_users_next_turn(client):
    resp = _chat(client, max_tokens=40)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY, "the implied stop '\\nUser:' should end the reply"
    assert choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == len(PROMPT)
    # the tokens that spelled the stop string were generated, so they count
    assert resp.usage.completion_tokens == len(REPLY + "\nUser:")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_stream_opens_with_the_role_and_its_deltas_add_up_to_the_reply(client):
    chunks = list(_chat(client, max_tokens=40, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(PROMPT)
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_a_resent_conversation_reports_its_cached_prefix_in_usage(client):
    """A chat client resends the conversation: the second identical request reuses every
    prompt token but the last, and ``usage.prompt_tokens_details.cached_tokens`` says so."""
    messages = [{"role": "user", "content": "Hi again"}]
    first = _chat(client, messages=messages, max_tokens=4)
    again = _chat(client, messages=messages, max_tokens=4)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    chunks = list(_chat(client, messages=messages, max_tokens=4, stream=True,
                        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_raw_stream_is_sse_ending_with_done(server):
    body = {"messages": HI, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas[1:]) == REPLY[:3]


def test_max_completion_tokens_wins_over_max_tokens_and_length_is_reported(client):
    resp = _chat(client, max_completion_tokens=4, max_tokens=30)
    assert resp.choices[0].message.content == REPLY[:4]
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 4


def test_user_stop_strings_apply_beside_the_implied_one(client):
    resp = _chat(client, max_tokens=40, stop=["there"])
    assert resp.choices[0].message.content == " Hello " and resp.choices[0].finish_reason == "stop"


def test_logprobs_come_in_the_chat_shape(client):
    resp = _chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == REPLY[:5]
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token, "greedy takes the most likely token"
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    plain = _chat(client, max_tokens=5, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert _chat(client, max_tokens=5).choices[0].logprobs is None


def test_n_seeded_choices_are_indexed_reproducible_and_differ(client):
    def run(seed):
        resp = client.chat.completions.create(
            model="tiny", messages=HI, max_tokens=12, n=3, seed=seed, temperature=3.0, stop=["\n"]
        )
        assert sorted(c.index for c in resp.choices) == [0, 1, 2]
        return [c.message.content for c in resp.choices]

    first = run(7)
    assert run(7) == first, "the same seed should give the same choices"
    assert len(set(first)) > 1, f"n seeded choices all sampled the same reply: {first}"


def test_models_card_states_the_builtin_template_and_its_stop(client):
    (card,) = client.models.list().data
    template = card.model_extra["chat_template"]
    assert template["origin"] == "builtin" and template["stop"] == ["\nUser:"]
    assert "Assistant:" in template["template"]


def test_langchain_chat_openai_invokes_and_streams(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    llm = langchain_openai.ChatOpenAI(
        model="tiny", base_url=server.url + "/v1", api_key="unused", temperature=0,
        max_tokens=40, max_retries=0,
    )
    reply = llm.invoke([HumanMessage(content="hi")])
    assert reply.content == REPLY
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata["input_tokens"] == len(PROMPT)
    pieces = list(llm.stream([HumanMessage(content="hi")]))
    assert len(pieces) > 2 and "".join(p.content for p in pieces) == REPLY


# (name, body, status, param)
BAD = [
    ("no_messages", {}, 400, "messages"),
    ("empty_messages", {"messages": []}, 400, "messages"),
    ("role_tool", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("content_number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        "image_part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
    ),
    ("tools", {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ("tool_choice", {"messages": HI, "tool_choice": "auto"}, 400, "tool_choice"),
    # JSON needs "{", which this 63-character vocabulary lacks: impossible, so a 400
    ("json_mode_no_brace", {"messages": HI, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("top_logprobs_alone", {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs_6", {"messages": HI, "logprobs": True, "top_logprobs": 6}, 400, "top_logprobs"),
    ("logprobs_int", {"messages": HI, "logprobs": 2}, 400, "logprobs"),
    (
        "max_completion_tokens_0",
        {"messages": HI, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("max_tokens_huge", {"messages": HI, "max_tokens": 10**7}, 400, "max_tokens"),
    ("n_0", {"messages": HI, "n": 0}, 400, "n"),
    ("temperature_string", {"messages": HI, "temperature": "1"}, 400, "temperature"),
    ("stop_empty", {"messages": HI, "stop": [""]}, 400, "stop"),
    ("unknown_model", {"messages": HI, "model": "gpt-4o"}, 404, "model"),
    ("char_not_in_vocab", {"messages": [{"role": "user", "content": "日本"}]}, 400, "messages"),
    ("lone_surrogate", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_the_error_envelope(server, body, status, param):
    raw = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \ud800
    resp = httpx.post(
        server.url + "/v1/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"], error
    ok = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200


def test_neutral_values_of_unsupported_features_are_accepted(client):
    resp = _chat(
        client, max_tokens=3, tools=[], tool_choice="none", response_format={"type": "text"}
    )
    assert resp.choices[0].message.content == REPLY[:3]


def test_a_chat_template_flag_replaces_the_builtin(checkpoint):
    template = "{% for m in messages %}{{ m.content }}{% endfor %};"
    with live_server(checkpoint, chat_template=template) as srv:
        resp = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2},
            timeout=30,
        ).json()
        assert resp["usage"]["prompt_tokens"] == len("abc;")
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]["chat_template"]
        assert card == {"origin": "--chat-template", "template": template, "stop": [], "error": None}


def test_the_access_log_line_carries_tokens_and_time_to_first_token(server, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    ids = []
    for path, body in (
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 40, "temperature": 0}),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 4, "stream": True}),
        ("/v1/completions", {"prompt": "ab", "max_tokens": 3, "n": 2}),
    ):
        resp = httpx.post(server.url + path, json=body, timeout=30)
        assert resp.status_code == 200
        ids.append(resp.headers["x-request-id"])
    wait_until(
        lambda: {r.fields["request_id"] for r in caplog.records if r.name == "service.access"}
        >= set(ids),
        what="the three access lines",
    )
    lines = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "service.access"}
    expected = [(len(PROMPT), len(REPLY + "\nUser:")), (len(PROMPT), 4), (2, 2 * 3)]
    for request_id, (prompt, completion) in zip(ids, expected, strict=True):
        fields = lines[request_id]
        assert (fields["prompt_tokens"], fields["completion_tokens"]) == (prompt, completion)
        assert 0 < fields["ttft_s"] <= fields["duration_s"], fields
