"""`deploylm bench` as a library: config checks, row planning, interleaving, medians, report round trip.

The orchestration tests inject fake runners (scripted timings and tokens) so every number in the
report can be checked against the rounds it came from; the tiny-model tests run the real decoder and
`transformers.generate` for a few tokens.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from deploylm.bench import STANDARD_PROMPTS, BenchConfig, BenchReport, CallTiming, RoundResult, plot_report, run_bench
from deploylm.benchmarking.measure import GeneratorRunner, TransformersRunner, timing_from_marks
from deploylm.benchmarking.report import percentile
from deploylm.benchmarking.workload import plan_rows, workload_of
from deploylm.errors import UsageError, WriteFailed

PROMPTS = ("the quick brown fox", "hello world", "one two three four five six seven", "beam search keeps")


# -- config and planning ------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(batch_size=0), "--batch-size 0"), (dict(rounds=0), "--rounds 0"), (dict(threads=0), "--threads 0"),
    (dict(num_beams=0), "--num-beams 0"), (dict(max_new_tokens=0), "--max-new-tokens 0"),
    (dict(warmup=-1), "--warmup -1"), (dict(backends=("torch", "tpu")), "unknown backend 'tpu'"),
    (dict(models=()), "no model given"), (dict(prompts=("ok", " ")), "non-empty prompt"),
    (dict(spin="sometimes"), "--spin 'sometimes': expected one of off, on, both"),
    (dict(spin="on", backends=("torch",)), "--spin on applies to onnx rows"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(UsageError, match=message):
        BenchConfig(**{"models": ("m",), **change})


def test_standard_workload_defaults():
    config = BenchConfig(models=("m",))
    assert len(STANDARD_PROMPTS) == 8 and config.batches() == (STANDARD_PROMPTS,)
    options = config.options()
    assert (options.num_beams, options.max_new_tokens, options.min_new_tokens) == (4, 64, 64)
    assert config.threads == 2 and config.rounds == 3 and config.warmup == 1


def test_batches_split_or_fill():
    five = ("a", "b", "c", "d", "e")
    assert BenchConfig(models=("m",), prompts=five, batch_size=2).batches() == (("a", "b"), ("c", "d"), ("e",))
    assert BenchConfig(models=("m",), prompts=("a", "b"), batch_size=5).batches() == (("a", "b", "a", "b", "a"),)


def test_rows_pair_models_with_backends_and_share_references(tiny_gpt2_dir, tiny_llama_dir):
    rows = plan_rows(BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir)), backends=("torch", "onnx")))
    assert [(r.backend, Path(r.src)) for r in rows] == [
        ("torch", tiny_gpt2_dir), ("torch", tiny_llama_dir),
        ("transformers", tiny_gpt2_dir), ("transformers", tiny_llama_dir)]
    assert rows[0].reference == rows[2].label and rows[1].reference == rows[3].label
    assert len({r.label for r in rows}) == 4
    assert [r.backend for r in plan_rows(BenchConfig(models=(str(tiny_gpt2_dir),), reference=False))] == ["torch"]


def test_two_copies_of_one_model_get_two_reference_labels(tiny_gpt2_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_gpt2_dir, tmp_path / "elsewhere" / tiny_gpt2_dir.name)   # same name, other path
    rows = plan_rows(BenchConfig(models=(str(tiny_gpt2_dir), str(copy))))
    references = [r for r in rows if r.backend == "transformers"]
    assert len(references) == 2 and len({r.label for r in references}) == 2
    assert references[1].label.endswith(" #2") and rows[1].reference == references[1].label


def test_rows_refuse_unusable_combinations(tiny_gpt2_dir):
    with pytest.raises(UsageError, match="none of --backends onnx runs a Hugging Face folder"):
        plan_rows(BenchConfig(models=(str(tiny_gpt2_dir),), backends=("onnx",)))
    with pytest.raises(UsageError, match="given twice"):
        plan_rows(BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_gpt2_dir))))


@pytest.mark.parametrize("spin", ["on", "both"])
def test_spin_without_an_onnx_row_is_refused(tiny_gpt2_dir, spin):
    """--spin with the default backends but no artifact made no onnx row: the flag did nothing, silently."""
    with pytest.raises(UsageError, match=f"--spin {spin} applies to onnx rows .* none of the models runs on onnx"):
        plan_rows(BenchConfig(models=(str(tiny_gpt2_dir),), spin=spin))


def test_one_model_by_a_relative_and_an_absolute_path_is_given_twice(tiny_gpt2_dir, monkeypatch):
    monkeypatch.chdir(tiny_gpt2_dir.parent)
    with pytest.raises(UsageError, match="given twice"):
        plan_rows(BenchConfig(models=(tiny_gpt2_dir.name, str(tiny_gpt2_dir))))


# -- orchestration with fake runners ------------------------------------------------------------------
def _round(wall: float, tokens: tuple[tuple[int, ...], ...], steps: int = 4) -> RoundResult:
    step = wall / (steps + 1)
    call = CallTiming(wall_s=wall, ttft_s=2 * step, step_s=(step,) * (steps - 1), model_s=0.8 * wall,
                      loop_s=0.9 * wall, steps=steps, requests=len(tokens))
    return RoundResult((call,), tokens)


class FakeRunner:
    """Plays back scripted rounds (warm-ups first) and logs every call into a shared list."""

    def __init__(self, spec, log, walls, tokens, fail_at=None):
        self.spec, self.log, self.walls, self.tokens, self.fail_at = spec, log, list(walls), tokens, fail_at
        self.load_s, self.rss_after_load_mib, self.runs = 0.5, 100.0, 0
        self.closed = self.killed = False

    def run(self):
        self.log.append(self.spec.label)
        self.runs += 1
        if self.runs == self.fail_at:
            raise RuntimeError("boom")
        return _round(self.walls.pop(0), self.tokens)

    def close(self):
        self.closed = True
        return 321.0

    def kill(self):
        self.killed = True


SAME = ((1, 2, 3, 4), (5, 6, 7, 8))
OTHER = ((1, 2, 3, 4), (5, 6, 7, 9))


@pytest.fixture
def fake_bench(tiny_gpt2_dir, tiny_llama_dir):
    """Rows: gpt2[torch], llama[torch], transformers(gpt2), transformers(llama); 1 warm-up, 3 rounds."""
    log: list[str] = []
    walls = {0: [9.0, 2.0, 4.0, 3.0], 1: [9.0, 5.0, 1.0, 6.0], 2: [9.0, 8.0, 4.0, 6.0], 3: [9.0, 1.0, 1.0, 1.0]}
    tokens = {0: SAME, 1: OTHER, 2: SAME, 3: SAME}
    runners = []

    def opener(spec, workload):
        i = len(runners)
        runners.append(FakeRunner(spec, log, walls[i], tokens[i]))
        return runners[-1]

    config = BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir)), prompts=PROMPTS[:2], rounds=3, warmup=1)
    return run_bench(config, open_runner=opener), log, walls, runners


def test_rounds_are_interleaved_after_one_warmup_each(fake_bench):
    report, log, _, runners = fake_bench
    labels = [r.label for r in report.rows]
    assert log == labels + labels * 3          # warm-up A B C D, then A B C D three times
    assert all(r.closed for r in runners)


def test_summaries_are_medians_of_the_recorded_rounds(fake_bench):
    report, _, walls, _ = fake_bench
    for row, expected in zip(report.rows, ([2.0, 4.0, 3.0], [5.0, 1.0, 6.0], [8.0, 4.0, 6.0], [1.0, 1.0, 1.0])):
        assert [r.wall_s for r in row.rounds] == expected          # the warm-up (9.0) is not recorded
        assert row.wall_s == statistics.median(expected)
        assert row.tokens_per_s == statistics.median(8 / w for w in expected)
        per_request = [w for w in expected for _ in range(2)]       # both prompts of a call wait its wall time
        assert row.latency_p50_s == percentile(per_request, 50) and row.latency_p95_s == percentile(per_request, 95)
        steps = [s * 1e3 for r in row.rounds for s in r.calls[0].step_s]
        assert row.step_p50_ms == pytest.approx(percentile(steps, 50))
        assert row.ttft_s == statistics.median(r.calls[0].ttft_s for r in row.rounds)
        assert row.decoder_ms_per_step == pytest.approx(statistics.median(1e3 * 0.1 * w / 4 for w in expected))
        assert row.decoder_pct == pytest.approx(100 * 0.1 / 0.9)
        assert (row.load_s, row.rss_after_load_mib, row.peak_rss_mib) == (0.5, 100.0, 321.0)


def test_summaries_of_rounds_of_several_calls_against_hand_computed_values():
    """Two rounds (an even count: medians average the middle two) of two calls each (a batch split): TTFT is
    the median over every call, decoder ms/step divides the round's decoder time by all its calls' steps,
    latency counts each request, step percentiles run over every step."""
    from deploylm.benchmarking.report import summarize
    from deploylm.benchmarking.workload import RowSpec

    def call(wall, ttft, steps_s, model, loop, requests):
        return CallTiming(wall, ttft, steps_s, model, loop, steps=3, requests=requests)

    tokens = ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    a = RoundResult((call(1.0, 0.1, (0.01, 0.02), 0.5, 0.8, 2), call(2.0, 0.3, (0.03, 0.04), 1.0, 1.1, 1)), tokens)
    b = RoundResult((call(1.5, 0.2, (0.05, 0.06), 0.6, 1.0, 2), call(2.5, 0.5, (0.07, 0.08), 1.2, 1.4, 1)), tokens)
    row = summarize(RowSpec("m [torch]", "m", "torch", "fp32"), [a, b], 0.5, None, None)
    assert row.wall_s == pytest.approx(3.5)                           # rounds of 3 s and 4 s
    assert row.tokens_per_s == pytest.approx((9 / 3 + 9 / 4) / 2)     # 9 best-sequence tokens a round
    assert row.ttft_s == pytest.approx(0.25)                          # median of 0.1, 0.3, 0.2, 0.5
    assert row.decoder_ms_per_step == pytest.approx((1e3 * 0.4 / 6 + 1e3 * 0.6 / 6) / 2)
    assert row.decoder_pct == pytest.approx((100 * 0.4 / 1.9 + 100 * 0.6 / 2.4) / 2)
    assert row.latency_p50_s == pytest.approx(1.5)                    # 1, 1, 1.5, 1.5, 2, 2.5
    assert row.latency_p95_s == pytest.approx(2.375)
    assert row.step_p50_ms == pytest.approx(45.0)                     # 10, 20, ..., 80 ms
    assert row.step_p95_ms == pytest.approx(76.5)
    assert row.deterministic


def test_rows_whose_rounds_spread_get_a_note_in_the_table_and_the_json(fake_bench):
    """Row 0's rounds (2, 4, 3 s) spread 67% of their median; row 3's (1, 1, 1 s) do not spread."""
    report, *_ = fake_bench
    spread = [n for n in report.rows[0].notes if "rounds spread" in n]
    assert spread == ["its rounds spread 67% (2-4 s): other work took the cores in some rounds, so its "
                      "ratios are less certain; re-run on a quieter machine to confirm"]
    assert not [n for n in report.rows[3].notes if "rounds spread" in n]
    assert f"note: {report.rows[0].label}: its rounds spread 67%" in report.table()
    assert BenchReport.from_dict(json.loads(json.dumps(report.to_dict()))).rows[0].notes == report.rows[0].notes


def test_steady_rounds_within_the_threshold_get_no_note():
    from deploylm.benchmarking.report import UNSTEADY_SPREAD, unsteady_note

    def rounds(*walls):
        return [RoundResult(calls=(CallTiming(w, 0.1, (), w, w, 4),), token_ids=((1,),)) for w in walls]

    assert unsteady_note(rounds(4.0, 4.1, 4.2)) == ()                      # 4.9% of the median
    assert unsteady_note(rounds(4.0, 4.0 * (1 + UNSTEADY_SPREAD) - 1e-9)) == ()
    assert unsteady_note(rounds(4.0, 4.2, 6.6))                            # a disturbed round
    assert unsteady_note(rounds(4.0)) == ()


def test_each_row_keeps_its_own_memory_warmups_and_determinism(tiny_gpt2_dir, tiny_llama_dir):
    """Two warm-ups each, then the rounds; each row reports its own load time and RSS; a row whose rounds
    produced different tokens is not deterministic; two rounds that spread get the note too."""
    log, runners = [], []

    class Varying(FakeRunner):
        def run(self):
            result = super().run()
            return RoundResult(result.calls, OTHER) if self.runs % 2 else result   # SAME, OTHER, SAME ...

    def opener(spec, workload):
        i = len(runners)
        runners.append((Varying if i == 1 else FakeRunner)(spec, log, [9.0, 9.0, 4.0, 6.0], SAME))
        runners[-1].load_s, runners[-1].rss_after_load_mib, runners[-1].close = i + 0.5, 100.0 + i, lambda i=i: 200.0 + i
        return runners[-1]

    config = BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir)), prompts=PROMPTS[:2], rounds=2, warmup=2)
    report = run_bench(config, open_runner=opener)
    labels = [r.label for r in report.rows]
    assert log == labels * 4
    assert [(r.load_s, r.rss_after_load_mib, r.peak_rss_mib) for r in report.rows] == [
        (0.5, 100.0, 200.0), (1.5, 101.0, 201.0), (2.5, 102.0, 202.0), (3.5, 103.0, 203.0)]
    assert [r.deterministic for r in report.rows] == [True, False, True, True]
    assert all(any("its rounds spread 40% (4-6 s)" in n for n in r.notes) for r in report.rows)


def test_ratios_and_token_agreement(fake_bench):
    report, *_ = fake_bench
    gpt2, llama, ref_gpt2, ref_llama = report.rows
    assert gpt2.ratio_vs_reference == pytest.approx(gpt2.tokens_per_s / ref_gpt2.tokens_per_s)
    assert llama.ratio_vs_reference == pytest.approx(llama.tokens_per_s / ref_llama.tokens_per_s)
    assert ref_gpt2.ratio_vs_reference == 1.0
    assert (gpt2.same_as_reference, llama.same_as_reference) == (2, 1)
    assert gpt2.same_as_first == 2 and all(r.deterministic for r in report.rows)
    # "= #1" compares rows of the first row's model only: another model's tokens have nothing to agree with
    assert (ref_gpt2.same_as_first, llama.same_as_first, ref_llama.same_as_first) == (2, None, None)
    assert any("ratio = tokens/s" in n for n in report.notes)


def test_without_references_rows_are_compared_and_no_ratio_is_explained(tiny_gpt2_dir, tiny_llama_dir):
    """--no-reference: which rows share a model cannot be told, so every row is compared with the first; the
    note explaining the ratio against transformers.generate is left out with the ratio."""
    config = BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir)), prompts=PROMPTS[:2], rounds=1, warmup=0,
                         reference=False)
    report = run_bench(config, open_runner=lambda spec, workload: FakeRunner(spec, [], [1.0], SAME))
    assert [r.same_as_first for r in report.rows] == [2, 2] and not any(r.is_reference for r in report.rows)
    assert not any("ratio =" in n for n in report.notes), report.notes


def test_a_failing_row_stops_every_worker(tiny_gpt2_dir, tiny_llama_dir):
    runners = []

    def opener(spec, workload):
        runners.append(FakeRunner(spec, [], [1.0] * 5, SAME, fail_at=2 if len(runners) == 1 else None))
        return runners[-1]

    with pytest.raises(RuntimeError, match="boom"):
        run_bench(BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir))), open_runner=opener)
    assert len(runners) == 4 and all(r.killed for r in runners)


def test_report_round_trips_through_json(fake_bench, tmp_path):
    report, *_ = fake_bench
    path = report.write_json(tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert BenchReport.from_dict(data) == report
    for key in ("date", "machine", "versions", "workload", "rows", "rss_scope", "notes"):
        assert key in data
    assert {"cpu", "physical_cores", "logical_cores", "threads", "load_average"} <= set(data["machine"])
    assert {"torch", "transformers", "deploylm"} <= set(data["versions"])
    assert data["workload"]["options"]["min_new_tokens"] == data["workload"]["options"]["max_new_tokens"]
    row = data["rows"][0]
    for key in ("tokens_per_s", "ratio_vs_reference", "latency_p50_s", "latency_p95_s", "step_p50_ms",
                "step_p95_ms", "ttft_s", "peak_rss_mib", "decoder_ms_per_step", "decoder_pct",
                "same_as_reference", "same_as_first", "rounds"):
        assert key in row
    assert not list(tmp_path.glob(".*tmp*"))


def test_table_and_plot(fake_bench, tmp_path):
    report, *_ = fake_bench
    table = report.table()
    for row in report.rows:
        assert row.label in table
    assert "exactly 64 new tokens" in table and "min_new_tokens = max_new_tokens" in table
    png = plot_report(report, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="ending in .png"):
        plot_report(report, tmp_path / "bench.jpg")


def test_table_cells_and_plot_bars_against_hand_computed_values(tiny_gpt2_dir, tiny_llama_dir, tmp_path, monkeypatch):
    """The fake_bench timings, with the llama row agreeing with its reference on both prompts (and not compared
    with the first row, another model's): every cell of the two model rows, and the plot's bars, colours and
    ratio labels."""
    import re

    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from deploylm.benchmarking import table

    walls = {0: [9.0, 2.0, 4.0, 3.0], 1: [9.0, 5.0, 1.0, 6.0], 2: [9.0, 8.0, 4.0, 6.0], 3: [9.0, 1.0, 1.0, 1.0]}
    tokens = {0: SAME, 1: OTHER, 2: SAME, 3: OTHER}
    runners = []

    def opener(spec, workload):
        runners.append(FakeRunner(spec, [], walls[len(runners)], tokens[len(runners)]))
        return runners[-1]

    def opener_again(walls, tokens):
        played = []
        return lambda spec, workload: played.append(FakeRunner(spec, [], walls[len(played)],
                                                               tokens[len(played)])) or played[-1]

    config = BenchConfig(models=(str(tiny_gpt2_dir), str(tiny_llama_dir)), prompts=PROMPTS[:2])
    report = run_bench(config, open_runner=opener)
    lines = {line.split("  ")[0]: re.split(r"\s{2,}", line.strip()) for line in report.table().splitlines()}
    gpt2, llama, ref_gpt2, ref_llama = report.rows
    # tok/s: median of 8 tokens / (2, 4, 3 s); × tf against transformers' median of 8 / (8, 4, 6 s); latency over
    # 2 requests a round; steps of wall / 5 (3 a round); TTFT 2 × wall / 5; decoder 0.1 × wall over 4 steps
    assert lines[gpt2.label] == [gpt2.label, "fp32", "2.7", "2.00×", "3.00/4.00", "600.0/800.0", "1.20",
                                 "75.00 (11.1%)", "321", "2/2", "2/2"]
    assert lines[llama.label] == [llama.label, "fp32", "1.6", "0.20×", "5.00/6.00", "1000.0/1200.0", "2.00",
                                  "125.00 (11.1%)", "321", "2/2", "-"]      # "= #1": another model
    assert not [n for n in report.notes if "round(s)" in n]          # 3 rounds: the standard, no note

    figures = []

    class Recording(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(table, "_figure_class", lambda: Recording)
    plot_report(report, tmp_path / "bench.png")
    (ax,) = figures[-1].axes
    assert [bar.get_height() for bar in ax.patches] == [r.tokens_per_s for r in report.rows]
    grey, blue = to_rgba("#9e9e9e"), to_rgba("#1f77b4")
    assert [bar.get_facecolor() for bar in ax.patches] == [blue, blue, grey, grey]
    assert [t.get_text() for t in ax.texts] == ["2.00×", "0.20×", "1.00×", "1.00×"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{r.label}\n{r.profile}" for r in report.rows]

    no_reference = run_bench(dataclasses.replace(config, reference=False), open_runner=opener_again(walls, tokens))
    plot_report(no_reference, tmp_path / "bench.png")
    (ax,) = figures[-1].axes        # --no-reference: no ratio to print, each bar says its tokens/s
    assert [t.get_text() for t in ax.texts] == [f"{r.tokens_per_s:.1f}" for r in no_reference.rows] == ["2.7", "1.6"]


def test_a_one_token_run_writes_standard_json(tiny_gpt2_dir, tmp_path):
    """--max-new-tokens 1 has no step after the first: its step percentiles are NaN, which the JSON
    writes as null (NaN is not JSON: jq and JSON.parse refuse the file) and the table as '-'."""
    class OneToken:
        load_s, rss_after_load_mib = 0.1, None

        def run(self):
            return _round(1.0, ((1,), (2,)), steps=1)

        def close(self):
            return None

    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], max_new_tokens=1, rounds=1, warmup=0)
    report = run_bench(config, open_runner=lambda spec, workload: OneToken())
    assert "nan" not in report.table()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(report.write_json(tmp_path / "b.json").read_text(), parse_constant=refuse)
    assert data["rows"][0]["step_p50_ms"] is None and data["rows"][0]["tokens_per_s"] == 2.0
    back = BenchReport.from_dict(data)
    assert back.rows[0].step_p50_ms != back.rows[0].step_p50_ms and back.table() == report.table()   # NaN again


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_timing_from_marks():
    timing = timing_from_marks(10.0, [11.0, 11.5, 12.5], 13.0, model_s=2.0, loop_s=2.5, requests=8)
    assert (timing.wall_s, timing.ttft_s, timing.step_s, timing.steps) == (3.0, 1.0, (0.5, 1.0), 3)
    assert timing.decoder_s == 0.5 and timing.requests == 8


def test_rows_in_this_process_run_with_the_bench_threads_then_restore_them(tiny_gpt2_dir, monkeypatch):
    """--in-process: torch's intra-op threads are --threads while the rows run (2 by default, not every core)."""
    import torch

    from deploylm.benchmarking import measure

    seen, before = [], torch.get_num_threads()
    wanted = 1 if before != 1 else 2

    class Recording(FakeRunner):
        def run(self):
            seen.append(torch.get_num_threads())
            return super().run()

    monkeypatch.setattr(measure, "open_local_runner",
                        lambda spec, workload: Recording(spec, [], [1.0] * 3, SAME))
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], threads=wanted, rounds=1, isolate=False)
    run_bench(config)
    assert seen == [wanted] * 4 and torch.get_num_threads() == before     # 2 rows × (warm-up + 1 round)


