"""Parity checker against tiny fake backends: a fixed random 'trigram' model implementing the Backend
protocol, and copies of it perturbed below/above the fp32 profile's tolerances, diverging at step 3,
broken in reorder, or producing NaN. Tolerances come from the built-in profiles only."""
from __future__ import annotations

import json

import pytest
import torch

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.decoding.options import DecodingOptions
from deploylm.parity import ParityReport, compare_backends, teacher_force
from deploylm.profiles import load_profile

V, EOS, PAD = 24, 23, 0
FP32 = load_profile("fp32").parity


def _table(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 4.0                       # [prev token, next token]
    table[:, PAD] = -100.0                                               # never predicted
    table[:, EOS] = -100.0                                               # no early stop unless asked
    return table


class Fake:
    """logits = table[token] + 0.5 * table2[previous token]; state = (previous tokens [R], step)."""

    def __init__(self, table, name="fake", noise=0.0, diverge_at=None, nan=False, broken_reorder=False):
        self.name, self.device = name, torch.device("cpu")
        self.table, self.table2 = table, _table(seed=1)
        self.noise, self.diverge_at, self.nan, self.broken_reorder = noise, diverge_at, nan, broken_reorder
        self.info = ModelInfo(is_encoder_decoder=False, vocab_size=V,
                              special=SpecialTokens(eos_token_ids=(EOS,), pad_token_id=PAD))

    def _logits(self, cur, prev, step):
        logits = self.table[cur] + 0.5 * self.table2[prev]              # [R, V]
        if self.noise:
            g = torch.Generator().manual_seed(1000 + step)
            logits = logits + (torch.rand(logits.shape, generator=g) * 2 - 1) * self.noise
        if self.diverge_at == step:
            logits = logits.clone()
            logits[torch.arange(len(cur)), logits.argmax(-1)] -= 50.0   # a different argmax on every row
        if self.nan:
            logits = torch.full_like(logits, float("nan"))
        return logits

    def prefill(self, batch):
        cur, prev = batch.input_ids[:, -1], batch.input_ids[:, -2]      # left-padded: last is real
        return self._logits(cur, prev, 0), (cur, 0)

    def decode(self, tokens, state):
        prev, step = state
        return self._logits(tokens, prev, step + 1), (tokens, step + 1)

    def reorder(self, state, beam_idx):
        prev, step = state
        if self.broken_reorder and len(beam_idx) == len(prev):
            return state
        return prev[beam_idx], step


def _batch() -> EncodedBatch:
    ids = torch.tensor([[PAD, 3, 5, 7], [2, 4, 6, 8], [PAD, PAD, 9, 1]])
    return EncodedBatch(ids, (ids != PAD).long())


OPTIONS = DecodingOptions(num_beams=3, max_new_tokens=6)


def _compare(candidate, options=OPTIONS, tolerances=FP32, **kw) -> ParityReport:
    return compare_backends(Fake(_table(), name="torch"), {candidate.name: candidate}, _batch(), options,
                            tolerances, **kw)


def test_identical_backend_passes_with_zero_error():
    report = _compare(Fake(_table(), name="onnx"))
    row = report.backends[0]
    assert report.passed, report.failures()
    assert row.max_abs_logit == 0.0 and row.token_agreement == 1.0 and row.first_divergence is None
    assert row.greedy_identical and row.beams_identical and row.max_abs_score == 0.0
    assert len(row.steps) == OPTIONS.max_new_tokens and row.steps[0].rows == 6   # greedy + beam per prompt


def test_noise_below_tolerance_passes_and_above_fails():
    below = _compare(Fake(_table(), name="onnx", noise=FP32.logits_atol / 10)).backends[0]
    assert 0 < below.max_abs_logit <= FP32.logits_atol
    assert not below.failures(FP32)
    report = _compare(Fake(_table(), name="onnx", noise=FP32.logits_atol * 10))
    assert not report.passed
    assert any("logits_atol" in line for line in report.failures())
    assert report.backends[0].max_abs_logit > FP32.logits_atol


def test_each_failure_line_names_its_backend_and_reasons_do_not():
    """With several backends compared, a failure line says which one is outside the budget (the parity
    command and export's refusal print these lines); reasons() gives the same lines without the name."""
    fine, noisy = Fake(_table(), name="onnx"), Fake(_table(), name="trt", noise=FP32.logits_atol * 10)
    report = compare_backends(Fake(_table(), name="torch"), {"onnx": fine, "trt": noisy}, _batch(), OPTIONS, FP32)
    failures = report.failures()
    assert failures and all(line.startswith("trt: ") for line in failures), failures
    row = next(r for r in report.backends if r.backend == "trt")
    assert [f"trt: {reason}" for reason in row.reasons(FP32)] == failures
    assert row.reasons(FP32)[0].startswith("max |Δ logit| ")


def test_max_time_does_not_cut_the_searches(monkeypatch):
    """A profile's max_time (a wall-clock limit) would stop the slower backend's search earlier: beams
    that "differ" although every logit matches. Parity compares whole searches."""
    import types

    import deploylm.decoding.search as search

    now = [0.0]
    monkeypatch.setattr(search, "time", types.SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0]))

    class Slow(Fake):                     # each decode step takes 10 s of the fake clock
        def decode(self, tokens, state):
            now[0] += 10.0
            return super().decode(tokens, state)

    report = compare_backends(Slow(_table(), name="torch"), {"onnx": Fake(_table(), name="onnx")}, _batch(),
                              OPTIONS.replace(max_time=5.0), FP32)
    row = report.backends[0]
    assert report.passed, report.failures()
    assert row.greedy_identical and row.beams_identical and len(row.steps) == OPTIONS.max_new_tokens


