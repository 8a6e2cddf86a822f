"""The built-in handlers (``handlers/``), end to end: each example archive of ``model_store/`` served with its sample
input from ``examples/``, checked against the model run in this process on inputs prepared here; bad inputs are 400
naming what was wrong, and the server keeps serving. In-process: client errors stay with their own request."""

from __future__ import annotations

import base64
import collections
import importlib.util
import io
import itertools
import json
import re
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from PIL import Image

from servekit import archiver, protocol
from servekit.worker import Worker
from tests.helpers import Server, running_server, write

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "model_store"
EXAMPLES = ROOT / "examples"
ARCHIVES = {  # archive -> (handler, sample input)
    "color_classifier": ("image_classifier", EXAMPLES / "image_classifier" / "landscape.png"),
    "color_segmenter": ("image_segmenter", EXAMPLES / "image_segmenter" / "landscape.png"),
    "color_detector": ("object_detector", EXAMPLES / "object_detector" / "shapes.png"),
    "news_classifier": ("text_classifier", EXAMPLES / "text_classifier" / "sample.txt"),
    "fahrenheit": ("tensor", EXAMPLES / "tensor" / "celsius.json"),
}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

# A handler file written for TorchServe that subclasses a built-in through the `ts` package.
TOP_TWO_HANDLER = """
from ts.torch_handler.image_classifier import ImageClassifier


class TopTwo(ImageClassifier):
    topk = 2
"""


def extract(name: str, into: Path) -> Path:
    target = into / name
    if not target.exists():
        with zipfile.ZipFile(STORE / f"{name}.mar") as archive:
            archive.extractall(target)
    return target


def load_model(model_dir: Path) -> Any:
    """The archive's eager model with its weights, imported from its own model.py under a unique module name."""
    spec = importlib.util.spec_from_file_location(f"builtin_model_{model_dir.name}", model_dir / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)]
    (model_class,) = [c for c in classes if c.__module__ == module.__name__]
    model = model_class()
    model.load_state_dict(torch.load(model_dir / f"{model_dir.name}.pt", weights_only=True))
    return model.eval()


def labels(model_dir: Path) -> dict[str, str]:
    mapping = json.loads((model_dir / "index_to_name.json").read_text())
    assert isinstance(mapping, dict)
    return mapping


def rgb_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for an RGB image, written out."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


def classifier_input(path: Path) -> torch.Tensor:
    """Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet), as TorchServe's image_classifier does."""
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    width, height = (256, int(image.height * scale)) if image.width <= image.height else (int(image.width * scale), 256)
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = round((width - 224) / 2), round((height - 224) / 2)
    image = image.crop((left, top, left + 224, top + 224))
    return (rgb_tensor(image) - IMAGENET_MEAN) / IMAGENET_STD


def png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size, all black: a few kB even when it decodes to gigapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def detection(found: dict[str, Any]) -> tuple[str, Any, Any]:
    """``{label: box, "score": s}`` as ``(label, box, s)``."""
    ((label, box),) = [(key, value) for key, value in found.items() if key != "score"]
    return label, box, found["score"]


def assert_close(got: Any, expected: Any) -> None:
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6), (got, expected)


def assert_bad_request(response: httpx.Response, message: str) -> None:
    """400 with servekit's JSON error body, whose message matches ``message`` (a regex)."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == 400
    assert re.search(message, body["message"]), body["message"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example archives unpacked, for the in-process reference."""
    root = tmp_path_factory.mktemp("unpacked")
    for name in ARCHIVES:
        extract(name, root)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("builtin")
    store = root / "store"
    store.mkdir()
    for name in ARCHIVES:
        shutil.copy(STORE / f"{name}.mar", store)
    # TorchServe-style subclass of a built-in, over the color classifier's model
    classifier = models / "color_classifier"
    src = root / "top_two"
    handler = write(src / "top_two.py", TOP_TWO_HANDLER)
    extra = str(classifier / "index_to_name.json")
    assert archiver.main(["--model-name", "top_two", "--version", "1.0", "--handler", str(handler),
                          "--model-file", str(classifier / "model.py"), "--extra-files", extra,
                          "--serialized-file", str(classifier / "color_classifier.pt"),
                          "--export-path", str(store)]) == 0  # fmt: skip
    # an archive whose manifest names no handler gets the tensor handler
    default = shutil.copytree(models / "fahrenheit", store / "default_handler")
    manifest = json.loads((default / "MAR-INF" / "MANIFEST.json").read_text())
    del manifest["model"]["handler"]
    manifest["model"]["modelName"] = "default_handler"
    (default / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    with running_server(root / "run", store) as srv:
        yield srv


def predict(server: Server, name: str, content: bytes, content_type: str | None = None) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return server.post(f"/predictions/{name}", content=content, headers=headers)


def test_image_classifier_answers_top_5_colours_of_the_sample(server: Server, models: Path) -> None:
    model_dir = models / "color_classifier"
    sample = ARCHIVES["color_classifier"][1]
    response = predict(server, "color_classifier", sample.read_bytes())
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        probabilities = torch.softmax(load_model(model_dir)(classifier_input(sample)[None]), dim=1)[0]
    top = torch.topk(probabilities, 5)
    names = labels(model_dir)
    expected = {names[str(i)]: p for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)}
    answer = response.json()
    assert list(answer) == list(expected) and list(answer)[:2] == ["blue", "green"]  # sky over grass
    assert_close(list(answer.values()), list(expected.values()))
    # base64 in a JSON body, and a multipart file field named "data", give the same answer
    encoded = base64.b64encode(sample.read_bytes()).decode()
    assert server.post("/predictions/color_classifier", json={"data": encoded}).json() == answer
    files = {"data": ("landscape.png", sample.read_bytes(), "image/png")}
    assert server.post("/predictions/color_classifier", files=files).json() == answer


