"""Structured-output constraints as the engine takes them, built the same for HTTP and offline.

``structured_outputs(json=..., regex=..., choice=..., grammar=..., json_object=True)`` mirrors
vLLM's ``StructuredOutputsParams`` for the offline ``LLM`` API; the HTTP fields
(``service.api.structured``) go through the same ``constraint``. A JSON schema is normalised once
here: objects that list properties are closed (``closed``), and the text is compact JSON
(``canonical_json``), the grammar cache's key.
"""

from __future__ import annotations

import json as _json
from typing import Any

from service.engine.types import InvalidRequestError, StructuredOutputs

JSON_OBJECT = {"type": "object"}  # json_object mode: any JSON object


def canonical_json(schema: object) -> str:
    """A schema's canonical text (the grammar cache's key): compact, keys in the client's order
    (properties are generated in schema order, as OpenAI's strict mode does)."""
    return _json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def json_constraint(schema: object, param: str) -> StructuredOutputs:
    """A JSON-schema constraint from a schema given as an object or as JSON text."""
    if isinstance(schema, str):
        try:
            schema = _json.loads(schema)
        except _json.JSONDecodeError as err:
            raise InvalidRequestError(param, f"{param}: the schema is not valid JSON: {err}") \
                from None
    if not isinstance(schema, dict):
        raise InvalidRequestError(param, f"{param}: a JSON schema must be an object")
    return StructuredOutputs("json", canonical_json(closed(schema)), param)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else",
            "propertyNames", "additionalProperties", "unevaluatedProperties")


def closed(schema: object) -> object:
    """``schema`` with every object that lists ``properties`` and says nothing of others closed
    (``"additionalProperties": false``): what OpenAI's strict mode requires and xgrammar's strict
    mode (vLLM's default) does. Its outputs still validate against the schema as given; left
    open, a model may add properties until ``max_tokens``."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: closed(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [closed(sub) for sub in value]
        elif key in _SCHEMAS:
            value = [closed(s) for s in value] if isinstance(value, list) else closed(value)
        out[key] = value
    if "properties" in out and not {"additionalProperties", "patternProperties",
                                    "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def constraint(kind: str, value: Any, param: str) -> StructuredOutputs:
    """One constraint of ``kind`` from its request value (a 400 naming ``param`` if malformed)."""
    if kind == "json":
        return json_constraint(value, param)
    if kind == "json_object":
        return json_constraint(JSON_OBJECT, param)
    if kind == "choice":
        if not value or any(not c for c in value):
            raise InvalidRequestError(param, f"{param}: choice must be a non-empty list of "
                                             "non-empty strings")
        return StructuredOutputs("choice", _json.dumps(value, ensure_ascii=False), param)
    return StructuredOutputs(kind, value, param)  # regex, grammar: the text itself


def structured_outputs(*, json: Any = None, regex: str | None = None,  # noqa: A002
                       choice: list[str] | None = None, grammar: str | None = None,
                       json_object: bool | None = None,
                       param: str = "structured_outputs") -> StructuredOutputs:
    """Exactly one constraint, as vLLM's ``StructuredOutputsParams`` takes it: ``json`` (a
    schema, as an object or JSON text), ``regex``, ``choice`` (strings), ``grammar`` (Lark or
    GBNF) or ``json_object=True`` (any JSON object)."""
    given = {k: v for k, v in (("json", json), ("regex", regex), ("choice", choice),
                               ("grammar", grammar)) if v is not None}
    if json_object:
        given["json_object"] = True
    if len(given) != 1:
        raise InvalidRequestError(
            param, f"{param} must hold exactly one of json, regex, choice, grammar, "
            f"json_object; got {len(given)}")
    [(kind, value)] = given.items()
    return constraint(kind, value, param)
