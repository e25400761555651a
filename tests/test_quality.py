"""The quality report (deploylm.export.quality) and its budget at export: agreement and budget
arithmetic, identical graphs measure as identical, and `deploylm export` refuses (exit 1, nothing
written) a profile whose budget is missed unless --allow-quality-loss; a missing calibration file
and a method unknown for the precision are exit 2 with nothing written."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.export.calibration import HELD_OUT_PROMPTS, TextSet
from deploylm.export.quality import QualityReport, measure_quality, token_agreement
from deploylm.profiles import QualityBudget

STRICT = """
name = "strict-int4"
description = "int4 with a budget no int4 graph meets"
precision = "int4"
backends = ["onnx"]
[quantization]
method = "weight-only"
algorithm = "rtn"
block_size = 16
[precision_fallback]
auto = false
[parity]
logits_atol = 100.0
logprob_atol = 100.0
min_token_agreement = 0.0
[quality]
max_perplexity_increase = 0.0
min_beam_agreement = 1.0
max_mean_kl = 0.0
[generation]
num_beams = 2
max_new_tokens = 8
"""


def _report(**changes):
    base = dict(perplexity_fp32=10.0, perplexity=10.5, beam_agreement=0.75, sequences_identical=1, prompts=4,
                fp32_bytes=1000, bytes=300, fp32_seconds=2.0, seconds=1.0, scored_tokens=50)
    return QualityReport(**{**base, **changes})


def test_token_agreement_counts_reference_tokens_matched_in_place():
    ref = [(1, 2, 3, 4), (5, 6)]
    assert token_agreement(ref, ref) == (1.0, 2)
    assert token_agreement(ref, [(1, 2, 9, 4), (5,)]) == (4 / 6, 0)
    assert token_agreement(ref, [(9, 9, 9, 9), (7, 6)]) == (1 / 6, 0)


def test_budget_failures_name_the_measure_and_the_limit():
    report = _report()
    assert math.isclose(report.perplexity_increase, 0.05) and report.size_ratio == 0.3 and report.speed_ratio == 2.0
    assert report.failures(QualityBudget(max_perplexity_increase=0.08, min_beam_agreement=0.7)) == []
    fails = report.failures(QualityBudget(max_perplexity_increase=0.02, min_beam_agreement=0.8))
    assert "perplexity +5.00% over fp32 > max_perplexity_increase +2.00%" in fails[0]
    assert "beam-4 token agreement 0.750 < min_beam_agreement 0.8" in fails[1]
    broken = _report(perplexity=math.inf, seconds=0.0)
    assert broken.failures(QualityBudget(max_perplexity_increase=10.0))
    assert broken.to_dict()["perplexity"] is None and broken.to_dict()["speed_ratio"] is None


def test_next_token_budgets_are_inclusive_and_name_the_measure():
    """max_mean_kl and min_top1_agreement judge the teacher-forced statistics; one not measured (NaN, a report from
    before they existed) or an infinite KL misses any such budget."""
    report = _report(mean_kl=0.0125, top1_agreement=0.92)
    assert report.failures(QualityBudget(max_mean_kl=0.0125, min_top1_agreement=0.92)) == []
    fails = report.failures(QualityBudget(max_mean_kl=0.01, min_top1_agreement=0.95))
    assert fails == ["mean KL(fp32 || profile) 0.0125 of the next-token distributions > max_mean_kl 0.01",
                     "next-token top-1 agreement 0.920 < min_top1_agreement 0.95"]
    for unmeasured in (_report(), _report(mean_kl=math.inf, top1_agreement=math.nan)):
        assert len(unmeasured.failures(QualityBudget(max_mean_kl=100.0, min_top1_agreement=0.0))) == 2
    assert report.failures(QualityBudget(max_perplexity_increase=0.08)) == []     # no such budget: not judged


def test_the_quality_line_shows_the_next_token_statistics_once_measured():
    assert "next token: top-1 0.920, KL 0.0125, size 30.0% of fp32" in _report(mean_kl=0.0125, top1_agreement=0.92).line()
    assert "next token" not in _report().line()                      # a report written before they were measured


def test_a_huge_perplexity_prints_in_a_few_digits():
    """A tiny random T5 exported with int8-static printed `perplexity 5110807029236051939387531716512072...000.000
    vs fp32 ...` (111 digits each, `.3f` of 5.1e110) on the quality line."""
    line = _report(perplexity_fp32=5.0617e110, perplexity=5.1108e110).line()
    assert "perplexity 5.111e+110 vs fp32 5.062e+110 (+0.97%)" in line, line
    assert "perplexity 10.500 vs fp32 10.000 " in _report().line()


@pytest.fixture(scope="module")
def gpt2_fp32(tiny_gpt2_dir, tmp_path_factory):
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("quality") / "gpt2-fp32"
    export_model(tiny_gpt2_dir, "fp32", out)
    return out


@pytest.mark.slow
def test_identical_graphs_measure_identical(gpt2_fp32, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(gpt2_fp32, copy)
    report = measure_quality(gpt2_fp32, copy, TextSet(HELD_OUT_PROMPTS, None, "builtin"), rounds=1)
    assert report.perplexity == report.perplexity_fp32 and math.isfinite(report.perplexity)
    assert report.beam_agreement == 1.0 and report.sequences_identical == report.prompts == len(HELD_OUT_PROMPTS)
    assert report.size_ratio == 1.0 and report.speed_ratio > 0 and report.scored_tokens > 20
    assert report.mean_kl == 0.0 and report.top1_agreement == 1.0


def _export(*args):
    return CliRunner().invoke(cli, ["export", *args])


@pytest.mark.slow
def test_missed_budget_exits_1_and_writes_nothing_unless_allowed(tiny_gpt2_dir, tmp_path):
    profile = tmp_path / "strict.toml"
    profile.write_text(STRICT)
    out = tmp_path / "art" / "gpt2-int4"
    result = _export("--model", str(tiny_gpt2_dir), "--profile", str(profile), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "error: profile strict-int4 misses its checks" in result.output and "--allow-quality-loss" in result.output
    assert "set [precision_fallback] auto = true" in result.output          # this profile has it off
    assert list((tmp_path / "art").iterdir()) == []                       # no artifact, no leftovers
    result = _export("--model", str(tiny_gpt2_dir), "--profile", str(profile), "--out", str(out),
                     "--allow-quality-loss")
    assert result.exit_code == 0, result.output
    assert "quality budget NOT met" in result.output
    assert "quality (held out: built-in English text (no training data of this model found)): perplexity" in result.output
    assert "next token: top-1 " in result.output
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["budget_met"] is False and quality["budget_failures"]
    assert any(f.startswith("mean KL(fp32 || profile) ") and f.endswith("> max_mean_kl 0") for f in quality["budget_failures"])
    assert quality["mean_kl"] > 0 and 0 <= quality["top1_agreement"] <= 1
    info = CliRunner().invoke(cli, ["info", str(out)])                    # read back from the manifest
    assert info.exit_code == 0 and f"next token: top-1 {quality['top1_agreement']:.3f}, " in info.output, info.output
    assert quality["size_ratio"] < 1.0 and quality["speed_ratio"] > 0 and quality["precision"] == "int4"
    assert [p.name for p in (tmp_path / "art").iterdir()] == ["gpt2-int4"]


def test_unknown_method_for_the_precision_exits_2(tiny_gpt2_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(STRICT.replace('method = "weight-only"', 'method = "dynamic"'))
    result = _export("--model", str(tiny_gpt2_dir), "--profile", str(bad), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "quantization.method = 'dynamic' is not allowed: expected one of weight-only" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


@pytest.mark.slow
def test_missing_calibration_file_exits_2(tiny_gpt2_dir, tmp_path):
    result = _export("--model", str(tiny_gpt2_dir), "--profile", "int8-static", "--out", str(tmp_path / "out"),
                     "--calibration", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2, result.output
    assert "--calibration" in result.output and "does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_file_is_refused_before_any_export_work(tiny_gpt2_dir, tmp_path, monkeypatch):
    from deploylm.errors import UsageError
    from deploylm.export import pipeline

    def must_not_load(*_):
        raise AssertionError("the model was loaded before the calibration file was checked")

    monkeypatch.setattr(pipeline, "_load_model", must_not_load)
    with pytest.raises(UsageError, match="--calibration"):
        pipeline.export_model(tiny_gpt2_dir, "int8-static", tmp_path / "out", calibration=tmp_path / "nope.txt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("auto", [True, False])
def test_a_missed_budget_advises_the_auto_search_only_when_it_is_off(auto):
    from types import SimpleNamespace

    from deploylm.errors import CheckFailed
    from deploylm.export.precision_step import _report
    from deploylm.profiles import load_profile

    profile = load_profile("int4")
    profile = SimpleNamespace(name="mine", precision="int4", quantization=profile.quantization,
                              precision_fallback=SimpleNamespace(auto=auto, ops=(), nodes=()))
    final = SimpleNamespace(failures=("beam-4 token agreement 0.5 < min_beam_agreement 0.9",), kept_count=3)
    result = SimpleNamespace(final=final, first=final, attempts=4 if auto else 1)
    with pytest.raises(CheckFailed) as err:
        _report(profile, None, {}, result, allow_quality_loss=False)
    assert ("set [precision_fallback] auto = true" in str(err.value)) is not auto
    assert ("after the auto search" in str(err.value)) is auto and "--allow-quality-loss" in str(err.value)



@pytest.mark.parametrize("ranked, kept, base, noted", [(12, 12, 0, True), (12, 5, 0, False), (0, 0, 0, False),
                                                      (12, 13, 5, False), (12, 17, 5, True)])
def test_an_auto_search_that_kept_every_convertible_node_says_the_graphs_are_fp32(ranked, kept, base, noted):
    """Tiny Gemma 2 in fp16: the search kept all 184 nodes it could convert, and the report read like an fp16
    artifact ("184 node(s) kept in fp32"). The profile's own [precision_fallback] nodes (`base`, left out of the
    ranking) are not the search's: 5 of them and 8 of 12 ranked kept is not "every one", and auto_kept is 8."""
    from types import SimpleNamespace

    from deploylm.export.precision_step import _report

    quality = SimpleNamespace(bytes=1000, speed_ratio=1.0, to_dict=dict)
    profile = SimpleNamespace(name="fp16", precision="fp16", quantization=None,
                              precision_fallback=SimpleNamespace(auto=True, ops=(), nodes=()))
    first = SimpleNamespace(failures=("beam-4 token agreement 0.891 < min_beam_agreement 0.95",), kept_count=0,
                            quality=quality)
    final = SimpleNamespace(failures=(), kept_count=kept, quality=quality, kept={"model.onnx": ("n",) * kept})
    result = SimpleNamespace(final=final, first=first, attempts=6, ranked=ranked)
    work = SimpleNamespace(calibration_note=None, calibration_origin=None, calibration_count=None,
                           held=SimpleNamespace(origin=None))
    report = _report(profile, work, {"model.onnx": ("b",) * base} if base else {}, result, allow_quality_loss=False)
    assert report.auto_kept == kept - base
    assert any("fp16 in name only" in n and f"every one of the {ranked} node(s)" in n for n in report.notes) is noted


