"""Parity checker against tiny fake backends: a fixed random 'trigram' model implementing the Backend
protocol, and copies of it perturbed below/above the fp32 profile's tolerances, diverging at step 3,
broken in reorder, or producing NaN. Tolerances come from the built-in profiles only."""
from __future__ import annotations

import json

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
