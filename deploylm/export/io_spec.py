"""The one declaration of ONNX graph inputs, outputs and dynamic axes (Hugging Face/optimum names).

The exporter, the validator and the ONNX Runtime backend all read tensor names from here.

Decoder-only, one graph `model.onnx` (the first step takes an empty past, length 0):
    input_ids                    [batch, seq]            int64
    attention_mask               [batch, total]          int64   total = past + seq, 1 = real token
    position_ids                 [batch, seq]            int64
    past_key_values.{i}.key      [batch, kv_heads, past, head_dim]   (and .value)
  ->
    logits                       [batch, 1, vocab]       fp32    LAST POSITION ONLY: a decode step
                                                                  needs no more, and prefill over a
                                                                  long prompt then costs no
                                                                  [batch, seq, vocab] output
    present.{i}.key              [batch, kv_heads, total, head_dim]  (and .value)

  That is the "concat" KV layout (KV_CONCAT, optimum's): every step copies the past into the
  present. Hugging Face causal LMs are exported with the "append" layout (KV_APPEND) instead:
    past_key_values.{i}.key      [batch, kv_heads, past, head_dim]   the backend's preallocated
                                                                  buffer: past = its capacity;
                                                                  positions not written yet are
                                                                  0 in attention_mask
    attention_mask               [batch, total]          total = past + seq, as above
  ->
    logits                       [batch, 1, vocab]
    new_key_values.{i}.key       [batch, kv_heads, seq, head_dim]    (and .value) the K/V of the
                                                                  seq new positions only; the
                                                                  backend writes them into its
                                                                  buffer (no copy of the past)
  Hugging Face causal LMs exported by this deploylm take the "shared-prompt" layout (KV_SHARED): the
  append layout with each prompt's K/V held once for all of its rows (beams, returned sequences):
    input_ids                    [batch, seq]            rows = prompts × beams, prompt-major: row r
                                                                  belongs to prompt r // (batch / prompts)
    attention_mask               [batch, total]          total = plen + past + seq: the prompt's
                                                                  positions, the buffer's, the new ones
    position_ids                 [batch, seq]
    past_key_values.{i}.key      [batch, kv_heads, past, head_dim]   the generated positions' buffer,
                                                                  as in the append layout
    prompt_key_values.{i}.key    [prompts, kv_heads, plen, head_dim] (and .value) one copy per prompt
  ->
    logits                       [batch, 1, vocab]
    new_key_values.{i}.key       [batch, kv_heads, seq, head_dim]    as in the append layout
  A prefill runs with plen = past = 0 (prompts = batch); its new K/V become the prompt K/V, which
  beam search then never copies per beam. The attention multiplies each prompt's K/V by the queries
  of all of its rows at once.
  The names tell the layouts apart (`kv_layout`); an empty past makes each of them a plain prefill.

Encoder-decoder, two graphs:
  `encoder_model.onnx`
    input_ids [batch, src], attention_mask [batch, src]
  ->
    encoder_hidden_states        [batch, src, d_model]
    present.{i}.encoder.key      [batch, heads, src, head_dim]   cross-attention K/V (and .value)
  `decoder_model.onnx`  (rows = batch × beams; the cross K/V have `enc_batch` rows: equal to rows
                         for Hugging Face graphs, the number of inputs for deploylm's own model)
    input_ids                      [rows, seq]
    encoder_attention_mask         [enc_batch, src]
    past_key_values.{i}.decoder.key  [rows, heads, past, head_dim]   self-attention, length ≥ 0
    past_key_values.{i}.encoder.key  [enc_batch, heads, src, head_dim]  (and .value for both)
  ->
    logits                         [rows, 1, vocab]   last position only, as above
    present.{i}.decoder.key        [rows, heads, total, head_dim]  (and .value)
"""
from __future__ import annotations

from dataclasses import dataclass

MODEL_FILE = "model.onnx"
ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
KV = ("key", "value")
KV_CONCAT = "concat"   # outputs present.* = past + new (optimum's layout)
KV_APPEND = "append"   # outputs new_key_values.* = the new positions only (see the module docstring)
KV_SHARED = "shared-prompt"  # KV_APPEND + prompt_key_values.* inputs held once per prompt (module docstring)
# axis names -> the smallest size each may take (the past is empty on the first step)
AXIS_MIN = {"batch": 1, "seq": 1, "past": 0, "total": 1, "src": 1, "rows": 1, "enc_batch": 1,
            "prompts": 1, "plen": 0}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, axes (a str is a dynamic axis, an int a fixed size), dtype."""

    name: str
    axes: tuple[str | int, ...]
    dtype: str  # "int64" | "float32"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, str)}


@dataclass(frozen=True)
class GraphSpec:
    """The IO of one graph file."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ModelDims:
    """Sizes that fix the graphs' static axes."""

    n_layers: int
    kv_heads: int       # self-attention K/V heads (grouped-query models have fewer than q heads)
    head_dim: int
    vocab_size: int
    d_model: int = 0    # encoder-decoder only: width of encoder_hidden_states
    cross_heads: int = 0  # encoder-decoder only: cross-attention K/V heads
    kv_layout: str = KV_CONCAT  # decoder-only self-attention K/V: KV_CONCAT | KV_APPEND | KV_SHARED


