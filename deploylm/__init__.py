"""deploylm: one verified decoder over PyTorch, ONNX Runtime and TensorRT.

Public API: load(), Generator, DecodingOptions, __version__.
"""
from __future__ import annotations

__version__ = "0.2.0"   # the one place it is set (pyproject.toml reads it)


def __getattr__(name: str):  # lazy: `import deploylm` stays cheap for the CLI
    if name in ("load", "Generator"):
        from deploylm import generator

        return getattr(generator, name)
    if name == "DecodingOptions":
        from deploylm.decoding.options import DecodingOptions

        return DecodingOptions
    raise AttributeError(f"module 'deploylm' has no attribute {name!r}")


def __dir__() -> list[str]:   # the lazy names too: `deploylm.<Tab>` in IPython, help(deploylm)
    return sorted({*globals(), *__all__})


__all__ = ["load", "Generator", "DecodingOptions", "__version__"]
