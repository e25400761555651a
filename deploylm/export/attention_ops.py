"""The attention of the append and shared-prompt KV layouts as opaque ops for torch.export, with their own ONNX
translations.

Traced op by op, the shared-prompt layout's regrouping of a prompt's rows (`rows // prompts` beams) gives
torch.export symbolic shapes it spends seconds per layer reasoning about (SmolLM2's graph took 197 s to export,
against 94 s in the append layout). As one custom op per layer, torch.export only needs the output's shape (the
query's), and the ONNX graph gets the same nodes from the op's translation, written with ONNX's own shape
arithmetic (58 s; the same graph outputs, bit for bit). The append layout's attention goes the same way.

Shapes: R rows = P prompts × B beams, prompt-major; G query heads per K/V head; T new positions; Lp prompt,
L past. q [R, Hkv, G·T, Dh]; scores = [q_by_prompt @ prompt_keyᵀ regrouped per row | q @ past_keyᵀ |
q @ new_keyᵀ] [R, Hkv, G·T, Lp + L + T] × scaling, plus the mask [R, 1, T, Lp + L + T] per query head,
softmax in fp32; out = (P_prompt @ V_prompt regrouped per row + P_past @ V_past) + P_new @ v_new
[R, Hkv, G·T, Dh]. The append layout's op is the same without the prompt.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def masked_softmax(scores: Tensor, attention_mask: Tensor | None, groups: int, length: int,
                   dtype: torch.dtype) -> Tensor:
    """softmax of scores [B, Hkv, G*T, total] plus the additive mask [B, 1, T, total] (the same for the G query
    heads of a K/V head), in fp32, as `dtype`."""
    batch, kv_heads, _, total = scores.shape
    if attention_mask is not None:
        scores = (scores.view(batch, kv_heads, groups, length, total) + attention_mask[:, :, None]
                  ).view(batch, kv_heads, groups * length, total)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _by_prompt(x: Tensor, prompts: int) -> Tensor:
    """[R, Hkv, M, N] (R = prompts × B rows, prompt-major) -> [P, Hkv, B·M, N]: the rows of one prompt side by side.
    Sizes are explicit, never -1: N is 0 when the prompt is empty (a prefill), and -1 cannot be read off 0 elements."""
    rows, kv_heads, m, n = x.shape
    beams = rows // prompts
    return x.reshape(prompts, beams, kv_heads, m, n).transpose(1, 2).reshape(prompts, kv_heads, beams * m, n)


def _by_row(x: Tensor, rows: int, m: int) -> Tensor:
    """[P, Hkv, B·M, N] -> [R, Hkv, M, N]: the inverse of `_by_prompt`."""
    prompts, kv_heads, _, n = x.shape
    beams = rows // prompts
    return x.reshape(prompts, kv_heads, beams, m, n).transpose(1, 2).reshape(rows, kv_heads, m, n)


@torch.library.custom_op("deploylm::append_attention", mutates_args=())
def append_attention(q: Tensor, key: Tensor, value: Tensor, new_key: Tensor, new_value: Tensor, mask: Tensor,
                     scaling: float, groups: int) -> Tensor:
    """q [R, Hkv, G·T, Dh], past K/V [R, Hkv, L, Dh], new K/V [R, Hkv, T, Dh], additive mask [R, 1, T, L + T]
    -> out [R, Hkv, G·T, Dh]."""
    past, queries = key.shape[2], q.shape[2]
    scores = torch.cat([torch.matmul(q, key.transpose(2, 3)),                         # [R, Hkv, G*T, L]
                        torch.matmul(q, new_key.transpose(2, 3))], dim=-1) * scaling   # ... + T
    probs = masked_softmax(scores, mask, groups, queries // groups, q.dtype)
    return torch.matmul(probs[..., :past], value) + torch.matmul(probs[..., past:], new_value)


@torch.library.custom_op("deploylm::shared_prompt_attention", mutates_args=())
def shared_prompt_attention(q: Tensor, prompt_key: Tensor, prompt_value: Tensor, key: Tensor, value: Tensor,
                            new_key: Tensor, new_value: Tensor, mask: Tensor, scaling: float, groups: int) -> Tensor:
    """q [R, Hkv, G·T, Dh], prompt K/V [P, Hkv, Lp, Dh], past K/V [R, Hkv, L, Dh], new K/V [R, Hkv, T, Dh],
    additive mask [R, 1, T, Lp + L + T] -> out [R, Hkv, G·T, Dh]."""
    rows, kv_heads, queries, _ = q.shape
    prompts, prompt_length, past = prompt_key.shape[0], prompt_key.shape[2], key.shape[2]
    prompt_scores = torch.matmul(_by_prompt(q, prompts), prompt_key.transpose(2, 3))  # [P, Hkv, B*G*T, Lp]
    scores = torch.cat([_by_row(prompt_scores, rows, queries),                        # [R, Hkv, G*T, Lp]
                        torch.matmul(q, key.transpose(2, 3)),                         # ... + L
                        torch.matmul(q, new_key.transpose(2, 3))], dim=-1) * scaling   # ... + T
    probs = masked_softmax(scores, mask, groups, queries // groups, q.dtype)
    from_prompt = torch.matmul(_by_prompt(probs[..., :prompt_length], prompts), prompt_value)  # [P, Hkv, B*G*T, Dh]
    return (_by_row(from_prompt, rows, queries)
            + torch.matmul(probs[..., prompt_length:prompt_length + past], value)
            + torch.matmul(probs[..., prompt_length + past:], new_value))


def _like_query(q: Tensor, *_: Any) -> Tensor:
    """What torch.export sees of either op: an output of the query's shape."""
    return torch.empty_like(q)


