"""The handler contract, compatible with TorchServe's (``ts.context``, ``ts.torch_handler.base_handler``).

A handler turns a batch into a list of results, one per request, in order:

- ``data`` is a list with one dict per request. A raw body arrives as ``{"body": value}``; a multipart or
  url-encoded form arrives as one key per field, each value the bytes the client sent (a url-encoded one
  percent-decoded), with a content type for file parts only. Values are decoded as TorchServe does: content type
  ``application/json`` -> the parsed JSON, ``text/*`` -> ``str``, anything else -> ``bytearray``.
- The result must be a list of exactly ``len(data)`` items. Each item is sent back as-is if it is
  ``bytes``/``bytearray``, as UTF-8 text if it is a ``str``, with ``torch.save`` if it is a tensor, and as
  JSON otherwise.

Entry points (``load_handler``): a module with a ``handle(data, context)`` function (called once with
``data=None`` to initialize), or a module defining exactly one class, instantiated without arguments,
whose ``initialize(context)`` runs once and whose ``handle(data, context)`` runs per batch.

Runs in the worker process; never imports asyncio or fastapi. torch is imported only inside
``BaseHandler`` methods, so that a handler which does not use torch does not pay for it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servekit import pt2
from servekit.context import SERVER_VERSION, Context, RequestProcessor
from servekit.errors import HandlerError

__all__ = ["SERVER_VERSION", "Context", "RequestProcessor"]  # the contract's context, defined in servekit.context


class PredictionException(Exception):
    """Raise from a handler to answer the whole batch with ``error_code`` and ``message``."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code

    def __str__(self) -> str:
        return f"message : error_code => {self.message} : {self.error_code}"


class InvalidInput(PredictionException):
    """Raise from a handler when a request's input is wrong: that client gets ``error_code`` (400 by default) and
    ``message``. Like any 4xx ``PredictionException`` raised for a batch of several requests, the worker then runs
    each request of the batch alone, so only the requests at fault get the error."""

    def __init__(self, message: str, error_code: int = 400) -> None:
        if not 400 <= error_code < 500:
            raise ValueError(f"InvalidInput is a client error (4xx), not {error_code}")
        super().__init__(message, error_code)