def test_divergence_at_step_3_is_located():
    report = _compare(Fake(_table(), name="onnx", diverge_at=3))
    row = report.backends[0]
    assert row.first_divergence == 3
    assert row.first_divergence_by_row == [3] * 6
    assert [s.top1_agreement for s in row.steps][:4] == [1.0, 1.0, 1.0, 0.0]
    assert row.token_agreement < 1.0 and not row.greedy_identical
    assert not report.passed and "FAIL" in report.table()


def test_first_divergence_min_step_from_profile():
    import dataclasses

    loose = dataclasses.replace(FP32, logits_atol=1e9, logprob_atol=1e9, min_token_agreement=0.0,
                                identical_beams=False, first_divergence_min_step=4)
    assert any("step 3" in f for f in _compare(Fake(_table(), name="x", diverge_at=3), tolerances=loose).failures())
    late = dataclasses.replace(loose, first_divergence_min_step=3)
    assert _compare(Fake(_table(), name="x", diverge_at=3), tolerances=late).passed


def test_finished_rows_are_not_compared():
    table = _table()
    table[7, :] = -100.0
    table[7, EOS] = 100.0                         # prompt 0 ends in 7: its reference stops at once
    table[PAD, 1] = 100.0                         # what PAD-fed finished rows see; differs below
    candidate_table = table.clone()
    candidate_table[PAD] = -candidate_table[PAD]  # only the finished rows' padding input differs
    ref = Fake(table, name="torch")
    report = compare_backends(ref, {"onnx": Fake(candidate_table, name="onnx")}, _batch(), OPTIONS, FP32)
    row = report.backends[0]
    assert report.passed, report.failures()
    assert row.steps[0].rows == 6 and row.steps[1].rows == 4   # prompt 0's two rows stop after EOS


def test_broken_reorder_is_caught_by_own_beams():
    report = _compare(Fake(_table(), name="onnx", broken_reorder=True))
    row = report.backends[0]
    assert not row.beams_identical
    assert any("identical_beams" in line for line in report.failures())


def test_nan_candidate_fails_and_serializes_as_strict_json():
    report = _compare(Fake(_table(), name="onnx", nan=True))
    assert not report.passed
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = ParityReport.from_dict(json.loads(text))
    assert not back.passed and back.backends[0].max_abs_logit != back.backends[0].max_abs_logit  # NaN