def test_torchserve_style_subclass_of_a_builtin_runs_unchanged(server: Server) -> None:
    sample = ARCHIVES["color_classifier"][1].read_bytes()
    full = predict(server, "color_classifier", sample).json()
    response = predict(server, "top_two", sample)
    assert response.status_code == 200, response.text
    assert response.json() == dict(list(full.items())[:2])


def test_image_segmenter_answers_class_and_probability_per_pixel(server: Server, models: Path) -> None:
    model_dir = models / "color_segmenter"
    sample = ARCHIVES["color_segmenter"][1]
    response = predict(server, "color_segmenter", sample.read_bytes())
    assert response.status_code == 200, response.text
    image = Image.open(sample)
    with torch.inference_mode():
        scores = load_model(model_dir)(((rgb_tensor(image) - IMAGENET_MEAN) / IMAGENET_STD)[None])["out"]
    best = torch.softmax(scores, dim=1).max(dim=1)
    expected = torch.stack([best.indices.float(), best.values], dim=3)[0]
    answer = torch.tensor(response.json())
    assert answer.shape == (image.height, image.width, 2)
    assert torch.equal(answer[..., 0], expected[..., 0])
    assert torch.allclose(answer[..., 1], expected[..., 1], rtol=1e-5)
    names = labels(model_dir)
    counts = collections.Counter(names[str(int(c))] for c in answer[..., 0].flatten().tolist())
    assert [name for name, _ in counts.most_common(4)] == ["blue", "green", "white", "yellow"]


def test_object_detector_answers_labelled_boxes(server: Server, models: Path) -> None:
    model_dir = models / "color_detector"
    sample = ARCHIVES["color_detector"][1]
    response = predict(server, "color_detector", sample.read_bytes())
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        (detections,) = load_model(model_dir)([rgb_tensor(Image.open(sample))])
    names = labels(model_dir)
    keep = detections["scores"] >= 0.5
    expected = [
        {names[str(label)]: box, "score": score}
        for box, label, score in zip(
            detections["boxes"][keep].tolist(),
            detections["labels"][keep].tolist(),
            detections["scores"][keep].tolist(),
            strict=True,
        )
    ]
    answer = [detection(d) for d in response.json()]
    assert [label for label, _, _ in answer] == [label for label, _, _ in map(detection, expected)]
    for (_, box, score), (_, want_box, want_score) in zip(answer, map(detection, expected), strict=True):
        assert box == want_box
        assert_close(score, want_score)
    # the shapes drawn by model_store/build_examples.py
    boxes = {label: box for label, box, _ in answer}
    assert boxes == {"red": [20, 30, 60, 70], "green": [70, 80, 131, 110], "blue": [90, 20, 130, 60]}