class BaseHandler:
    """TorchServe's default handler: loads an eager or TorchScript model and runs
    ``preprocess -> inference -> postprocess``. Subclass it and override any step."""

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: Any = None
        self.device: Any = None
        self.initialized = False
        self.context: Context | None = None
        self.manifest: dict[str, Any] | None = None
        self.map_location: str | None = None
        self.explain = False
        self.target = 0
        self.model_yaml_config: dict[str, Any] = {}

    def initialize(self, context: Context) -> None:
        """Pick the device, then load ``serializedFile``: as a state dict into the one ``nn.Module``
        class of ``modelFile`` (``torch.load(weights_only=True)`` unless the model config says
        ``weightsOnly: false``), else as AOTInductor's output (``.pt2``, ``.so``), else as TorchScript. Then compile
        and warm up the model as the model config's ``pt2`` section says (``servekit.pt2``)."""
        import torch

        self.context = context
        self.manifest = context.manifest
        self.model_yaml_config = context.model_yaml_config
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")
        model_dir = properties["model_dir"]
        model_section = (self.manifest or {}).get("model", {})
        serialized = model_section.get("serializedFile")
        model_pt_path = os.path.join(model_dir, serialized) if serialized else None
        model_file = model_section.get("modelFile")
        settings = pt2.read_settings(self.model_yaml_config)  # a malformed pt2 section fails before the weights load
        aot = False
        if model_file:
            self.model = self._load_pickled_model(model_dir, model_file, model_pt_path)
        elif model_pt_path and os.path.isfile(model_pt_path) and pt2.is_aot_file(model_pt_path):
            self.model, aot = pt2.load_aot(model_pt_path, self.device), True
        elif model_pt_path and os.path.isfile(model_pt_path):
            self.model = self._load_torchscript_model(model_pt_path)
        else:
            raise RuntimeError("No model weights could be loaded")
        if not aot:
            self.model.eval()
        self.model = pt2.prepare(self.model, settings, self.device, aot)
        mapping_file = os.path.join(model_dir, "index_to_name.json")
        if os.path.isfile(mapping_file):
            self.mapping = load_label_mapping(mapping_file)
        self.initialized = True

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        import torch

        return torch.jit.load(model_pt_path, map_location=self.device)  # type: ignore[no-untyped-call]

    def _load_pickled_model(self, model_dir: str, model_file: str, model_pt_path: str | None) -> Any:
        import torch

        module = _import_file(model_dir, model_file)
        classes = list_classes_from_module(module, torch.nn.Module)
        if len(classes) != 1:
            names = [cls.__name__ for cls in classes]
            raise ValueError(f"Expected exactly one nn.Module class in {model_file}, found {names}")
        model = classes[0]()
        if model_pt_path:
            weights_only = bool(self.model_yaml_config.get("weightsOnly", True))
            state_dict = torch.load(model_pt_path, map_location=self.device, weights_only=weights_only)
            model.load_state_dict(state_dict)
        return model.to(self.device)

    def preprocess(self, data: list[Any]) -> Any:
        import torch

        return torch.as_tensor(data, device=self.device)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(data, *args, **kwargs)

    def postprocess(self, data: Any) -> list[Any]:
        return data.tolist()  # type: ignore[no-any-return]

    def handle(self, data: list[Any], context: Context) -> list[Any]:
        self.context = context
        start = time.perf_counter()
        if context.get_request_header(0, "describe") == "True":
            return [self.describe_handle()]
        model_input = self.preprocess(data)
        if self._is_explain():
            output = self.explain_handle(model_input, data)
        else:
            output = self.postprocess(self.inference(model_input))
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2))
        return output

    def _is_explain(self) -> bool:
        """Whether the batch asks for explanations: request 0's ``explain`` header is ``"True"`` (``/explanations``,
        KServe's ``:explain`` and ``/explain``)."""
        if self.context and self.context.get_request_header(0, "explain") == "True":
            self.explain = True
            return True
        return False

    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> list[Any]:
        """The explanations of a batch, as TorchServe computes them: ``get_insights`` on the preprocessed batch,
        with request 0's ``data`` (else ``body``) and its ``target`` (0 when absent)."""
        inputs = None
        target = 0
        row = raw_data[0]
        if isinstance(row, dict):
            inputs = row.get("data") or row.get("body")
            target = row.get("target") or 0
        return self.get_insights(data_preprocess, inputs, target)

    def get_insights(self, tensor_data: Any, raw_data: Any, target: Any) -> list[Any]:
        """Override to explain a batch (TorchServe's handlers use Captum, an optional package: ``pip install
        captum``). By default explanations are not served: 500 naming the handler."""
        raise PredictionException(
            f"{type(self).__name__} does not explain its predictions: it has no get_insights", 500
        )

    def describe_handle(self) -> Any:
        """Override to describe the model beyond its settings: ``GET /models/{m}?customized=true`` answers what this
        returns as ``customizedMetadata`` (a dict, or the JSON text of one; anything else shows as ``{}``). By
        default ``None``, as TorchServe's."""
        return None


def load_label_mapping(mapping_file_path: str) -> dict[str, Any]:
    """Read ``index_to_name.json`` (``{"0": "cat", ...}``)."""
    with open(mapping_file_path) as handle:
        mapping = json.load(handle)
    if not isinstance(mapping, dict):
        raise ValueError(f"{mapping_file_path}: expected a JSON object of index -> label")
    return mapping


