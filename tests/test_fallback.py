"""Parity-guided fp32 fallback: a model whose activations overflow fp16 (one MLP scaled so the
residual stream exceeds 65504) gives NaN/inf in fp16 without fallback, and passes parity with
`auto = true`; plus the search and ranking helpers on their own."""
from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import onnx
import pytest
import torch

from deploylm.backends.onnx_backend import OnnxBackend
from deploylm.backends.torch_backend import TorchBackend
from deploylm.decoding.options import DecodingOptions
from deploylm.errors import CheckFailed
from deploylm.export.calibration import graph_feeds
from deploylm.export.fallback import Verdict, run_all_outputs, search
from deploylm.export.precision_step import apply_precision
from deploylm.generator import Generator
from deploylm.models.source import resolve_source
from deploylm.models.tokenizer import load_tokenizer
from deploylm.parity import DEFAULT_PROMPTS, compare_backends
from deploylm.profiles import PrecisionFallback, load_profile
from tests.helpers.tiny_hf import build_tiny_hf

FP16_MAX = 65504.0


@pytest.fixture(scope="module")
def overflow_model(tmp_path_factory):
    """A tiny Llama whose first MLP output is scaled by 1e8 (~3e5): fine in fp32, inf in fp16."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_hf("llama", tmp_path_factory.mktemp("overflow"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e8)
        out = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]), output_hidden_states=True)
    assert out.hidden_states[1].abs().max() > FP16_MAX and torch.isfinite(out.logits).all()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def overflow_fp32(overflow_model, tmp_path_factory):
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("overflow-art") / "fp32"
    export_model(overflow_model, "fp32", out)
    return out


def _fp16(auto: bool):
    return dataclasses.replace(load_profile("fp16"), precision_fallback=PrecisionFallback(ops=(), auto=auto))


def _copy(artifact, tmp_path):
    folder = tmp_path / "tmp-artifact"
    shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns("manifest.json", "parity.json"))
    return folder


def _parity(src, folder, profile):
    reference = TorchBackend.from_source(resolve_source(src))
    tokenizer = load_tokenizer(resolve_source(src))
    options = DecodingOptions.from_mapping(profile.generation).replace(max_new_tokens=8)
    batch = Generator(reference, tokenizer).encode(list(DEFAULT_PROMPTS), options)
    candidate = OnnxBackend.from_folder(folder, name="fp16")
    return compare_backends(reference, {"onnx": candidate}, batch, options, profile.parity, tokenizer)


@pytest.mark.slow
def test_fp16_without_fallback_overflows(overflow_model, overflow_fp32, tmp_path):
    folder = _copy(overflow_fp32, tmp_path)
    with pytest.raises(CheckFailed, match="profile fp16 misses its checks"):
        apply_precision(folder, _fp16(auto=False), resolve_source(overflow_model), rounds=0)
    report = apply_precision(folder, _fp16(auto=False), resolve_source(overflow_model), rounds=0,
                             allow_quality_loss=True)
    assert report.budget_failures and report.auto_kept == 0
    feeds = graph_feeds(overflow_fp32, [[5, 6, 7, 8, 9]])["model.onnx"][0]
    fp32 = run_all_outputs(onnx.load(str(overflow_fp32 / "model.onnx")), feeds)
    fp16 = run_all_outputs(onnx.load(str(folder / "model.onnx")), feeds)
    assert all(np.isfinite(v).all() for v in fp32.values())
    overflowed = [name for name, v in fp16.items() if not np.isfinite(v).all()]
    assert overflowed                                # inf/NaN inside the fp16 graph
    assert not _parity(overflow_model, folder, _fp16(auto=False)).passed


@pytest.mark.slow
def test_fp16_with_auto_fallback_passes_parity(overflow_model, overflow_fp32, tmp_path):
    folder = _copy(overflow_fp32, tmp_path)
    profile = _fp16(auto=True)
    report = apply_precision(folder, profile, resolve_source(overflow_model), rounds=1)
    assert report.auto_kept > 0 and report.budget_failures == ()
    assert any(n.startswith("fp16 on CPU: ONNX Runtime runs most MatMuls in fp32") for n in report.notes), report.notes
    kept = report.kept_fp32["model.onnx"]
    assert any("linear_6" in n or "down" in n or n.startswith("node_linear") for n in kept), kept
    assert report.fallback_cost["bytes_after"] >= report.fallback_cost["bytes_before"]
    assert math.isfinite(report.quality["perplexity"])
    parity = _parity(overflow_model, folder, profile)
    assert parity.passed, parity.table()


def _verdict(kept, passed):
    return Verdict(kept, () if passed else ("fails",), None)


def test_search_finds_the_smallest_passing_prefix():
    ranked = [("g", f"n{i}") for i in range(20)]
    needed = 11                                     # passes once the first 11 ranked nodes are kept
    calls = []

    def judge(kept):
        calls.append(len(kept["g"]))
        return _verdict(kept, len(kept["g"]) >= needed)

    result = search(ranked, {"g": ()}, judge, _verdict({"g": ()}, False))
    assert result.final.passed and len(result.final.kept["g"]) == needed
    assert calls[:5] == [1, 2, 4, 8, 16] and len(calls) <= 10


def test_search_without_a_pass_keeps_only_the_listed_nodes():
    ranked = [("g", "a"), ("g", "b"), ("g", "c")]
    tried = []
    judge = lambda kept: tried.append(kept["g"]) or _verdict(kept, False)  # noqa: E731
    result = search(ranked, {"g": ("base",)}, judge, _verdict({"g": ("base",)}, False))
    assert tried[-1] == ("base", "a", "b", "c")                     # it tried everything ranked
    assert not result.final.passed and result.final.kept["g"] == ("base",) and result.attempts == 4


@pytest.mark.parametrize("listed, message", [
    (dict(nodes=("no_such_node",)), r"\[precision_fallback\] nodes \['no_such_node'\] are not nodes of the exported graphs"),
    (dict(ops=("Softmx",)), r"\[precision_fallback\] ops \['Softmx'\] are not ONNX operator types"),
])
def test_a_misspelt_fallback_node_or_op_is_refused(overflow_model, overflow_fp32, tmp_path, listed, message):
    """A typo in [precision_fallback] kept nothing in fp32 without a word; an ONNX op type this model
    lacks (LayerNormalization in a Llama) stays fine: a profile serves many models."""
    from deploylm.errors import UsageError

    folder = _copy(overflow_fp32, tmp_path)
    profile = dataclasses.replace(load_profile("fp16"), precision_fallback=PrecisionFallback(**listed, auto=False))
    with pytest.raises(UsageError, match=message):
        apply_precision(folder, profile, resolve_source(overflow_model), rounds=0, allow_quality_loss=True)
    fine = dataclasses.replace(load_profile("fp16"), precision_fallback=PrecisionFallback(ops=("LayerNormalization",),
                                                                                          auto=False))
    apply_precision(_copy(overflow_fp32, tmp_path / "again"), fine, resolve_source(overflow_model), rounds=0,
                    allow_quality_loss=True)


def test_int8_ranking_offers_every_quantized_node_so_the_search_can_keep_them_all():
    """A quantized node whose output error did not grow (score 0) used to be left out of the ranking: the
    longest prefix the search tried could then never be "everything in fp32", and int4 exports that would
    pass with it failed. Now it is ranked last."""
    import tempfile
    from pathlib import Path

    from onnx import TensorProto, helper, numpy_helper

    from deploylm.export.fallback import rank_nodes

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 4)).astype(np.float32), np.eye(4, dtype=np.float32)   # "exact" adds no error

    def graph(first: np.ndarray) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="noisy"),
                 helper.make_node("MatMul", ["h", "w2"], ["y"], name="exact")]
        io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
        inits = [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(w2, "w2")]
        return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits),
                                 opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    with tempfile.TemporaryDirectory() as tmp:
        ref, cand = Path(tmp) / "ref", Path(tmp) / "cand"
        ref.mkdir(), cand.mkdir()
        onnx.save(graph(w1), ref / "model.onnx")
        onnx.save(graph(w1 + 0.05), cand / "model.onnx")          # only the first MatMul's weights moved
        feeds = {"model.onnx": [{"x": rng.standard_normal((2, 4)).astype(np.float32)}]}
        assert rank_nodes(ref, cand, feeds, "int8", {}) == [("model.onnx", "noisy"), ("model.onnx", "exact")]


def _chain(w1, w2, transpose_w2=False):
    """x [2, 4] -> MatMul(w1) 'first' -> MatMul(w2 or Transpose(w2)) 'second' -> y."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first")]
    if transpose_w2:
        nodes.append(helper.make_node("Transpose", ["w2"], ["w2t"], name="tie", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["h", "w2t" if transpose_w2 else "w2"], ["y"], name="second"))
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], inits),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


