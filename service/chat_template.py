"""Chat templates: how ``/v1/chat/completions`` turns a conversation into one prompt.

GPT-2-family checkpoints are base models with no chat format. As vLLM does, a template is
Jinja2 text rendered with ``messages`` (``role``, ``content``, optional ``name``) and
``add_generation_prompt``. Which one applies, first match wins:

1. ``--chat-template``: a template, or the path of a file holding one;
2. the checkpoint's own: ``chat_template.jinja`` in its folder, else a ``chat_template`` string in
   its ``config.json`` or ``tokenizer_config.json`` (Hugging Face's places);
3. ``BUILTIN``: plain text that a base model continues naturally, one ``User: ...`` /
   ``Assistant: ...`` line per turn, ending with ``Assistant:``, with ``"\\nUser:"`` as an implicit
   stop string so the model does not go on to write the user's next turn.

Templates are data, never Python: they are read as text (only regular files inside the checkpoint
folder, size-capped) and rendered in Jinja2's immutable sandbox, which refuses access to Python
internals and mutation of the inputs. The sandbox bounds what a template may reach, not what it may
spend, so resources are bounded here too: no constant folding at compile time (Jinja would
otherwise evaluate ``'x' * 10**9`` while compiling), ``*``, ``+`` and ``**`` refuse results larger
than ``MAX_PROMPT_CHARS`` items (or ``MAX_POWER_BITS`` bits), and rendering stops once the prompt
passes ``MAX_PROMPT_CHARS``. Time and memory are bounded by where templates run: the server compiles
and renders every template but the builtin in a separate process (``service.template_worker``).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN = (
    "{% for message in messages %}"
    "{% if message.role in ('system', 'developer') %}{{ message.content }}\n"
    "{% elif message.role == 'user' %}User: {{ message.content }}\n"
    "{% else %}Assistant: {{ message.content }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
BUILTIN_STOP = ("\nUser:",)
TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024  # config.json of a char model lists its vocabulary
MAX_PROMPT_CHARS = 4 * 1024 * 1024  # a rendered prompt (4x the default request body cap)
MAX_POWER_BITS = 4096  # ``a ** b`` in a template: no chat format needs more


class TemplateError(ValueError):
    """A chat template that cannot be read, compiled or rendered; the message says which."""


def _environment():
    from jinja2.exceptions import SecurityError
    from jinja2.exceptions import TemplateError as JinjaTemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:  # Hugging Face templates call this
        raise JinjaTemplateError(message)

    class Bounded(ImmutableSandboxedEnvironment):
        """The immutable sandbox, with ``*``, ``+`` and ``**`` sized before they run."""

        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            if _too_big(operator, left, right):
                raise SecurityError(
                    f"{operator!r} would make a value larger than the chat template limit "
                    f"({MAX_PROMPT_CHARS} items, {MAX_POWER_BITS} bits)"
                )
            return super().call_binop(context, operator, left, right)

    # trim_blocks/lstrip_blocks: the settings Hugging Face renders chat templates with.
    # optimized=False: no constant folding, which would run template code while compiling.
    env = Bounded(trim_blocks=True, lstrip_blocks=True, autoescape=False, optimized=False)
    env.globals["raise_exception"] = raise_exception
    return env


def _too_big(operator: str, left: Any, right: Any) -> bool:
    """Whether ``left operator right`` would exceed the template limits (computed from sizes)."""
    sized = (str, list, tuple)
    if operator == "*":
        if isinstance(left, int) and isinstance(right, sized):
            left, right = right, left
        return isinstance(left, sized) and isinstance(right, int) and len(left) * right > MAX_PROMPT_CHARS
    if operator == "+":
        return isinstance(left, sized) and isinstance(right, sized) and (
            len(left) + len(right) > MAX_PROMPT_CHARS
        )
    # "**": only integer powers grow without bound
    return (
        isinstance(left, int) and isinstance(right, int) and right > 0
        and abs(left) > 1 and abs(left).bit_length() * right > MAX_POWER_BITS
    )


class ChatTemplate:
    """Owns one template's source, where it came from, the stop strings it implies, and (once
    compiled) its compiled form."""

    def __init__(self, source: str, origin: str, stop: tuple[str, ...] = ()) -> None:
        self.source = source
        self.origin = origin
        self.stop = stop
        self._template = None

    def compile(self) -> ChatTemplate:
        """Compile once; ``TemplateError`` naming the origin and line if it is not Jinja2."""
        from jinja2.exceptions import TemplateSyntaxError

        if self._template is None:
            try:
                self._template = _environment().from_string(self.source)
            except TemplateSyntaxError as err:
                raise TemplateError(
                    f"the chat template from {self.origin} is not valid Jinja2: {err.message} "
                    f"(line {err.lineno})"
                ) from None
            except RecursionError:
                raise TemplateError(
                    f"the chat template from {self.origin} nests too deeply to compile"
                ) from None
        return self

    def render(self, messages: list[dict[str, Any]], *, eos_token: str = "") -> str:
        """The prompt for ``messages``, ending where the assistant's reply begins, in this
        process (the server runs templates it did not write through ``service.template_worker``,
        which bounds time and memory)."""
        parts, size = [], 0
        try:
            chunks = self.compile()._template.generate(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos_token
            )
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_PROMPT_CHARS:
                    raise TemplateError(
                        f"the chat template ({self.origin}) made a prompt longer than "
                        f"{MAX_PROMPT_CHARS} characters"
                    )
                parts.append(chunk)
        except TemplateError:
            raise
        except MemoryError:
            raise TemplateError(f"the chat template ({self.origin}) ran out of memory") from None
        except Exception as err:  # noqa: BLE001 - any template failure is reported, not raised
            raise TemplateError(f"the chat template ({self.origin}) failed: {err}") from None
        return "".join(parts)

    def card(self) -> dict[str, Any]:
        return {"origin": self.origin, "template": self.source, "stop": list(self.stop)}


def builtin() -> ChatTemplate:
    return ChatTemplate(BUILTIN, "builtin", BUILTIN_STOP).compile()


def template_arg(value: str) -> str:
    """``--chat-template``'s value as template text: a file's content, or the value itself when
    it is Jinja2 (holds ``{{``, ``{%`` or ``{#``); compiled once here so a bad one fails at
    startup."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a template too long to be a file name
        is_file = False
    if is_file:
        text = _read_text(path, MAX_TEMPLATE_BYTES)
        ChatTemplate(text, str(path)).compile()
        return text
    if not any(mark in value for mark in ("{{", "{%", "{#")):
        raise TemplateError(
            f"--chat-template {value!r} is neither a file nor a Jinja2 template"
        )
    ChatTemplate(value, "--chat-template").compile()
    return value


def from_checkpoint(checkpoint_path: Path) -> ChatTemplate | None:
    """The template a checkpoint carries, if any (see the module docstring for where)."""
    folder = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
    text = _read_confined(folder, TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
    if text is not None:
        return ChatTemplate(text, f"checkpoint {TEMPLATE_FILE}")
    for name in ("config.json", "tokenizer_config.json"):
        raw = _read_confined(folder, name, MAX_JSON_BYTES)
        if raw is None:
            continue
        try:
            meta = json.loads(raw)
        except ValueError:
            continue  # the loader owns reporting a bad config; it has no template for us
        found = meta.get("chat_template") if isinstance(meta, dict) else None
        if isinstance(found, list):  # Hugging Face's named templates: use the default one
            found = next(
                (t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"),
                None,
            )
        if found is None:
            continue
        if not isinstance(found, str):
            raise TemplateError(f"checkpoint {name}: chat_template must be a string")
        return ChatTemplate(found, f"checkpoint {name}")
    return None


def _read_confined(folder: Path, name: str, limit: int) -> str | None:
    """``folder/name`` as text if it exists; refused unless a regular file inside ``folder``."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        resolved = path.resolve(strict=True)
        inside = resolved.is_relative_to(folder.resolve(strict=True))
    except (OSError, RuntimeError):  # /v1/models shows this: no filesystem paths in it
        raise TemplateError(f"checkpoint {name}: a dangling or looping link") from None
    if not inside:
        raise TemplateError(f"checkpoint {name}: points outside the checkpoint folder")
    return _read_text(resolved, limit, label=f"checkpoint {name}")


def _read_text(path: Path, limit: int, *, label: str | None = None) -> str:
    label = label or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise TemplateError(f"{label}: cannot be opened ({err.strerror})") from None
    try:  # fstat before wrapping: os.fdopen raises on a folder and leaves its fd open
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TemplateError(f"{label}: not a regular file")
        if info.st_size > limit:
            raise TemplateError(f"{label}: larger than {limit} bytes")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since fstat
        raise TemplateError(f"{label}: larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TemplateError(f"{label}: not UTF-8 text ({err.reason} at byte {err.start})") from None


@dataclass(frozen=True)
class _Broken:
    error: TemplateError


class ChatTemplates:
    """Owns which template each engine's chat requests use: the flag's, else each checkpoint's own
    (resolved once per engine, since a live reload may bring one that carries its own), else the
    builtin; and where each renders: the builtin in this process, any other in ``worker`` (a
    ``service.template_worker.TemplateWorker``), off the event loop with a time and memory bound.
    """

    def __init__(self, flag_template: str | None, worker: Any) -> None:
        self._flag = ChatTemplate(flag_template, "--chat-template") if flag_template else None
        self._builtin = builtin()
        self._worker = worker
        # engine -> the task resolving its template; the task holds the path, not the engine
        self._by_engine: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def for_engine(self, engine: Any) -> ChatTemplate:
        """The template for ``engine``; ``TemplateError`` if its checkpoint's one is unusable."""
        if self._flag is not None:
            return self._flag
        task = self._by_engine.get(engine)
        if task is None:
            path = getattr(getattr(engine, "checkpoint", None), "path", None)
            task = self._by_engine[engine] = asyncio.ensure_future(self._resolve(path))
        try:
            found = await asyncio.shield(task)  # a cancelled request leaves it to the next one
        except Exception:  # not the template's fault (no process could start): try again later
            if self._by_engine.get(engine) is task:
                del self._by_engine[engine]
            raise
        if isinstance(found, _Broken):
            raise found.error
        return found

    async def render(
        self, template: ChatTemplate, messages: list[dict[str, Any]], *, eos_token: str = ""
    ) -> str:
        """``template``'s prompt for ``messages``; ``TemplateError`` if it fails or passes a
        bound."""
        if template is self._builtin:  # ours: linear in the messages, microseconds
            return template.render(messages, eos_token=eos_token)
        return await self._worker.render(template, messages, eos_token)

    async def card(self, engine: Any) -> dict[str, Any]:
        """What ``/v1/models`` says about the template in use."""
        try:
            return (await self.for_engine(engine)).card()
        except TemplateError as err:
            return {"origin": "checkpoint", "template": None, "stop": [], "error": str(err)}

    async def close(self) -> None:
        await self._worker.close()

    async def _resolve(self, path: Any) -> ChatTemplate | _Broken:
        if not isinstance(path, Path):
            return self._builtin
        try:
            found = await asyncio.to_thread(from_checkpoint, path)  # file reads: off the loop
            if found is None:
                return self._builtin
            await self._worker.compile(found)
            return found
        except TemplateError as err:
            return _Broken(err)