def map_class_to_label(probs: list[list[float]], mapping: dict[str, Any] | None = None, lbl_classes: Any = None) -> Any:
    """Turn per-class probabilities into ``[{label: prob, ...}, ...]`` as TorchServe's util does."""
    if lbl_classes is None:
        lbl_classes = [[str(i) for i in range(len(row))] for row in probs]
    if mapping is not None:
        lbl_classes = [[mapping.get(str(c), str(c)) for c in row] for row in lbl_classes]
    return [dict(zip(labels, row, strict=False)) for labels, row in zip(lbl_classes, probs, strict=False)]


def list_classes_from_module(module: Any, parent_class: type | None = None) -> list[type]:
    """The classes defined in ``module`` itself (not imported into it), optionally of one base."""
    classes = [obj for _, obj in inspect.getmembers(module, inspect.isclass) if obj.__module__ == module.__name__]
    if parent_class is not None:
        classes = [cls for cls in classes if issubclass(cls, parent_class)]
    return classes


def _import_file(model_dir: str, file_name: str) -> Any:
    module_name = Path(file_name).stem
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    return importlib.import_module(module_name)


EntryPoint = Callable[[list[Any], Context], Any]

# The built-in handlers (top-level ``handlers/``, installed as ``servekit_handlers``), by short name.
BUILTIN_HANDLERS = frozenset(
    {"base_handler", "image_classifier", "image_segmenter", "object_detector", "text_classifier", "tensor"}
)
BUILTIN_PACKAGE = "servekit_handlers"
DEFAULT_HANDLER = "tensor"  # for an archive whose manifest names no handler


def load_handler(handler: str, model_dir: str, context: Context) -> EntryPoint:
    """Import the handler named in the manifest and initialize it; return the per-batch callable.

    ``handler`` is ``module[.py][:function]`` relative to ``model_dir``, or a built-in name (``BUILTIN_HANDLERS``,
    unless ``model_dir`` has a file of that name, as TorchServe looks there first), or another module of
    ``ts.torch_handler``. Raises ``HandlerError`` naming what could not be found.
    """
    module_part, _, function_name = handler.partition(":")
    module_name = Path(module_part).name.removesuffix(".py")
    if not module_name:
        raise HandlerError("The model has no handler")
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    module = _import_handler_module(module_name, model_dir)
    function = getattr(module, function_name or "handle", None)
    if function_name and function is None:
        raise HandlerError(f"Handler module {module_name!r} has no function {function_name!r}")
    if callable(function) and not inspect.isclass(function):
        function(None, context)
        return function  # type: ignore[no-any-return]
    classes = list_classes_from_module(module)
    if len(classes) != 1:
        names = [cls.__name__ for cls in classes]
        raise HandlerError(
            f"Handler module {module_name!r} must define a handle() function or exactly one class; found {names}"
        )
    instance = classes[0]()
    if not callable(getattr(instance, "handle", None)):
        raise HandlerError(f"Handler class {classes[0].__name__} has no handle(data, context) method")
    initialize = getattr(instance, "initialize", None)
    if callable(initialize):
        initialize(context)
    return instance.handle  # type: ignore[no-any-return]


def _import_handler_module(module_name: str, model_dir: str) -> Any:
    local = Path(model_dir, f"{module_name}.py").is_file() or Path(model_dir, module_name, "__init__.py").is_file()
    if module_name in BUILTIN_HANDLERS and not local:
        try:
            return importlib.import_module(f"{BUILTIN_PACKAGE}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != BUILTIN_PACKAGE:
                raise
            raise HandlerError(
                f"Built-in handler {module_name!r} needs the package {BUILTIN_PACKAGE}, which is not "
                "installed (it is handlers/ in servekit's source; reinstall servekit)"
            ) from None
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the handler was found, but its own import failed: report that
    try:
        return importlib.import_module(f"ts.torch_handler.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ts", "ts.torch_handler", f"ts.torch_handler.{module_name}"):
            raise
    raise HandlerError(f"Handler module {module_name!r} not found in {model_dir} or the built-ins")
