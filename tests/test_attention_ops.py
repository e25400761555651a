"""The attention ops of the append and shared-prompt KV layouts: each one's ONNX translation computes what its
torch implementation computes, at every shape the backend feeds (an empty prompt or past at prefill, one or several
beams, one or several new positions), and the causal-LM graph calls one op per layer instead of being traced
through."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from deploylm.backends.onnx_backend import create_session
from deploylm.export import attention_ops

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 4
GROUPS = HEADS // KV_HEADS
SCALING = HEAD_DIM ** -0.5


class _Shared(nn.Module):
    def forward(self, q: Tensor, prompt_key: Tensor, prompt_value: Tensor, key: Tensor, value: Tensor,
                new_key: Tensor, new_value: Tensor, mask: Tensor) -> Tensor:
        return attention_ops.shared_prompt_attention(q, prompt_key, prompt_value, key, value, new_key,
                                                     new_value, mask, SCALING, GROUPS)


class _Append(nn.Module):
    def forward(self, q: Tensor, key: Tensor, value: Tensor, new_key: Tensor, new_value: Tensor, mask: Tensor) -> Tensor:
        return attention_ops.append_attention(q, key, value, new_key, new_value, mask, SCALING, GROUPS)


def _op_inputs(op: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The op's own inputs: the append op has no prompt (its inputs come with an empty one)."""
    if op == "append":
        assert inputs["prompt_key"].shape[2] == 0
        return {k: v for k, v in inputs.items() if not k.startswith("prompt_")}
    return inputs


def _run_torch(op: str, inputs: dict[str, Tensor]) -> Tensor:
    module = _Append() if op == "append" else _Shared()
    return module(**_op_inputs(op, inputs))


def _inputs(prompts: int, beams: int, plen: int, past: int, new: int, seed: int) -> dict[str, Tensor]:
    """Random K/V and a mask that hides some prompt, past and future positions, as a step or a prefill has."""
    gen = torch.Generator().manual_seed(seed)
    rows, total = prompts * beams, plen + past + new

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen)

    mask = torch.zeros(rows, 1, new, total)
    low = torch.finfo(torch.float32).min
    if plen > 1:
        mask[:beams, ..., :1] = low                                 # the first prompt is left-padded
    if past > 1:
        mask[-1, ..., plen:plen + 1] = low                          # an unwritten position in a row's buffer
    mask[..., plen + past:] += torch.triu(torch.full((new, new), low), diagonal=1)   # causal among the new ones
    return {"q": randn(rows, KV_HEADS, GROUPS * new, HEAD_DIM),
            "prompt_key": randn(prompts, KV_HEADS, plen, HEAD_DIM), "prompt_value": randn(prompts, KV_HEADS, plen, HEAD_DIM),
            "key": randn(rows, KV_HEADS, past, HEAD_DIM), "value": randn(rows, KV_HEADS, past, HEAD_DIM),
            "new_key": randn(rows, KV_HEADS, new, HEAD_DIM), "new_value": randn(rows, KV_HEADS, new, HEAD_DIM),
            "mask": mask}


def _repeated(inputs: dict[str, Tensor], beams: int) -> Tensor:
    """The same attention with each prompt's K/V repeated for its beams and concatenated with the past:
    plain softmax(q Kᵀ · scaling + mask) V per query head."""
    k = torch.cat([inputs["prompt_key"].repeat_interleave(beams, 0), inputs["key"], inputs["new_key"]], 2)
    v = torch.cat([inputs["prompt_value"].repeat_interleave(beams, 0), inputs["value"], inputs["new_value"]], 2)
    rows, _, queries, dim = inputs["q"].shape
    new = queries // GROUPS
    scores = (inputs["q"] @ k.transpose(2, 3) * SCALING).view(rows, KV_HEADS, GROUPS, new, -1) + inputs["mask"][:, :, None]
    return (torch.softmax(scores, -1) @ v[:, :, None]).view(rows, KV_HEADS, queries, dim)


@pytest.fixture(scope="module")
def translated(tmp_path_factory):
    """op name -> an ONNX Runtime session of the op alone, exported with its ONNX translation, every size dynamic."""
    sessions: dict[str, object] = {}

    def get(op: str):
        if op not in sessions:
            sessions[op] = _export_op(op, tmp_path_factory.mktemp("op") / f"{op}.onnx")
        return sessions[op]

    return get