append_attention.register_fake(_like_query)
shared_prompt_attention.register_fake(_like_query)


def _translate(q: Any, key: Any, value: Any, new_key: Any, new_value: Any, mask: Any, scaling: float, groups: int,
               prompt_key: Any = None, prompt_value: Any = None) -> Any:
    """Either op in ONNX (opset 18): the nodes torch.export would have traced from its torch code."""
    from onnxscript import opset18 as op

    def dim(x: Any, axis: int) -> Any:      # [1] int64
        return op.Shape(x, start=axis, end=axis + 1)

    def keys_t(k: Any) -> Any:
        return op.Transpose(k, perm=[0, 1, 3, 2])

    rows, kv_heads, queries, head_dim = dim(q, 0), dim(q, 1), dim(q, 2), dim(q, 3)
    past, zero = dim(key, 2), op.Constant(value_ints=[0])
    scores = [op.MatMul(q, keys_t(key)), op.MatMul(q, keys_t(new_key))]                # [R, Hkv, G*T, L], ... T
    if prompt_key is not None:
        prompts, prompt_length = dim(prompt_key, 0), dim(prompt_key, 2)
        beams = op.Div(rows, prompts)

        def by_prompt(x: Any, n: Any) -> Any:   # [R, Hkv, M, N] -> [P, Hkv, B*M, N]
            x = op.Reshape(x, op.Concat(prompts, beams, kv_heads, queries, n, axis=0), allowzero=1)
            x = op.Transpose(x, perm=[0, 2, 1, 3, 4])
            return op.Reshape(x, op.Concat(prompts, kv_heads, op.Mul(beams, queries), n, axis=0), allowzero=1)

        def by_row(x: Any, n: Any) -> Any:      # [P, Hkv, B*M, N] -> [R, Hkv, M, N]
            x = op.Reshape(x, op.Concat(prompts, kv_heads, beams, queries, n, axis=0), allowzero=1)
            x = op.Transpose(x, perm=[0, 2, 1, 3, 4])
            return op.Reshape(x, op.Concat(rows, kv_heads, queries, n, axis=0), allowzero=1)

        prompt_scores = op.MatMul(by_prompt(q, head_dim), keys_t(prompt_key))          # [P, Hkv, B*G*T, Lp]
        scores.insert(0, by_row(prompt_scores, prompt_length))                         # [R, Hkv, G*T, Lp]
    scores = op.Concat(*scores, axis=-1)                                               # [R, Hkv, G*T, total]
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scaling), scores))
    total = dim(scores, 3)
    group = op.Constant(value_ints=[groups])                                           # G query heads per K/V head
    grouped = op.Reshape(scores, op.Concat(rows, kv_heads, group, op.Div(queries, group), total, axis=0))
    scores = op.Reshape(op.Add(grouped, op.Unsqueeze(mask, op.Constant(value_ints=[2]))),
                        op.Concat(rows, kv_heads, queries, total, axis=0))
    probs = op.CastLike(op.Softmax(op.Cast(scores, to=1), axis=-1), q)                 # softmax in fp32
    axis = op.Constant(value_ints=[3])
    start, end = (zero, past) if prompt_key is None else (prompt_length, op.Add(prompt_length, past))  # the past's
    out = op.MatMul(op.Slice(probs, start, end, axis), value)                          # P_past @ V_past
    if prompt_key is not None:
        from_prompt = op.MatMul(by_prompt(op.Slice(probs, zero, prompt_length, axis), prompt_length), prompt_value)
        out = op.Add(by_row(from_prompt, head_dim), out)
    return op.Add(out, op.MatMul(op.Slice(probs, end, total, axis), new_value))


def _append_translation(q: Any, key: Any, value: Any, new_key: Any, new_value: Any, mask: Any, scaling: float,
                        groups: int) -> Any:
    return _translate(q, key, value, new_key, new_value, mask, scaling, groups)


def _shared_translation(q: Any, prompt_key: Any, prompt_value: Any, key: Any, value: Any, new_key: Any,
                        new_value: Any, mask: Any, scaling: float, groups: int) -> Any:
    return _translate(q, key, value, new_key, new_value, mask, scaling, groups, prompt_key, prompt_value)


TRANSLATIONS = {torch.ops.deploylm.append_attention.default: _append_translation,   # torch.onnx.export's
                torch.ops.deploylm.shared_prompt_attention.default: _shared_translation}  # custom_translation_table