def test_rows_in_this_process_quiet_transformers_only_while_they_run(tiny_gpt2_dir, monkeypatch):
    """run_bench is a library call: in-process rows run with transformers' advice and progress bars off,
    and the calling program gets its own settings back (it used to keep error-only logging for good)."""
    from transformers.utils import logging

    from deploylm.benchmarking import measure

    seen = []

    class Recording(FakeRunner):
        def run(self):
            seen.append((logging.get_verbosity(), logging.is_progress_bar_enabled()))
            return super().run()

    monkeypatch.setattr(measure, "open_local_runner", lambda spec, workload: Recording(spec, [], [1.0] * 3, SAME))
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_info()
    logging.enable_progress_bar()
    try:
        run_bench(BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], rounds=1, isolate=False))
        assert seen == [(logging.ERROR, False)] * 4
        assert logging.get_verbosity() == logging.INFO and logging.is_progress_bar_enabled()
        logging.set_verbosity_warning()
        logging.disable_progress_bar()   # a caller that turned the bars off keeps them off
        run_bench(BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], rounds=1, isolate=False))
        assert logging.get_verbosity() == logging.WARNING and not logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity(verbosity)
        (logging.enable_progress_bar if bars else logging.disable_progress_bar)()


def test_an_onnx_row_loads_with_the_bench_threads_and_its_spin(monkeypatch):
    """ONNX Runtime's intra-op threads are --threads, and an [onnx, spin] row really loads with spin=True."""
    import deploylm.generator
    from deploylm.benchmarking.measure import open_local_runner
    from deploylm.benchmarking.workload import RowSpec

    loads = []
    monkeypatch.setattr(deploylm.generator, "load", lambda src, **kwargs: loads.append((src, kwargs)))
    workload = workload_of(BenchConfig(models=("m",), prompts=PROMPTS[:2], threads=3))
    for spin in (False, True):
        open_local_runner(RowSpec("a [onnx]", "export/a", "onnx", "fp32", spin=spin), workload)
    assert loads == [("export/a", dict(backend="onnx", spin=False, threads=3)),
                     ("export/a", dict(backend="onnx", spin=True, threads=3))]