_RNG = np.random.default_rng(7)
_W1, _W2 = _RNG.standard_normal((4, 4)).astype(np.float32), _RNG.standard_normal((4, 4)).astype(np.float32)
_I = np.eye(4, dtype=np.float32)
_FEEDS = {"x": _RNG.standard_normal((2, 4)).astype(np.float32)}


def test_sensitivity_scores_the_error_a_node_adds_not_the_error_it_inherits():
    """Only 'first' has perturbed weights: 'second' (the identity, which keeps relative errors) reads its error but
    adds none of its own (score 0). A node that turns finite inputs into inf scores highest (1e30); its
    consumer adds nothing."""
    from deploylm.export.fallback import sensitivity

    scores = dict(sensitivity(_chain(_W1, _I), _chain(_W1 + 0.1, _I), _FEEDS, "bf16", {"first", "second"}))
    assert scores["first"] > 0.01 and scores["second"] < 1e-6
    broken = _W1.copy()
    broken[0, 0] = np.inf
    ranked = sensitivity(_chain(_W1, _I), _chain(broken, _I), _FEEDS, "bf16", {"first", "second"})
    assert ranked[0] == ("first", 1e30) and dict(ranked)["second"] == 0.0


def _rank(tmp_path, graphs, precision, base):
    from deploylm.export.fallback import rank_nodes

    ref, cand = tmp_path / "ref", tmp_path / "cand"
    ref.mkdir(parents=True), cand.mkdir(parents=True)
    for file, (r, c) in graphs.items():
        onnx.save(r, ref / file), onnx.save(c, cand / file)
    return rank_nodes(ref, cand, {file: [_FEEDS] for file in graphs}, precision, base)


