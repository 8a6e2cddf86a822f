"""A declarative HTTP exchange sent to TorchServe and to servekit, and the comparison of what a client reads of both
answers: status, body and chosen headers, after normalizers for what legitimately varies. A difference is expected
only when the case lists it with the words of docs/migration.md that document it."""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import torch

from tests.compat.servers import Endpoint, Pair

MIGRATION = Path(__file__).resolve().parent.parent.parent / "docs" / "migration.md"
Port = Literal["inference", "management", "metrics"]
# json and text: the same text, byte for byte, after the case's masks (``subs``) of what varies between runs (and, for
# json with ``fix``, the same JSON after that change); bytes: exact; tensor: torch.load'ed values equal
BodyMode = Literal["json", "text", "bytes", "tensor", "skip"]
# The headers a client reads. Compared by value, except those of PRESENCE (compared by presence only).
CLIENT_HEADERS = ("content-type", "x-request-id", "retry-after", "cache-control", "pragma", "expires")
PRESENCE = frozenset({"x-request-id"})
ABSENT = "<absent>"
UUID = (r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    port: Port = "inference"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds after the case starts, for requests sent concurrently
    timeout: float = 180.0  # past it, "no answer"


@dataclass(frozen=True)
class Expected:
    """A documented difference in one aspect ("status", "reason", "body", "header:<name>", with "[i]" for the i-th
    of several requests). With ``tolerate``, only what it removes may differ: it is applied to both values, which
    must then be equal. With ``sometimes``, TorchServe differs in some runs only, so an equal answer is not stale.
    With ``also``, a TorchServe value it accepts is expected whatever ``tolerate`` says: TorchServe's other outcome
    of a race, documented by ``also_docs``."""

    aspect: str
    docs: str  # words of docs/migration.md (whitespace-insensitive) that document the difference
    tolerate: Callable[[str], str] | None = None
    sometimes: bool = False
    also: Callable[[str], bool] | None = None
    also_docs: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    requests: tuple[Request, ...]
    body: BodyMode = "json"
    headers: tuple[str, ...] = CLIENT_HEADERS
    reason: bool = False  # compare the reason phrase too
    subs: tuple[tuple[str, str], ...] = ()  # (regex, replacement) on both bodies' text: masks of what varies per run
    fix: Callable[[Any], Any] | None = None  # on both parsed JSON bodies, for a documented difference inside them
    expected: tuple[Expected, ...] = ()


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (the error says why)
    reason: str = ""
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: bytes = b""
    error: str = ""


@dataclass(frozen=True)
class Difference:
    case: str
    aspect: str
    torchserve: str
    servekit: str
    verdict: Literal["expected", "unexpected", "stale"]
    docs: str = ""

    def line(self) -> str:
        """The difference in three lines, values shortened."""
        head = f"{self.case} {self.aspect}: {self.verdict}" + (f" (docs: {self.docs!r})" if self.docs else "")
        return head + f"\n  torchserve: {shorten(self.torchserve)}\n  servekit:   {shorten(self.servekit)}"

    def render(self) -> str:
        head = f"{self.case} {self.aspect}: {self.verdict}" + (f" (docs: {self.docs!r})" if self.docs else "")
        if self.verdict == "stale":
            return head + f"\n  both answer {self.servekit!r}: drop this expected difference (and its docs line?)"
        ts, sk = readable(self.torchserve), readable(self.servekit)
        if "\n" in ts or "\n" in sk:
            lines = difflib.unified_diff(ts.splitlines(), sk.splitlines(), "torchserve", "servekit", lineterm="")
            return head + "\n" + "\n".join("  " + line for line in lines)
        return head + f"\n  torchserve: {ts}\n  servekit:   {sk}"


def shorten(value: str, width: int = 240) -> str:
    value = " ".join(value.split())
    return value if len(value) <= width else value[:width] + " ..."


def readable(value: str) -> str:
    """Long JSON on one line indented, so that a diff shows the lines that differ."""
    if len(value) > 160 and "\n" not in value.strip():
        with contextlib.suppress(ValueError):
            return json.dumps(json.loads(value), indent=1, sort_keys=True, ensure_ascii=False)
    return value


def send(endpoint: Endpoint, request: Request) -> Answer:
    time.sleep(request.delay)
    try:
        response = httpx.request(
            request.method,
            endpoint.url(request.port, request.path),
            content=request.body,
            headers=list(request.headers),
            timeout=request.timeout,
        )
    except httpx.HTTPError as exc:
        return Answer(None, error=f"no answer: {type(exc).__name__}: {exc}")
    return Answer(response.status_code, response.reason_phrase, response.headers, response.content)


def exchange(endpoint: Endpoint, case: Case) -> list[Answer]:
    if len(case.requests) == 1:
        return [send(endpoint, case.requests[0])]
    with ThreadPoolExecutor(len(case.requests)) as pool:
        return list(pool.map(lambda r: send(endpoint, r), case.requests))


def body_text(case: Case, body: bytes) -> str:
    if case.body == "tensor":
        try:
            return json.dumps(torch.load(io.BytesIO(body)).tolist())
        except Exception as exc:  # what cannot be loaded is shown as it came
            return f"<not a tensor: {type(exc).__name__}> {body[:200]!r}"
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return repr(body)
    for pattern, replacement in case.subs:
        text = re.sub(pattern, replacement, text, flags=re.MULTILINE)
    if case.body != "json":
        return str(case.fix(text)) if case.fix else text
    if not text or case.fix is None:
        return text  # byte for byte: TorchServe's layout (indents, key order, number forms, final newline) too
    try:
        value = json.loads(text)
    except ValueError:
        return f"<not JSON> {text}"
    return json.dumps(case.fix(value), indent=2, ensure_ascii=False)


def aspects(case: Case, answer: Answer) -> dict[str, str]:
    """What a client reads of one answer, aspect by aspect, as comparable text."""
    if answer.status is None:
        return {"status": answer.error}
    found = {"status": str(answer.status)}
    if case.reason:
        found["reason"] = answer.reason
    for name in case.headers:
        values = answer.headers.get_list(name)
        shown = ", ".join(values) if values else ABSENT
        found[f"header:{name}"] = ("<present>" if values else ABSENT) if name in PRESENCE else shown
    if case.body != "skip":
        found["body"] = body_text(case, answer.body)
    return found


def documented(words: str) -> bool:
    return " ".join(words.split()) in " ".join(MIGRATION.read_text().split())


def compare(case: Case, pair: Pair) -> list[Difference]:
    """Send the case to both servers (TorchServe first) and judge every aspect."""
    answers = {name: exchange(getattr(pair, name), case) for name in ("torchserve", "servekit")}
    expected = {e.aspect: e for e in case.expected}
    found: list[Difference] = []
    seen: set[str] = set()
    for idx, (ts_answer, sk_answer) in enumerate(zip(answers["torchserve"], answers["servekit"], strict=True)):
        suffix = f"[{idx}]" if len(case.requests) > 1 else ""
        ts, sk = aspects(case, ts_answer), aspects(case, sk_answer)
        if ts_answer.status is None or sk_answer.status is None:  # no answer: nothing else to compare
            ts, sk = {"status": ts["status"]}, {"status": sk["status"]}
            seen.update(e.aspect for e in case.expected if e.aspect.endswith(suffix))
        for aspect in dict.fromkeys([*ts, *sk]):
            key = aspect + suffix
            seen.add(key)
            ts_value, sk_value = ts.get(aspect, ABSENT), sk.get(aspect, ABSENT)
            known = expected.get(key)
            docs = known.docs if known else ""
            if ts_value == sk_value:
                if known and not known.sometimes:
                    found.append(Difference(case.name, key, ts_value, sk_value, "stale", docs))
                continue
            other_outcome = known is not None and known.also is not None and known.also(ts_value)
            if known and known.tolerate and not other_outcome and known.tolerate(ts_value) != known.tolerate(sk_value):
                ts_value, sk_value = known.tolerate(ts_value), known.tolerate(sk_value)
                found.append(Difference(case.name, key, ts_value, sk_value, "unexpected", f"beyond {docs}"))
                continue
            found.append(Difference(case.name, key, ts_value, sk_value, "expected" if known else "unexpected", docs))
    for key in {k for k, e in expected.items() if not e.sometimes} - seen:
        found.append(Difference(case.name, key, "", "", "unexpected", f"no such aspect: {expected[key].docs}"))
    return found


# Every judged difference of this run, for the summary at the end (conftest.py).
RECORDED: list[Difference] = []


def check(case: Case, pair: Pair) -> None:
    """Compare; fail on any difference that the case does not list, and on a listed one that is gone."""
    for known in case.expected:
        for docs in (known.docs, known.also_docs):
            assert not docs or documented(docs), f"{case.name}: {docs!r} is not in {MIGRATION}"
    differences = compare(case, pair)
    RECORDED.extend(differences)
    problems = [d.render() for d in differences if d.verdict != "expected"]
    assert not problems, "\n".join(problems)