@pytest.mark.parametrize("nll, n, expected", [(2.0, 2, math.e), (1e4, 2, math.inf), (math.inf, 2, math.inf),
                                              (math.nan, 2, math.inf), (0.0, 0, math.inf)])
def test_perplexity_past_what_a_float_holds_is_infinite_not_an_overflow(monkeypatch, nll, n, expected):
    """exp(mean NLL) of a wildly wrong graph (mean NLL 5000) raised OverflowError out of the quality report."""
    from types import SimpleNamespace

    from deploylm.export import quality

    monkeypatch.setattr(quality, "forced_nll", lambda *_: (nll, n))
    backend = SimpleNamespace(info=SimpleNamespace(max_positions=64, is_encoder_decoder=False))
    got, count = quality.perplexity(backend, lambda text: {"input_ids": [1, 2, 3]}, ("a b",), None)
    assert got == pytest.approx(expected) and count == n

def test_calibration_files_folders_and_jsonl(tmp_path):
    from deploylm.errors import UsageError
    from deploylm.export.calibration import check_calibration_file, read_lines

    with pytest.raises(UsageError, match=r"--calibration '.*' is a folder: expected a UTF-8 text file"):
        check_calibration_file(tmp_path)
    pairs = tmp_path / "train.jsonl"
    pairs.write_text('{"source": "one two", "target": "1 2"}\n\n{"text": "three"}\n')
    assert read_lines(pairs) == ["one two", "three"]
    pairs.write_text('{"source": "one\u2028two"}\n', encoding="utf-8")     # raw in a JSON string: one record
    assert read_lines(pairs) == ["one\u2028two"]
    pairs.write_text('{"source": "one two"}\n["not", "a record"]\n')
    with pytest.raises(UsageError, match=r"line 2: expected a JSON object with a text field \(source, prompt, text\)"):
        read_lines(pairs)


