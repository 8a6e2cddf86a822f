"""Lenient JSON, as TorchServe reads a JSON registration body (Gson's lenient mode): besides JSON, single-quoted
strings, unquoted names and string values, ``=`` or ``=>`` between a name and its value, ``;`` between members, and
``//``, ``#`` and ``/* */`` comments. TorchServe's own tests register with
``{'url':'noop.mar', 'model_name':'noop', 'initial_workers':'1', 'synchronous':'true'}``.

The text is rewritten token by token into strict JSON and parsed by ``json``, so nesting and the values themselves
follow JSON's rules. Standard library only.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TOKEN = re.compile(
    r"""
      (?P<skip>\s+|//[^\n]*|\#[^\n]*|/\*.*?\*/)
    | (?P<double>"(?:[^"\\]|\\.)*")
    | (?P<single>'(?:[^'\\]|\\.)*')
    | (?P<name_sep>=>|[=:])
    | (?P<member_sep>[;,])
    | (?P<bracket>[{}\[\]])
    | (?P<literal>[^\s/\\;\#={}\[\]:,'"]+)
    """,
    re.VERBOSE | re.DOTALL,
)
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_ESCAPE = re.compile(r"\\(.)|\"", re.DOTALL)


def _double_quoted(single: str) -> str:
    """A single-quoted string as a JSON string: ``\\'`` loses its backslash and a bare ``"`` gains one."""

    def convert(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return '\\"'
        return "'" if match.group(1) == "'" else match.group(0)

    return '"' + _ESCAPE.sub(convert, single[1:-1]) + '"'


def _strict(text: str) -> str:
    """``text`` rewritten as strict JSON; ``ValueError`` at the first character that no token starts with."""
    out: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unexpected {text[position]!r} at position {position}")
        kind, token = match.lastgroup, match.group()
        if kind == "single":
            out.append(_double_quoted(token))
        elif kind == "name_sep":
            out.append(":")
        elif kind == "member_sep":
            out.append(",")
        elif kind == "literal":
            keyword = token.lower()
            if keyword in ("true", "false", "null"):
                out.append(keyword)
            else:
                out.append(token if _NUMBER.fullmatch(token) else json.dumps(token))
        elif kind != "skip":
            out.append(token)
        position = match.end()
    return " ".join(out)


def loads(text: str) -> Any:
    """Parse JSON, or what Gson's lenient mode accepts; ``ValueError`` (a ``json.JSONDecodeError`` for bad JSON)
    naming what is wrong otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as strict_error:
        try:
            return json.loads(_strict(text))
        except ValueError:
            raise strict_error from None
