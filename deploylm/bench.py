"""Benchmark harness (DESIGN.md §9): `run_bench(BenchConfig) -> BenchReport`, used by `deploylm bench`.

    from deploylm.bench import BenchConfig, run_bench
    report = run_bench(BenchConfig(models=("model.gguf", "export/model-fp32")))
    print(report.table()); report.write_json("bench.json"); plot_report(report, "bench.png")

The parts live in deploylm/benchmarking/: workload.py (standard prompts, config, rows), measure.py
(one timed round), worker.py (one process per row), runner.py (interleaving), report.py, table.py.
"""
from __future__ import annotations

from deploylm.benchmarking.measure import CallTiming, RoundResult
from deploylm.benchmarking.report import BenchReport, BenchRow
from deploylm.benchmarking.runner import run_bench
from deploylm.benchmarking.table import plot_report
from deploylm.benchmarking.workload import STANDARD_PROMPTS, BenchConfig, RowSpec

__all__ = ["BenchConfig", "BenchReport", "BenchRow", "CallTiming", "RoundResult", "RowSpec", "STANDARD_PROMPTS",
           "plot_report", "run_bench"]