@pytest.mark.parametrize("profile", ["fp32", "int4"])
def test_calibration_for_a_profile_that_reads_none_is_refused_before_any_work(tiny_gpt2_dir, tmp_path, profile):
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    if profile == "int4":                        # int4 reads it only with its auto search on
        off = tmp_path / "int4-no-search.toml"
        off.write_text(STRICT.replace('name = "strict-int4"', 'name = "no-search"'))
        profile = str(off)
    result = _export("--model", str(tiny_gpt2_dir), "--profile", profile, "--out", str(tmp_path / "out"),
                     "--calibration", str(text))
    assert result.exit_code == 2 and "reads no calibration text" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lines, note, used", [
    (2, "has 2 sample(s), fewer than the profile's calibration_samples = 64: all of them were used", 2),
    (70, "has 70 samples: the first 64 (the profile's calibration_samples) were used", 64)])   # silent before
def test_a_calibration_file_of_another_size_than_calibration_samples_is_noted(tiny_gpt2_dir, tmp_path, lines, note,
                                                                              used):
    """...in the export's output, and the manifest records how many samples fed the graphs (it recorded only
    where they came from)."""
    text = tmp_path / "calib.txt"
    text.write_text("".join(f"the quick brown fox number {i}\n" for i in range(lines)))
    out = tmp_path / "out"
    result = _export("--model", str(tiny_gpt2_dir), "--profile", "int8-static", "--out", str(out),
                     "--calibration", str(text), "--allow-quality-loss")
    assert result.exit_code == 0, result.output
    assert f"note: --calibration {text} {note}" in result.output
    quality = json.loads((out / "manifest.json").read_text())["quality"]
    assert quality["calibration"] == f"file:{text}" and quality["calibration_samples"] == used


