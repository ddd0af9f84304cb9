"""Triton's ``config.pbtxt``: protobuf text format written from plain Python values.

    to_pbtxt({"name": "m", "max_batch_size": 4, "input": [{"name": "x", "data_type": Enum("TYPE_FP32"),
                                                           "dims": [-1, 3]}]})

dict -> a message (``key { ... }``), list of dicts -> a repeated message (``key [ {...}, {...} ]``),
list of scalars -> ``key: [1, 2]``, str -> a quoted string, bool -> true/false, ``Enum`` -> a bare
enum name. Map fields (``parameters``) are written as repeated ``{ key value }`` entries, which is
how protobuf text format spells a map. Parsed back by protobuf's own ``text_format`` into
tritonclient's ``model_config_pb2.ModelConfig`` in tests/test_triton.py (strict: an unknown field
or a wrong type fails there).
"""

from __future__ import annotations

import json

INDENT = "  "


class Enum(str):
    """An enum value (TYPE_FP32, KIND_CPU, ...): written without quotes."""


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid protobuf text string literal
    raise TypeError(f"cannot write {type(value).__name__} {value!r} in a config.pbtxt")


def _field(key: str, value, depth: int) -> list[str]:
    pad = INDENT * depth
    if isinstance(value, dict):
        return [f"{pad}{key} {{", *_body(value, depth + 1), f"{pad}}}"]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        lines = [f"{pad}{key} ["]
        for i, item in enumerate(value):
            lines += [f"{pad}{INDENT}{{", *_body(item, depth + 2),
                      f"{pad}{INDENT}}}" + ("," if i < len(value) - 1 else "")]
        return lines + [f"{pad}]"]
    if isinstance(value, list):
        return [f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _body(message: dict, depth: int) -> list[str]:
    lines: list[str] = []
    for key, value in message.items():
        if value is None:
            continue
        lines += _field(key, value, depth)
    return lines


def to_pbtxt(message: dict) -> str:
    """The text of one ModelConfig message (fields in the dict's order; None values left out)."""
    return "\n".join(_body(message, 0)) + "\n"


def parameters(values: dict[str, str]) -> list[dict]:
    """A ``parameters`` map (string values, as every backend reads them)."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]
