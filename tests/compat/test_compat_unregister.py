"""The differential test of an unregister past ``unregister_model_timeout`` (issue 14.5): TorchServe 0.12 and
servekit with ``unregister_model_timeout=0``, each serving the slow archive; the exchanges are cases.py's
``UNREGISTER_TIMEOUT``. Its own module, so that the pair of test_compat_rest.py is stopped before this one starts.
Run with `make compat`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.compat.archives import build_store
from tests.compat.cases import CASES, UNREGISTER_TIMEOUT
from tests.compat.exchange import Case, check
from tests.compat.servers import Pair, require_peers, running_pair
from tests.compat.test_compat_rest import KEYS

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    require_peers()
    root = tmp_path_factory.mktemp("compat-unregister")
    keys = {**KEYS, "unregister_model_timeout": "0"}
    with running_pair(root, build_store(root, ("slow",)), ["slow=slow.mar"], keys) as started:
        yield started


def test_compat_unregister_case_names_are_unique() -> None:
    names = [c.name for c in CASES + UNREGISTER_TIMEOUT]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("case", UNREGISTER_TIMEOUT, ids=[c.name for c in UNREGISTER_TIMEOUT])
def test_compat_unregister_timeout(pair: Pair, case: Case) -> None:
    check(case, pair)
