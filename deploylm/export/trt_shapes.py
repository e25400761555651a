"""TensorRT optimization-profile shapes and KV-buffer sizes, derived from a profile's [tensorrt] table.

Pure functions (no tensorrt, no torch): the engine builder and the trt backend both read them, and
the unit tests check them on machines without TensorRT.

Axes of the [tensorrt] table (each (min, opt, max)):
  batch     inputs per call (prefill rows); decode rows are batch x num_beams
  sequence  prompt (decoder-only) or source (encoder) tokens
  past      cached tokens before a decode step

Phases (one TensorRT optimization profile each):
  prefill   decoder-only first step: many tokens, past length 0            rows = batch
  decode    one token per row, past up to max                              rows = batch x beams
  encoder   the encoder of an encoder-decoder                              rows = batch
An encoder-decoder decoder has only `decode`, with past from 0 (its first step has no past).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from deploylm.errors import UsageError

Range = tuple[int, int, int]                 # (min, opt, max)
Dims = tuple[int | None, ...]                # a graph input's dims; None = dynamic
ShapeSet = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # name -> (min, opt, max) shapes

PHASES = ("prefill", "decode", "encoder")
AXES = ("batch", "sequence", "past")


@dataclass(frozen=True)
class TrtShapes:
    """Axis ranges for one engine build; `num_beams` multiplies the decode rows."""

    batch: Range
    sequence: Range
    past: Range
    num_beams: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            _check_range(axis, getattr(self, axis), minimum=0 if axis == "past" else 1)
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise UsageError(f"[tensorrt] num_beams={self.num_beams!r}: expected an integer >= 1")

    @property
    def decode_rows(self) -> Range:
        """Rows of a decode step: prefill rows at least, batch x beams at most."""
        lo, opt, hi = self.batch
        return (lo, opt * self.num_beams, hi * self.num_beams)


def _check_range(axis: str, value: Any, minimum: int) -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok or not (minimum <= value[0] <= value[1] <= value[2]):
        raise UsageError(f"[tensorrt] shapes.{axis}={value!r}: expected [min, opt, max] integers with "
                         f"{minimum} <= min <= opt <= max")


def shapes_from_profile(profile: Any, num_beams: int | None = None) -> TrtShapes:
    """TrtShapes from a deploylm.profiles.Profile (its [tensorrt] table and generation.num_beams)."""
    table = getattr(profile, "tensorrt", None)
    if table is None:
        raise UsageError(f"profile {getattr(profile, 'name', '?')!r} has no [tensorrt] table: "
                         "use a trt-* profile (deploylm profiles lists them)")
    shapes: Mapping[str, Any] = table.shapes
    missing = [axis for axis in AXES if axis not in shapes]
    if missing:
        raise UsageError(f"profile {profile.name!r}: [tensorrt] shapes lacks {', '.join(missing)}: "
                         f"expected {', '.join(AXES)}")
    beams = num_beams if num_beams is not None else int(dict(profile.generation).get("num_beams", 1))
    return TrtShapes(*(tuple(shapes[axis]) for axis in AXES), num_beams=beams)


# ---- which axis each dimension of a named graph input is ------------------------------------------

def input_layout(name: str, dims: Dims, *, decoder_only: bool, phase: str) -> tuple[str | int, ...]:
    """Role of each dim of graph input `name`: "rows", "seq", "past", "total", "src" or a fixed int.

    Names follow the io spec (Hugging Face/optimum): input_ids, attention_mask, position_ids,
    past_key_values.{i}.key|value (enc-dec: .decoder./.encoder.), encoder_hidden_states,
    encoder_attention_mask.
    """
    if name.startswith("past_key_values."):
        time_role = "src" if ".encoder." in name else "past"
        roles: tuple[str | None, ...] = ("rows", None, time_role, None)
    elif name in ("input_ids", "position_ids"):
        roles = ("rows", "seq")
    elif name == "attention_mask":
        roles = ("rows", "seq") if phase == "encoder" else ("rows", "total")
    elif name in ("encoder_hidden_states", "encoder_attention_mask"):
        roles = ("rows", "src", None)[: len(dims)]
    else:
        raise UsageError(f"graph input {name!r} is not in the io spec: cannot derive TensorRT shapes for it")
    if len(roles) != len(dims):
        raise UsageError(f"graph input {name!r} has {len(dims)} dims, expected {len(roles)}")
    layout: list[str | int] = []
    for role, dim in zip(roles, dims):
        if role is None:
            if dim is None:
                raise UsageError(f"graph input {name!r}: heads/hidden dims must be static, got a dynamic dim")
            layout.append(dim)
        else:
            layout.append(role)
    return tuple(layout)


def phase_axes(shapes: TrtShapes, phase: str, *, decoder_only: bool) -> dict[str, Range]:
    """(min, opt, max) of every role in `phase`."""
    if phase == "encoder":
        return {"rows": shapes.batch, "seq": shapes.sequence}
    if phase == "prefill":
        if not decoder_only:
            raise UsageError("an encoder-decoder decoder has no prefill profile: its first step is a decode step")
        return {"rows": shapes.batch, "seq": shapes.sequence, "past": (0, 0, 0), "total": shapes.sequence,
                "src": shapes.sequence}
    if phase != "decode":
        raise UsageError(f"unknown phase {phase!r}: expected one of {', '.join(PHASES)}")
    lo, opt, hi = shapes.past
    past = (max(lo, 1), max(opt, 1), max(hi, 1)) if decoder_only else (lo, opt, hi)
    return {"rows": shapes.decode_rows, "seq": (1, 1, 1), "past": past,
            "total": tuple(p + 1 for p in past), "src": shapes.sequence}


def profile_shapes(inputs: Mapping[str, Dims], shapes: TrtShapes, phase: str, *,
                   decoder_only: bool) -> ShapeSet:
    """Shapes for one optimization profile: input name -> (min, opt, max) shape tuples."""
    axes = phase_axes(shapes, phase, decoder_only=decoder_only)
    out: ShapeSet = {}
    for name, dims in inputs.items():
        layout = input_layout(name, dims, decoder_only=decoder_only, phase=phase)
        out[name] = tuple(tuple(axes[d][k] if isinstance(d, str) else d for d in layout)  # type: ignore[misc]
                          for k in range(3))
    return out


def engine_phases(graph: str) -> tuple[str, ...]:
    """Optimization profiles of each graph, in index order (profile 0 first)."""
    table = {"model": ("prefill", "decode"), "decoder_model": ("decode",), "encoder_model": ("encoder",)}
    if graph not in table:
        raise UsageError(f"unknown graph {graph!r}: expected one of {', '.join(table)}")
    return table[graph]


# ---- KV buffers for the trt backend ---------------------------------------------------------------

@dataclass(frozen=True)
class KvBufferPlan:
    """KV memory: per cache tensor two flat buffers (ping-pong) of at most `numel` elements, and
    the prefill profile's limits."""

    names: tuple[str, ...]        # graph inputs past_key_values.* (the outputs are present.*)
    rows: int                     # batch x beams
    heads: int
    max_len: int
    head_dim: int
    itemsize: int                 # bytes per element of the engine's KV dtype
    prefill_rows: int | None = None    # the prefill profile's most rows and prompt tokens
    prefill_tokens: int | None = None  # (None: no prefill profile, or not known)
    positions: int | None = None       # prompt + generated - 1 at most: the decode profile's longest past + 1

    @property
    def numel(self) -> int:
        """Elements of one buffer: [rows, heads, max_len, head_dim]."""
        return self.rows * self.heads * self.max_len * self.head_dim

    @property
    def total_bytes(self) -> int:
        return 2 * len(self.names) * self.numel * self.itemsize