def test_float_ranking_leaves_out_nodes_without_error_and_the_listed_ones(tmp_path):
    pair = (_chain(_W1, _W2), _chain(_W1 + 0.1, _W2 + 0.1))
    assert sorted(_rank(tmp_path / "a", {"model.onnx": pair}, "bf16", {})) == [("model.onnx", "first"),
                                                                               ("model.onnx", "second")]
    only_first = (_chain(_W1, _I), _chain(_W1 + 0.1, _I))
    assert _rank(tmp_path / "b", {"model.onnx": only_first}, "bf16", {}) == [("model.onnx", "first")]
    assert _rank(tmp_path / "c", {"model.onnx": pair}, "bf16", {"model.onnx": ("first",)}) == [("model.onnx", "second")]


def test_ranking_is_sorted_across_graph_files(tmp_path):
    small = (_chain(_W1, _I), _chain(_W1 + 0.001, _I))
    large = (_chain(_W1, _I), _chain(_W1 + 0.5, _I))
    ranked = _rank(tmp_path, {"encoder_model.onnx": small, "decoder_model.onnx": large}, "bf16", {})
    assert ranked == [("decoder_model.onnx", "first"), ("encoder_model.onnx", "first")]


def test_listed_nodes_are_the_listed_op_types_and_node_names():
    from deploylm.export.fallback import listed_nodes, quantizable_nodes

    model = _chain(_W1, _W2, transpose_w2=True)
    assert listed_nodes(model, ("Transpose",), ()) == ("tie",)
    assert listed_nodes(model, (), ("second", "elsewhere")) == ("second",)      # names of other graphs skipped
    assert set(listed_nodes(model, ("MatMul",), ("tie",))) == {"first", "second", "tie"}
    assert quantizable_nodes(model) == {"first", "second"}                     # a tied (transposed) weight counts


def test_the_search_keeps_the_folder_of_the_candidate_it_chooses_and_deletes_the_others(tmp_path, monkeypatch):
    """_Workspace.judge prunes candidate folders as the search goes: the chosen one (here the smallest pass,
    judged before a failing smaller one) and the first must still be there at the end, the others gone."""
    from types import SimpleNamespace

    from deploylm.export import precision_step, quality

    needed = 10                                     # 1, 2, 4, 8 fail, 16 passes, 12, 10 pass, 9 fails: 10 it is
    monkeypatch.setattr(precision_step._Workspace, "convert", lambda self, kept, dest: setattr(self, "kept", kept) or dest.mkdir())
    monkeypatch.setattr(precision_step._Workspace, "_parity",
                        lambda self, dest: [] if len(self.kept["g"]) >= needed else ["fails"])
    monkeypatch.setattr(quality, "measure_quality", lambda *a, **k: SimpleNamespace(failures=lambda budget: []))
    work = precision_step._Workspace(tmp_path, tmp_path / "fp32", tmp_path / "fp32", SimpleNamespace(quality=None),
                                     ["model.onnx"], {}, None)
    first = work.judge({"g": ()})
    result = search([("g", f"n{i}") for i in range(20)], {"g": ()}, work.judge, first)
    assert result.final.kept_count == needed and [v.kept_count for v in work.verdicts][-1] == needed - 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert work.dirs[id(result.final)].is_dir() and work.dirs[id(first)].is_dir()
    assert left == sorted({work.dirs[id(first)].name, work.dirs[id(result.final)].name, work.dirs[id(work.verdicts[-1])].name})


