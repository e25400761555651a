"""The torch backend's dtype "int8": dynamic int8 quantization of every Linear layer, CPU only.

`torch.ao.quantization.quantize_dynamic` swaps each `nn.Linear` for a quantized one: weights int8
(one scale per output channel), activations quantized to uint8 per tensor at run time, int32
accumulation, fp32 out. Embeddings, norms, attention arithmetic and the tied output projection of
the seed model (`F.linear` over the embedding) stay fp32. GPT-2's `Conv1D` layers (a Linear with a
transposed weight) are turned into `nn.Linear` first so that they are quantized too.

torch.ao.quantization is deprecated (torch 2.13 still runs it, with a deprecation warning that we
silence); its kernels exist on CPU only (fbgemm/x86, onednn, qnnpack), so CUDA is refused up front.
Measured on SmolLM2-135M (2026-11-28, 1 thread, against the fp32 torch backend): 3.3x faster beam-4
generation, but perplexity +36% and 11% beam-4 token agreement on the built-in held-out texts: per-tensor
activation scales break on the model's activation outliers (down_proj inputs reach |x| ~ 3000). For
near-lossless int8 use the `int8` ONNX profile (weight-only); this dtype suits models without such
outliers (tiny test models and the seed digits2words model agree with fp32 top-1).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from deploylm.errors import UsageError

NO_INT8 = "dtype int8"


def check_int8_device(device: str | torch.device) -> None:
    """int8 dynamic quantization has CPU kernels only: refuse any other device in one line."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind != "cpu":
        raise UsageError(f"{NO_INT8} (torch dynamic quantization) runs on CPU only, not {device!s}: use --device cpu, "
                         "or --dtype float16/bfloat16 on CUDA, or an int8 ONNX export (deploylm export --profile int8)")


def _conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D (GPT-2 family: y = x @ W + b, W [in, out]) by equivalent nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize `model` (fp32, on CPU, eval mode) in place; a UsageError where this torch cannot."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise UsageError(f"{NO_INT8}: this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic; "
                         "use an int8 ONNX export (deploylm export --profile int8) with --backend onnx") from None
    if torch.backends.quantized.engine in (None, "none"):
        raise UsageError(f"{NO_INT8}: this torch build has no quantized CPU engine (torch.backends.quantized.engine "
                         f"is {torch.backends.quantized.engine!r}); use an int8 ONNX export with --backend onnx")
    _conv1d_to_linear(model)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise UsageError(f"{NO_INT8}: {type(model).__name__} has no Linear layers to quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices, once per call
        try:
            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        except (RuntimeError, NotImplementedError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"{NO_INT8}: torch dynamic quantization failed on {type(model).__name__}: {first}") from None
    return model


def quantized_linears(model: Any) -> int:
    """How many Linear layers of `model` run int8 (tests and reports)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(1 for m in model.modules() if isinstance(m, DynamicLinear))