def test_machine_info_reads_cores_flags_and_memory(monkeypatch):
    """Two sockets of two cores with two hyper-threads each: 4 physical cores; MemTotal in KiB -> GiB."""
    from deploylm.benchmarking import machine

    cpuinfo = "".join(f"processor\t: {n}\nmodel name\t: Test CPU @ 2.0GHz\nphysical id\t: {n // 4}\n"
                      f"core id\t\t: {n % 2}\nflags\t\t: fpu sse avx512f fma avx2\n\n" for n in range(8))
    files = {"/proc/cpuinfo": cpuinfo, "/proc/meminfo": "MemTotal:       16777216 kB\nMemFree:  1 kB\n"}
    monkeypatch.setattr(machine, "_read", lambda path: files.get(path, ""))
    info = machine.machine_info(3)
    assert (info["cpu"], info["physical_cores"], info["memory_gib"], info["threads"]) == ("Test CPU @ 2.0GHz", 4, 16.0, 3)
    assert info["cpu_flags"] == ["avx2", "avx512f", "fma"]


# -- the real decoder on a tiny model -----------------------------------------------------------------
def test_generator_runner_reads_the_clock_once_per_step(tiny_gpt2_dir):
    ticks = iter(range(1000))
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS, batch_size=4, max_new_tokens=3)
    runner = GeneratorRunner(str(tiny_gpt2_dir), "torch", workload_of(config), clock=lambda: float(next(ticks)))
    result = runner.run()
    call = result.calls[0]
    assert (call.steps, call.ttft_s, call.step_s, call.wall_s) == (3, 1.0, (1.0, 1.0), 4.0)
    assert 0 < call.model_s < call.loop_s and [len(t) for t in result.token_ids] == [3, 3, 3, 3]


