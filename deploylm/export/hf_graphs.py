"""Hugging Face models as export-ready modules with flat tensor IO (names in deploylm.export.io_spec).

Each wrapper's `forward(*inputs)` takes the graph inputs in io_spec order and returns the outputs in
io_spec order. The KV cache travels as flat tensors and is rebuilt into a transformers 5
DynamicCache / EncoderDecoderCache inside the forward, so `torch.export` sees plain tensors.
"""
from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import Tensor, nn

from deploylm.export import attention_ops, io_spec
from deploylm.export.io_spec import ModelDims
from deploylm.errors import UsageError
from deploylm.models.hf import cache_keyword, cache_of, not_a_decoder, rope_types

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")   # mixture-of-experts configs


def check_exportable(model: nn.Module) -> None:
    """Refuse, in one line and before any tracing, Hugging Face models whose graphs this exporter
    cannot build (the torch backend still runs them): mixture-of-experts routing, dynamic NTK rope
    (its frequencies are recomputed as the cache grows), and Falcon's alibi (built in bfloat16, which
    ONNX Runtime's CPU kernels do not run)."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = getattr(config, "model_type", type(model).__name__)
    why = None
    if any(isinstance(getattr(text, key, None), int) and getattr(text, key) > 1 for key in EXPERT_KEYS):
        why = "a mixture-of-experts model: its expert routing does not convert to ONNX"
    elif "dynamic" in rope_types(config.to_dict()):
        why = "its rope is dynamic NTK, whose frequencies are recomputed as the sequence grows"
    elif kind == "falcon" and getattr(config, "alibi", False):
        why = "Falcon with alibi builds its attention bias in bfloat16, which ONNX Runtime's CPU kernels do not run"
    if why:
        raise UsageError(f"cannot export this {kind} model to ONNX: {why}; generate with --backend torch instead")


def causal_cache(model: nn.Module, out: Any) -> Any:
    """The K/V cache of a forward with use_cache=True; a model that returns none, or another kind
    (a state-space model's), is a UsageError."""
    cache = cache_of(out)
    if cache is None:
        raise not_a_decoder(model)
    kind = getattr(model.config, "model_type", type(model).__name__)
    layers = getattr(cache, "layers", None) or []
    if not layers or not all(hasattr(layer, "keys") for layer in layers):
        raise UsageError(f"cannot export this {kind} model to ONNX: its cache holds no per-layer keys and values "
                         "(a state-space or linear-attention model); generate with --backend torch instead")
    return cache


def _dynamic_cache(config, flat: tuple[Tensor, ...]):
    """The graph's past as a DynamicCache of plain layers, sliding-window layers included: `present.*`
    is then past + new for every layer (the concat layout's contract; a sliding layer would trim it
    to the window), and the window is applied by the attention mask, which transformers builds from
    config.sliding_window whatever the cache holds."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(len(flat) // 2):
        cache.update(flat[2 * i], flat[2 * i + 1], i)
    return cache


def _flatten(cache) -> list[Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


GQA_ATTENTION = "deploylm_gqa"  # the attention implementation graphs of grouped-query models are traced with


def gqa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float, dropout: float = 0.0, **_: object) -> tuple[Tensor, None]:
    """Eager attention without `repeat_kv`: the G query heads of one K/V head share one matmul.

    query [B, H, T, Dh], key/value [B, Hkv, L, Dh], attention_mask additive [B, 1, T, L] -> [B, T, H, Dh].
    The same arithmetic as transformers' eager attention, but the graph never copies K/V to H heads
    (that copy was the largest memory traffic of a decode step).
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * length, head_dim)                  # [B, Hkv, G*T, Dh]
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling                        # [B, Hkv, G*T, L]
    probs = attention_ops.masked_softmax(scores, attention_mask, groups, length, query.dtype)
    out = torch.matmul(probs, value)                                               # [B, Hkv, G*T, Dh]
    return out.reshape(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None


def _uses_gqa_attention(model: nn.Module) -> bool:
    """Grouped-query models whose attention goes through transformers' attention interface."""
    config = model.config
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", 0)
    return bool(getattr(model, "_supports_attention_backend", False) and kv_heads and heads > kv_heads
                and heads % kv_heads == 0 and getattr(config, "_attn_implementation", None) in ("sdpa", "eager"))


def _register_gqa_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, eager_mask)
    AttentionInterface.register(APPEND_ATTENTION, append_attention)
    AttentionMaskInterface.register(APPEND_ATTENTION, eager_mask)
    AttentionInterface.register(SHARED_ATTENTION, shared_prompt_attention)
    AttentionMaskInterface.register(SHARED_ATTENTION, eager_mask)


# -- the "append" KV layout (io_spec.KV_APPEND): past in, only the new positions' K/V out ---------------