def test_text_classifier_answers_the_topic(server: Server, models: Path) -> None:
    model_dir = models / "news_classifier"
    sample = ARCHIVES["news_classifier"][1]
    response = predict(server, "news_classifier", sample.read_bytes())
    assert response.status_code == 200, response.text
    vocab = torch.load(model_dir / "source_vocab.pt", weights_only=True)
    words = re.sub(r"[^\w\s]", "", sample.read_text().lower()).split()
    tokens = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    ids = torch.tensor([vocab.get(token, vocab["<unk>"]) for token in tokens])
    with torch.inference_mode():
        probabilities = torch.softmax(load_model(model_dir)(ids, torch.tensor([0])), dim=1)[0]
    names = labels(model_dir)
    answer = response.json()
    assert list(answer) == [names[str(i)] for i in range(len(names))]
    assert_close(list(answer.values()), probabilities.tolist())
    assert max(answer, key=answer.get) == "Sports"
    # as text/plain, and as a JSON string, too
    assert predict(server, "news_classifier", sample.read_bytes(), "text/plain").json() == answer
    assert server.post("/predictions/news_classifier", json={"data": sample.read_text()}).json() == answer


def test_tensor_handler_answers_json_and_torch_save_bytes(server: Server, models: Path) -> None:
    sample = ARCHIVES["fahrenheit"][1]
    celsius = torch.tensor(json.loads(sample.read_text())["data"])
    with torch.inference_mode():
        expected = load_model(models / "fahrenheit")(celsius)
    response = predict(server, "fahrenheit", sample.read_bytes(), "application/json")
    assert response.status_code == 200, response.text
    assert response.json() == expected.tolist() == [[-40.0], [32.0], [68.0], [212.0]]
    # no content type, a bare array of integers (the model config says FP32)
    assert predict(server, "fahrenheit", b"[[-40], [0], [20], [100]]").json() == expected.tolist()
    buffer = io.BytesIO()
    torch.save(celsius[1:3], buffer)  # a view: torch.save keeps the whole storage
    response = predict(server, "fahrenheit", buffer.getvalue(), "application/octet-stream")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert torch.equal(torch.load(io.BytesIO(response.content), weights_only=True), expected[1:3])
    # the same model over the Open Inference Protocol (the model config's inputs and outputs)
    body = {"inputs": [{"name": "celsius", "datatype": "FP32", "shape": [2, 1], "data": [0.0, 100.0]}]}
    outputs = server.post("/v2/models/fahrenheit/infer", json=body).json()["outputs"]
    assert [(o["name"], o["data"]) for o in outputs] == [("fahrenheit", [32.0, 212.0])]


def test_an_archive_that_names_no_handler_gets_the_tensor_handler(server: Server) -> None:
    response = predict(server, "default_handler", b'{"data": [[100]]}', "application/json")
    assert response.status_code == 200, response.text
    assert response.json() == [[212.0]]


BAD_INPUTS = {  # id: (model, body or a function that makes it, content type, what the error message says)
    "classifier-not-an-image": ("color_classifier", b"plain bytes", None, "not an image of a known format"),
    "classifier-fake-gif": ("color_classifier", b"GIF89a, or so it says", None, "not an image|not a readable image"),
    "classifier-not-base64": ("color_classifier", b"just some text!", "text/plain", "base64"),
    "classifier-over-the-cap": (
        "color_classifier",
        partial(png, 5000, 4000),
        "image/png",
        "5000x4000 = 20000000 pixels is over the limit of 16777216",
    ),
    "classifier-bomb": ("color_classifier", partial(png, 20000, 20000), "image/png", "Image too large|over the limit"),
    "classifier-truncated": (
        "color_classifier",
        lambda: ARCHIVES["color_classifier"][1].read_bytes()[:600],
        "image/png",
        "Corrupt or truncated|not a readable image",
    ),
    "classifier-json-number": ("color_classifier", b'{"data": 5}', "application/json", "got a JSON number"),
    "segmenter-over-its-cap": ("color_segmenter", partial(png, 600, 600), "image/png", "over the limit of 262144"),
    "segmenter-garbage": ("color_segmenter", b"\x00\x01\x02", None, "not an image"),
    "detector-2d-list": ("color_detector", b"[[1, 2], [3, 4]]", "application/json", "3 dimensions"),
    "detector-ragged-list": ("color_detector", b"[[[1], [2, 3]]]", "application/json", "not a rectangular array"),
    "text-not-utf8": ("news_classifier", b"\xff\xfe\xfa not utf-8", None, "not valid UTF-8"),
    "text-json-object": ("news_classifier", b'{"text": 1}', "application/json", "got a JSON object"),
    "text-no-words": ("news_classifier", b"?!", "text/plain", "no words"),
    "tensor-wrong-shape": ("fahrenheit", b'{"data": [[1, 2]]}', "application/json", r"shape \[-1, 1\], got \[1, 2\]"),
    "tensor-ragged": ("fahrenheit", b"[[1], [2, 3]]", "application/json", "not a rectangular array"),
    "tensor-no-data": ("fahrenheit", b'{"celsius": [[1]]}', "application/json", "Expected a JSON array"),
    "tensor-wrong-dtype": ("fahrenheit", b'{"data": [[1]], "dtype": "int64"}', None, "celsius is float32, got int64"),
    "tensor-unknown-dtype": ("fahrenheit", b'{"data": [[1]], "dtype": "complex"}', None, "Unknown dtype"),
    "tensor-empty": ("fahrenheit", b"[]", "application/json", "non-empty"),
    "tensor-bad-torch-save": ("fahrenheit", b"PK\x03\x04 not a zip", "application/octet-stream", "Not a tensor saved"),
    "tensor-not-json": ("fahrenheit", b"not json", None, "neither JSON nor a tensor"),
}