def kv_buffer_plan(phase_shapes: Mapping[str, ShapeSet], itemsize: int, rows: int | None = None) -> KvBufferPlan:
    """Size the ping-pong KV buffers from an engine's optimization-profile shapes (phase -> input
    -> (min, opt, max)): rows = the most rows any phase allows (or `rows`, if smaller), length =
    the longest present (max past + max new tokens), heads/head_dim from the past_key_values."""
    kv_max = {n: s[2] for shapes in phase_shapes.values() for n, s in shapes.items() if n.startswith("past_key_values.")}
    self_kv = {n: dims for n, dims in kv_max.items() if ".encoder." not in n}
    if not self_kv:
        raise UsageError("the engine has no past_key_values inputs: cannot size a KV cache")
    geometry = {(dims[1], dims[3]) for dims in self_kv.values()}
    if len(geometry) != 1:
        raise UsageError(f"KV inputs must share heads and head_dim, got {sorted(geometry)}")
    heads, head_dim = next(iter(geometry))
    max_rows = max(shapes["input_ids"][2][0] for shapes in phase_shapes.values())
    max_len = max(shapes[n][2][2] + shapes["input_ids"][2][1]
                  for shapes in phase_shapes.values() for n in self_kv if n in shapes)
    prefill = phase_shapes.get("prefill", {}).get("input_ids")
    prefill_rows, prefill_tokens = (int(prefill[2][0]), int(prefill[2][1])) if prefill else (None, None)
    decode = phase_shapes.get("decode", {})
    pasts = [int(decode[n][2][2]) for n in self_kv if n in decode]
    return KvBufferPlan(tuple(self_kv), min(rows or max_rows, max_rows), heads, max_len, head_dim, itemsize,
                        prefill_rows, prefill_tokens, min(pasts) + 1 if pasts else None)


def check_fits(rows: int, length: int, plan: KvBufferPlan) -> None:
    """UsageError when a call needs more rows or a longer cache than the engine/buffers allow."""
    if rows > plan.rows:
        raise UsageError(f"{rows} rows (batch x beams) exceed the TensorRT engine's {plan.rows}: lower "
                         "--batch-size/--num-beams or re-export with larger [tensorrt] shapes.batch")
    if length > plan.max_len:
        raise UsageError(f"a cache of {length} tokens exceeds the TensorRT engine's {plan.max_len}: shorten "
                         "the prompt/--max-new-tokens or re-export with larger [tensorrt] shapes")


def check_prefill(rows: int, length: int, plan: KvBufferPlan) -> None:
    """UsageError when a prompt batch is outside the engine's prefill profile (or the buffers)."""
    check_fits(rows, length, plan)
    if plan.prefill_rows is not None and rows > plan.prefill_rows:
        raise UsageError(f"{rows} prompts in one call exceed the TensorRT engine's prefill profile of "
                         f"{plan.prefill_rows}: lower --batch-size or re-export with larger [tensorrt] shapes.batch")
    if plan.prefill_tokens is not None and length > plan.prefill_tokens:
        raise UsageError(f"a prompt of {length} tokens exceeds the TensorRT engine's prefill profile of "
                         f"{plan.prefill_tokens}: shorten the prompt or re-export with larger [tensorrt] "
                         "shapes.sequence")