APPEND_ATTENTION = "deploylm_append"  # attention of graphs whose past is a preallocated buffer
_APPEND_CACHE: contextvars.ContextVar[Any] = contextvars.ContextVar("deploylm_append_cache")


def _append_layer(keys: Tensor, values: Tensor, prompt_keys: Tensor | None = None,
                  prompt_values: Tensor | None = None):
    """An `_AppendLayer` (a transformers DynamicLayer subclass, made on first use) holding the past
    (and, in the shared-prompt layout, the prompts' K/V)."""
    global _AppendLayer
    if _AppendLayer is None:
        from transformers.cache_utils import DynamicLayer

        _AppendLayer = type("_AppendLayer", (_AppendLayerMixin, DynamicLayer), {"__doc__": _AppendLayerMixin.__doc__})
    layer = _AppendLayer()
    layer.keys, layer.values, layer.is_initialized = keys, values, True
    layer.prompt_keys, layer.prompt_values = prompt_keys, prompt_values
    layer.new_keys = layer.new_values = None
    return layer


_AppendLayer: Any = None


class _AppendLayerMixin:
    """A cache layer that never concatenates: `update` keeps the new K/V aside and returns the past.

    The past is the backend's buffer [B, Hkv, L, Dh] (positions it has not written yet are masked
    out by attention_mask), so transformers' mask covers L + T positions as for any cache of length L.
    In the shared-prompt layout the prompts' K/V [P, Hkv, Lp, Dh] come first: Lp + L + T positions.
    """

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.new_keys, self.new_values = key_states, value_states
        return self.keys, self.values

    def _prompt_length(self) -> int:
        return 0 if self.prompt_keys is None else self.prompt_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self._prompt_length() + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self._prompt_length() + self.keys.shape[-2] + query_length, 0


def _append_cache(config, flat: tuple[Tensor, ...], prompt: tuple[Tensor, ...] = ()):
    """The append layout's cache (past buffer per layer); with `prompt`, the shared-prompt layout's."""
    cache = _dynamic_cache(config, ())
    cache.layers = [_append_layer(flat[2 * i], flat[2 * i + 1], *(prompt[2 * i:2 * i + 2] if prompt else ()))
                    for i in range(len(flat) // 2)]
    return cache


def append_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float, dropout: float = 0.0, **_: object) -> tuple[Tensor, None]:
    """Attention over (past buffer, new positions) without concatenating them.

    key/value are the past [B, Hkv, L, Dh]; the new positions' k/v [B, Hkv, T, Dh] come from the
    layer's `_AppendLayer`. Scores are computed against each part and only the small score tensors
    are concatenated: softmax over [B, Hkv, G·T, L + T], then out = P_past @ V_past + P_new @ v_new.
    The same arithmetic as `gqa_attention` on the concatenated K/V (one more addition per output), computed by
    one custom op (`attention_ops.append_attention`) that torch.export does not trace through.
    """
    layer = _APPEND_CACHE.get().layers[module.layer_idx]
    return _grouped_query_op(attention_ops.append_attention, query, attention_mask, key.shape[2],
                             (key, value, layer.new_keys, layer.new_values), scaling, key.shape[1])


def _grouped_query_op(op: Any, query: Tensor, attention_mask: Tensor | None, cached: int, tensors: tuple[Tensor, ...],
                      scaling: float, kv_heads: int) -> tuple[Tensor, None]:
    """query [R, H, T, Dh] regrouped per K/V head as q [R, Hkv, G*T, Dh], `op(q, *tensors, mask, scaling, G)`, and the
    result [R, Hkv, G*T, Dh] back as transformers' attention output [R, T, H, Dh]. transformers' additive mask
    [R, 1, T, cached + T] is zeros where it passes none (the ops take a tensor)."""
    batch, heads, length, head_dim = query.shape
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * length, head_dim)                    # [R, Hkv, G*T, Dh]
    mask = attention_mask if attention_mask is not None else query.new_zeros(batch, 1, length, cached + length)
    out = op(q, *tensors, mask, scaling, groups)                                     # [R, Hkv, G*T, Dh]
    return out.reshape(batch, heads, length, head_dim).transpose(1, 2).contiguous(), None


SHARED_ATTENTION = "deploylm_shared_prompt"  # attention of graphs that hold each prompt's K/V once


