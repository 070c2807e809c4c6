"""Hostile chat templates: a checkpoint's template may burn CPU or memory, never the server.

Templates compile and render in a separate process (``service.template_worker``) with a time, a
memory and a size bound, so ``/health`` answers and SIGTERM exits while one runs; ``*``, ``+`` and
``**`` refuse results past the template limits before computing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading

import httpx
import pytest
from conftest import live_server, wait_until
from deploy_support import ServerProcess, make_tiny_checkpoint

from service.chat_template import MAX_PROMPT_CHARS, ChatTemplate, TemplateError
from service.template_worker import TemplateWorker

pytestmark = pytest.mark.timeout(120)
NEST = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
TALK = [{"role": "user", "content": "abc"}]


def _renderer(server_pid: int) -> int | None:
    """The pid of the server's template process, if it has one."""
    for task in os.listdir(f"/proc/{server_pid}/task"):
        with contextlib.suppress(OSError):
            for pid in open(f"/proc/{server_pid}/task/{task}/children").read().split():
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
                if b"service.template_worker" in cmdline:
                    return int(pid)
    return None


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _chat(url: str, out: dict) -> None:
    body = {"messages": TALK, "max_tokens": 2}
    try:
        resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        out.update(status=resp.status_code, body=resp.json())
    except httpx.HTTPError as err:
        out.update(status=None, body=repr(err))


def test_a_hostile_template_leaves_health_answering_and_sigterm_exiting(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ck")
    (folder / "chat_template.jinja").write_text(NEST)
    server = ServerProcess(folder, tmp_path / "server.log", ("--shutdown-timeout", "3"))
    server.start()
    try:
        server.wait_ready()
        first: dict = {}
        chat = threading.Thread(target=_chat, args=(server.url, first))
        chat.start()
        wait_until(lambda: _renderer(server.proc.pid) is not None, timeout=30,
                   what="the template to run in a process of its own")  # fmt: skip
        for _ in range(3):
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        done = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                          timeout=30)  # fmt: skip
        assert done.status_code == 200, done.text
        assert chat.is_alive(), "the template finished before the checks: weak test"
        chat.join(60)
        assert first["status"] == 400, first
        assert "took longer than" in first["body"]["error"]["message"], first

        renderer = _renderer(server.proc.pid)
        idle = _cpu_ticks(renderer)
        second: dict = {}
        chat = threading.Thread(target=_chat, args=(server.url, second))
        chat.start()
        wait_until(lambda: _cpu_ticks(renderer) > idle + 5, what="the second render to run")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()[-3000:]
        wait_until(lambda: _gone(renderer), what="the template process to end with the server")
        chat.join(60)
    finally:
        server.stop()


def test_a_template_that_multiplies_a_string_to_a_gigabyte_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "chat_template.jinja").write_text("{{ ('x' * 10**9)|length }}")
    with live_server(folder) as srv:
        body = {"messages": TALK, "max_tokens": 2}
        chat = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert chat.status_code == 400, chat.text
        assert "larger than the chat template limit" in chat.json()["error"]["message"]
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("{{ 'x' * 10**9 }}", "larger than the chat template limit"),
        ("{{ [0] * 10**8 }}", "larger than the chat template limit"),
        ("{{ 2 ** 100000 }}", "larger than the chat template limit"),
        ("{{ 'x'|center(2000000000) }}", "ran out of memory"),
        ("{% set ns = namespace(s='xy') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s|length }}", "ran out of memory|took longer than"),  # which first
        ("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}",
         f"longer than {MAX_PROMPT_CHARS} characters"),
        (NEST, "took longer than 1 s"),
    ],
)
def test_each_bound_ends_a_hostile_template_and_the_renderer_goes_on(source, says):
    async def scenario():
        worker = TemplateWorker(seconds=1.0)
        try:
            with pytest.raises(TemplateError, match=says):
                await worker.render(ChatTemplate(source, "test"), TALK, "")
            good = ChatTemplate("{{ messages[0].content }}!", "test")
            assert await worker.render(good, TALK, "") == "abc!"
        finally:
            await worker.close()

    _run(scenario())


def test_a_renderer_that_stops_answering_is_killed_and_replaced():
    async def scenario():
        worker = TemplateWorker(seconds=1.0)
        good = ChatTemplate("{{ messages[0].content }}", "test")
        try:
            assert await worker.render(good, TALK, "") == "abc"
            stuck = worker._proc.pid
            os.kill(stuck, signal.SIGSTOP)  # deaf to its own alarm, like a long C call
            with pytest.raises(TemplateError, match="took longer than 1 s"):
                await worker.render(good, TALK, "")
            assert _gone(stuck), "the stuck renderer was not killed"
            assert await worker.render(good, TALK, "") == "abc"
        finally:
            await worker.close()

    _run(scenario())


def test_templates_compile_in_the_renderer_with_their_errors():
    async def scenario():
        worker = TemplateWorker()
        try:
            with pytest.raises(TemplateError, match="not valid Jinja2"):
                await worker.compile(ChatTemplate("{% for %}", "checkpoint x"))
            await worker.compile(ChatTemplate("{{ 'x' * 10**9 }}", "checkpoint x"))  # no folding
        finally:
            await worker.close()

    _run(scenario())
