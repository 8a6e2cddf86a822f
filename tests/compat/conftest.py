"""The summary of the differential test: every difference it found, expected or not, after the run; also written as
Markdown to $COMPAT_REPORT when that is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.compat.exchange import RECORDED


def cell(text: str, width: int = 300) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width] + " …"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RECORDED:
        return
    counts = {v: sum(d.verdict == v for d in RECORDED) for v in ("unexpected", "stale", "expected")}
    terminalreporter.section("differences from TorchServe 0.12")
    for verdict in ("unexpected", "stale", "expected"):
        for difference in (d for d in RECORDED if d.verdict == verdict):
            terminalreporter.write_line(difference.line())
    terminalreporter.write_line(", ".join(f"{n} {v}" for v, n in counts.items()))
    if report := os.environ.get("COMPAT_REPORT"):
        rows = [
            "| case | aspect | verdict | TorchServe 0.12 | servekit | docs/migration.md |",
            "|---|---|---|---|---|---|",
        ]
        rows += [
            f"| {d.case} | {d.aspect} | {d.verdict} | {cell(d.torchserve)} | {cell(d.servekit)} | {cell(d.docs, 120)} |"
            for d in RECORDED
        ]
        Path(report).write_text("\n".join(rows) + "\n")
        terminalreporter.write_line(f"table of these differences: {report}")
