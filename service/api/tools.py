"""Chat tool calls on top of structured outputs, as vLLM does them for a forced tool choice.

``tool_choice`` naming a function constrains the output to that function's ``parameters``
schema: the generated text is the call's ``arguments``. ``tool_choice: "required"`` constrains it
to a JSON array of ``{"name": ..., "parameters": {...}}`` over the given tools (at least one),
parsed into one call per item. Either way the choice answers ``message.tool_calls`` in OpenAI's
shape with ``content: null``. ``"auto"`` (OpenAI's default when tools are given) would need the
model to choose between text and a call in a format its chat template declares; these
checkpoints' templates declare none, so it is a 400. ``"none"`` ignores the tools.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from service.engine.constraints import canonical_json, closed
from service.engine.types import InvalidRequestError, StructuredOutputs

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's choices become tool calls: one named function, or any of ``names``."""

    mode: Literal["named", "required"]
    names: tuple[str, ...]
    constraint: StructuredOutputs

    def calls(self, text: str) -> list[ToolCall]:
        """The tool calls a choice's text holds (text cut short by ``length`` still answers, as
        OpenAI does: its arguments are the partial JSON)."""
        if self.mode == "named":
            return [_call(self.names[0], text)]
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return []
        return [_call(item["name"], canonical_json(item.get("parameters", {})))
                for item in items if isinstance(item, dict) and "name" in item]


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"chatcmpl-tool-{uuid.uuid4().hex}", function=FunctionCall(
        name=name, arguments=arguments))


def tool_plan(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """The plan for ``tools`` + ``tool_choice`` (None: plain text); a 400 naming the field for a
    malformed tool, an unknown name, or ``"auto"``."""
    functions = _functions(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if tool_choice == "none":
        return None
    if not functions:
        raise InvalidRequestError("tool_choice", f"tool_choice {_show(tool_choice)} needs tools")
    if tool_choice == "auto":
        raise InvalidRequestError(
            "tool_choice", 'tool_choice "auto" (the default when tools are given) needs a chat '
            "template that declares a tool-call format, and this model's declares none; use "
            '"required", name a function ({"type": "function", "function": {"name": ...}}), '
            'or "none"')
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name},
                                                    "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, params in functions.items()]
        schema = {"type": "array", "minItems": 1,
                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        return ToolPlan("required", tuple(functions),
                        StructuredOutputs("json", canonical_json(closed(schema)), "tools"))
    name = _named(tool_choice)
    if name not in functions:
        raise InvalidRequestError(
            "tool_choice", f"tool_choice names {name!r}, which is not among the tools "
            f"({', '.join(map(repr, functions))})")
    return ToolPlan("named", (name,),
                    StructuredOutputs("json", canonical_json(closed(functions[name])), "tools"))


def _functions(tools: list[Any]) -> dict[str, dict]:
    """Each tool's name -> its parameters schema, checking OpenAI's shape."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function"
                or not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not function["name"]):
            raise InvalidRequestError(
                "tools", f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                '"parameters": {...}}}')
        params = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise InvalidRequestError("tools", f"tools[{i}].function.parameters must be a JSON "
                                               "schema object")
        out[function["name"]] = params
    return out


def _named(tool_choice: Any) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(function, dict) or not isinstance(function.get("name"), str)):
        raise InvalidRequestError(
            "tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": '
            f'"function", "function": {{"name": ...}}}}; got {_show(tool_choice)}')
    return function["name"]


def _show(value: Any) -> str:
    return json.dumps(value)[:80] if not isinstance(value, str) else repr(value[:80])
