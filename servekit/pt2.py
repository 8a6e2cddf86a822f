"""The model config's ``pt2`` section: ``torch.compile`` and AOTInductor, as TorchServe 0.12's ``BaseHandler`` reads it.

``BaseHandler.initialize`` reads the section (``read_settings``) before it loads anything, loads an AOTInductor
``serializedFile`` (``.pt2`` or ``.so``) with torch's loader (``load_aot``), and passes the model through ``prepare``,
which compiles it and runs it on the warm-up inputs, so that the worker reports ready with its graphs compiled and
the first request does not pay for the compile. The forms read (docs/handlers.md#compiled-models-pt2):

- ``pt2: {compile: {enable: true, backend: inductor, mode: ...}}``: ``torch.compile(model, **options)`` with every
  option but ``enable`` (any keyword argument of ``torch.compile``); ``enable: false`` turns it off.
- ``pt2: inductor`` and ``pt2: {backend: inductor, mode: ...}``: TorchServe's older forms, read the same way.
- ``pt2: {export: {aot_compile: true}}``: the model is an AOTInductor file; nothing is compiled here.
- ``pt2: {warmup: ...}``: servekit's own; the inputs to warm up on, ``false`` for none. By default the model config's
  ``inputs`` (``[{name, datatype, shape}]``), if it declares them.

Unlike TorchServe, which logs a failed compile and serves the model uncompiled, every problem here fails the load
with a ``HandlerError`` whose message starts with the setting at fault (``pt2.compile: backend 'nope' ...``).

Runs in the worker process; never imports asyncio or fastapi. torch is imported inside the functions only.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from servekit.errors import HandlerError

logger = logging.getLogger("servekit.pt2")

# Open Inference Protocol datatype -> torch dtype (attribute of torch): what a warm-up input may be
DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
AOT_SUFFIXES = (".pt2", ".so")  # an AOTInductor package, or the shared library of torch._export.aot_compile


@dataclass(frozen=True, slots=True)
class WarmupInput:
    """One positional input of the model for the warm-up: ``-1`` marks a dimension of any size."""

    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``pt2`` asks for. ``compile`` holds ``torch.compile``'s keyword arguments (None: no compile); ``source``
    names the setting they come from, ``warmup_source`` where the warm-up inputs come from (``warmup`` is None when
    there are none)."""

    compile: Mapping[str, Any] | None
    source: str = "pt2"
    warmup: tuple[WarmupInput, ...] | None = None
    warmup_source: str = "pt2.warmup"


def read_settings(config: Mapping[str, Any]) -> Settings:
    """The ``pt2`` section of a model config; ``HandlerError`` naming the key if it is malformed. Always returns
    settings: ``compile`` is None when the config asks for no compile."""
    section = config.get("pt2")
    if section is None:
        return Settings(None)
    if isinstance(section, str):
        options: dict[str, Any] | None = {"backend": section}
        source = "pt2"
    elif isinstance(section, dict):
        options, source = _compile_options(section)
    else:
        raise HandlerError(f"pt2: expected a backend name or a mapping, got {type(section).__name__}")
    if options is None:
        return Settings(None, source)
    if not isinstance(options.get("backend", ""), str):
        raise HandlerError(f"{source}.backend: expected a backend name, got {options['backend']!r}")
    warmup = section.get("warmup", True) if isinstance(section, dict) else True
    inputs, warmup_source = _warmup_inputs(warmup, config)
    return Settings(options, source, inputs, warmup_source)


