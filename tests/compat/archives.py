"""The archives of the differential test, built with ``servekit archive`` into one model store that TorchServe and
servekit both serve: handler-only archives (written for TorchServe, ``ts.`` imports) and mnist-like models."""

from __future__ import annotations

import base64
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from servekit import archiver

# Every startup model gets exactly one worker on both servers (TorchServe's default is one per core).
ONE_WORKER = "minWorkers: 1\nmaxWorkers: 1\n"

NOOP = """
def handle(data, context):
    if data is None:  # the function entry point's initialization call
        return None
    return ["ok" for _ in data]
"""

ECHO = """
class Echo:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return [row.get("data") or row.get("body") for row in data]
"""

# What the handler is given: each input's type and value, and what get_request_header answers.
INSPECT = """
PROBES = ("Content-Type", "content-type", "X-Compat-Probe", "x-compat-probe", "url_path", "explain")


class Inspect:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            fields = {}
            for key, value in row.items():
                shown = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value
                fields[key] = [type(value).__name__, shown]
            headers = {name: context.get_request_header(idx, name) for name in PROBES}
            out.append({"fields": fields, "headers": headers})
        return out
"""

# The result types a handler may return, chosen by the request's body.
KINDS = """
import torch

RESULTS = {
    "str": "hello",
    "unicode": "h\\u00e9llo \\u2713",
    "dict": {"a": 1, "b": [1.5, None, True]},
    "list": [1, 2, 3],
    "int": 7,
    "float": 0.1,
    "none": None,
    "nan": float("nan"),
    "bytes": b"\\x00\\x01bytes\\xff",
    "emptystr": "",
}


class Kinds:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        kind = bytes(data[0].get("body") or b"").decode()
        if kind == "nonlist":
            return {"not": "a list"}
        if kind == "short":
            return []
        if kind == "tensor":
            return [torch.arange(3)]
        if kind == "object":
            return [object()]
        return [RESULTS[kind]]
"""

HEADERS = """
class Headers:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            spec = row["body"]
            if "content_type" in spec:
                context.set_response_content_type(idx, spec["content_type"])
            for name, value in spec.get("headers", {}).items():
                context.set_response_header(idx, name, value)
            out.append(spec.get("body", "payload"))
        return out
"""

STATUS = """
class Status:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            code, _, phrase = bytes(row["body"]).decode().partition(" ")
            context.set_response_status(int(code), phrase, idx)
            out.append("status " + code)
        return out
"""

BATCH_FAIL = """
class BatchFail:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            if bytes(row["body"]) == b"bad":
                context.set_response_status(422, "Bad Row", idx)
                out.append({"error": "this row failed"})
            else:
                out.append("ok")
        return out
"""

FAIL_INIT = """
class FailInit:
    def initialize(self, context):
        raise RuntimeError("cannot initialize")

    def handle(self, data, context):
        return ["never" for _ in data]
"""

RAISES = """
from ts.utils.util import PredictionException


class Raises:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        kind = bytes(data[0]["body"]).decode()
        if kind == "memory":
            raise MemoryError()
        if kind == "cuda":
            raise RuntimeError("CUDA error: out of memory")
        if kind == "prediction":
            raise PredictionException("bad input", 400)
        raise RuntimeError("boom")
"""

SLOW = """
import time


class Slow:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        time.sleep(float(bytes(data[0]["body"])))
        return ["slept" for _ in data]
"""