def test_a_candidate_whose_own_search_overflows_fails_whatever_the_budget():
    """A candidate whose logits overflow only on rows teacher forcing never feeds it (its own beam search's other
    beams): its search stops with a NumericalOverflow, as every user's beam search over it would. The report
    said only "beams DIFF", which a profile without identical_beams (fp16, trt-fp16, int8) passed; the overflow
    is now a failure of its own, kept in the JSON report."""
    import dataclasses

    class OverflowsInItsBeams(Fake):                     # finite for teacher forcing (6 rows) and greedy (3 rows)
        def _logits(self, cur, prev, step):
            logits = super()._logits(cur, prev, step)
            return torch.full_like(logits, float("nan")) if len(cur) == 9 and step >= 2 else logits

    loose = dataclasses.replace(load_profile("fp16").parity, identical_beams=False)
    report = _compare(OverflowsInItsBeams(_table(), name="onnx"), tolerances=loose)
    row = report.backends[0]
    assert row.max_abs_logit == 0.0 and row.token_agreement == 1.0 and row.greedy_identical, row
    assert not report.passed
    [line] = report.failures()
    assert line.startswith("onnx: its own beam search stopped: the model's logits at generated token 3 are NaN"), line
    back = ParityReport.from_dict(json.loads(json.dumps(report.to_dict(), allow_nan=False)))
    assert back.failures() == report.failures()
    old = report.to_dict()
    del old["backends"][0]["overflow"]                   # a report written before the field: read as none
    assert ParityReport.from_dict(old).backends[0].overflow is None
    assert "FAIL" in report.table() and line.split(": ", 1)[1] in report.table()


def test_a_candidate_with_another_vocabulary_is_a_failed_check_not_a_crash():
    import pytest

    from deploylm.errors import CheckFailed

    class Wider(Fake):                                   # an lm_head with 8 extra columns
        def _logits(self, cur, prev, step):
            return torch.cat([super()._logits(cur, prev, step), torch.zeros(len(cur), 8)], 1)

    with pytest.raises(CheckFailed, match=r"onnx returns 32 logits per token and the reference torch 24"):
        _compare(Wider(_table(), name="onnx"))


def test_a_candidate_stopping_at_another_eos_fails_whatever_the_budget():
    import dataclasses

    loose = dataclasses.replace(FP32, logits_atol=1e9, logprob_atol=1e9, min_token_agreement=0.0,
                                identical_beams=False)
    other = Fake(_table(), name="onnx")
    other.info = dataclasses.replace(other.info, special=SpecialTokens(eos_token_ids=(EOS, 5), pad_token_id=PAD))
    report = _compare(other, tolerances=loose)
    assert report.backends[0].max_abs_logit == 0.0          # the logits are the same: only the stop differs
    assert report.failures() == ["onnx: decodes with other settings than the reference: "
                                 "eos_token_ids (5, 23), the reference's (23,)"]
    assert "eos_token_ids" in ParityReport.from_dict(json.loads(json.dumps(report.to_dict()))).failures()[0]
    assert _compare(Fake(_table(), name="onnx"), tolerances=loose).backends[0].settings_difference is None


def test_failures_and_table_say_where_the_difference_is():
    """The terminal names the step of the largest |Δ logit| and the step and prompt (greedy output or best
    beam) where top-1 first differs, not only the numbers. Rows are prompts x (greedy, best beam)."""
    import dataclasses

    from deploylm.parity import BackendParity, StepStats

    steps = [StepStats(0, 6, 0.0, 0.0, 1.0), StepStats(1, 6, 0.5, 0.4, 1.0), StepStats(2, 6, 0.2, 0.6, 5 / 6)]
    row = BackendParity(backend="onnx", steps=steps, max_abs_logit=0.5, max_abs_logprob=0.6, token_agreement=17 / 18,
                        first_divergence=2, first_divergence_by_row=[None, None, None, None, None, 2],
                        greedy_identical=True, beams_identical=True)
    report = ParityReport(reference="torch", tolerances=dataclasses.asdict(FP32), options={}, prompts=3, backends=[row])
    assert report.failures()[:3] == [
        "onnx: max |Δ logit| 0.5 > logits_atol 0.0001 at step 1",
        "onnx: max |Δ log-prob| 0.6 > logprob_atol 0.0002 at step 2",
        "onnx: top-1 agreement 0.9444 < min_token_agreement 1 (first differs at step 2, prompt 3 of 3, its best beam)"]
    loose = dataclasses.replace(FP32, logits_atol=1.0, logprob_atol=1.0, min_token_agreement=0.9)
    passing = dataclasses.replace(report, tolerances=dataclasses.asdict(loose))
    assert passing.passed and "  onnx: top-1 first differs at step 2, prompt 3 of 3, its best beam" in passing.table()
    greedy = _compare(Fake(_table(), name="onnx", diverge_at=3), options=OPTIONS.replace(num_beams=1))
    assert greedy.backends[0].divergence(greedy.prompts) == "step 3, prompt 1 of 3, its greedy output"