class _Bigram:
    """A fake decoder-only Backend: logits = table[last token]; the state is nothing."""

    def __init__(self, table, max_positions=None):
        from deploylm.backends.base import ModelInfo, SpecialTokens

        self.table = table
        self.info = ModelInfo(is_encoder_decoder=False, vocab_size=table.shape[0], max_positions=max_positions,
                              special=SpecialTokens(eos_token_ids=(2,), pad_token_id=0))
        self.fed = []

    def prefill(self, batch):
        return self.table[batch.input_ids[:, -1]], None

    def decode(self, tokens, state):
        self.fed.append(tokens.tolist())
        return self.table[tokens], state


def _words_tokenizer(text):
    return {"input_ids": [int(w) for w in text.split()]}


def _bigram_table():
    import torch

    return torch.randn(10, 10, generator=torch.Generator().manual_seed(0)) * 3


def _by_hand(table, seqs):
    """-sum log p(s[i+1] | s[i]) over every sequence, and the count of scored tokens."""
    logp = table.log_softmax(-1)
    return -sum(float(logp[s[i], s[i + 1]]) for s in seqs for i in range(len(s) - 1)), sum(len(s) - 1 for s in seqs)


@pytest.mark.parametrize("max_positions, seqs", [(None, [[3, 5, 7, 2, 9], [4, 6], [8, 1, 1]]),
                                                 (3, [[3, 5, 7], [4, 6], [8, 1, 1]])])