@pytest.mark.parametrize(("model", "body", "content_type", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_builtin_handler_bad_input_is_400_and_the_model_keeps_serving(
    server: Server, model: str, body: bytes | Callable[[], bytes], content_type: str | None, message: str
) -> None:
    content = body() if callable(body) else body  # large ones are made when their test runs
    assert_bad_request(predict(server, model, content, content_type), message)
    handler, sample = ARCHIVES[model]
    kind = "application/json" if handler == "tensor" else None
    assert predict(server, model, sample.read_bytes(), kind).status_code == 200


def test_tensor_handler_refuses_a_tensor_that_views_more_than_it_holds(server: Server) -> None:
    buffer = io.BytesIO()
    torch.save(torch.zeros(1, 1).expand(1_000_000, 1), buffer)  # 4 bytes of storage seen as a million rows
    response = predict(server, "fahrenheit", buffer.getvalue(), "application/octet-stream")
    assert_bad_request(response, "view more elements than it holds")


@pytest.fixture
def in_process(models: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A worker of an example model in this process (``servekit.worker.Worker``, what a worker process runs);
    sys.path and the models' modules are restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))

    def load(name: str) -> Worker:
        monkeypatch.delitem(sys.modules, "model", raising=False)
        model_dir = models / name
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
        handler = manifest["model"]["handler"]
        return Worker(protocol.LoadCommand(name, str(model_dir), handler, manifest, config, 4, None, 1))

    yield load
    sys.modules.pop("model", None)


def run_batch(worker: Worker, bodies: list[tuple[bytes, str | None]]) -> tuple[list[Any], list[int]]:
    """One batch through the worker: each request's decoded JSON answer and its status."""
    requests = [
        protocol.Request(f"req-{i}", {}, (protocol.Field("body", content_type, body),))
        for i, (body, content_type) in enumerate(bodies)
    ]
    outcome = worker.run(requests).outcome
    assert isinstance(outcome, list), outcome
    return [json.loads(response.payload) for response in outcome], [response.status for response in outcome]


def test_builtin_handler_bad_request_in_a_batch_fails_only_itself(in_process: Any) -> None:
    worker = in_process("color_classifier")
    sample = ARCHIVES["color_classifier"][1].read_bytes()
    results, statuses = run_batch(worker, [(sample, None), (b"nope", None), (sample, None)])
    assert statuses == [200, 400, 200]
    assert results[0] == results[2] and next(iter(results[0])) == "blue"
    assert results[1]["code"] == 400
    assert results[1]["message"].startswith("The request is not an image of a known format")  # the handler's alone


def test_image_segmenter_batch_of_different_sizes_runs_each_alone(in_process: Any) -> None:
    worker = in_process("color_segmenter")
    small, large = Image.new("RGB", (4, 3), (30, 70, 200)), Image.new("RGB", (6, 5), (40, 160, 60))
    bodies: list[tuple[bytes, str | None]] = []
    for image in (small, large):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        bodies.append((buffer.getvalue(), None))
    results, statuses = run_batch(worker, bodies)
    assert statuses == [200, 200]
    assert torch.tensor(results[0]).shape == (3, 4, 2) and torch.tensor(results[1]).shape == (5, 6, 2)
    assert {p[0] for row in results[0] for p in row} == {7.0} and {p[0] for row in results[1] for p in row} == {6.0}


def test_tensor_handler_batches_requests_of_the_same_trailing_shape(in_process: Any) -> None:
    worker = in_process("fahrenheit")
    bodies: list[tuple[bytes, str | None]] = [
        (b"[[0.0], [100.0]]", "application/json"),
        (b'{"data": [[-40]]}', "application/json"),
        (b"[[20]]", "text/plain"),
    ]
    results, statuses = run_batch(worker, bodies)
    assert statuses == [200, 200, 200]
    assert results == [[[32.0], [212.0]], [[-40.0]], [[68.0]]]
