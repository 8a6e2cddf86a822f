"""The differential test of the REST APIs (issue 14): each exchange of cases.py is sent to TorchServe 0.12 and to
servekit, both serving the same archives with the same config.properties and flags; what a client reads of the two
answers must be the same but for the differences that docs/migration.md documents. Run with `make compat`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compat.archives import STARTUP, build_store
from tests.compat.cases import CASES
from tests.compat.exchange import Case, check, documented
from tests.compat.servers import Pair, require_peers, running_pair

pytestmark = pytest.mark.compat

KEYS = {
    "metrics_mode": "prometheus",  # TorchServe's /metrics is empty in its default "log" mode
    "enable_model_api": "true",
    "max_request_size": "100000",
    "unregister_model_timeout": "2",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    require_peers()
    root = tmp_path_factory.mktemp("compat-rest")
    with running_pair(root, build_store(root), [f"{m}={m}.mar" for m in STARTUP], KEYS) as started:
        yield started


def test_compat_expected_differences_cite_the_docs() -> None:
    missing = {e.docs for c in CASES for e in c.expected if not documented(e.docs)}
    assert not missing


def test_compat_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compat_rest(pair: Pair, case: Case) -> None:
    check(case, pair)