def test_parity_of_a_model_folder_reports_a_failing_export_instead_of_aborting(tiny_llama_dir):
    """`deploylm parity --model HF_FOLDER` exports into a temporary folder first; with tolerances that export
    misses, the user still gets the report measured with their options (table, --json), not the export's
    own 16-token check as an error."""
    import dataclasses

    from deploylm.parity import run_parity

    fp32 = load_profile("fp32")
    tight = dataclasses.replace(fp32, parity=dataclasses.replace(fp32.parity, logits_atol=1e-12, logprob_atol=1e-12))
    report = run_parity(tiny_llama_dir, ["torch", "onnx"], profile=tight, max_new_tokens=3, num_beams=1)
    assert not report.passed and report.options["max_new_tokens"] == 3
    assert len(report.backends[0].steps) <= 3 and "logits_atol 1e-12" in report.failures()[0]


def test_report_roundtrip_summary_and_table():
    report = _compare(Fake(_table(), name="onnx", diverge_at=3), tokenizer=_Tok())
    back = ParityReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report and back.passed == report.passed
    summary = report.summary()
    assert summary["passed"] is False and summary["backends"]["onnx"]["first_divergence"] == 3
    assert summary["backends"]["onnx"]["text_identical"] is False
    table = report.table()
    assert "onnx" in table and "torch" in table and "logits_atol" in table


def test_text_level_with_tokenizer():
    report = _compare(Fake(_table(), name="onnx"), tokenizer=_Tok())
    assert report.backends[0].text_identical is True


def test_teacher_force_feeds_reference_tokens():
    """The candidate sees the forced tokens, not its own choices: a candidate that always diverges at
    step 1 still agrees again from step 2 on (its state follows the reference's prefix)."""
    seqs = [[(4, 5, 6)], [(1, 2, 3)], [(7, 8, 9)]]
    forced = teacher_force(Fake(_table()), Fake(_table(), diverge_at=1), _batch(), seqs)
    assert [s.top1_agreement for s in forced.steps] == [1.0, 0.0, 1.0]
    assert forced.first_by_row == [1, 1, 1]


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (EOS, PAD)))


def test_teacher_force_rows_of_an_input_stay_contiguous():
    """Row r of the forced batch belongs to input r // sequences-per-input (the Backend contract)."""

    class Recording(Fake):
        def decode(self, tokens, state):
            self.seen = getattr(self, "seen", []) + [(state[0].tolist(), tokens.tolist())]
            return super().decode(tokens, state)

    ref = Recording(_table())
    seqs = [[(10, 11), (12, 13)], [(14, 15), (16, 17)], [(18, 19), (20, 21)]]
    teacher_force(ref, Fake(_table()), _batch(), seqs)
    prev_after_reorder, fed = ref.seen[0]
    assert prev_after_reorder == [7, 7, 8, 8, 1, 1]      # each prompt's last token, once per sequence
    assert fed == [10, 12, 14, 16, 18, 20]


class _Diverging(Fake):
    """Changes the argmax of the listed rows at the listed steps: {step: [rows] or None for every row}."""

    def __init__(self, table, where, **kw):
        super().__init__(table, **kw)
        self.where = where

    def _logits(self, cur, prev, step):
        logits = super()._logits(cur, prev, step)
        if step in self.where:
            rows = self.where[step] if self.where[step] is not None else list(range(len(cur)))
            logits = logits.clone()
            logits[rows, logits[rows].argmax(-1)] -= 50.0
        return logits


def test_first_divergence_is_the_earliest_step_of_the_earliest_row():
    """first_divergence_by_row keeps each row's FIRST differing step (later ones do not overwrite it);
    first_divergence is the smallest of them, not the largest."""
    report = _compare(_Diverging(_table(), {2: [0], 4: None}, name="onnx"))
    row = report.backends[0]
    assert row.first_divergence_by_row == [2, 4, 4, 4, 4, 4]
    assert row.first_divergence == 2
    assert [round(s.top1_agreement, 4) for s in row.steps] == [1.0, 1.0, round(5 / 6, 4), 1.0, 0.0, 1.0]
    assert row.token_agreement == (36 - 1 - 6) / 36


