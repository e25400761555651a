"""Backend registry: names -> implementations, imported lazily so a missing runtime costs nothing
until it is asked for (and then raises MissingDependencyError with the install command)."""
from __future__ import annotations

import importlib
from typing import Any

from deploylm.backends.base import Backend, EncodedBatch, ModelInfo, SpecialTokens, State
from deploylm.errors import UsageError

# name -> "module:attribute" of a class with `from_source(source, **options) -> Backend`
_REGISTRY: dict[str, str] = {
    "torch": "deploylm.backends.torch_backend:TorchBackend",
    "onnx": "deploylm.backends.onnx_backend:OnnxBackend",
    "trt": "deploylm.backends.trt_backend:TrtBackend",
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_class(name: str) -> Any:
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend {name!r}: expected one of {', '.join(_REGISTRY)}")
    module, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def load_backend(name: str, source: Any, **options: Any) -> Backend:
    """Open `source` (a deploylm.models.source.Source) with backend `name`."""
    return backend_class(name).from_source(source, **options)


__all__ = [
    "Backend", "EncodedBatch", "ModelInfo", "SpecialTokens", "State",
    "backend_names", "backend_class", "load_backend",
]
