"""The model config's ``pt2`` section (servekit.pt2 through BaseHandler): its forms read as TorchServe 0.12 reads them,
torch.compile in the worker with a warm-up before the worker is ready, the same answers as the eager model, load
errors that name the setting, and AOTInductor packages.

Compiles with ``aot_eager`` and ``eager`` (no C++ compiler needed, about a second); the ``inductor`` and AOTInductor
tests need a C++ compiler, take tens of seconds from a cold cache and are marked ``slow``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch._dynamo.utils import counters

from servekit import archiver, pt2
from servekit.context import Context
from servekit.errors import HandlerError
from servekit.handler import BaseHandler
from tests.helpers import MLP_PY, Server, build_mlp, make_archive, running_server, write

# Each request: a JSON array of rows of 16 floats. Each answer: the model's rows, and how many graphs torch.compile had
# made in this worker before and after the batch (dynamo's counter): timing-free evidence of the warm-up.
HANDLER = """
import torch
from torch._dynamo.utils import counters
from ts.torch_handler.base_handler import BaseHandler


class Rows(BaseHandler):
    def preprocess(self, data):
        return torch.tensor([row for request in data for row in request["body"]], dtype=torch.float32)

    def handle(self, data, context):
        before = counters["stats"]["unique_graphs"]
        rows = self.inference(self.preprocess(data)).tolist()
        after = counters["stats"]["unique_graphs"]
        answers = []
        for request in data:
            answers.append({"rows": rows[: len(request["body"])], "graphs": [before, after]})
            rows = rows[len(request["body"]) :]
        return answers
