"""Chat templates: the builtin plain-text one, ``--chat-template``, a checkpoint's own, the
sandbox, and files that must not be followed (outside the folder, FIFOs)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import pytest
from conftest import live_server

from service.chat_template import (
    BUILTIN_STOP,
    ChatTemplate,
    ChatTemplates,
    TemplateError,
    builtin,
    from_checkpoint,
    template_arg,
)
from service.settings import parse_settings
from service.template_worker import TemplateWorker

pytestmark = pytest.mark.timeout(60)
TALK = [
    {"role": "system", "content": "You are a poet."},
    {"role": "user", "content": "Speak."},
    {"role": "assistant", "content": "I shall."},
    {"role": "user", "content": "Now!"},
]


def test_builtin_template_is_plain_text_ending_where_the_assistant_speaks():
    assert builtin().render(TALK) == (
        "You are a poet.\nUser: Speak.\nAssistant: I shall.\nUser: Now!\nAssistant:"
    )
    assert builtin().stop == BUILTIN_STOP == ("\nUser:",)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # Python internals
        "{{ messages.append({'role': 'user'}) }}",  # mutating the input
        "{{ raise_exception('roles must alternate') }}",  # Hugging Face's refusal helper
    ],
)
def test_the_sandbox_refuses_what_a_template_must_not_do(source):
    with pytest.raises(TemplateError, match="failed"):
        ChatTemplate(source, "test").render(TALK)


def test_chat_template_flag_takes_a_template_or_a_file_and_fails_at_startup(tmp_path, capsys):
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[-1].content }}\n", encoding="utf-8")
    assert template_arg(str(file)) == "{{ messages[-1].content }}\n"
    assert template_arg("{% for m in messages %}{% endfor %}") == "{% for m in messages %}{% endfor %}"
    with pytest.raises(TemplateError, match="neither a file nor"):
        template_arg(str(tmp_path / "missing.jinja"))
    for bad in ("{% if %}", "{{ messages"):
        with pytest.raises(SystemExit) as exc:
            parse_settings(["--chat-template", bad], environ={})
        assert exc.value.code == 2
        assert "not valid Jinja2" in capsys.readouterr().err


def test_a_checkpoint_carries_its_template_in_a_file_or_its_config(tmp_path):
    assert from_checkpoint(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"chat_template": "{{ 'c' }}"}))
    assert from_checkpoint(tmp_path).origin == "checkpoint config.json"
    (tmp_path / "chat_template.jinja").write_text("{{ 'f' }}")
    found = from_checkpoint(tmp_path)
    assert found.origin == "checkpoint chat_template.jinja" and found.render(TALK) == "f"
    # a file checkpoint (nanoGPT's ckpt.pt) looks beside itself
    assert from_checkpoint(tmp_path / "ckpt.pt").render(TALK) == "f"


def test_hugging_face_tokenizer_config_and_named_templates_are_read(tmp_path):
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'd' }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert from_checkpoint(tmp_path).render(TALK) == "d"


def test_template_files_outside_the_folder_or_not_regular_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (folder / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(TemplateError, match="outside the checkpoint folder") as err:
        from_checkpoint(folder)
    assert "root:x" not in str(err.value)
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").symlink_to("chat_template.jinja")  # a loop
    with pytest.raises(TemplateError, match="looping link") as err:
        from_checkpoint(folder)
    assert str(tmp_path) not in str(err.value), "the message must not show server paths"
    (folder / "chat_template.jinja").unlink()
    os.mkfifo(folder / "chat_template.jinja")  # opening must not wait for a writer
    with pytest.raises(TemplateError, match="not a regular file"):
        from_checkpoint(folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(TemplateError, match="not UTF-8"):
        from_checkpoint(folder)


def test_a_broken_checkpoint_template_is_reported_not_replaced(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for %}")

    class Engine:  # what ChatTemplates reads of an engine: its checkpoint's path
        class checkpoint:  # noqa: N801
            path = tmp_path

    async def scenario():
        templates = ChatTemplates(None, TemplateWorker())
        try:
            with pytest.raises(TemplateError, match="not valid Jinja2"):
                await templates.for_engine(Engine)
            assert "not valid Jinja2" in (await templates.card(Engine))["error"]
            flag = ChatTemplates("{{ 'flag' }}", templates._worker)
            assert (await flag.for_engine(Engine)).origin == "--chat-template"
        finally:
            await templates.close()

    asyncio.run(scenario())


def _copy(checkpoint, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(checkpoint, folder)
    return folder


def test_a_served_checkpoint_uses_its_own_template(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages[-1].content }}:")
    with live_server(folder) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]["chat_template"]
        assert card["origin"] == "checkpoint chat_template.jinja" and card["stop"] == []
        resp = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2},
            timeout=30,
        )
        assert resp.json()["usage"]["prompt_tokens"] == len("abc:")


def test_a_broken_checkpoint_template_fails_chat_clearly_and_completions_still_work(
    tiny_checkpoint, tmp_path
):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").write_text("{% if %}")
    with live_server(folder) as srv:
        chat = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2},
            timeout=30,
        )
        assert chat.status_code == 500 and chat.json()["error"]["code"] == "chat_template_error"
        assert "not valid Jinja2" in chat.json()["error"]["message"]
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]["chat_template"]
        assert "not valid Jinja2" in card["error"]
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2})
        assert ok.status_code == 200


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_template_that_is_a_folder_is_refused_and_leaks_no_descriptor(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "chat_template.jinja").mkdir()
    with live_server(folder) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2}
        client.post("/v1/chat/completions", json=body)  # warm: the first request may open files
        before = _open_fds()
        for _ in range(20):
            chat = client.post("/v1/chat/completions", json=body)
            assert chat.status_code == 500, chat.text
            assert chat.json()["error"]["code"] == "chat_template_error"
            assert "not a regular file" in chat.json()["error"]["message"]
            card = client.get("/v1/models").json()["data"][0]["chat_template"]
            assert "not a regular file" in card["error"], card
        assert _open_fds() <= before, "chat requests left file descriptors open"
        assert client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2}).status_code == 200


def test_reading_a_folder_as_a_template_closes_its_descriptor(tmp_path):
    (tmp_path / "chat_template.jinja").mkdir()
    before = _open_fds()
    for _ in range(10):
        with pytest.raises(TemplateError, match="not a regular file"):
            from_checkpoint(tmp_path)
    assert _open_fds() == before, "a refused template file left its descriptor open"