def test_generator_runner_passes_no_sampling_option_a_deterministic_row_ignores(tiny_gpt2_dir):
    """The row passed the workload's whole DecodingOptions.to_dict() to generate: in a workload that does not sample,
    a temperature there would make every call warn that it is ignored (Generator.generate). It passes the
    options that matter (call_keywords): no warning, the same tokens."""
    import warnings

    from deploylm.benchmarking.workload import Workload
    from deploylm.decoding.options import DecodingOptions

    options = DecodingOptions(num_beams=2, max_new_tokens=2, min_new_tokens=2, temperature=0.7, top_k=5, seed=1)
    runner = GeneratorRunner(str(tiny_gpt2_dir), "torch", Workload(((PROMPTS[0],),), options, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*only when sampling", UserWarning)
        _, tokens = runner._call([PROMPTS[0]])
    expected = runner.generator.generate([PROMPTS[0]], num_beams=2, max_new_tokens=2, min_new_tokens=2)
    assert tokens == [expected[0].sequences[0].token_ids]


def test_transformers_row_counts_an_encoders_time_as_model_time(tiny_t5_dir):
    """generate() runs an encoder-decoder's encoder outside model.forward: it is model time, not the
    decoder's overhead (a long prompt made the encoder look like >50% decoder overhead)."""
    now = [0.0]
    config = BenchConfig(models=(str(tiny_t5_dir),), prompts=PROMPTS[:2], batch_size=2, max_new_tokens=2, num_beams=2)
    runner = TransformersRunner(str(tiny_t5_dir), workload_of(config), clock=lambda: now[0])
    encoder = runner.model.get_encoder()
    forward = encoder.forward

    def slow_forward(*args, **kwargs):          # the encoder "takes" 100 s of the fake clock, nothing else does
        now[0] += 100.0
        return forward(*args, **kwargs)

    encoder.forward = slow_forward
    (call,) = runner.run().calls
    assert call.model_s == 100.0 and call.decoder_s == 0.0 and call.loop_s == 100.0


def test_transformers_row_times_the_model_of_each_call_alone(tiny_gpt2_dir):
    """Two calls a round, two rounds: each call's model time is its own forward passes (each "takes" 1 s of
    the fake clock), not the running total of the earlier calls; the loop is generate() alone, while the
    call's wall time and TTFT include tokenizing (and the wall time detokenizing)."""
    now = [0.0]
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS, batch_size=2, max_new_tokens=3, num_beams=2)
    runner = TransformersRunner(str(tiny_gpt2_dir), workload_of(config), clock=lambda: now[0])
    forward = runner.model.forward

    def slow_forward(*args, **kwargs):
        now[0] += 1.0
        return forward(*args, **kwargs)

    class SlowTokenizer:                        # encoding "takes" 10 s, decoding 100 s: call time, not loop time
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            now[0] += 10.0
            return self.inner(*args, **kwargs)

        def batch_decode(self, *args, **kwargs):
            now[0] += 100.0
            return self.inner.batch_decode(*args, **kwargs)

    runner.model.forward = slow_forward
    runner.tokenizer = SlowTokenizer(runner.tokenizer)
    calls = runner.run().calls + runner.run().calls
    assert [(c.model_s, c.loop_s, c.decoder_s, c.steps) for c in calls] == [(3.0, 3.0, 0.0, 3)] * 4
    assert [(c.wall_s, c.ttft_s, c.step_s, c.requests) for c in calls] == [(113.0, 11.0, (1.0, 1.0), 2)] * 4


def test_cut_at_eos_keeps_the_eos_and_drops_the_padding_after_it():
    from deploylm.benchmarking.measure import cut_at_eos

    rows = [[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8], [9, 3, 2, 3]]
    assert cut_at_eos(rows, (2, 3)) == [(5, 2), (5, 6, 7, 2), (5, 6, 7, 8), (9, 3)]


def test_tiny_model_in_process_matches_transformers(tiny_gpt2_dir):
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS, batch_size=4, max_new_tokens=5,
                         rounds=1, warmup=0, isolate=False)
    report = run_bench(config)
    torch_row, ref = report.rows
    assert (torch_row.backend, ref.backend) == ("torch", "transformers")
    for row in report.rows:
        call = row.rounds[0].calls[0]
        assert call.steps == 5 and len(call.step_s) == 4 and call.requests == 4
        assert [len(t) for t in row.token_ids] == [5] * 4          # EOS banned: exactly 5 tokens each
        assert row.tokens_per_s == pytest.approx(20 / call.wall_s)
        assert 0 < call.model_s < call.loop_s < call.wall_s
    assert torch_row.same_as_reference == 4                          # fp32 torch == transformers (DESIGN §5)
    assert report.rss_scope == "process" and torch_row.peak_rss_mib is None and report.process_peak_rss_mib > 0
    assert BenchReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_an_encoder_decoders_rows_count_generated_tokens_only(tiny_t5_dir):
    """transformers' output for T5 starts with the decoder start token: not a generated token, so not counted
    in tokens/s nor compared with deploylm's (which has none)."""
    config = BenchConfig(models=(str(tiny_t5_dir),), prompts=PROMPTS[:2], batch_size=2, max_new_tokens=3,
                         num_beams=2, rounds=1, warmup=0, isolate=False)
    torch_row, ref = run_bench(config).rows
    for row in (torch_row, ref):
        assert [len(t) for t in row.token_ids] == [3, 3]
        assert row.tokens_per_s == pytest.approx(6 / row.rounds[0].wall_s)
    assert torch_row.same_as_reference == 2