"""
INPUTS = "inputs:\n  - {name: x, datatype: FP32, shape: [-1, 16]}\n"
COMPILED = "pt2:\n  compile: {enable: true, backend: aot_eager}\n" + INPUTS
BAD_BACKEND = "pt2:\n  compile: {enable: true, backend: nope}\n"
INDUCTOR = {"backend": "inductor", "mode": "default"}
ARGS = ("--disable-token-auth", "--ncs", "--enable-model-api")
NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
needs_compiler = pytest.mark.skipif(NO_COMPILER, reason="inductor on the CPU needs a C++ compiler (g++ or $CXX)")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pt2")
    store, work = root / "store", root / "work"
    store.mkdir()
    make_archive(store, "eager", HANDLER, work=work, model="eager", config=INPUTS)
    make_archive(store, "compiled", HANDLER, work=work, model="eager", config=COMPILED)
    make_archive(store, "bad", HANDLER, work=work, model="eager", config=BAD_BACKEND)
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("run"), store, ("eager.mar", "compiled.mar"), args=ARGS) as srv:
        yield srv


def manage(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.management + path, timeout=300, **kwargs)


def predict(server: Server, model: str, rows: list[list[float]]) -> dict[str, Any]:
    response = server.post(f"/predictions/{model}", json=rows, timeout=300)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def rows_of(n: int, seed: int) -> list[list[float]]:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)).tolist()


def assert_same_rows(got: list[list[float]], expected: list[list[float]]) -> None:
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5), (got, expected)


# --- reading the section -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "options", "source"),
    [
        ({"compile": {"enable": True, "backend": "inductor", "mode": "default"}}, INDUCTOR, "pt2.compile"),
        ({"compile": {"enable": True}}, {}, "pt2.compile"),  # torch.compile's default backend
        ({"compile": {"backend": "eager"}}, {"backend": "eager"}, "pt2.compile"),  # TorchServe: KeyError; here on
        ({"compile": {"enable": False, "backend": "inductor"}}, None, "pt2.compile"),
        ("inductor", {"backend": "inductor"}, "pt2"),  # TorchServe's older forms
        ({"backend": "aot_eager", "mode": "default"}, {"backend": "aot_eager", "mode": "default"}, "pt2"),
        ({}, {}, "pt2"),
        ({"export": {"aot_compile": True}}, None, "pt2.export"),
        (None, None, "pt2"),
    ],
)
def test_pt2_settings_read_torchserve_forms(section: Any, options: dict[str, Any] | None, source: str) -> None:
    settings = pt2.read_settings({"pt2": section})
    assert (settings.compile, settings.source) == (options, source)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pt2": 3}, "pt2: expected a backend name or a mapping, got int"),
        ({"pt2": {"compile": "inductor"}}, "pt2.compile: expected a mapping"),
        ({"pt2": {"compile": {"enable": "yes"}}}, "pt2.compile.enable: expected true or false, got 'yes'"),
        ({"pt2": {"compile": {"backend": 7}}}, "pt2.compile.backend: expected a backend name, got 7"),
        ({"pt2": {"compile": {}, "warmup": "yes"}}, "pt2.warmup: expected false or a list of inputs"),
        ({"pt2": {"compile": {}, "warmup": [{"shape": ["n", 16]}]}}, "pt2.warmup[0]: expected a datatype of BOOL"),
        ({"pt2": {"compile": {}, "warmup": [{"datatype": "BYTES"}]}}, "pt2.warmup[0]: expected a datatype of"),
        ({"pt2": "aot_eager", "inputs": [{"name": "x", "datatype": "FP33"}]}, "inputs[0]: expected a datatype of"),
    ],
)
def test_pt2_settings_refuse_malformed_sections_naming_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(HandlerError) as raised:
        pt2.read_settings(config)
    assert raised.value.message.startswith(message), raised.value.message


def test_pt2_warmup_inputs_come_from_pt2_warmup_else_the_declared_inputs() -> None:
    declared = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 8]}]}
    settings = pt2.read_settings({"pt2": "eager", **declared})
    assert settings.warmup == (pt2.WarmupInput("INT64", (-1, 8)),)
    assert settings.warmup_source == "the model config's inputs"
    given = pt2.read_settings({"pt2": {"compile": {}, "warmup": [{"shape": [2, 3]}, {"datatype": "BOOL"}]}, **declared})
    assert given.warmup == (pt2.WarmupInput("FP32", (2, 3)), pt2.WarmupInput("BOOL", (-1,)))
    assert pt2.read_settings({"pt2": {"compile": {}, "warmup": False}, **declared}).warmup is None
    assert pt2.read_settings({"pt2": "eager"}).warmup is None  # nothing declared: the first request compiles
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]}
    assert pt2.read_settings({"pt2": "eager", **text}).warmup is None  # bytes cannot be made up


def test_pt2_warmup_shapes_are_ones_then_a_batch_of_two() -> None:
    inputs = (pt2.WarmupInput("FP32", (-1, 3, -1)), pt2.WarmupInput("INT64", (4,)))
    assert list(pt2.warmup_shapes(inputs)) == [[[1, 3, 1], [4]], [[2, 3, 1], [4]]]
    assert list(pt2.warmup_shapes((pt2.WarmupInput("FP32", (1, -1)),))) == [[[1, 1]]]  # no batch dimension to vary


# --- BaseHandler, in this process ----------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write(tmp_path / "model.py", MLP_PY)
    torch.save(build_mlp().state_dict(), tmp_path / "weights.pt")
    torch._dynamo.reset()  # graphs and counters of other tests go
    counters.clear()
    return tmp_path


def initialized(model_dir: Path, config: dict[str, Any], serialized: str = "weights.pt") -> BaseHandler:
    manifest = {"model": {"modelName": "m", "serializedFile": serialized}}
    if serialized == "weights.pt":
        manifest["model"]["modelFile"] = "model.py"
    handler = BaseHandler()
    handler.initialize(Context("m", str(model_dir), manifest, 1, None, model_yaml_config=config))
    return handler


@pytest.mark.parametrize(
    "config",
    [
        {"pt2": {"compile": {"enable": True, "backend": "aot_eager"}}, "inputs": [{"name": "x", "shape": [-1, 16]}]},
        {"pt2": {"backend": "eager", "warmup": [{"datatype": "FP32", "shape": [-1, 16]}]}},
    ],
)
def test_pt2_base_handler_compiles_and_warms_up_the_model(model_dir: Path, config: dict[str, Any]) -> None:
    handler = initialized(model_dir, config)
    assert type(handler.model).__name__ == "OptimizedModule"
    assert counters["stats"]["unique_graphs"] == 2  # a batch of one, and any other batch size
    x = torch.randn(5, 16)
    assert torch.equal(handler.inference(x), build_mlp()(x))
    assert counters["stats"]["unique_graphs"] == 2  # no compile for the request


def test_pt2_without_warmup_input_the_first_call_compiles(model_dir: Path) -> None:
    handler = initialized(model_dir, {"pt2": "aot_eager"})
    assert type(handler.model).__name__ == "OptimizedModule" and counters["stats"]["unique_graphs"] == 0
    handler.inference(torch.randn(1, 16))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"pt2": {"compile": {"enable": True, "backend": "nope"}}},
            "pt2.compile: backend 'nope' is not a torch.compile backend (torch ",
        ),
        ({"pt2": {"compile": {"backend": "eager", "bogus": 1}}}, "pt2.compile: unknown option 'bogus'"),
        ({"pt2": {"backend": "eager", "mode": "default", "options": {}}}, "pt2: torch.compile refused"),
        (
            {"pt2": {"compile": {"backend": "eager"}, "warmup": [{"shape": [-1, 3]}]}},
            "pt2.compile: the model compiled with backend 'eager' failed on the warm-up input FP32[1, 3] (from "
            "pt2.warmup): ",
        ),
    ],
)
def test_pt2_compile_failure_is_a_load_error_naming_the_setting(
    model_dir: Path, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(HandlerError) as raised:
        initialized(model_dir, config)
    assert raised.value.message.startswith(message), raised.value.message


def test_pt2_inductor_without_a_cpp_compiler_is_a_load_error(model_dir: Path) -> None:
    from torch._inductor import config as inductor_config

    with (
        inductor_config.patch({"cpp.cxx": (None, str(model_dir / "no-such-g++"))}),
        pytest.raises(HandlerError) as raised,
    ):
        initialized(model_dir, {"pt2": {"compile": {"enable": True, "backend": "inductor"}}})
    message = raised.value.message
    assert message.startswith("pt2.compile: backend 'inductor' compiles C++ for the CPU, and no C++ compiler works")
    assert "no-such-g++" in message and "backend 'aot_eager'" in message


# --- served --------------------------------------------------------------------------------------------------------


def test_pt2_compiled_model_answers_as_the_eager_model(server: Server) -> None:
    for n, seed in ((1, 0), (3, 1), (8, 2), (1, 3)):
        rows = rows_of(n, seed)
        eager, compiled = predict(server, "eager", rows), predict(server, "compiled", rows)
        assert_same_rows(compiled["rows"], eager["rows"])
        assert eager["graphs"] == [0, 0] and compiled["graphs"] == [2, 2]  # compiled before: nothing compiles now
    x = torch.tensor(rows_of(2, 4))
    v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16], "data": x.flatten().tolist()}]}
    response = httpx.post(server.inference + "/v2/models/compiled/infer", json=v2, timeout=60)
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        expected = build_mlp()(x).flatten().tolist()
    assert torch.allclose(torch.tensor(response.json()["outputs"][0]["data"]), torch.tensor(expected), atol=1e-5)


def test_pt2_worker_is_ready_only_once_warmed_up(server: Server) -> None:
    """A synchronous registration answers once the worker is ready: its first request then finds both graphs
    compiled, and compiles nothing."""
    params = {"url": "compiled.mar", "model_name": "fresh", "initial_workers": "1"}
    response = manage(server, "POST", "/models", params=params)
    try:
        assert response.status_code == 200, response.text
        first = predict(server, "fresh", rows_of(4, 5))
        assert first["graphs"] == [2, 2]
    finally:
        manage(server, "DELETE", "/models/fresh")


def test_pt2_bad_backend_fails_the_load_naming_the_setting(server: Server) -> None:
    registered = manage(server, "POST", "/models", params={"url": "bad.mar", "initial_workers": "1"})
    try:
        assert registered.status_code == 500, registered.text  # TorchServe's words; the cause is in the log
        assert registered.json()["message"] == "Failed to start workers for model bad version: 1.0"
        assert "pt2.compile: backend 'nope' is not a torch.compile backend" in server.log_text()
        scaled = manage(server, "PUT", "/models/bad", params={"min_worker": "1", "synchronous": "true"})
        assert scaled.status_code == 500, scaled.text
        assert "pt2.compile: backend 'nope' is not a torch.compile backend" in scaled.json()["message"]
    finally:
        manage(server, "DELETE", "/models/bad")


@pytest.mark.slow  # inductor compiles C++: about 20 s from a cold cache on 2 cores
@needs_compiler
def test_pt2_inductor_compiled_model_answers_as_the_eager_model(server: Server, store: Path, tmp_path: Path) -> None:
    config = "pt2:\n  compile: {enable: true, backend: inductor, mode: max-autotune-no-cudagraphs}\n" + INPUTS
    make_archive(store, "inductor", HANDLER, work=tmp_path, model="eager", config=config)
    response = manage(server, "POST", "/models", params={"url": "inductor.mar", "initial_workers": "1"})
    try:
        assert response.status_code == 200, response.text + server.log_text()[-3000:]
        for n, seed in ((1, 6), (5, 7)):
            rows = rows_of(n, seed)
            compiled = predict(server, "inductor", rows)
            assert_same_rows(compiled["rows"], predict(server, "eager", rows)["rows"])
            assert compiled["graphs"] == [2, 2]
    finally:
        manage(server, "DELETE", "/models/inductor")


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test MLP compiled ahead of time for batches of 1 to 64 (``aoti_compile_and_package``; 30 s cold)."""
    path = tmp_path_factory.mktemp("aoti") / "mlp.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(build_mlp(), (torch.zeros(2, 16),), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    return path