@pytest.mark.parametrize("precision, gathers, nodes", [("int8", True, ["embed", "fc1", "fc2", "lm_head"]),
                                                      ("int4", False, ["fc1", "fc2", "lm_head"])])
def test_int8_ranking_offers_exactly_the_quantizable_nodes(tmp_path, precision, gathers, nodes):
    """int8/int4 rank the nodes quantization touches: weight MatMuls, the tied lm_head and the embedding
    Gather; not Relu or the tie's Transpose, which quantization never changes (keeping them "in fp32"
    would spend search steps and report nodes kept that were never converted). The embedding only where the
    profile quantizes it (weight-only with `embedding = true`): else an auto search that kept every converted
    MatMul did not say the graphs compute in fp32 (the ranking held one node more than it could keep)."""
    from tests.helpers.tied_graph import FEEDS, tied_graph

    ref = onnx.load(str(tied_graph(tmp_path / "ref.onnx")))
    cand = onnx.ModelProto.FromString(ref.SerializeToString())
    for init in cand.graph.initializer:
        values = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array(values + 0.05 * np.sign(values), init.name))
    from deploylm.export.fallback import rank_nodes

    (tmp_path / "ref").mkdir(), (tmp_path / "cand").mkdir()
    onnx.save(ref, tmp_path / "ref" / "model.onnx"), onnx.save(cand, tmp_path / "cand" / "model.onnx")
    ranked = rank_nodes(tmp_path / "ref", tmp_path / "cand", {"model.onnx": [FEEDS[0]]}, precision, {}, gathers=gathers)
    assert sorted(node for _, node in ranked) == nodes


def test_fp16_sensitivity_scores_a_node_by_its_range_even_without_error():
    """fp16: a node whose fp32 values pass 65504 scores max |value| / 65504 (> 1) although this candidate
    adds no error: the range term alone ranks it (it would overflow in fp16); bf16 has no range term."""
    from deploylm.export.fallback import sensitivity

    weight = np.full((4, 4), 6e4, np.float32)                # in range itself; the outputs (sums of 4) are not
    big = _chain(weight, _I)
    peak = float(np.abs(_FEEDS["x"] @ weight).max())
    assert peak > FP16_MAX
    scores = dict(sensitivity(big, big, _FEEDS, "fp16", {"first", "second"}))
    assert scores["first"] == pytest.approx(peak / FP16_MAX, rel=1e-5) and scores["second"] >= scores["first"]
    assert dict(sensitivity(big, big, _FEEDS, "bf16", {"first"}))["first"] == 0.0


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_the_workspace_keeps_listed_ops_and_kept_nodes_in_fp32(tmp_path, precision):
    """[precision_fallback] ops/nodes and the search's kept nodes reach the converters: listed op types become
    node names (the quantizers take names only; the report lists them) and int8 leaves kept MatMuls fp32;
    fp16 blocks listed op types directly as well and kept nodes by name."""
    from types import SimpleNamespace

    from onnx import TensorProto

    from deploylm.export.precision_step import _base_exclusions, _Workspace
    from deploylm.profiles import Quantization
    from tests.helpers.tied_graph import tied_graph

    ref = tmp_path / "fp32"
    ref.mkdir()
    tied_graph(ref / "model.onnx")
    listed = PrecisionFallback(ops=("Gather", "Transpose"), nodes=("fc2",))
    profile = SimpleNamespace(name="p", precision=precision, precision_fallback=listed,
                              quantization=Quantization("dynamic", weight_type="quint8") if precision == "int8" else None)
    work = _Workspace(tmp_path, ref, ref, profile, ["model.onnx"], {}, None)
    base = _base_exclusions(work)
    # int8 dynamic quantizes neither the Gather nor the Transpose: they are not "kept in fp32" (they were counted)
    assert base == {"model.onnx": ("fc2",) if precision == "int8" else ("embed", "tie", "fc2")}
    work.convert({"model.onnx": (*base["model.onnx"], "fc1")}, tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert [nodes[n].input[1] for n in ("fc1", "fc2")] == ["w1", "w2"]               # kept: fp32 weights
    assert inits["w1"] == inits["w2"] == inits["emb"] == TensorProto.FLOAT             # the table's users listed
    assert nodes["embed"].op_type == "Gather" and nodes["embed"].input[0] == "emb"


@pytest.mark.parametrize("quantization, kept", [
    (("weight-only", dict(block_size=16, algorithm="rtn", embedding=True)), ("embed", "fc1", "fc2", "lm_head")),
    (("weight-only", dict(block_size=16, algorithm="rtn")), ("fc1", "fc2", "lm_head")),
    (("static", dict(weight_type="qint8")), ("fc1", "fc2", "lm_head")),
    (("dynamic", dict(weight_type="quint8")), ("fc1", "fc2", "lm_head"))])
def test_int8_reports_as_kept_only_listed_nodes_its_quantizer_would_convert(tmp_path, quantization, kept):
    """`[precision_fallback] ops = ["MatMul", "Gather", "Relu"]` in an int8 profile: the report's kept_fp32 (and its
    "N node(s) kept in fp32") counted every listed node, also those no int8 method converts (attention's
    activation MatMuls, a Relu, the embedding Gather unless weight-only quantizes the table)."""
    from types import SimpleNamespace

    from onnx import helper

    from deploylm.export.precision_step import _base_exclusions, _Workspace
    from deploylm.profiles import Quantization
    from tests.helpers.tied_graph import tied_graph

    ref = tmp_path / "fp32"
    ref.mkdir()
    model = onnx.load(str(tied_graph(ref / "model.onnx")))
    # an activation x activation product, as attention's Q.K^T: no constant weight to quantize
    model.graph.node.append(helper.make_node("MatMul", ["y", "y_t"], ["scores"], name="attn_scores"))
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Transpose", ["y"], ["y_t"], name="yt",
                                                                        perm=[0, 2, 1]))
    onnx.save(model, str(ref / "model.onnx"))
    method, fields = quantization
    profile = SimpleNamespace(name="p", precision="int8", quantization=Quantization(method, **fields),
                              precision_fallback=PrecisionFallback(ops=("MatMul", "Gather", "Relu")))
    base = _base_exclusions(_Workspace(tmp_path, ref, ref, profile, ["model.onnx"], {}, None))
    assert sorted(base["model.onnx"]) == sorted(kept)