def test_perplexity_is_teacher_forced_exp_mean_nll_by_hand(max_positions, seqs):
    """Decoder-only: each text is prefilled on its first token and every later token is scored once,
    fed the text's own previous token; rows of different lengths stop at their own end; texts are cut
    to the model's window; a text of one token scores nothing."""
    from deploylm.export.quality import perplexity

    table = _bigram_table()
    backend = _Bigram(table, max_positions)
    texts = ("3 5 7 2 9", "4 6", "8 1 1", "5")
    ppl, n = perplexity(backend, _words_tokenizer, texts, None)
    nll, count = _by_hand(table, seqs)
    assert n == count
    assert math.isclose(ppl, math.exp(nll / count), rel_tol=1e-5)
    assert backend.fed[0] == [s[1] for s in seqs]                 # step 1 is fed each text's second token


def test_forced_pair_scores_both_backends_and_their_next_token_distance_by_hand():
    """Two backends teacher-forced side by side: each one's NLL as forced_nll alone computes it, and per scored
    position KL(ref || cand) and whether the argmax agrees, by hand; rows stop at their own end."""
    import torch

    from deploylm.backends.base import EncodedBatch
    from deploylm.export.quality import forced_nll, forced_pair

    ref_table = _bigram_table()
    cand_table = ref_table + torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    seqs = [[3, 5, 7, 2, 9], [4, 6], [8, 1, 1]]
    batch = EncodedBatch(torch.tensor([[s[0]] for s in seqs]), torch.ones((3, 1), dtype=torch.long))
    targets = [s[1:] for s in seqs]
    got = forced_pair(_Bigram(ref_table), _Bigram(cand_table), batch, targets)
    assert (got.nll_ref, got.count) == forced_nll(_Bigram(ref_table), batch, targets)
    assert (got.nll, got.count) == forced_nll(_Bigram(cand_table), batch, targets)
    lp_ref, lp = ref_table.log_softmax(-1), cand_table.log_softmax(-1)
    fed = [s[i] for s in seqs for i in range(len(s) - 1)]                   # the token each scored position follows
    kl = sum(float((lp_ref[t].exp() * (lp_ref[t] - lp[t])).sum()) for t in fed)
    same = sum(int(lp_ref[t].argmax() == lp[t].argmax()) for t in fed)
    assert got.count == len(fed) == 7 and math.isclose(got.kl_sum, kl, rel_tol=1e-5) and got.top1_same == same
    assert 0 < same < 7                                                      # the tables differ, but not everywhere
    alone = forced_pair(_Bigram(ref_table), _Bigram(ref_table), batch, targets)
    assert alone.kl_sum == 0.0 and alone.top1_same == 7 and alone.nll == alone.nll_ref


