"""The Backend protocol: the only thing the decoder knows about a model.

A backend turns token ids into next-token logits. The decoder (deploylm.decoding) owns the search;
backends own the model state (KV caches, encoder memory) and never import the decoder.

Row layout: after `prefill` the state has one row per input (B rows). The decoder then calls
`reorder(state, beam_idx)` with `beam_idx` of length B * num_beams (e.g. [0,0,0,0,1,1,1,1]) to expand
it to beams, and afterwards with the surviving parent rows at every step. `reorder` is a gather on
the batch axis: the output has len(beam_idx) rows; rows of the same input stay contiguous
(row r belongs to input r // num_beams), so encoder memory can stay at B rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

State = Any  # opaque to the decoder; each backend defines its own


@dataclass(frozen=True)
class SpecialTokens:
    """Special token ids, taken from the model's generation_config/config as transformers does."""

    eos_token_ids: tuple[int, ...]          # any of these finishes a hypothesis
    pad_token_id: int                       # pads prompts (left for decoder-only) and finished rows
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder only


@dataclass(frozen=True)
class EngineLimits:
    """The lengths an engine was built for (a TensorRT engine's optimization profiles), decoder-only: the Generator
    refuses a prompt + max_new_tokens outside them before it decodes (deploylm.long_inputs), naming the setting that
    raises them, instead of the engine refusing the cache that outgrew it after most of the decode."""

    positions: int                          # prompt + max_new_tokens - 1 at most: the longest past + 1
    prompt_tokens: int                      # the most prompt tokens one call takes (the prefill profile's)
    name: str = "the TensorRT engine"       # for messages: "... over the TensorRT engine's ..."
    positions_setting: str = "[tensorrt] shapes.past"   # what raises `positions` (re-export with a larger one)
    prompt_setting: str = "[tensorrt] shapes.sequence"  # what raises `prompt_tokens`


@dataclass(frozen=True)
class ModelInfo:
    """What the decoder and the Generator need to know about the model behind a backend."""

    is_encoder_decoder: bool
    vocab_size: int                         # width of the logits
    special: SpecialTokens
    max_positions: int | None = None        # the model's window (prompt + generated), if bounded
    name: str = "model"
    # decoding settings of the model's generation_config that the decoder applies as logits processors:
    # only the keys deploylm.models.hf.DECODING_KEYS that the model sets (ints, floats, tuples of ints,
    # sequence_bias as (token ids, bias) pairs)
    generation: Mapping[str, Any] = field(default_factory=dict)
    engine: EngineLimits | None = None      # the limits of an engine built for fixed shapes (the trt backend's)


@dataclass(frozen=True)
class EncodedBatch:
    """Tokenized prompts, padded into one batch.

    input_ids:      [B, T] int64. Decoder-only: LEFT-padded. Encoder-decoder: RIGHT-padded source.
    attention_mask: [B, T] int64, 1 for real tokens, 0 for padding.
    The decoder-only position ids are derived from the mask (cumsum - 1, clamped at 0), as in HF.
    """

    input_ids: Tensor
    attention_mask: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "EncodedBatch":
        """On `device`, as int64 (a caller's int32 or bool tensors are cast: ONNX Runtime binds them by type)."""
        return EncodedBatch(self.input_ids.to(device, torch.long), self.attention_mask.to(device, torch.long))


@runtime_checkable
class Backend(Protocol):
    name: str                      # "torch" | "onnx" | "trt"
    device: torch.device
    info: ModelInfo

    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, State]:
        """Run the prompt (decoder-only) or encoder + decoder start token (enc-dec).

        Returns logits [B, V] (fp32) of the last position and a state with B rows.
        """
        ...

    def decode(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Feed one new token per row: tokens [R] int64 -> logits [R, V] (fp32), state advanced."""
        ...

    def reorder(self, state: State, beam_idx: Tensor) -> State:
        """Keep rows beam_idx [R'] (a gather on the batch axis; R' may differ from R)."""
        ...


@dataclass
class BackendStats:
    """Counters a backend may fill in, read by `deploylm bench` (time inside backend calls)."""

    calls: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def timed(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) under torch.inference_mode(), counting one call and its wall time."""
        start = time.perf_counter()
        with torch.inference_mode():
            result = fn(*args)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return result


def check_threads(threads: Any, default: str) -> None:
    """A backend's `threads` option: None (`default` decides) or a whole number >= 1; else a UsageError."""
    from deploylm.errors import UsageError

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads={threads!r}: expected a whole number of threads >= 1 (or None: {default})")
