"""The one decoder: options, logits processors, beam/greedy/sampling search and streaming.

Imports are lazy so that `deploylm.decoding.options` stays importable without loading torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DecodingOptions": "options", "Hypothesis": "search", "SearchStats": "search", "StepEvent": "search",
    "generate_ids": "search", "iter_search": "search", "common_prefix": "stream", "stream_ids": "stream",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"deploylm.decoding.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deploylm.decoding' has no attribute {name!r}")


__all__ = list(_EXPORTS)