# describe_handle answers what the request's x-kind header asks for (GET /models/described?customized=true).
DESCRIBED = """
import json

from ts.torch_handler.base_handler import BaseHandler

VALUES = {
    "dict": {"kind": "dict", "nested": {"n": [1, None]}},
    "jsontext": json.dumps({"kind": "jsontext"}),
    "bytes": b'{"kind": "bytes"}',
    "text": "plain text",
    "none": None,
    "list": [1, 2],
    "empty": "",
    "nulls": {"kind": "nulls", "gone": None, "inner": {"gone": None, "kept": [None]}},
}


class Described(BaseHandler):
    def initialize(self, context):
        self.manifest = context.manifest
        self.initialized = True

    def describe_handle(self):
        kind = self.context.get_request_header(0, "x-kind") or "dict"
        if kind == "raise":
            raise RuntimeError("cannot describe")
        if kind == "status":
            self.context.set_response_status(299, "Described")
            self.context.set_response_content_type(0, "application/x-described")
            self.context.set_response_header(0, "X-Described", "yes")
            return {"kind": "status"}
        return VALUES[kind]
"""

# A function handler asked to describe: what it is given.
DESCRIBE_FN = """
def handle(data, context):
    if data is None:
        return None
    probes = ("describe", "x-probe", "explain", "url_path")
    return [{"data": repr(data), "headers": {name: context.get_request_header(0, name) for name in probes}}]
"""

# Sequence batching (TorchServe's contract): a running sum per sequence; the end header, echoed, closes it.
SEQUENCE = """
from ts.torch_handler.base_handler import BaseHandler


class Sums(BaseHandler):
    def initialize(self, context):
        self.sums = {}
        self.initialized = True

    def handle(self, data, context):
        out = []
        for i, row in enumerate(data):
            sequence = context.get_sequence_id(i)
            total = self.sums.get(sequence, 0) + int(bytes(row.get("data") or row.get("body")).decode())
            self.sums[sequence] = total
            if context.get_request_header(i, context.header_key_sequence_end) is not None:
                context.set_response_header(i, context.header_key_sequence_end, sequence)
                del self.sums[sequence]
            out.append(str(total))
        return out
"""

# Continuous batching (TorchServe's contract): each call is one iteration, one chunk per request; a request of body
# "N" counts 0 to N-1, and its stopping criterion ends it after its last number.
CONTINUOUS = """
class Counter:
    def initialize(self, context):
        self.left = {}
        self.next = {}
        self.initialized = True

    def handle(self, data, context):
        ids = [context.get_request_id(i) for i in range(len(data))]
        chunks = []
        for i, rid in enumerate(ids):
            if rid not in self.left:  # its first iteration: its input
                self.left[rid] = int(bytes(data[i].get("data") or data[i].get("body")).decode())
                self.next[rid] = 0
            chunks.append(f"{self.next[rid]};")
            self.next[rid] += 1
            self.left[rid] -= 1
        context.stopping_criteria = [self.stopper(rid) for rid in ids]
        return chunks

    def stopper(self, rid):
        def stop(chunk):
            if self.left[rid] > 0:
                return False
            del self.left[rid], self.next[rid]
            return True

        return stop
"""

MNIST_MODEL = """
import torch
from torch import nn


class MnistLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.flatten(1))
"""

# TorchServe's mnist example handler, without torchvision: PNG bytes, base64 PNG or a 28x28 list in; the digit out.
MNIST_HANDLER = """
import base64
import io
import json

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class MnistClassifier(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            if isinstance(image, str):
                image = base64.b64decode(image)
            if isinstance(image, (bytes, bytearray)):
                pixels = Image.open(io.BytesIO(image)).convert("L")
                tensor = torch.tensor(list(pixels.getdata()), dtype=torch.float32).reshape(28, 28) / 255
            else:
                tensor = torch.as_tensor(image, dtype=torch.float32).reshape(28, 28)
            images.append((tensor - 0.1307) / 0.3081)
        return torch.stack(images).unsqueeze(1)

    def postprocess(self, data):
        return data.argmax(1).tolist()

    def get_insights(self, tensor_data, _, target=0):
        # a stand-in for Captum: one number per request
        return [round(float(x), 3) for x in tensor_data.sum(dim=(1, 2, 3))]

    def describe_handle(self):
        return json.dumps({"kind": "mnist-like", "classes": 10})
"""


