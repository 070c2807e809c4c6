"""Chat templates compiled and rendered in a separate process, with a time and a memory bound.

A template that came with a checkpoint is code its author wrote: Jinja2's sandbox keeps it away
from Python internals, but not from CPU and memory (a nest of ``range(100000)`` loops runs for
hours; a filter such as ``center`` allocates what it is asked to). So the server never runs one on
its event loop, nor in a thread of its own process (a C-level allocation holds the GIL, and a
thread cannot be stopped): ``TemplateWorker`` hands each compile and render to one child process,
``python -m service.template_worker``, that speaks one JSON line per request and per answer on its
stdin and stdout. The child caps its own address space (``MEMORY_BYTES``), interrupts a render that
runs past ``RENDER_SECONDS`` and dies with the server; the server kills it (and starts another on
the next request) when it does not answer within ``RENDER_SECONDS`` plus a grace, or when a
request waiting on it is cancelled. ``/health`` keeps answering and SIGTERM exits meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from service.chat_template import MAX_PROMPT_CHARS, ChatTemplate, TemplateError

RENDER_SECONDS = 5.0  # one compile or render; a chat template takes milliseconds
GRACE_SECONDS = 2.0  # past RENDER_SECONDS, the child has not answered: it is killed
MEMORY_BYTES = 1024 * 1024 * 1024  # the child's address space (a fresh one uses ~40 MB)
_LINE_LIMIT = 12 * MAX_PROMPT_CHARS + 4096  # one answer: the prompt, 12 bytes a char at worst
_CACHE = 8  # compiled templates the child keeps (one per loaded checkpoint, in practice)


class TemplateWorker:
    """Owns the child process that compiles and renders chat templates, one request at a time."""

    def __init__(self, seconds: float = RENDER_SECONDS) -> None:
        self.seconds = seconds
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def compile(self, template: ChatTemplate) -> None:
        """``TemplateError`` if ``template`` is not valid Jinja2 (or cannot compile in time)."""
        await self._ask({"source": template.source, "origin": template.origin})

    async def render(self, template: ChatTemplate, messages: list[dict], eos_token: str) -> str:
        """The prompt ``template`` makes of ``messages``; ``TemplateError`` if it fails, runs out
        of time or memory, or makes a prompt longer than ``MAX_PROMPT_CHARS``."""
        answer = await self._ask({
            "source": template.source,
            "origin": template.origin,
            "messages": messages,
            "eos_token": eos_token,
        })  # fmt: skip
        return answer["prompt"]

    async def close(self) -> None:
        """Kill the child, if any, and start no other (the server is shutting down)."""
        self._closed = True
        await self._kill()

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self._closed:
                raise TemplateError("the server is shutting down")
            proc = self._proc if self._proc is not None else await self._start()
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(
                    proc.stdout.readline(), self.seconds + GRACE_SECONDS
                )
            except TimeoutError:
                await self._kill()
                raise TemplateError(
                    f"the chat template ({request['origin']}) took longer than {self.seconds:g} s"
                ) from None
            except BaseException:  # cancelled, or the child died: its next answer is not ours
                await self._kill()
                raise
            if not line:
                code = await self._kill()
                raise TemplateError(
                    f"the chat template ({request['origin']}) stopped its renderer ({code})"
                )
        answer = json.loads(line)
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer

    async def _start(self) -> asyncio.subprocess.Process:
        root = str(Path(__file__).resolve().parents[1])  # where ``service`` is importable from
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "GPTSERVE_TEMPLATE_PARENT": str(os.getpid()),
            "GPTSERVE_TEMPLATE_SECONDS": repr(self.seconds),
        }
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.template_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_LINE_LIMIT,
            start_new_session=True,  # a terminal's Ctrl-C is the server's to handle
        )  # fmt: skip
        return self._proc

    async def _kill(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return "not running"
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = await proc.wait()
        return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"


# ---- the child ----------------------------------------------------------------------------------


class _OutOfTime(BaseException):  # not Exception: template code must not catch it
    pass


def _bound_self(parent: int) -> None:
    """Cap memory, die with the server, and turn SIGALRM into ``_OutOfTime``."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    with contextlib.suppress(OSError, AttributeError):  # PR_SET_PDEATHSIG = 1 (Linux)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the server died before the line above
        os._exit(1)

    def out_of_time(signum, frame) -> None:
        raise _OutOfTime

    signal.signal(signal.SIGALRM, out_of_time)


def _answer(request: dict[str, Any], cache: dict[str, ChatTemplate], seconds: float) -> dict:
    origin = request["origin"]
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        template = cache.get(request["source"])
        if template is None:
            template = ChatTemplate(request["source"], origin).compile()
            if len(cache) >= _CACHE:
                cache.pop(next(iter(cache)))
            cache[request["source"]] = template
        if "messages" not in request:
            return {}
        return {"prompt": template.render(request["messages"], eos_token=request["eos_token"])}
    except _OutOfTime:
        return {"error": f"the chat template ({origin}) took longer than {seconds:g} s"}
    except TemplateError as err:
        return {"error": str(err)}
    except MemoryError:  # compiling a huge template
        return {"error": f"the chat template ({origin}) ran out of memory"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    """The child: one JSON request per stdin line, one JSON answer per stdout line."""
    _bound_self(int(os.environ["GPTSERVE_TEMPLATE_PARENT"]))
    seconds = float(os.environ["GPTSERVE_TEMPLATE_SECONDS"])
    cache: dict[str, ChatTemplate] = {}
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        answer = _answer(json.loads(line), cache, seconds)
        out.write(json.dumps(answer).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
