"""The PyTorch backend: opens any SRC except an artifact and serves prefill/decode/reorder.

`TorchBackend.from_source` picks the implementation by SRC kind:
- deploylm checkpoint  -> DeployLMSeq2SeqBackend / DeployLMCausalBackend (torch_seq2seq.py)
- Hugging Face folder  -> HFCausalBackend or HFSeq2SeqBackend (torch_hf.py)
- .gguf file           -> HFCausalBackend over transformers' GGUF loader
Every call runs under `torch.inference_mode()`, returns fp32 logits and counts its time in `stats`
(`deploylm bench` and benchmarks/decoder_overhead.py read it: time inside backend calls).
States are consumed: after `decode(tokens, state)` or `reorder(state, idx)` use only the returned state.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deploylm.backends.base import BackendStats, EncodedBatch, ModelInfo, State, check_threads
from deploylm.errors import UsageError
from deploylm.models.source import Source, resolve_source


class TorchBackend:
    """Base of the torch backends; subclasses implement `_prefill`, `_decode`, `_reorder`."""

    name = "torch"

    def __init__(self, model: Any, info: ModelInfo, device: torch.device,
                 generation_defaults: dict[str, Any] | None = None) -> None:
        self.model = model
        self.info = info
        self.device = device
        self.generation_defaults = dict(generation_defaults or {})  # model defaults for DecodingOptions
        self.stats = BackendStats()
        self._setup()

    @classmethod
    def from_source(cls, source: Source | str, *, device: str = "cpu", dtype: str = "float32",
                    threads: int | None = None, **_: Any) -> "TorchBackend":
        """Open `source` on `device` ("cpu" | "cuda") in `dtype` ("float32" | "float16" | "bfloat16" | "int8").

        "int8": fp32 weights, then every Linear layer dynamically quantized to int8 (CPU only; torch_int8.py).
        threads: PyTorch's CPU threads, set with torch.set_num_threads: for the loading thread and as the default of
        every thread that first runs PyTorch later; a thread that already ran PyTorch (a started thread pool's
        worker) keeps its count. None leaves PyTorch's default (the physical cores). On a machine shared with
        busy processes, 1 is much faster.
        """
        from deploylm.models import hf

        check_threads(threads, "PyTorch's default")
        source = source if isinstance(source, Source) else resolve_source(source)
        int8 = isinstance(dtype, str) and dtype == "int8"
        if not int8 and not isinstance(dtype, torch.dtype) and dtype not in hf.DTYPES:
            raise UsageError(f"dtype {dtype!r}: expected one of {', '.join([*hf.DTYPES, 'int8'])}")
        if int8:
            from deploylm.backends.torch_int8 import check_int8_device

            check_int8_device(device)
        torch_dtype, torch_device = hf.resolve_dtype("float32" if int8 else dtype), hf.resolve_device(device)
        if source.kind == "artifact":
            raise UsageError(f"model {str(source.path)!r} is an exported artifact: the torch backend runs checkpoints, "
                             "Hugging Face folders and .gguf files; use the onnx (or trt) backend: --backend onnx, "
                             "or backend=\"onnx\" in deploylm.load")
        # A model built before its weights are loaded draws its initial weights from torch's global RNG: the host
        # process's random numbers (seeded for its own use) must not depend on whether it loaded a model.
        with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
            if source.kind == "checkpoint":
                from deploylm.backends.torch_seq2seq import open_checkpoint

                backend = open_checkpoint(source, dtype=torch_dtype, device=torch_device)
            else:
                from deploylm.backends.torch_hf import HFCausalBackend, HFSeq2SeqBackend

                model = hf.load_hf_model(source, dtype=torch_dtype, device=torch_device)
                impl = HFSeq2SeqBackend if model.config.is_encoder_decoder else HFCausalBackend
                backend = impl(model, hf.model_info(model, source.name), torch_device, hf.generation_defaults(model))
        if int8:
            from deploylm.backends.torch_int8 import quantize_int8

            quantize_int8(backend.model)
        if threads is not None:
            torch.set_num_threads(threads)
        return backend

    def _setup(self) -> None:
        """Subclass hook run at the end of __init__."""

    # -- the Backend protocol -------------------------------------------------------------------
    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, State]:
        """Prompt (decoder-only) or encoder + decoder start (enc-dec) -> logits [B, V] fp32, state of B rows."""
        return self.stats.timed(self._prefill, batch.to(self.device))

    def decode(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens [R] -> logits [R, V] fp32 and the advanced state."""
        return self.stats.timed(self._decode, tokens.to(self.device, torch.long), state)

    def reorder(self, state: State, beam_idx: Tensor) -> State:
        """Keep rows beam_idx [R'] (gather on the batch axis)."""
        return self.stats.timed(self._reorder, state, beam_idx.to(self.device, torch.long))

    def _prefill(self, batch: EncodedBatch) -> tuple[Tensor, State]:
        raise NotImplementedError

    def _decode(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def _reorder(self, state: State, beam_idx: Tensor) -> State:
        raise NotImplementedError


def is_identity(beam_idx: Tensor, rows: int) -> bool:
    """True when gathering `beam_idx` from `rows` rows would change nothing."""
    if beam_idx.shape[0] != rows:
        return False
    return bool(torch.equal(beam_idx, torch.arange(rows, device=beam_idx.device)))