def test_every_row_runs_the_bench_options_not_the_models_decoding_defaults(tiny_gpt2_dir, tmp_path):
    """A model whose generation_config samples, penalizes repeats, bans repeated tokens and whose EOS is the
    token it picks first: both rows still run the bench's deterministic beam search with EOS banned until the
    last token, so each prompt gets exactly max_new_tokens tokens and transformers' are deploylm's."""
    import shutil

    import deploylm

    model = Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "eager"))
    first = deploylm.load(str(model), backend="torch").generate([PROMPTS[0]], num_beams=1, max_new_tokens=1)
    eos = first[0].sequences[0].token_ids[0]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({
        **generation, "eos_token_id": eos, "do_sample": True, "temperature": 5.0, "repetition_penalty": 5.0,
        "no_repeat_ngram_size": 1, "num_beams": 1, "length_penalty": -2.0}))
    config = BenchConfig(models=(str(model),), prompts=PROMPTS, batch_size=4, max_new_tokens=5, num_beams=2,
                         rounds=2, warmup=0, isolate=False)
    torch_row, ref = run_bench(config).rows
    assert [len(t) for t in ref.token_ids] == [5] * 4 and ref.deterministic
    assert torch_row.same_as_reference == 4


def test_an_artifact_whose_source_model_changed_has_no_transformers_reference(tiny_gpt2_dir, tmp_path):
    """The reference is the model the artifact was exported from: a model at that path with other weights
    would give ratios and token agreement against another model (parity refuses it the same way)."""
    import shutil

    from deploylm.artifact import weights_sha256
    from deploylm.profiles import load_profile

    origin = Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "gpt2"))
    artifact = tmp_path / "gpt2-fp32"
    artifact.mkdir()
    manifest = {"format_version": 1, "deploylm_version": "0", "created": "2026-01-01T00:00:00+00:00",
                "source": {"kind": "hf", "path": str(origin), "weights_sha256": weights_sha256(origin)},
                "profile": load_profile("fp32").to_dict(), "files": {}, "io": {}, "toolchain": {}}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    rows = plan_rows(BenchConfig(models=(str(artifact),)))
    assert [r.backend for r in rows] == ["onnx", "transformers"] and Path(rows[1].src) == origin
    with open(origin / "model.safetensors", "ab") as fh:      # other weights at the recorded path
        fh.write(b"\0")
    (row,) = plan_rows(BenchConfig(models=(str(artifact),)))
    assert row.reference is None and "changed since this artifact was exported" in row.notes[0]


def test_an_artifact_runs_on_the_backends_its_profile_was_exported_for(tiny_gpt2_dir, tmp_path):
    """`--backends onnx,trt` over an int8 (onnx) and a trt-fp16 artifact planned both on both: the int8 artifact's
    trt row failed the whole run (no engines), and the trt artifact's onnx row ran its graphs on ONNX Runtime
    labelled trt-fp16. Each now runs on its profile's backends; none of them listed is one line naming the profile."""
    from deploylm.profiles import load_profile

    def artifact(name: str) -> str:
        folder = tmp_path / f"gpt2-{name}"
        folder.mkdir()
        manifest = {"format_version": 1, "deploylm_version": "0", "created": "2026-01-01T00:00:00+00:00",
                    "source": {"kind": "hf", "path": str(tiny_gpt2_dir)}, "profile": load_profile(name).to_dict(),
                    "files": {}, "io": {}, "toolchain": {}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(folder)

    int8, trt, fp16 = artifact("int8"), artifact("trt-fp16"), artifact("fp16")
    rows = plan_rows(BenchConfig(models=(int8, trt, fp16), backends=("torch", "onnx", "trt"), reference=False))
    assert [(Path(r.src).name, r.backend, r.profile) for r in rows] == [
        ("gpt2-int8", "onnx", "int8"), ("gpt2-trt-fp16", "trt", "trt-fp16"), ("gpt2-fp16", "onnx", "fp16")]
    assert [r.backend for r in plan_rows(BenchConfig(models=(trt,), backends=(), reference=False))] == ["trt"]
    with pytest.raises(UsageError, match=r"none of --backends torch,onnx runs an exported artifact: its profile "
                                         r"trt-fp16 was exported for trt"):
        plan_rows(BenchConfig(models=(int8, trt), reference=False))


def test_a_deploylm_checkpoint_has_no_transformers_reference(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deploylm-lm"}')
    (row,) = plan_rows(BenchConfig(models=(str(tmp_path),)))
    assert row.backend == "torch" and row.reference is None
    assert "transformers cannot load" in row.notes[0]


def test_the_spread_note_shows_short_rounds_apart():
    """Rounds of 18 and 24 ms read as such, not as "0.02-0.02 s"."""
    from types import SimpleNamespace

    from deploylm.benchmarking.report import unsteady_note

    [note] = unsteady_note([SimpleNamespace(wall_s=w) for w in (0.0182, 0.0204, 0.0243)])
    assert note.startswith("its rounds spread 30% (0.0182-0.0243 s)")


def test_a_report_that_cannot_be_written_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    from deploylm.benchmarking.report import write_atomic

    def full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[:3])                                            # a part was written, then the disk filled
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteFailed, match=r"could not write .*report.json: No space left on device; nothing was "
                                          r"written") as failed:
        write_atomic(tmp_path / "report.json", b'{"rows": []}')
    assert failed.value.exit_code == 1                       # bench exits 1 on a full disk, as train does, not 2
    assert list(tmp_path.iterdir()) == []


