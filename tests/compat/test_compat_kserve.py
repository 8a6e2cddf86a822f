"""The differential test of KServe (issue 14): TorchServe 0.12 with ``service_envelope=kserve`` or ``kservev2`` (its
request envelopes wrap the handler) and servekit with the same config.properties, serving an mnist-like model written
for TorchServe, sent the KServe requests of TorchServe's own Postman collections. Run with `make compat`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.archives import build_store, digit_b64, digit_pixels, digit_png
from tests.compat.cases import D_OIP, D_RAISED, D_RESULT_TYPE, case, exp, req
from tests.compat.exchange import UUID, Case, check
from tests.compat.servers import Pair, require_peers, running_pair

pytestmark = pytest.mark.compat

JSON = (("content-type", "application/json"),)
PNG = (("content-type", "image/png"),)


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def v2_input(seed: int, **more: object) -> bytes:
    tensor = {"name": "input-0", "shape": [1, 28, 28], "datatype": "FP32", "data": digit_pixels(seed)}
    return body({**more, "inputs": [tensor]})


# TorchServe's mnist_v2_bytes.json: a base64 PNG as a BYTES tensor
BYTES_INPUT = {"name": "png", "shape": [-1], "datatype": "BYTES", "data": [digit_b64(4)]}
V1 = [
    case(
        "v1_predict",
        req(
            "POST",
            "/v1/models/mnist:predict",
            body({"instances": [{"data": digit_b64(1)}, {"data": digit_b64(2)}]}),
            JSON,
        ),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "v1_explain",
        req("POST", "/v1/models/mnist:explain", body({"instances": [{"data": digit_b64(1)}]}), JSON),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case("v1_models", req("GET", "/v1/models"), expected=(exp("status", D_OIP), exp("body", D_OIP))),
    case("v1_model", req("GET", "/v1/models/mnist"), expected=(exp("status", D_OIP), exp("body", D_OIP))),
    case(
        "v1_predictions_json_instances",
        req("POST", "/predictions/mnist", body({"instances": [{"data": digit_b64(3)}]}), JSON),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "v1_predictions_png",
        req("POST", "/predictions/mnist", digit_png(3), PNG),
        expected=(exp("status", D_RAISED), exp("body", D_RAISED)),
    ),
]
V2 = [
    case(
        "v2_infer",
        req("POST", "/v2/models/mnist/infer", v2_input(1, id="d3b15cad-50a2-4eaf-80ce-8b0a428bd298"), JSON),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "v2_infer_without_id",
        req("POST", "/v2/models/mnist/infer", v2_input(2), JSON),
        subs=(UUID,),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "v2_infer_bytes",
        req("POST", "/v2/models/mnist/infer", body({"id": "7", "inputs": [BYTES_INPUT]}), JSON),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "v2_explain",
        req("POST", "/v2/models/mnist/explain", v2_input(1, id="8"), JSON),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case("v2_model_metadata", req("GET", "/v2/models/mnist"), expected=(exp("status", D_OIP), exp("body", D_OIP))),
    case(
        "v2_predictions_png",
        req("POST", "/predictions/mnist", digit_png(3), PNG),
        subs=(UUID,),
        expected=(exp("status", D_RAISED), exp("body", D_RAISED)),
    ),
]
CASES = {"kserve": V1, "kservev2": V2}
PARAMS = [pytest.param(envelope, c, id=f"{envelope}-{c.name}") for envelope, cases in CASES.items() for c in cases]


class Pairs:
    """One TorchServe/servekit pair at a time, for the envelope of the running cases."""

    def __init__(self, root: Path) -> None:
        self.root, self.envelope, self.stack = root, "", contextlib.ExitStack()
        self.pair: Pair | None = None

    def get(self, envelope: str) -> Pair:
        if envelope != self.envelope or self.pair is None:
            self.stack.close()
            self.envelope, root = envelope, self.root / envelope
            root.mkdir()
            store = build_store(root, ("mnist",))
            self.pair = self.stack.enter_context(
                running_pair(root, store, ["mnist=mnist.mar"], {"service_envelope": envelope})
            )
        return self.pair


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pairs]:
    require_peers()
    found = Pairs(tmp_path_factory.mktemp("compat-kserve"))
    with found.stack:
        yield found


@pytest.mark.parametrize(("envelope", "case"), PARAMS)
def test_compat_kserve(pairs: Pairs, envelope: str, case: Case) -> None:
    check(case, pairs.get(envelope))