def shared_prompt_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                            **_: object) -> tuple[Tensor, None]:
    """Attention over (the prompt's K/V, the past buffer, the new positions) without concatenating them.

    The prompts' K/V [P, Hkv, Lp, Dh] are held once per prompt; rows are prompt-major (R = P × B), so
    the B rows of a prompt are regrouped, one reshape and transpose, into one product per prompt and K/V
    head of B·G·T query rows (instead of B products over B copies of the prompt). key/value are the
    past [R, Hkv, L, Dh]; the new positions' k/v [R, Hkv, T, Dh] come from the layer. Scores are
    computed against each part and only the small score tensors are concatenated: softmax over
    [R, Hkv, G·T, Lp + L + T], then out = P_prompt @ V_prompt + P_past @ V_past + P_new @ v_new. The
    same products as `append_attention` over the concatenated K/V (P @ V summed in three parts), computed
    by one custom op (`attention_ops.shared_prompt_attention`) that torch.export does not trace through.
    """
    layer = _APPEND_CACHE.get().layers[module.layer_idx]
    return _grouped_query_op(attention_ops.shared_prompt_attention, query, attention_mask,
                             layer.prompt_keys.shape[2] + key.shape[2],
                             (layer.prompt_keys, layer.prompt_values, key, value, layer.new_keys, layer.new_values),
                             scaling, key.shape[1])


def uses_append_layout(model: nn.Module) -> bool:
    """Causal LMs whose attention goes through transformers' attention interface and whose layers are
    all plain (no sliding window) dynamic cache layers: their graph takes the shared-prompt layout (or the
    append layout, which it extends)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class HFCausalGraph(nn.Module):
    """model.onnx of a Hugging Face causal LM: (ids, mask, positions, *past) -> (logits [B,1,V], *K/V).

    layout io_spec.KV_SHARED (default where `uses_append_layout`): as KV_APPEND, with each prompt's K/V
    [P, Hkv, Lp, Dh] as inputs of their own, read once for the prompt's B = R / P rows
    (`shared_prompt_attention`). layout io_spec.KV_APPEND: the past is a preallocated buffer
    [B, Hkv, L, Dh] whose unwritten positions attention_mask [B, L+T] masks out, and the outputs
    are only the T new positions' K/V (`new_key_values.*`, [B, Hkv, T, Dh]); the backend writes them
    into its buffer, so no step copies the past. layout io_spec.KV_CONCAT: `present.*` = past + new
    [B, Hkv, L+T, Dh] (optimum's layout; grouped-query models then use `gqa_attention`). The model's
    own attention setting is put back after every call (the torch model used elsewhere is unchanged).
    """

    def __init__(self, model: nn.Module, layout: str | None = None):
        super().__init__()
        self.model = model
        self.layout = layout or (io_spec.KV_SHARED if uses_append_layout(model) else io_spec.KV_CONCAT)
        if self.layout == io_spec.KV_APPEND:
            self.attention = APPEND_ATTENTION
        elif self.layout == io_spec.KV_SHARED:
            self.attention = SHARED_ATTENTION
        else:
            self.attention = GQA_ATTENTION if _uses_gqa_attention(model) else None
        if self.attention:
            _register_gqa_attention()

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        input_ids, attention_mask, position_ids, *kv = inputs
        config = self.model.config
        original = config._attn_implementation
        if self.attention:
            config._attn_implementation = self.attention
        append = self.layout in (io_spec.KV_APPEND, io_spec.KV_SHARED)
        if self.layout == io_spec.KV_SHARED:    # past [B, Hkv, L, Dh] then prompt [P, Hkv, Lp, Dh], each 2N
            half = len(kv) // 2
            cache = _append_cache(config, tuple(kv[:half]), tuple(kv[half:]))
        else:
            cache = (_append_cache if append else _dynamic_cache)(config, tuple(kv))  # each [B, Hkv, P, Dh]
        token = _APPEND_CACHE.set(cache) if append else None
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{cache_keyword(self.model): cache})
        finally:
            config._attn_implementation = original
            if token is not None:
                _APPEND_CACHE.reset(token)
        if append:  # [B, 1, V], [B, Hkv, T, Dh]
            return (out.logits[:, -1:, :].float(), *[t for layer in cache.layers for t in (layer.new_keys, layer.new_values)])
        return (out.logits[:, -1:, :].float(), *_flatten(cache))  # [B, 1, V], [B, Hkv, P+T, Dh]


class HFEncoderGraph(nn.Module):
    """encoder_model.onnx: (ids, mask) -> (encoder_hidden_states [B,S,D], *cross K/V [B,H,S,Dh]).

    The cross-attention K/V come from one decoder call on a dummy start token with an empty cache:
    the model fills its cross-attention cache from the encoder output, and everything else in that
    call is dead code that the ONNX optimizer removes. This works for any transformers enc-dec.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        input_ids, attention_mask = inputs

        encoder = self.model.get_encoder()
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, D]
        cache = EncoderDecoderCache(DynamicCache(config=self.model.config), DynamicCache(config=self.model.config))
        start = torch.zeros_like(input_ids[:, :1])  # [B, 1]; its value never reaches the cross K/V
        self.model(encoder_outputs=(hidden,), attention_mask=attention_mask, decoder_input_ids=start,
                   use_cache=True, **{cache_keyword(self.model): cache})
        return (hidden, *_flatten(cache.cross_attention_cache))