def test_a_worker_runs_its_row_with_the_bench_threads_and_answers_each_message(tiny_gpt2_dir, monkeypatch):
    """The worker's main loop, here in this process: it sets torch's threads to --threads before loading, answers
    (load time, RSS), then one round per "run", then its peak RSS on "close"."""
    import multiprocessing

    import torch

    from deploylm.benchmarking import measure, worker

    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    monkeypatch.setattr(worker, "quiet_libraries_env", lambda: None)
    seen = []

    class Recording(FakeRunner):
        def run(self):
            seen.append(torch.get_num_threads())
            return super().run()

    monkeypatch.setattr(measure, "open_local_runner", lambda spec, workload: Recording(spec, [], [1.5], SAME))
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], threads=wanted)
    parent, child = multiprocessing.Pipe()
    parent.send("run")
    parent.send("close")
    try:
        worker.serve(child, plan_rows(config)[0], workload_of(config))
    finally:
        torch.set_num_threads(before)
    (kind, (load_s, rss)), (kind2, result), (kind3, peak) = parent.recv(), parent.recv(), parent.recv()
    assert (kind, kind2, kind3) == ("ok", "ok", "ok") and seen == [wanted]
    assert load_s == 0.5 and rss > 0 and result.wall_s == 1.5 and result.token_ids == SAME
    assert peak == pytest.approx(worker.peak_rss_mib(), rel=0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="spawn handing ru_maxrss on is Linux's")
def test_a_workers_peak_rss_is_its_own_not_the_callers(tmp_path):
    """A row's peak RSS is its worker's: on Linux a spawned process's ru_maxrss starts at its parent's peak, so a
    bench started from a process holding 2 GiB (a notebook with a model loaded) reported >= 2 GiB for every row."""
    script = tmp_path / "big_parent.py"
    script.write_text(
        "import multiprocessing\n"
        "from deploylm.benchmarking.worker import peak_rss_mib\n"
        "if __name__ == '__main__':\n"
        "    held = bytearray(300 * 2**20)\n"
        "    held[::4096] = b'x' * len(held[::4096])          # touched: resident\n"
        "    with multiprocessing.get_context('spawn').Pool(1) as pool:\n"
        "        print(peak_rss_mib(), pool.apply(peak_rss_mib))\n")
    run = _run_script(script)
    assert run.returncode == 0, run.stderr[-2000:]
    parent, child = map(float, run.stdout.split())
    assert parent > 300 and child < 200, (parent, child)


def _run_script(script: Path, *args: object) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` with this checkout importable, its output captured."""

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_quietly_with_a_bench_killed_outright(tiny_gpt2_dir, tmp_path):
    """`kill -9` of `deploylm bench`: its row worker used to go on (loading its model) and then print a
    BrokenPipeError traceback into the terminal; it now dies with the bench, silently."""
    script = tmp_path / "killed_bench.py"
    script.write_text(
        "import os, signal, sys\n"
        "from deploylm.bench import BenchConfig\n"
        "from deploylm.benchmarking.worker import ProcessRunner\n"
        "from deploylm.benchmarking.workload import plan_rows, workload_of\n"
        "if __name__ == '__main__':\n"
        "    config = BenchConfig(models=(sys.argv[1],), prompts=('hello world',), batch_size=1, max_new_tokens=2,\n"
        "                         rounds=1, warmup=0, reference=False)\n"
        "    runner = ProcessRunner(plan_rows(config)[0], workload_of(config))\n"
        "    runner.ready()\n"
        "    print(runner._proc.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = _run_script(script, tiny_gpt2_dir)   # returns once the worker, which shares its pipes, is gone too
    assert run.returncode == -9 and run.stdout.strip().isdigit(), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr[-2000:]


def test_a_script_without_a_main_guard_is_told_about_it_not_about_memory(tiny_gpt2_dir, tmp_path):
    """docs/bench.md's Python example saved as a script without `if __name__ == "__main__":`: each spawned worker
    imports the script again and dies at bootstrap (exit code 1). The error used to guess "out of memory?"; it now
    names the missing guard and the in-process alternative."""
    script = tmp_path / "unguarded_bench.py"
    script.write_text(
        "import sys\n"
        "from deploylm.bench import BenchConfig, run_bench\n"
        "run_bench(BenchConfig(models=(sys.argv[1],), prompts=('hello world',), max_new_tokens=2, rounds=1,\n"
        "                      warmup=0, reference=False))\n")
    run = _run_script(script, tiny_gpt2_dir)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("RuntimeError: the benchmark worker for "), run.stderr[-2000:]
    assert "died (exit code 1)" in last and "__name__" in last and "isolate=False" in last, last
    assert "out of memory" not in last


FITS_ALONE = "the quick brown fox " * 8 + "jumps over the dog"   # 126 tokens: 129 positions with 4 new ones
OVER_ALONE = "the quick brown fox " * 40                          # 560 tokens


@pytest.mark.parametrize("isolate, long, advice", [
    (False, FITS_ALONE, "(bench: --prompts FILE, --max-new-tokens N)"), (True, OVER_ALONE, "(bench: --prompts FILE)"),
    (False, OVER_ALONE, "(bench: --prompts FILE)")], ids=["fits-alone", "over-alone-isolated", "over-alone"])
def test_a_prompt_over_a_rows_window_names_the_row_and_what_bench_offers(tiny_gpt2_dir, isolate, long, advice):
    """Two rows, one prompt over tiny GPT-2's window of 128 with 4 new tokens: the error names the row (it named no
    model) and advises --prompts / --max-new-tokens, not generate's --truncation, which bench does not have. A prompt
    over the window by itself (160 tokens) is told to shorten it: --max-new-tokens was advised too, where fewer new
    tokens cannot help (as `deploylm parity` and the server no longer advise)."""
    from deploylm.errors import UsageError

    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=("hello world", long), max_new_tokens=4, rounds=1,
                         warmup=1, reference=False, isolate=isolate)
    with pytest.raises(UsageError) as raised:
        run_bench(config)
    message = str(raised.value)
    assert message.startswith(f"{tiny_gpt2_dir.name} [torch]: prompt 2 has "), message
    assert "truncation" not in message and message.endswith(advice), message


def test_a_refused_prompt_is_numbered_in_the_prompt_list_not_in_its_call(tiny_gpt2_dir):
    """--batch-size 2 over 3 prompts, the third over the window: it is the first prompt of the second call, and the
    error called it "prompt 1" (a short prompt of the user's file); it is prompt 3."""
    long = "the quick brown fox " * 40
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=("hello world", "beam search keeps", long),
                         batch_size=2, max_new_tokens=4, rounds=1, warmup=0, reference=False, isolate=False)
    assert config.prompt_numbers() == ((1, 2), (3,))
    assert BenchConfig(models=("m",), prompts=("a", "b"), batch_size=5).prompt_numbers() == ((1, 2, 1, 2, 1),)
    with pytest.raises(UsageError, match=rf"^{tiny_gpt2_dir.name} \[torch\]: prompt 3 has \d+ tokens"):
        run_bench(config)


@pytest.mark.parametrize("isolate", [False, True])
def test_a_workload_a_row_refuses_is_refused_before_any_warm_up(tiny_gpt2_dir, isolate):
    """A prompt a row cannot take (over the model's window; on a trt row, over the engine's lengths) was refused at
    that row's first call, after every row had loaded and the rows before it had decoded the whole workload (the
    first calls of this one too): now when the rows are loaded, before any decode."""
    long = "the quick brown fox " * 40
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=("hello world", "beam search keeps", long),
                         batch_size=2, max_new_tokens=4, rounds=1, warmup=1, reference=False, isolate=isolate)
    said = []
    with pytest.raises(UsageError, match=rf"^{tiny_gpt2_dir.name} \[torch\]: prompt 3 has \d+ tokens.*\(bench: "):
        run_bench(config, progress=said.append)
    assert not any(line.startswith(("warm-up", "round")) for line in said), said


def test_every_json_key_is_documented(tiny_gpt2_dir):
    """docs/bench.md names every key of the report and of its rows (load_s, rss_after_load_mib, wall_s, rss_scope ...
    were in the JSON and nowhere in the docs)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text()
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], rounds=1, warmup=0, reference=False)
    data = run_bench(config, open_runner=lambda spec, workload: FakeRunner(spec, [], [1.0], SAME)).to_dict()
    keys = set(data) | set(data["rows"][0])
    assert sorted(k for k in keys if f"`{k}`" not in docs and f"`{k}:" not in docs) == []


