"""Checks every text must pass before it reaches a tokenizer (serving and training alike)."""

from __future__ import annotations

import json
from typing import Any


def encoding_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None.

    JSON may carry lone UTF-16 surrogates (`"\\ud800"`): valid JSON, a valid Python str, but not
    encodable as UTF-8, and Rust tokenizers raise on them. Such a text in a batch used to fail
    every row of the batch, whoever sent it; it is refused at the door instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"character {e.start} is a lone surrogate (U+{ord(text[e.start]):04X}), which is "
            "not valid Unicode text; send the text as UTF-8 (pair surrogates in JSON escapes)"
        )
    return None


MAX_JSON_DEPTH = 64


class JSONError(ValueError):
    """A JSON document that cannot be taken, with a message fit for the client."""


def parse_json(raw: bytes | str) -> Any:
    """`json.loads`, with every way it can fail turned into a JSONError naming the problem:
    syntax, bad UTF-8, nesting deeper than MAX_JSON_DEPTH (deeper documents would also exhaust
    the validators' recursion), integers of more than 4300 digits."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise JSONError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise JSONError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise JSONError(f"a number is too large: {str(e).split(';')[0]}") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JSONError(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