def past_names(n_layers: int, part: str = "") -> list[str]:
    """past_key_values.{i}.key/value in layer order, key before value (part: "", "decoder", "encoder")."""
    infix = f".{part}" if part else ""
    return [f"past_key_values.{i}{infix}.{kv}" for i in range(n_layers) for kv in KV]


def present_names(n_layers: int, part: str = "") -> list[str]:
    """present.{i}.key/value in layer order (part: "", "decoder", "encoder")."""
    infix = f".{part}" if part else ""
    return [f"present.{i}{infix}.{kv}" for i in range(n_layers) for kv in KV]


def new_kv_names(n_layers: int) -> list[str]:
    """new_key_values.{i}.key/value in layer order: the outputs of an append-layout graph."""
    return [f"new_key_values.{i}.{kv}" for i in range(n_layers) for kv in KV]


def prompt_names(n_layers: int) -> list[str]:
    """prompt_key_values.{i}.key/value in layer order: the per-prompt K/V inputs of a shared-prompt graph."""
    return [f"prompt_key_values.{i}.{kv}" for i in range(n_layers) for kv in KV]


def kv_layout(output_names: list[str] | tuple[str, ...], input_names: list[str] | tuple[str, ...] = ()) -> str:
    """A decoder-only graph's layout: KV_SHARED when it takes prompt_key_values.*, KV_APPEND when it
    outputs new_key_values.* (and takes no prompt K/V), else KV_CONCAT."""
    if not any(n.startswith("new_key_values.") for n in output_names):
        return KV_CONCAT
    return KV_SHARED if any(n.startswith("prompt_key_values.") for n in input_names) else KV_APPEND


def _kv(names: list[str], rows: str, heads: int, length: str, head_dim: int) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, (rows, heads, length, head_dim), "float32") for n in names)


def decoder_only_spec(d: ModelDims) -> GraphSpec:
    inputs = (
        TensorSpec("input_ids", ("batch", "seq"), "int64"),
        TensorSpec("attention_mask", ("batch", "total"), "int64"),
        TensorSpec("position_ids", ("batch", "seq"), "int64"),
        *_kv(past_names(d.n_layers), "batch", d.kv_heads, "past", d.head_dim),
    )
    if d.kv_layout == KV_SHARED:
        inputs += _kv(prompt_names(d.n_layers), "prompts", d.kv_heads, "plen", d.head_dim)
    if d.kv_layout in (KV_APPEND, KV_SHARED):
        kv = _kv(new_kv_names(d.n_layers), "batch", d.kv_heads, "seq", d.head_dim)
    else:
        kv = _kv(present_names(d.n_layers), "batch", d.kv_heads, "total", d.head_dim)
    outputs = (TensorSpec("logits", ("batch", 1, d.vocab_size), "float32"), *kv)
    return GraphSpec(MODEL_FILE, inputs, outputs)


def encoder_spec(d: ModelDims) -> GraphSpec:
    inputs = (
        TensorSpec("input_ids", ("batch", "src"), "int64"),
        TensorSpec("attention_mask", ("batch", "src"), "int64"),
    )
    outputs = (
        TensorSpec("encoder_hidden_states", ("batch", "src", d.d_model), "float32"),
        *_kv(present_names(d.n_layers, "encoder"), "batch", d.cross_heads, "src", d.head_dim),
    )
    return GraphSpec(ENCODER_FILE, inputs, outputs)


def decoder_spec(d: ModelDims, cross_rows: str = "enc_batch") -> GraphSpec:
    """cross_rows "enc_batch": cross K/V and mask at one row per input (deploylm's model);
    "rows": one row per beam (Hugging Face graphs, whose attention needs equal batch sizes)."""
    inputs = (
        TensorSpec("input_ids", ("rows", "seq"), "int64"),
        TensorSpec("encoder_attention_mask", (cross_rows, "src"), "int64"),
        *_kv(past_names(d.n_layers, "decoder"), "rows", d.kv_heads, "past", d.head_dim),
        *_kv(past_names(d.n_layers, "encoder"), cross_rows, d.cross_heads, "src", d.head_dim),
    )
    outputs = (
        TensorSpec("logits", ("rows", 1, d.vocab_size), "float32"),
        *_kv(present_names(d.n_layers, "decoder"), "rows", d.kv_heads, "total", d.head_dim),
    )
    return GraphSpec(DECODER_FILE, inputs, outputs)


def graph_specs(kind: str, dims: ModelDims, cross_rows: str = "enc_batch") -> tuple[GraphSpec, ...]:
    """kind "decoder-only" -> (model.onnx,); "encoder-decoder" -> (encoder_model.onnx, decoder_model.onnx)."""
    if kind == "decoder-only":
        return (decoder_only_spec(dims),)
    return (encoder_spec(dims), decoder_spec(dims, cross_rows))