@pytest.mark.slow
@needs_compiler
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own, from inside torch.export (LeafSpec)
def test_pt2_aot_inductor_package_is_served(server: Server, store: Path, tmp_path: Path, aoti_package: Path) -> None:
    handler = write(tmp_path / "aoti_handler.py", HANDLER)
    config = write(tmp_path / "model-config.yaml", "pt2:\n  export: {aot_compile: true}\n")
    args = ["--model-name", "aoti", "--version", "1.0", "--handler", str(handler), "--config-file", str(config)]
    assert archiver.main([*args, "--serialized-file", str(aoti_package), "--export-path", str(store)]) == 0
    response = manage(server, "POST", "/models", params={"url": "aoti.mar", "initial_workers": "1"})
    try:
        assert response.status_code == 200, response.text + server.log_text()[-3000:]
        for n, seed in ((1, 8), (6, 9)):
            rows = rows_of(n, seed)
            answer = predict(server, "aoti", rows)
            assert_same_rows(answer["rows"], predict(server, "eager", rows)["rows"])
            assert answer["graphs"] == [0, 0]  # compiled ahead of time: torch.compile never runs
    finally:
        manage(server, "DELETE", "/models/aoti")


def test_pt2_aot_inductor_file_cannot_be_compiled_again(tmp_path: Path) -> None:
    settings = pt2.read_settings({"pt2": "inductor"})
    with pytest.raises(HandlerError, match=r"^pt2: the model is an AOTInductor file, already compiled"):
        pt2.prepare(object(), settings, torch.device("cpu"), aot=True)
    with pytest.raises(HandlerError, match=r"^pt2.export: cannot load the AOTInductor model .*not-a-package.pt2: "):
        pt2.load_aot(str(write(tmp_path / "not-a-package.pt2", "no zip")), torch.device("cpu"))