def test_a_killed_worker_is_named_with_its_signal():
    from deploylm.benchmarking.worker import _death

    assert _death(-9) == "was killed by signal 9 (the system's out-of-memory killer sends this one)"
    assert _death(-15) == "was killed by signal 15"


def test_decoder_share_is_the_median_over_rounds_not_the_mean():
    """Three rounds whose decoder shares are 10%, 20% and 60% of their loop time: the row says 20% (the
    median, as the docs say), not 30% (the mean, which one disturbed round would pull up)."""
    from deploylm.benchmarking.report import summarize
    from deploylm.benchmarking.workload import RowSpec

    def one(model_s):
        return RoundResult((CallTiming(2.0, 0.1, (0.1,) * 3, model_s, 1.0, steps=4),), ((1, 2, 3, 4),))

    row = summarize(RowSpec("m [torch]", "m", "torch", "fp32"), [one(0.9), one(0.8), one(0.4)], 0.5, None, None)
    assert row.decoder_pct == pytest.approx(20.0)
    assert row.decoder_ms_per_step == pytest.approx(1e3 * 0.2 / 4)


def test_rounds_spread_exactly_the_threshold_get_no_note():
    """The note is for a spread of MORE than UNSTEADY_SPREAD (docs/bench.md: "more than 10% of their median"):
    rounds of 9.5, 10 and 10.5 s spread exactly 10% and get none; a hair more gets one."""
    from deploylm.benchmarking.report import UNSTEADY_SPREAD, unsteady_note

    def rounds(*walls):
        return [RoundResult(calls=(CallTiming(w, 0.1, (), w, w, 4),), token_ids=((1,),)) for w in walls]

    assert (10.5 - 9.5) / 10.0 == UNSTEADY_SPREAD                         # exactly, in floating point
    assert unsteady_note(rounds(9.5, 10.0, 10.5)) == ()
    assert unsteady_note(rounds(9.5, 10.0, 10.5 + 1e-9))


def test_a_rows_peak_rss_is_the_one_its_worker_reports_not_the_parents():
    """ProcessRunner.close returns the peak RSS the worker sent back (its own ru_maxrss), which the row
    reports as peak_rss_mib; the parent's own peak (this pytest process) would be every row's same number."""
    from deploylm.benchmarking.worker import ProcessRunner, peak_rss_mib

    sent = []

    class Conn:
        def send(self, message):
            sent.append(message)

        def recv(self):
            return ("ok", 12345.0)

        def close(self):
            pass

    class Proc:
        alive = True

        def is_alive(self):
            return self.alive

        def join(self, timeout=None):
            self.alive = False

        def kill(self):
            self.alive = False

    runner = ProcessRunner.__new__(ProcessRunner)
    runner.label, runner._conn, runner._proc = "m [torch]", Conn(), Proc()
    assert peak_rss_mib() != 12345.0
    assert runner.close() == 12345.0 and sent == ["close"]


def test_a_rows_load_time_is_the_clock_around_opening_its_model(tiny_gpt2_dir):
    """load_s (in --json) is the time the runner took to open its model: both runners read the clock before
    and after loading (a fake clock that ticks once per read gives exactly 1 s)."""
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:1], batch_size=1, max_new_tokens=1)
    for make in (lambda clock: GeneratorRunner(str(tiny_gpt2_dir), "torch", workload_of(config), clock=clock),
                 lambda clock: TransformersRunner(str(tiny_gpt2_dir), workload_of(config), clock=clock)):
        ticks = iter(range(1000))
        assert make(lambda: float(next(ticks))).load_s == 1.0


def test_a_refusal_naming_a_prompt_mid_message_is_numbered_in_the_prompt_list_too():
    """The renumbering is errors.PROMPT_NUMBER's, as generate's and serve's: "... of prompt 2: ..." (a sampling
    refusal) gets the prompt list's number as a leading "prompt 2" does; a number outside the call stays."""
    from deploylm.benchmarking.measure import run_round

    def refusing(message):
        def call(texts):
            raise UsageError(message)
        return call

    second_call = (("c", "d"),), ((3, 4),)           # prompts 3 and 4 of the list, "prompt 1" and "2" of the call
    for message, said in (("nothing left to sample at generated token 3 of prompt 2: x",
                            "nothing left to sample at generated token 3 of prompt 4: x"),
                          ("prompt 1 has 300 tokens", "prompt 3 has 300 tokens"),
                          ("prompt 7 is odd", "prompt 7 is odd")):
        with pytest.raises(UsageError) as raised:
            run_round(refusing(message), *second_call)
        assert str(raised.value) == said


