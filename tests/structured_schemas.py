"""The JSON schemas the structured-output tests and ``bench/structured.py`` use.

Each is bounded (strings have ``maxLength``, arrays ``maxItems``, numbers ranges or enums), so a
model constrained by it must reach the end of the structure well within ``MAX_TOKENS`` and finish
with ``stop``. Together they cover nested objects, arrays with bounds, enums, consts, patterns,
formats, integer and number ranges, required and optional fields, ``anyOf`` and ``$ref``.
"""

from __future__ import annotations

MAX_TOKENS = 160  # generous: the longest schema's longest instance, one BPE token per char

_name = {"type": "string", "maxLength": 8}
SCHEMAS: dict[str, dict] = {
    "boolean": {"type": "boolean"},
    "small_integer": {"type": "integer", "minimum": 0, "maximum": 99},
    "negative_range": {"type": "integer", "minimum": -50, "maximum": -3},
    "enum_string": {"enum": ["red", "green", "blue"]},
    "const": {"const": "fixed"},
    "null": {"type": "null"},
    "short_string": {"type": "string", "maxLength": 12},
    "pattern_string": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"},
    "date_format": {"type": "string", "format": "date"},
    "flat_object": {
        "type": "object",
        "properties": {"name": _name, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                       "note": _name, "flag": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": _name,
                               "address": {"type": "object",
                                           "properties": {"city": _name, "zip": {
                                               "type": "string", "pattern": "^[0-9]{5}$"}},
                                           "required": ["city", "zip"],
                                           "additionalProperties": False}},
                "required": ["name", "address"],
                "additionalProperties": False,
            },
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "bounded_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 1, "maxItems": 4},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2,
                       "maxItems": 3},
    "array_of_objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"k": _name, "v": {"type": "boolean"}},
                  "required": ["k", "v"], "additionalProperties": False},
        "maxItems": 2,
    },
    "tuple_items": {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": [1, 2]}],
                    "items": False},
    "number_range": {"type": "number", "enum": [0.5, 1.25, 2.0]},
    "integer_enum": {"enum": [1, 10, 100]},
    "any_of": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 5}]},
    "nullable": {"type": ["integer", "null"], "minimum": 0, "maximum": 3},
    "ref": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "tool_arguments": {
        "type": "object",
        "properties": {"location": _name, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"],
        "additionalProperties": False,
    },
}