def test_forced_pair_is_infinitely_far_where_the_candidate_rules_out_a_token_or_computes_nan():
    import torch

    from deploylm.backends.base import EncodedBatch
    from deploylm.export.quality import forced_pair

    ref_table = _bigram_table()
    batch = EncodedBatch(torch.tensor([[3]]), torch.ones((1, 1), dtype=torch.long))
    for value in (-math.inf, math.nan):
        cand_table = ref_table.clone()
        cand_table[3, 4] = value                                              # after token 3: token 4 impossible / NaN
        got = forced_pair(_Bigram(ref_table), _Bigram(cand_table), batch, [[5]])
        assert got.kl_sum == math.inf and got.count == 1
    masked = ref_table.clone()
    masked[3, 4] = -math.inf                                                  # both rule it out: no divergence there
    assert forced_pair(_Bigram(masked), _Bigram(masked), batch, [[5]]).kl_sum == 0.0


def test_seq2seq_targets_end_with_one_eos():
    from deploylm.export.quality import _targets

    assert _targets(_words_tokenizer, ("4 5", "6 2", ""), 2) == [[4, 5, 2], [6, 2], [2]]
    assert _targets(_words_tokenizer, ("4 5",), None) == [[4, 5]]


def test_budget_limits_are_inclusive():
    """A report exactly at its budget meets it: +5% against max_perplexity_increase = 0.05 (10.5 / 10 - 1
    is 0.050000000000000044 in floating point), agreement 0.75 against min_beam_agreement = 0.75."""
    report = _report()
    assert report.failures(QualityBudget(max_perplexity_increase=0.05, min_beam_agreement=0.75)) == []
    assert len(report.failures(QualityBudget(max_perplexity_increase=0.0499, min_beam_agreement=0.7501))) == 2
    better = _report(perplexity=9.0)                                 # lower perplexity than fp32 is no loss
    assert better.perplexity_increase < 0 and better.failures(QualityBudget(max_perplexity_increase=0.0)) == []


def test_measure_quality_times_after_the_warm_up_and_judges_against_fp32(monkeypatch, tmp_path):
    """measure_quality with its pieces faked: the warm-up round is not timed, the speed ratio is fp32
    time / profile time, agreement is the share of fp32's tokens the profile reproduces."""
    from types import SimpleNamespace

    import deploylm.backends.onnx_backend as onnx_backend
    import deploylm.export.calibration as calibration
    import deploylm.export.quality as quality
    import deploylm.models.source as source
    import deploylm.models.tokenizer as tokenizer

    ref_dir, cand_dir = tmp_path / "fp32", tmp_path / "int4"
    info = SimpleNamespace(special=SimpleNamespace(pad_token_id=0))      # what the padding of the prompts reads
    backends = {ref_dir: SimpleNamespace(kind="ref", info=info), cand_dir: SimpleNamespace(kind="cand", info=info)}
    monkeypatch.setattr(onnx_backend.OnnxBackend, "from_folder", classmethod(lambda cls, d, name=None: backends[d]))
    monkeypatch.setattr(source, "folder_source", lambda path: path)
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda src: None)
    monkeypatch.setattr(calibration, "perplexity_texts", lambda held: (("t",), None))
    monkeypatch.setattr(quality, "_forced_inputs", lambda b, tok, texts, targets: (None, [[1] * 7]))
    monkeypatch.setattr(quality, "forced_pair", lambda ref, cand, batch, targets: quality.ForcedPair(
        nll_ref=7 * math.log(10.0), nll=7 * math.log(11.0), count=7, kl_sum=0.07, top1_same=6))
    monkeypatch.setattr(quality, "_prompts", lambda b, tok, prompts: None)
    monkeypatch.setattr(quality, "graph_bytes", lambda d: 1000 if d == ref_dir else 250)
    calls = []

    def beam_run(backend, batch, options):
        calls.append(backend.kind)
        warm = calls.count(backend.kind) == 1
        if backend.kind == "ref":
            return [(1, 2, 3, 4), (5, 6)], 1.0 if warm else 3.0, 2.0
        return [(1, 2, 9), (5, 6)], 100.0 if warm else 1.5, 1.0       # 4 of fp32's 6 tokens in place

    monkeypatch.setattr(quality, "_beam_run", beam_run)
    report = measure_quality(ref_dir, cand_dir, SimpleNamespace(inputs=("a", "b")), rounds=1)
    assert calls == ["ref", "cand", "cand", "ref"]                       # rounds alternate who goes first
    assert report.round_ratios == (2.0,) and report.speed_ratio == 2.0 and report.cpu_ratio == 2.0
    assert report.beam_agreement == 4 / 6 and report.sequences_identical == 1 and report.prompts == 2
    assert math.isclose(report.perplexity_increase, 0.1) and report.size_ratio == 0.25 and report.scored_tokens == 7
    assert math.isclose(report.perplexity_fp32, 10.0) and math.isclose(report.mean_kl, 0.01)
    assert report.top1_agreement == 6 / 7


