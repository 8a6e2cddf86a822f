"""Normalizers of the differential test: masks of what legitimately varies between two runs (ids, times, hosts,
counts), regular expressions on the text of both answers, and what a documented difference may change
(``Expected.tolerate``, ``Case.fix``), each applied to both servers' answers alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

HOSTNAMES = (r'(?i)(hostname)="[^"]*"', r'\1="H"')
SAMPLE_VALUES = (r"^([^#\n].*) \S+$", r"\1 N")
# A describe's per-run worker values (ids, pids, start times, memory), masked in its text: the rest is compared byte
# for byte.
WORKERS = (r'^(\s*"(?:id|pid|startTime|memoryUsage)": )(?:"[^"]*"|-?\d+)', r"\1*")


def on_json(change: Callable[[Any], Any]) -> Callable[[str], str]:
    """A tolerance on a JSON body (given in canonical text) from a change of its parsed value."""

    def tolerate(text: str) -> str:
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return json.dumps(change(value), sort_keys=True, ensure_ascii=False)

    return tolerate


def without(*keys: str) -> Callable[[str], str]:
    """Tolerate differences in these keys of a JSON object, or of each object of a JSON list."""

    def change(value: Any) -> Any:
        if isinstance(value, list):
            return [change(item) for item in value]
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in keys}
        return value

    return on_json(change)


def any_header_case(value: Any) -> Any:
    """Inspect's answers with ``get_request_header(i, "Content-Type")`` and ``(i, "content-type")`` merged: the
    lookup is exact-case in TorchServe and lower-case in servekit."""
    for row in value if isinstance(value, list) else [value]:
        headers = row.get("headers") if isinstance(row, dict) else None
        if isinstance(headers, dict):
            for name in [n for n in headers if n != n.lower()]:
                merged = headers.pop(name) or headers.get(name.lower())
                headers[name.lower()] = merged
    return value


def sorted_lines(text: str) -> str:
    return "\n".join(sorted(text.splitlines()))