def test_a_first_candidate_that_passes_is_not_searched(tmp_path, monkeypatch):
    """auto = true searches only when the listed-nodes candidate misses its checks: a passing one ships as
    it is (a search on it would keep its most sensitive node in fp32 for nothing)."""
    from types import SimpleNamespace

    from deploylm.export import precision_step, quality

    monkeypatch.setattr(precision_step._Workspace, "convert", lambda self, kept, dest: dest.mkdir())
    monkeypatch.setattr(precision_step._Workspace, "_parity", lambda self, dest: [])
    monkeypatch.setattr(quality, "measure_quality",
                        lambda *a, **k: SimpleNamespace(failures=lambda budget: [], to_dict=lambda: {}))
    fake = lambda root, tmp_dir, profile, source, file: precision_step._Workspace(  # noqa: E731
        root, tmp_path / "fp32", tmp_path / "fp32", profile, [], {}, SimpleNamespace(origin="builtin"))
    monkeypatch.setattr(precision_step, "_workspace", fake)
    monkeypatch.setattr(precision_step, "rank_nodes", lambda *a: pytest.fail("searched although the first passed"))
    profile = dataclasses.replace(load_profile("int8"), precision_fallback=PrecisionFallback(auto=True))
    report = apply_precision(tmp_path / "artifact", profile, None, rounds=0)
    assert report.attempts == 1 and report.auto_kept == 0 and report.budget_failures == ()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_float_reports_list_the_nodes_of_the_profiles_fallback_ops(overflow_model, overflow_fp32, tmp_path, precision):
    """fp16/bf16 keep the [precision_fallback] op types in fp32 (the converter's op block list), but the report
    listed none of those nodes: `precision: fp16, 0 node(s) kept in fp32` and an empty manifest quality.kept_fp32
    for the built-in fp16 profile's Softmax nodes, where int8/int4 list theirs."""
    folder = _copy(overflow_fp32, tmp_path)
    profile = dataclasses.replace(load_profile(precision), precision_fallback=PrecisionFallback(ops=("Softmax",)))
    report = apply_precision(folder, profile, resolve_source(overflow_model), rounds=0, allow_quality_loss=True)
    graph = onnx.load(str(overflow_fp32 / "model.onnx"), load_external_data=False)
    softmax = [n.name for n in graph.graph.node if n.op_type == "Softmax"]
    assert softmax and list(report.kept_fp32["model.onnx"]) == softmax
    assert report.lines()[0].startswith(f"precision: {precision}, {len(softmax)} node(s) kept in fp32 (0 by the auto")