def _compile_options(section: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    if "compile" in section:
        options = section["compile"]
        if not isinstance(options, dict):
            raise HandlerError(f"pt2.compile: expected a mapping (enable, backend, mode, ...), got {options!r}")
        enable = options.get("enable", True)
        if not isinstance(enable, bool):
            raise HandlerError(f"pt2.compile.enable: expected true or false, got {enable!r}")
        return ({k: v for k, v in options.items() if k != "enable"} if enable else None), "pt2.compile"
    if "export" in section:
        return None, "pt2.export"
    # TorchServe's older form: the section itself holds torch.compile's options (an empty one compiles too)
    options = {k: v for k, v in section.items() if k != "warmup"}
    return (None if not options and "warmup" in section else options), "pt2"


def _warmup_inputs(warmup: Any, config: Mapping[str, Any]) -> tuple[tuple[WarmupInput, ...] | None, str]:
    if warmup is False:
        return None, "pt2.warmup"
    if warmup is True:
        entries, source = config.get("inputs") or [], "the model config's inputs"
    elif isinstance(warmup, list) and warmup:
        entries, source = warmup, "pt2.warmup"
    else:
        raise HandlerError(f"pt2.warmup: expected false or a list of inputs ({{datatype, shape}}), got {warmup!r}")
    if not isinstance(entries, list) or not entries:
        return None, source
    inputs = []
    for i, entry in enumerate(entries):
        where = f"{'pt2.warmup' if source == 'pt2.warmup' else 'inputs'}[{i}]"
        if not isinstance(entry, dict):
            raise HandlerError(f"{where}: expected a mapping {{datatype, shape}}, got {entry!r}")
        datatype, shape = str(entry.get("datatype", "FP32")).upper(), entry.get("shape", [-1])
        if datatype == "BYTES" and source != "pt2.warmup":
            return None, source  # bytes cannot be made up: no warm-up unless pt2.warmup says what to use
        if datatype not in DTYPES or not isinstance(shape, list) or not all(type(d) is int and d >= -1 for d in shape):
            raise HandlerError(
                f"{where}: expected a datatype of {', '.join(DTYPES)} and a shape of integers >= -1, got {entry!r}"
            )
        inputs.append(WarmupInput(datatype, tuple(shape)))
    return tuple(inputs), source


def is_aot_file(path: str) -> bool:
    """Whether ``path`` is AOTInductor's output, which ``load_aot`` loads (by its suffix, as TorchServe tells)."""
    return path.endswith(AOT_SUFFIXES)


def load_aot(path: str, device: Any) -> Any:
    """An AOTInductor model, callable as the module it was compiled from: a ``.pt2`` package
    (``torch._inductor.aoti_compile_and_package``) with ``torch._inductor.aoti_load_package``, or the ``.so`` of
    ``torch._export.aot_compile`` (TorchServe 0.12's form, deprecated by torch) with ``torch._export.aot_load``."""
    import torch

    cuda = device.type == "cuda"
    try:
        if path.endswith(".so"):
            if cuda:
                torch.cuda.set_device(device)  # aot_load takes no device index, as TorchServe notes
            return torch._export.aot_load(path, device.type)
        return torch._inductor.aoti_load_package(path, device_index=device.index if cuda else -1)
    except Exception as exc:
        raise HandlerError(f"pt2.export: cannot load the AOTInductor model {path}: {reason(exc)}") from exc


def prepare(model: Any, settings: Settings, device: Any, aot: bool = False) -> Any:
    """``model`` compiled as ``settings`` say and run once per warm-up input shape (``model`` itself if they ask for
    no compile). ``aot``: the model is an AOTInductor one, which cannot be compiled again."""
    if settings.compile is None:
        return model
    import torch

    options = dict(settings.compile)
    backend = options.get("backend", "inductor")
    if aot:
        raise HandlerError(f"{settings.source}: the model is an AOTInductor file, already compiled: remove the setting")
    known = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise HandlerError(f"{settings.source}: unknown option {names} (torch.compile takes {', '.join(known)})")
    _check_compiler(backend, device, settings.source)
    try:
        compiled = torch.compile(model, **options)
    except Exception as exc:
        if type(exc).__name__ == "InvalidBackend":
            backends = ", ".join(sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"}))  # not the debug ones
            raise HandlerError(
                f"{settings.source}: backend {backend!r} is not a torch.compile backend (torch {torch.__version__} "
                f"has {backends})"
            ) from exc
        raise HandlerError(f"{settings.source}: torch.compile refused {options}: {reason(exc)}") from exc
    warm_up(compiled, settings, device, backend)
    return compiled


def _check_compiler(backend: str, device: Any, source: str) -> None:
    """Inductor compiles C++ for the CPU: without a working compiler, fail the load rather than the first request."""
    if backend != "inductor" or device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch: the warm-up, or else the first request, finds out
        return
    try:
        get_cpp_compiler()
    except Exception as exc:
        raise HandlerError(
            f"{source}: backend 'inductor' compiles C++ for the CPU, and no C++ compiler works here ({reason(exc)}): "
            "install g++ (or set CXX), or choose backend 'aot_eager', which needs none"
        ) from exc


def warm_up(model: Any, settings: Settings, device: Any, backend: str) -> None:
    """Run ``model`` under ``torch.inference_mode()`` (as ``BaseHandler.inference`` does) on zeros of each warm-up
    shape (``warmup_shapes``), so that torch.compile's graphs exist before the first request."""
    import torch

    if settings.warmup is None:
        if settings.warmup_source != "pt2.warmup":  # not turned off: say why the first request will be slow
            logger.warning(
                "%s: no warm-up input (declare the model config's inputs, or pt2.warmup): the first request "
                "compiles the model",
                settings.source,
            )
        return
    for shapes in warmup_shapes(settings.warmup):
        pairs = list(zip(settings.warmup, shapes, strict=True))
        tensors = [torch.zeros(shape, dtype=getattr(torch, DTYPES[s.datatype]), device=device) for s, shape in pairs]
        try:
            with torch.inference_mode():
                model(*tensors)
        except Exception as exc:
            given = ", ".join(f"{s.datatype}{shape}" for s, shape in pairs)
            raise HandlerError(
                f"{settings.source}: the model compiled with backend {backend!r} failed on the warm-up input "
                f"{given} (from {settings.warmup_source}): {reason(exc)}"
            ) from exc
    _stop_compile_workers()


def warmup_shapes(inputs: tuple[WarmupInput, ...]) -> Iterator[list[list[int]]]:
    """The shapes to warm up on: every ``-1`` as 1; then, when an input's leading dimension is ``-1`` (the batch), that
    dimension as 2. torch.compile specializes a size of 1 and compiles a graph for any other size on the first one it
    sees, so both graphs are then compiled."""
    yield [[1 if d == -1 else d for d in spec.shape] for spec in inputs]
    if any(spec.shape and spec.shape[0] == -1 for spec in inputs):
        yield [[2 if i == 0 and d == -1 else 1 if d == -1 else d for i, d in enumerate(spec.shape)] for spec in inputs]


def _stop_compile_workers() -> None:
    """Inductor compiles in a pool of processes, one per core; once warmed up, a worker does not keep them (a later
    compile starts them again)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except ImportError:
        return
    shutdown_compile_workers()


def reason(exc: BaseException) -> str:
    """An exception on one line: its class and the first paragraph of its message (torch's go on for pages), with
    the same of the exception that caused it."""
    text = " ".join(str(exc).strip().split("\n\n")[0].split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" (from {reason(cause)})"
    return text if len(text) <= 800 else text[:800] + "..."