class HFDecoderGraph(nn.Module):
    """decoder_model.onnx: (ids [R,T], enc mask [R,S], *self past, *cross K/V) -> (logits [R,1,V], *present).

    Cross K/V and the encoder mask have one row per beam (R rows): Hugging Face attention needs
    equal batch sizes. The encoder hidden states are not an input: only their shape is read.
    """

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        from transformers import EncoderDecoderCache

        input_ids, encoder_attention_mask, *kv = inputs
        n = 2 * self.n_layers
        config = self.model.config
        cache = EncoderDecoderCache(_dynamic_cache(config, tuple(kv[:n])), _dynamic_cache(config, tuple(kv[n:])))
        cache.is_updated = {i: True for i in range(self.n_layers)}
        rows, src = encoder_attention_mask.shape
        hidden = kv[n].new_zeros(()).expand(rows, src, config.d_model)  # [R, S, D], shape only
        out = self.model(encoder_outputs=(hidden,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=input_ids, use_cache=True, **{cache_keyword(self.model): cache})
        return (out.logits[:, -1:, :].float(), *_flatten(cache.self_attention_cache))


def hf_causal_dims(model: nn.Module) -> ModelDims:
    """Layer count, K/V heads and head size read from one real forward (robust across configs)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    cache = causal_cache(model, out)
    _, heads, _, head_dim = cache.layers[0].keys.shape
    layout = io_spec.KV_SHARED if uses_append_layout(model) else io_spec.KV_CONCAT
    return ModelDims(n_layers=len(cache.layers), kv_heads=heads, head_dim=head_dim,
                     vocab_size=int(out.logits.shape[-1]), kv_layout=layout)


def hf_seq2seq_dims(model: nn.Module) -> ModelDims:
    """As hf_causal_dims for encoder-decoders: self and cross K/V shapes, encoder width."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), decoder_input_ids=torch.tensor([[0]]), use_cache=True)
    cache = cache_of(out)
    _, heads, _, head_dim = cache.self_attention_cache.layers[0].keys.shape
    cross_heads = cache.cross_attention_cache.layers[0].keys.shape[1]
    return ModelDims(n_layers=len(cache.self_attention_cache.layers), kv_heads=heads, head_dim=head_dim,
                     vocab_size=int(out.logits.shape[-1]), d_model=int(out.encoder_last_hidden_state.shape[-1]),
                     cross_heads=cross_heads)


def with_layout(plan: Any, layout: str) -> Any:
    """`plan` (an onnx_export.GraphPlan) with its graphs in KV `layout` (io_spec.KV_*; a profile's `kv_layout`).

    KV_CONCAT (optimum's IO, present.* = past + new) is every model's: a Hugging Face causal graph is switched to it
    (what TensorRT engines and static int8 need); other graphs already hold it. KV_APPEND and KV_SHARED are only
    for Hugging Face causal LMs whose attention deploylm replaces (`uses_append_layout`): anything else is a
    UsageError naming the model, before any export work."""
    import dataclasses

    if plan.dims.kv_layout == layout:
        return plan
    hf_causal = plan.family == "hf" and plan.kind == "decoder-only"
    if layout != io_spec.KV_CONCAT:
        model = plan.graphs[0][1].model if hf_causal else None
        if model is None or not uses_append_layout(model):
            what = (f"a {type(model).__name__}" if model is not None
                    else f"an {plan.kind} model" if plan.kind == "encoder-decoder" else "a deploylm model")
            raise UsageError(f"kv_layout = {layout!r}: {what} takes only the {io_spec.KV_CONCAT!r} KV layout "
                             f"({layout!r} needs a Hugging Face causal LM with plain attention layers, e.g. Llama, "
                             "GPT-2, Qwen2): set kv_layout = \"auto\" or \"concat\" in the profile")
    if not hf_causal:
        return plan
    dims = dataclasses.replace(plan.dims, kv_layout=layout)
    ((_, module),) = plan.graphs
    graph = HFCausalGraph(module.model, layout)
    return dataclasses.replace(plan, dims=dims, graphs=((io_spec.decoder_only_spec(dims), graph),))


def with_concat_layout(plan: Any) -> Any:
    """`plan` with a Hugging Face causal graph switched to the concat layout (present.* = past + new), for
    consumers that need optimum's IO: TensorRT engines."""
    return with_layout(plan, io_spec.KV_CONCAT)