def _export_op(op: str, path):
    example = _op_inputs(op, _inputs(prompts=2, beams=3, plen=5, past=4, new=2, seed=0) if op == "shared"
                         else _inputs(prompts=6, beams=1, plen=0, past=4, new=2, seed=0))
    rows, prompts = torch.export.Dim("rows"), torch.export.Dim("prompts")
    plen, past, queries, new = (torch.export.Dim(n) for n in ("plen", "past", "queries", "new"))
    total = torch.export.Dim("total")
    shapes = {"q": {0: rows, 2: queries}, "prompt_key": {0: prompts, 2: plen}, "prompt_value": {0: prompts, 2: plen},
              "key": {0: rows, 2: past}, "value": {0: rows, 2: past}, "new_key": {0: rows, 2: new},
              "new_value": {0: rows, 2: new}, "mask": {0: rows, 2: new, 3: total}}
    with warnings.catch_warnings():          # "axis name ... will not be used": the exporter renames nothing here
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Append() if op == "append" else _Shared(), (), kwargs=example, dynamo=True,
                                    dynamic_shapes={k: shapes[k] for k in example}, optimize=True,
                                    custom_translation_table=attention_ops.TRANSLATIONS, verbose=False)
    program.save(path)
    return create_session(path)


CASES = [  # op, prompts, beams, prompt length, past, new positions
    ("shared", 2, 3, 5, 4, 2),      # the example shapes
    ("shared", 3, 4, 7, 6, 1),      # a beam-search step
    ("shared", 4, 1, 9, 3, 1),      # a greedy step: one row per prompt
    ("shared", 1, 4, 6, 0, 1),      # the first step after the prefill: nothing generated yet
    ("shared", 3, 1, 0, 0, 5),      # a prefill: empty prompt and past
    ("shared", 2, 2, 0, 5, 1),      # a step whose prompt was folded into the rows' buffer
    ("append", 6, 1, 0, 4, 2),      # the append layout (no prompt: each row's whole past in its buffer)
    ("append", 5, 1, 0, 7, 1),      # a step
    ("append", 3, 1, 0, 0, 5),      # a prefill
]


@pytest.mark.parametrize("op,prompts,beams,plen,past,new", CASES)
def test_the_onnx_translation_computes_the_torch_op(translated, op, prompts, beams, plen, past, new):
    session = translated(op)
    inputs = _inputs(prompts, beams, plen, past, new, seed=prompts * 100 + plen)
    expected = _run_torch(op, inputs)
    (got,) = session.run(None, {name: t.numpy() for name, t in _op_inputs(op, inputs).items()})
    assert got.shape == tuple(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    # and both are attention over the prompt repeated per beam (the regrouping puts rows back where they were)
    torch.testing.assert_close(expected, _repeated(inputs, beams), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["shared-prompt", "append"])
def test_the_causal_lm_graph_calls_the_op_once_per_layer(tiny_llama_dir, layout):
    """torch.export sees one op per layer (so its symbolic shapes are the query's), not the regrouping inside:
    traced through, SmolLM2's graph took twice as long to export (`attention_ops`)."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from deploylm.export import io_spec
    from deploylm.export.hf_graphs import HFCausalGraph
    from deploylm.export.onnx_export import EXPORT_SIZES, SHARED_EXPORT_SIZES, example_inputs, plan_graphs

    plan = plan_graphs(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    ((_, default),) = plan.graphs
    assert isinstance(default, HFCausalGraph) and default.layout == io_spec.KV_SHARED
    dims = dataclasses.replace(plan.dims, kv_layout=layout)
    spec, module = io_spec.decoder_only_spec(dims), HFCausalGraph(default.model, layout)
    calls: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    sizes = {**EXPORT_SIZES, **(SHARED_EXPORT_SIZES if layout == io_spec.KV_SHARED else {})}
    with torch.no_grad(), Record():
        module(*example_inputs(spec, sizes, dims.vocab_size))
    op = {"shared-prompt": "shared_prompt_attention", "append": "append_attention"}[layout]
    assert calls.count(f"deploylm.{op}.default") == dims.n_layers