def test_logprob_difference_ignores_a_constant_logit_shift():
    """A candidate whose logits are the reference's + 5 has |Δ logit| = 5 but the same log-softmax:
    max_abs_logprob measures the log-probabilities, not the logits."""

    class Shifted(Fake):
        def _logits(self, cur, prev, step):
            return super()._logits(cur, prev, step) + 5.0

    row = _compare(Shifted(_table(), name="onnx")).backends[0]
    assert abs(row.max_abs_logit - 5.0) < 1e-4
    assert row.max_abs_logprob < 1e-4
    assert row.token_agreement == 1.0 and row.greedy_identical and row.beams_identical


def test_nan_at_one_step_is_the_reported_maximum():
    """A NaN at a single middle step (the others exact) is the maximum reported, and fails."""

    class NanAt2(Fake):
        def _logits(self, cur, prev, step):
            logits = super()._logits(cur, prev, step)
            return torch.full_like(logits, float("nan")) if step == 2 else logits

    report = _compare(NanAt2(_table(), name="onnx"))
    row = report.backends[0]
    assert row.steps[0].max_abs_logit == 0.0 and row.steps[2].max_abs_logit != row.steps[2].max_abs_logit
    assert row.max_abs_logit != row.max_abs_logit and row.max_abs_logprob != row.max_abs_logprob
    assert any("logits_atol" in line for line in report.failures())


def _row(**kw):
    from deploylm.parity import BackendParity

    base = dict(backend="onnx", steps=[], max_abs_logit=0.0, max_abs_logprob=0.0, token_agreement=1.0,
                first_divergence=None, first_divergence_by_row=[], greedy_identical=True, beams_identical=True)
    return BackendParity(**{**base, **kw})


def test_tolerances_are_inclusive_and_identical_beams_covers_greedy():
    """A difference exactly at the tolerance passes ('largest allowed'); just above it fails. With
    identical_beams, greedy outputs that differ fail even when the beams are the same."""
    import dataclasses

    tol = dataclasses.replace(FP32, logits_atol=0.5, logprob_atol=0.25, min_token_agreement=0.75,
                              identical_beams=True)
    assert _row(max_abs_logit=0.5, max_abs_logprob=0.25, token_agreement=0.75).failures(tol) == []
    assert len(_row(max_abs_logit=0.5000001).failures(tol)) == 1
    assert len(_row(max_abs_logprob=0.2500001).failures(tol)) == 1
    assert len(_row(token_agreement=0.7499).failures(tol)) == 1
    assert _row(max_abs_logit=float("inf")).failures(tol)
    failures = _row(greedy_identical=False).failures(tol)
    assert len(failures) == 1 and "greedy" in failures[0]
    assert _row(greedy_identical=False).failures(dataclasses.replace(tol, identical_beams=False)) == []


def test_score_gap_is_absolute():
    from types import SimpleNamespace as H

    from deploylm.parity import _score_gap

    a = [[H(token_ids=(1, 2), score=-1.5)], [H(token_ids=(3,), score=-2.0)]]
    b = [[H(token_ids=(1, 2), score=-1.0)], [H(token_ids=(3,), score=-2.25)]]
    assert _score_gap(a, b) == 0.5 and _score_gap(b, a) == 0.5
    assert _score_gap(a, [[H(token_ids=(1, 3), score=-1.5)], b[1]]) is None


def test_text_level_compares_the_best_beams():
    """A candidate with a broken reorder keeps the reference's greedy output but not its beams: the
    texts compared are the beam-search outputs, so they differ."""
    row = _compare(Fake(_table(), name="onnx", broken_reorder=True), tokenizer=_Tok()).backends[0]
    assert row.greedy_identical and not row.beams_identical
    assert row.text_identical is False


def test_summary_judges_each_backend_on_its_own():
    ref = Fake(_table(), name="torch")
    report = compare_backends(ref, {"good": Fake(_table(), name="good"),
                                    "bad": Fake(_table(), name="bad", diverge_at=3)}, _batch(), OPTIONS, FP32)
    summary = report.summary()
    assert summary["passed"] is False
    assert summary["backends"]["good"]["passed"] is True and summary["backends"]["bad"]["passed"] is False