def test_graph_bytes_count_external_weights_and_nothing_else(tmp_path):
    """The size in the quality report is the graphs' with their external data (large exports keep the
    weights in model.onnx.data): not the tokenizer or config beside them."""
    from deploylm.export.quality import graph_bytes

    for name, size in (("model.onnx", 100), ("model.onnx.data", 5000), ("decoder_model.onnx_data", 700),
                       ("tokenizer.json", 40000), ("config.json", 300)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert graph_bytes(tmp_path) == 5800


@pytest.mark.parametrize("seq2seq, room", [(False, 24 - 16), (True, 24 - 1)])
def test_agreement_prompts_leave_room_for_the_new_tokens(tiny_gpt2_dir, seq2seq, room):
    """Beam-agreement prompts are cut so that prompt + AGREEMENT_NEW_TOKENS (16) fit the model's window
    (seq2seq: the source, less one), a decoder-only prompt from the left (its end is what it continues).
    transformers 5 ignores a truncation_side call argument: decoder-only prompts were cut from the right."""
    from types import SimpleNamespace

    from deploylm.export.quality import _prompts
    from deploylm.models.source import resolve_source
    from deploylm.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_source(tiny_gpt2_dir))
    backend = SimpleNamespace(info=SimpleNamespace(max_positions=24, is_encoder_decoder=seq2seq))
    text = " ".join(str(i) for i in range(60))
    full = list(tokenizer(text)["input_ids"])
    batch = _prompts(backend, tokenizer, (text, "0 1"))
    assert batch.input_ids.shape[1] == room < len(full)
    assert batch.input_ids[0].tolist() == (full[:room] if seq2seq else full[-room:])
    assert tokenizer.truncation_side == "right"                       # the tokenizer's own setting is back


def test_a_candidate_whose_logits_overflow_reproduces_no_token_instead_of_stopping_the_export():
    """The beam search now stops on NaN logits (NumericalOverflow); for the quality check that is a candidate that
    agrees on nothing, so the budget fails and the fallback search goes on to graphs with more fp32 nodes."""
    from deploylm.export import quality
    from tests.helpers.scripted_backend import ScriptedBackend, encode, table_script

    class Overflowing(ScriptedBackend):
        def decode(self, tokens, state):
            logits, state = super().decode(tokens, state)
            return logits.fill_(float("nan")), state

    from deploylm.decoding.options import DecodingOptions

    script = table_script({}, [0, .1, .3, .3, .3])
    options = DecodingOptions(num_beams=2, max_new_tokens=4)
    good, _, _ = quality._beam_run(ScriptedBackend(script, vocab_size=5), encode([(2,), (3, 4)]), options)
    bad, _, _ = quality._beam_run(Overflowing(script, vocab_size=5), encode([(2,), (3, 4)]), options)
    assert [len(t) for t in good] == [4, 4] and bad == [(), ()]
    assert quality.token_agreement(good, bad) == (0.0, 0)
