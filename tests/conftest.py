"""Every test that starts a server, a worker process or a subprocess is marked ``slow``, without a marker in each
module: only the unit tests of ``FAST`` are not, so that ``pytest -m "not slow"`` is a loop of seconds (issue 16) and
bare ``pytest`` still runs everything. A new module is slow until it is named here: keep these in-process, no
subprocess and no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest

FAST = {  # tests/ modules whose tests run in process, in well under a second each
    "test_batcher_unit.py",
    "test_config.py",
    "test_exposition.py",
    "test_oip.py",
    "test_pool_unit.py",
    "test_protocol_unit.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).name not in FAST:
            item.add_marker(pytest.mark.slow)