def test_a_row_without_a_reference_is_compared_with_the_first_row():
    """A row whose reference cannot be told (a deploylm checkpoint, an artifact whose original changed) is not
    known to be another model than the first row's: its "= #1" is counted (2/2 here), not "-"; a row of another
    model that has a reference of its own still gets "-"."""
    from deploylm.benchmarking.report import compare, summarize
    from deploylm.benchmarking.workload import RowSpec

    specs = [RowSpec("a [torch]", "a", "torch", "fp32", reference="transformers (a)"),
             RowSpec("ck [torch]", "ck", "torch", "fp32"),
             RowSpec("b [torch]", "b", "torch", "fp32", reference="transformers (b)"),
             RowSpec("transformers (a)", "a", "transformers", "fp32"),
             RowSpec("transformers (b)", "b", "transformers", "fp32")]
    rows = compare([summarize(s, [_round(1.0, SAME)], 0.5, None, None) for s in specs])
    assert [r.same_as_first for r in rows] == [2, 2, None, 2, None]
    assert [r.same_as_reference for r in rows] == [2, None, 2, 2, 2]


def test_the_report_tells_standard_prompts_and_the_load_average_at_the_end(tiny_gpt2_dir):
    """`workload.standard_prompts` is true for the standard prompts only (a --prompts file is another workload),
    and `machine` holds the load average at the end of the run next to the one at its start (docs/bench.md:
    "load average at start and end")."""
    def report(**change):
        config = BenchConfig(**{"models": (str(tiny_gpt2_dir),), "rounds": 1, "warmup": 0, "reference": False,
                                **change})
        return run_bench(config, open_runner=lambda spec, workload: FakeRunner(spec, [], [1.0], SAME)).to_dict()

    standard, custom = report(), report(prompts=PROMPTS[:3])
    assert (standard["workload"]["standard_prompts"], custom["workload"]["standard_prompts"]) == (True, False)
    assert {"load_average", "load_average_end"} <= set(standard["machine"])


def test_peak_and_current_rss_read_procs_fields_in_mib(monkeypatch):
    """peak_rss_mib is VmHWM (kB / 1024), not VmRSS; current_rss_mib is statm's resident pages × the page size
    (64 KiB pages on some arm64 kernels)."""
    import io

    from deploylm.benchmarking import worker

    files = {"/proc/self/status": "Name:\tpython\nVmPeak:\t 9999 kB\nVmRSS:\t 1024 kB\nVmHWM:\t 3072 kB\n",
             "/proc/self/statm": "5000 40 10 1 0 20 0\n"}
    monkeypatch.setattr(worker, "open", lambda path, *a, **k: io.StringIO(files[path]), raising=False)
    monkeypatch.setattr(worker.resource, "getpagesize", lambda: 65536)
    assert worker.peak_rss_mib() == 3.0
    assert worker.current_rss_mib() == 2.5


def test_a_worker_answers_its_rss_once_loaded_and_its_peak_at_close(tiny_gpt2_dir, monkeypatch):
    """After loading, the worker sends its RSS now (rss_after_load_mib); on "close" its peak (peak_rss_mib)."""
    import multiprocessing

    import torch

    from deploylm.benchmarking import measure, worker

    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    monkeypatch.setattr(worker, "quiet_libraries_env", lambda: None)
    monkeypatch.setattr(worker, "current_rss_mib", lambda: 111.0)
    monkeypatch.setattr(worker, "peak_rss_mib", lambda: 222.0)
    monkeypatch.setattr(measure, "open_local_runner", lambda spec, workload: FakeRunner(spec, [], [1.5], SAME))
    config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], threads=torch.get_num_threads())
    parent, child = multiprocessing.Pipe()
    parent.send("close")
    worker.serve(child, plan_rows(config)[0], workload_of(config))
    assert parent.recv() == ("ok", (0.5, 111.0)) and parent.recv() == ("ok", 222.0)


def test_only_a_refused_prompt_gets_the_bench_advice(tiny_gpt2_dir):
    """A row's refusal is prefixed with the row's label; "--prompts FILE, --max-new-tokens N" is advised for a
    refused prompt only, not for a refusal those flags cannot help with."""
    def refusal(message):
        class Refusing(FakeRunner):
            def run(self):
                raise UsageError(message)

        config = BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], rounds=1, warmup=0, reference=False)
        with pytest.raises(UsageError) as raised:
            run_bench(config, open_runner=lambda spec, workload: Refusing(spec, [], [1.0], SAME))
        return str(raised.value)

    label = f"{tiny_gpt2_dir.name} [torch]"
    assert refusal("prompt 2 has 300 tokens; with max_new_tokens=64 that needs 363 positions") == \
        f"{label}: prompt 2 has 300 tokens; with max_new_tokens=64 that needs 363 positions (bench: --prompts FILE, " \
        "--max-new-tokens N)"
    assert refusal("prompt 2 has 300 tokens, over the model's window of 128 before any new token: shorten it") == \
        f"{label}: prompt 2 has 300 tokens, over the model's window of 128 before any new token: shorten it " \
        "(bench: --prompts FILE)"
    assert refusal("the model has no tokenizer") == f"{label}: the model has no tokenizer"


def test_the_peak_rss_note_says_whether_rows_ran_in_worker_processes(tiny_gpt2_dir, monkeypatch):
    """Rows in worker processes: each row's peak RSS is its own (rss_scope "row", no process peak); rows in this
    process: the note says per-row peak RSS was not measured (rss_scope "process", the process's peak)."""
    from deploylm.benchmarking import runner

    monkeypatch.setattr(runner, "_default_opener",
                        lambda isolate: lambda spec, workload: FakeRunner(spec, [], [1.0] * 3, SAME))
    for isolate, scope, note in (
            (True, "row", "peak RSS: each row's own worker process (imports + model + its runs)"),
            (False, "process", "peak RSS per row not measured: every row ran in this process "
                               "(see process_peak_rss_mib)")):
        report = run_bench(BenchConfig(models=(str(tiny_gpt2_dir),), prompts=PROMPTS[:2], rounds=3, warmup=0,
                                       reference=False, isolate=isolate))
        assert report.rss_scope == scope and (report.process_peak_rss_mib is None) == isolate
        assert [n for n in report.notes if n.startswith("peak RSS")] == [note]


def test_a_program_read_from_stdin_is_told_it_cannot_spawn_workers(tiny_gpt2_dir):
    """docs/bench.md's Python example piped into `python -` (a heredoc): each spawned worker tried to run the
    caller's '<stdin>' again and died (FileNotFoundError), and the error advised an `if __name__` guard, which does
    not help there. It is now one UsageError before any worker starts, naming '<stdin>' and isolate=False."""
    program = ("import sys\n"
               "from deploylm.bench import BenchConfig, run_bench\n"
               "if __name__ == '__main__':\n"
               f"    run_bench(BenchConfig(models=({str(tiny_gpt2_dir)!r},), prompts=('hello world',),\n"
               "                          max_new_tokens=2, rounds=1, warmup=0, reference=False))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=120, env=env)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and last.startswith("deploylm.errors.UsageError: bench: "), run.stderr[-2000:]
    assert "'<stdin>'" in last and "isolate=False" in last, last
    assert "FileNotFoundError" not in run.stderr, run.stderr[-2000:]
