"""Command lines generated from frozen config dataclasses, shared by the server
(``service.settings``) and the trainer (``trainer.cli``): one field is one flag.

- ``flag(name)``: ``max_iters`` -> ``--max-iters``;
- ``field_type(field)``: the argparse ``type`` of a field annotated ``int``, ``float``, ``str`` or
  ``Path`` (optionally ``| None``), None for any other annotation (the caller decides);
- ``SuggestingParser``: argparse that names the closest flag, of the parser or any of its
  commands, when one is mistyped (``--chekpoint``: did you mean ``--checkpoint``?), in one line
  instead of the whole usage.

Torch-free: the command lines build (and ``--help`` answers) before torch loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

_TYPES = {"int": int, "float": float, "str": str, "Path": Path}


def flag(name: str) -> str:
    """The command-line flag of a config field: ``max_iters`` -> ``--max-iters``."""
    return "--" + name.replace("_", "-")


def field_type(field: dataclasses.Field) -> type | None:
    """``int``, ``float``, ``str`` or ``Path`` for a field annotated so (``| None`` allowed)."""
    return _TYPES.get(str(field.type).split(" |")[0].strip())


class SuggestingParser(argparse.ArgumentParser):
    """argparse, naming the closest flag when one is mistyped; exits 2 like argparse."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{flag_hint(self, message)}\n"
                     f"{self.prog} --help lists every flag\n")  # fmt: skip


def flag_hint(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (--x: did you mean --y?)`` for each unrecognized ``--flag`` in argparse's ``message``."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return ""
    known = option_strings(parser)
    hints = []
    for arg in message[len(prefix):].split():
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1) if name.startswith("--") else []
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    return f" ({'; '.join(hints)})" if hints else ""


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of ``parser`` and of its commands."""
    found = []
    for action in parser._actions:
        found += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found += option_strings(command)
    return list(dict.fromkeys(found))