def test_prompts_file_skips_blank_and_whitespace_lines(tmp_path):
    from deploylm.parity import read_prompts_file

    path = tmp_path / "p.txt"
    path.write_text("first\n   \n\t\nsecond  \n\n", encoding="utf-8")
    assert read_prompts_file(path) == ["first", "second  "]


def test_prompts_file_lines_end_at_newlines_only(tmp_path):
    """As generate --input: a form feed or U+2028 inside a prompt does not make two prompts (str.splitlines did)."""
    from deploylm.parity import read_prompts_file

    path = tmp_path / "p.txt"
    path.write_bytes("one\u2028still one\r\ntwo\x0cstill two\rthree\n".encode())
    assert read_prompts_file(path) == ["one\u2028still one", "two\x0cstill two", "three"]


def _artifact_of(folder, model, digest):
    """A folder with just the manifest fields backend_source reads: the model it came from and its digest."""
    from deploylm.models.source import Source
    from deploylm.profiles import load_profile

    folder.mkdir()
    manifest = {"format_version": 1, "deploylm_version": "0", "created": "now", "files": {}, "io": {}, "toolchain": {},
                "source": {"kind": "hf", "path": str(model), "weights_sha256": digest}, "profile": load_profile("int8").to_dict()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Source("artifact", folder)


def test_backend_source_opens_the_recorded_model_for_torch_only(tiny_gpt2_dir, tmp_path):
    import pytest

    from deploylm.artifact import weights_sha256
    from deploylm.errors import UsageError
    from deploylm.parity import backend_source

    art = _artifact_of(tmp_path / "art", tiny_gpt2_dir, weights_sha256(tiny_gpt2_dir))
    assert backend_source("onnx", art) is art
    torch_src = backend_source("torch", art)
    assert (torch_src.kind, torch_src.path) == ("hf", tiny_gpt2_dir)
    other = _artifact_of(tmp_path / "other", tiny_gpt2_dir, "0" * 64)           # the model changed since
    with pytest.raises(UsageError, match=f"changed since artifact .* --profile int8 --out {other.path} --force"):
        backend_source("torch", other)
    with pytest.raises(UsageError, match="is not the model artifact"):
        backend_source("torch", other, reference=tiny_gpt2_dir)


def test_backend_source_without_a_recorded_digest_takes_the_model_as_it_is(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    """A manifest that recorded no weights digest (a source without weight files) has nothing to compare:
    the recorded model, or --reference, is opened as it is."""
    from deploylm.parity import backend_source

    art = _artifact_of(tmp_path / "art", tiny_gpt2_dir, None)
    assert backend_source("torch", art).path == tiny_gpt2_dir
    assert backend_source("torch", art, reference=tiny_llama_dir).path == tiny_llama_dir


def test_reference_is_refused_when_torch_does_not_check_the_artifact(tiny_gpt2_dir, tmp_path):
    import pytest

    from deploylm.errors import UsageError
    from deploylm.parity import run_parity

    art = _artifact_of(tmp_path / "art", tiny_gpt2_dir, None)
    with pytest.raises(UsageError, match="applies to an artifact checked with the torch backend"):
        run_parity(art.path, ["onnx", "trt"], reference=tiny_gpt2_dir)


def test_one_logit_off_at_one_step_is_the_reported_maximum():
    """max |Δ logit| is the largest difference over every step, row and vocabulary entry: one entry off by
    0.5 in one row at one step (every other logit exact) is reported as 0.5 and fails fp32's budget, not
    averaged away over the row's 24 entries and the step's 6 rows."""

    class OneOff(Fake):
        def _logits(self, cur, prev, step):
            logits = super()._logits(cur, prev, step)
            if step == 2:
                logits = logits.clone()
                logits[0, 1] += 0.5
            return logits

    report = _compare(OneOff(_table(), name="onnx"))
    row = report.backends[0]
    assert abs(row.max_abs_logit - 0.5) < 1e-5 and row.steps[2].max_abs_logit == row.max_abs_logit
    assert [s.max_abs_logit for i, s in enumerate(row.steps) if i != 2] == [0.0] * (len(row.steps) - 1)
    assert not report.passed and any("logits_atol" in line for line in report.failures())


def test_the_reference_best_beam_is_teacher_forced_too():
    """With num_beams > 1 the candidate is fed the reference's best beam as well as its greedy path: a
    candidate off only after a token that the best beam takes and no greedy path does (at that position)
    is caught. Its difference sits on the PAD logit (-100), so neither backend's own search changes."""
    from deploylm.decoding.search import generate_ids

    ref = Fake(_table(), name="torch")
    greedy = [h[0].token_ids for h in generate_ids(ref, _batch(), OPTIONS.replace(num_beams=1))]
    beams = [h[0].token_ids for h in generate_ids(ref, _batch(), OPTIONS)]
    pos, token = next((p, b[p]) for b in beams for p in range(len(b)) if all(len(g) <= p or g[p] != b[p] for g in greedy))

    class OffOnTheBeamPath(Fake):
        def _logits(self, cur, prev, step):
            logits = super()._logits(cur, prev, step)
            if step == pos + 1:                                   # the logits after the token at `pos`
                logits = logits.clone()
                logits[cur == token, PAD] += 1.0
            return logits

    report = _compare(OffOnTheBeamPath(_table(), name="onnx"))
    row = report.backends[0]
    assert row.greedy_identical and row.beams_identical
    assert row.max_abs_logit == 1.0 and row.steps[pos + 1].max_abs_logit == 1.0
    assert not report.passed


def test_each_steps_top1_agreement_is_over_its_active_rows():
    """A step's top1_agreement (in --json's steps) is the share of the rows still generating at that step:
    with prompt 0's two rows finished after step 0 and every active row agreeing, it is 1.0 at every step,
    not 4/6 (finished rows counted as disagreeing)."""
    table = _table()
    table[7, :] = -100.0
    table[7, EOS] = 100.0                         # prompt 0 ends in 7: its reference stops at once
    report = compare_backends(Fake(table, name="torch"), {"onnx": Fake(table, name="onnx")}, _batch(), OPTIONS, FP32)
    steps = report.backends[0].steps
    assert [s.rows for s in steps[:2]] == [6, 4]
    assert [s.top1_agreement for s in steps] == [1.0] * len(steps)


def test_the_table_marks_each_backends_own_result():
    """The table's result column says FAIL on the row of the backend outside its budget and PASS on the one
    within, not only in the last line (FAILED) for the whole report."""
    fine, noisy = Fake(_table(), name="onnx"), Fake(_table(), name="trt", noise=FP32.logits_atol * 10)
    report = compare_backends(Fake(_table(), name="torch"), {"onnx": fine, "trt": noisy}, _batch(), OPTIONS, FP32)
    lines = report.table().splitlines()
    onnx, trt = (next(line for line in lines if line.startswith(name + " ")) for name in ("onnx", "trt"))
    assert onnx.split()[-1] == "PASS" and trt.split()[-1] == "FAIL"
    assert lines[-1] == "FAILED"


def test_beams_identical_compares_every_returned_sequence():
    """With num_return_sequences > 1 (a profile's [generation] may ask for it) "beams identical" means every
    returned sequence of every prompt, in order, not only the best one."""
    from types import SimpleNamespace as H

    from deploylm.parity import _same_ids

    ref = [[H(token_ids=(1, 2)), H(token_ids=(1, 3))], [H(token_ids=(4,)), H(token_ids=(5,))]]
    assert _same_ids(ref, [[H(token_ids=(1, 2)), H(token_ids=(1, 3))], [H(token_ids=(4,)), H(token_ids=(5,))]])
    assert not _same_ids(ref, [[H(token_ids=(1, 2)), H(token_ids=(1, 4))], [H(token_ids=(4,)), H(token_ids=(5,))]])
    assert not _same_ids(ref, [[H(token_ids=(1, 2)), H(token_ids=(1, 3))], [H(token_ids=(4,)), H(token_ids=(6,))]])


@pytest.mark.parametrize("command", ["parity", "bench"])
def test_an_empty_prompts_name_is_refused_not_taken_for_the_built_in_prompts(command, tmp_path):
    """--prompts "$FILE" with FILE unset gave --prompts '': the built-in prompts were used as if no file were named."""
    from click.testing import CliRunner

    from deploylm.cli import cli

    result = CliRunner().invoke(cli, [command, "--model", str(tmp_path / "nowhere"), "--prompts", ""])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --prompts '': expected a UTF-8 text file with one prompt per line"


def test_parity_refusing_a_long_prompt_advises_what_parity_offers(monkeypatch):
    """The window check's advice names generate's --truncation, which parity does not have."""
    from click.testing import CliRunner

    from deploylm import parity as parity_module
    from deploylm.cli import cli
    from deploylm.long_inputs import check_fits

    info = ModelInfo(is_encoder_decoder=False, vocab_size=10, special=None, max_positions=32)
    monkeypatch.setattr(parity_module, "run_parity", lambda *a, **k: check_fits([30], info, 4))
    result = CliRunner().invoke(cli, ["parity", "--model", "x"])
    assert result.exit_code == 2, result.output
    assert "truncation" not in result.output, result.output
    assert result.output.strip().endswith("lower max_new_tokens (parity: --prompts FILE, --max-new-tokens N)"), \
        result.output
    monkeypatch.setattr(parity_module, "run_parity", lambda *a, **k: check_fits([40], info, 4))   # over it alone
    result = CliRunner().invoke(cli, ["parity", "--model", "x"])
    assert result.output.strip().endswith("window of 32 before any new token: shorten it (parity: --prompts FILE)"), \
        result.output


def test_a_candidate_engine_too_short_for_the_request_is_refused_before_the_reference_decodes():
    """A trt candidate whose engine holds fewer positions than prompt + max_new_tokens - 1 failed only when the
    forced tokens outgrew its cache, after the reference's greedy and beam searches (minutes on a real model)."""
    import dataclasses

    from deploylm.backends.base import EngineLimits
    from deploylm.errors import UsageError

    reference, trt = Fake(_table(), name="torch"), Fake(_table(), name="trt")
    trt.info = dataclasses.replace(trt.info, engine=EngineLimits(positions=8, prompt_tokens=8))
    reference.prefill = lambda batch: pytest.fail("the reference decoded before the candidate's limits were checked")
    with pytest.raises(UsageError, match=r"prompt 2 has 4 tokens; with max_new_tokens=6 that needs 9 positions, over "
                                         r"the TensorRT engine's window of 8 positions: .*re-export with a larger "
                                         r"\[tensorrt\] shapes.past"):
        compare_backends(reference, {"trt": trt}, _batch(), OPTIONS, FP32)
    trt.info = dataclasses.replace(trt.info, engine=EngineLimits(positions=9, prompt_tokens=8))
    assert compare_backends(Fake(_table(), name="torch"), {"trt": trt}, _batch(), OPTIONS, FP32).passed


def test_settings_difference_names_the_decoder_start_and_a_setting_only_the_candidate_has():
    """Besides the EOS ids: a decoder_start_token_id, and a generation_config setting the reference does not
    have at all (an artifact whose manifest gained forced_eos_token_id), are settings differences too."""
    import dataclasses

    loose = dataclasses.replace(FP32, logits_atol=1e9, logprob_atol=1e9, min_token_agreement=0.0,
                                identical_beams=False)
    start = Fake(_table(), name="onnx")
    start.info = dataclasses.replace(start.info, special=SpecialTokens(eos_token_ids=(EOS,), pad_token_id=PAD,
                                                                       decoder_start_token_id=2))
    assert _compare(start, tolerances=loose).backends[0].settings_difference == \
        "decoder_start_token_id 2, the reference's None"
    forced = Fake(_table(), name="onnx")
    forced.info = dataclasses.replace(forced.info, generation={"forced_eos_token_id": EOS})
    report = _compare(forced, tolerances=loose)
    assert report.backends[0].settings_difference == f"forced_eos_token_id {EOS}, the reference's None"
    assert not report.passed


def test_a_full_disk_in_parity_s_own_export_names_where_it_writes_not_an_out_option(tiny_llama_dir, monkeypatch):
    """parity exports a model that is no artifact into a temporary folder; a full disk there said "choose another
    --out", an option parity does not have."""
    import errno
    import tempfile

    from click.testing import CliRunner

    from deploylm.artifact import write_artifact
    from deploylm.cli import cli
    from deploylm.export import pipeline

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "export_model", lambda src, profile, out, **_: write_artifact(out, full, {}))
    result = CliRunner().invoke(cli, ["parity", "--model", str(tiny_llama_dir)])
    assert result.exit_code == 1 and "--out DIR) and check that artifact" in result.output, result.output
    assert f"parity exports into {tempfile.gettempdir()} first: free space there, or set TMPDIR" in result.output
    assert "choose another --out" not in result.output
