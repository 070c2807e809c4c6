"""Structured outputs on the wire: the request fields that constrain generation, and their compile.

Both endpoints take (at most one of):
- OpenAI's ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": true}}`` (``{"type": "text"}``: none);
- vLLM's ``structured_outputs``: ``{"json": schema, "regex": ..., "choice": [...], "grammar":
  ..., "json_object": true}``, one constraint, as vLLM's ``StructuredOutputsParams``;
- vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.

Each becomes the engine's ``StructuredOutputs`` (canonical text, the field it came from), which
``compile_constraint`` compiles on the engine's grammar compiler in a worker thread, within
``--grammar-timeout``: every failure is a 400 naming the field. Chat's ``tools`` build on the
same path (``service.api.tools``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from service.api.protocol import StructuredOutputsRequest
from service.engine.constraints import JSON_OBJECT, constraint, json_constraint
from service.engine.types import InvalidRequestError, StructuredOutputs


def from_response_format(value: dict[str, Any]) -> StructuredOutputs | None:
    """OpenAI's ``response_format``: text (no constraint), json_object or json_schema."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_constraint(JSON_OBJECT, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError(
                "response_format", 'response_format: "json_schema" needs a "json_schema" object '
                'with "name" and "schema"')
        schema = spec.get("schema", JSON_OBJECT)  # OpenAI makes it optional: any object
        return json_constraint(schema, "response_format")
    raise InvalidRequestError(
        "response_format", f'response_format: type {kind!r} is not supported; use "text", '
        '"json_object" or "json_schema"')


def from_structured_outputs(value: StructuredOutputsRequest) -> StructuredOutputs:
    """vLLM's ``structured_outputs``: exactly one constraint."""
    param = "structured_outputs"
    for option in ("whitespace_pattern", "structural_tag"):
        if getattr(value, option) is not None:
            raise InvalidRequestError(param, f"{param}.{option} is not supported")
    given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(value, name)]
    if value.json_object:
        given.append("json_object")
    if len(given) != 1:
        raise InvalidRequestError(
            param, f"{param} must hold exactly one of json, regex, choice, grammar, "
            f"json_object; got {len(given)}")
    return constraint(given[0].rstrip("_"), getattr(value, given[0]), param)


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def request_constraint(body) -> StructuredOutputs | None:
    """The constraint of a ``GenerationRequest`` (None: unconstrained); a 400 naming the field
    when two fields constrain at once or one is malformed."""
    found: list[StructuredOutputs] = []
    if body.response_format is not None:
        formatted = from_response_format(body.response_format)
        if formatted is not None:
            found.append(formatted)
    if body.structured_outputs is not None:
        found.append(from_structured_outputs(body.structured_outputs))
    for field, kind in GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            found.append(constraint(kind, value, field))
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise InvalidRequestError(found[1].param, f"only one constraint per request; got {names}")
    return found[0] if found else None


async def compile_constraint(engine, structured: StructuredOutputs) -> None:
    """Compile (or find cached) ``structured`` off the event loop, within the engine's
    ``grammar_timeout``; a 400 naming its field when it is invalid, impossible or too slow."""
    timeout = engine.config.grammar_timeout
    future = engine.grammars.submit(structured)
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise InvalidRequestError(
            structured.param, f"{structured.param}: the {structured.kind} constraint took longer "
            f"than {timeout:g}s to compile (--grammar-timeout); simplify it") from None