@dataclass(frozen=True)
class Spec:
    name: str
    handler: str
    config: str | None = ONE_WORKER
    model: str | None = None  # None (handler only), "eager" or "torchscript"


SPECS = (
    Spec("noop", NOOP),
    Spec("echo", ECHO),
    Spec("inspect", INSPECT),
    Spec("kinds", KINDS),
    Spec("headers", HEADERS),
    Spec("status", STATUS),
    Spec("batchfail", BATCH_FAIL, ONE_WORKER + "batchSize: 2\nmaxBatchDelay: 1000\n"),
    Spec("raises", RAISES),
    Spec("slow", SLOW),
    Spec("described", DESCRIBED),
    Spec("describefn", DESCRIBE_FN),
    Spec("sums", SEQUENCE, ONE_WORKER + "batchSize: 1\nsequenceBatching: true\nsequenceMaxIdleMSec: 60000\n"),
    Spec("counter", CONTINUOUS, ONE_WORKER + "batchSize: 4\nmaxBatchDelay: 50\ncontinuousBatching: true\n"),
    Spec("mnist", MNIST_HANDLER, model="eager"),
    Spec("mnist_ts", MNIST_HANDLER, model="torchscript"),
    # registered by the cases, not at startup; no YAML, so the registration decides the workers
    Spec("reg", NOOP, config=None),
    Spec("failinit", FAIL_INIT, config=None),
)
STARTUP = tuple(s.name for s in SPECS if s.config is not None)


def mnist_model() -> torch.nn.Module:
    namespace: dict[str, object] = {}
    exec(MNIST_MODEL, namespace)  # the same source that goes into the archive
    torch.manual_seed(0)
    model = namespace["MnistLike"]()  # type: ignore[operator]
    assert isinstance(model, torch.nn.Module)
    return model.eval()


def build(spec: Spec, store: Path, work: Path) -> Path:
    """``servekit archive`` of one spec into ``store``; returns the archive."""
    src = work / spec.name
    src.mkdir(parents=True)
    (src / "handler.py").write_text(textwrap.dedent(spec.handler))
    args = ["--model-name", spec.name, "--version", "1.0", "--export-path", str(store)]
    args += ["--handler", str(src / "handler.py")]
    if spec.config is not None:
        (src / "model-config.yaml").write_text(spec.config)
        args += ["--config-file", str(src / "model-config.yaml")]
    if spec.model is not None:
        net = mnist_model()
        if spec.model == "eager":
            (src / "model.py").write_text(MNIST_MODEL)
            torch.save(net.state_dict(), src / "weights.pt")
            args += ["--model-file", str(src / "model.py")]
        else:
            torch.jit.trace(net, torch.zeros(1, 1, 28, 28)).save(str(src / "weights.pt"))  # type: ignore[no-untyped-call]
        args += ["--serialized-file", str(src / "weights.pt")]
    assert archiver.main(args) == 0, f"servekit archive failed for {spec.name}"
    return store / f"{spec.name}.mar"


def build_store(root: Path, names: tuple[str, ...] | None = None) -> Path:
    """A fresh model store holding the archives of ``names`` (default: all)."""
    store, work = root / "store", root / "src"
    store.mkdir()
    for spec in SPECS:
        if names is None or spec.name in names:
            build(spec, store, work)
    return store


def digit_png(seed: int) -> bytes:
    """A 28x28 grayscale PNG, different for each seed, the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(28, 28, generator=generator) * 255).to(torch.uint8)
    image = Image.frombytes("L", (28, 28), bytes(pixels.flatten().tolist()))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def digit_b64(seed: int) -> str:
    return base64.b64encode(digit_png(seed)).decode()


def digit_pixels(seed: int) -> list[float]:
    """The pixels of ``digit_png(seed)`` scaled to [0, 1], flat (784 values)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(28, 28, generator=generator) * 255).to(torch.uint8)
    return [round(float(p) / 255, 4) for p in pixels.flatten()]
