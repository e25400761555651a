"""The benchmark report: one row per configuration, medians over its rounds, JSON and a terminal table.

Every summary number is derived from the recorded rounds (kept in the report): tokens/s, wall time,
time to first token and decoder overhead are medians over rounds; latency and step-latency
percentiles are over every call / every step of every round.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploylm.benchmarking.measure import RoundResult
from deploylm.fsutil import json_finite, write_atomic

FORMAT = "deploylm-bench/1"
# Rounds of one row whose wall times spread more than this (max - min, over their median) get a note:
# on a quiet machine the rounds of a row stay within a few percent; a wider spread means other work
# took the cores in some rounds, and ratios from that run are less certain than its medians suggest.
UNSTEADY_SPREAD = 0.10


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class BenchRow:
    """One configuration: what ran, its rounds, and the summary derived from them."""

    label: str
    src: str
    backend: str
    profile: str
    reference: str | None               # label of the reference row; None: none (see notes)
    notes: tuple[str, ...]
    rounds: tuple[RoundResult, ...]
    load_s: float
    rss_after_load_mib: float | None    # None when rows share one process
    peak_rss_mib: float | None          # the row's worker process; None when rows share one process
    tokens_per_s: float                 # median over rounds of (best-sequence tokens / wall time)
    wall_s: float                       # median over rounds
    latency_p50_s: float                # per request (= its call's wall time), over every round
    latency_p95_s: float
    step_p50_ms: float                  # every decode step after the first, over every round
    step_p95_ms: float
    ttft_s: float                       # median over calls: call start -> first token chosen
    decoder_ms_per_step: float          # median over rounds: time outside model calls per step
    decoder_pct: float                  # median over rounds: that time as % of the decode loop's time
    deterministic: bool                 # every round produced the same tokens
    ratio_vs_reference: float | None = None   # tokens/s ÷ the reference row's
    same_as_reference: int | None = None      # prompts whose best sequence equals the reference's
    same_as_first: int | None = None          # ... equals the first row's
    spin: bool = False                        # onnx: ONNX Runtime threads spinning between kernels

    @property
    def is_reference(self) -> bool:
        return self.backend == "transformers"

    @property
    def token_ids(self) -> tuple[tuple[int, ...], ...]:
        return self.rounds[-1].token_ids if self.rounds else ()

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**data, "notes": list(self.notes), "rounds": [r.to_dict() for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchRow":
        nan = {k: float("nan") for k in NAN_AS_NULL if data.get(k, 0.0) is None}   # written as null
        return cls(**{**data, **nan, "notes": tuple(data["notes"]),
                      "rounds": tuple(RoundResult.from_dict(r) for r in data["rounds"])})


# Summaries that are NaN when there is nothing to summarize (step percentiles of a one-token run: no step
# after the first); JSON has no NaN, so they are written as null and read back as NaN.
NAN_AS_NULL = ("tokens_per_s", "wall_s", "latency_p50_s", "latency_p95_s", "step_p50_ms", "step_p95_ms",
               "ttft_s", "decoder_ms_per_step", "decoder_pct")


def summarize(spec: Any, rounds: list[RoundResult], load_s: float, rss_after_load_mib: float | None,
              peak_rss_mib: float | None) -> BenchRow:
    """A BenchRow from a RowSpec and its measured rounds (comparisons are filled in by `compare`)."""
    latencies = [c.wall_s for r in rounds for c in r.calls for _ in range(c.requests)]
    steps = [s * 1e3 for r in rounds for c in r.calls for s in c.step_s]
    return BenchRow(
        label=spec.label, src=spec.src, backend=spec.backend, profile=spec.profile, reference=spec.reference,
        notes=tuple(spec.notes) + unsteady_note(rounds), rounds=tuple(rounds), load_s=load_s, rss_after_load_mib=rss_after_load_mib,
        peak_rss_mib=peak_rss_mib,
        tokens_per_s=statistics.median(r.tokens_per_s for r in rounds),
        wall_s=statistics.median(r.wall_s for r in rounds),
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        step_p50_ms=percentile(steps, 50), step_p95_ms=percentile(steps, 95),
        ttft_s=statistics.median(c.ttft_s for r in rounds for c in r.calls),
        decoder_ms_per_step=statistics.median(r.decoder_ms_per_step for r in rounds),
        decoder_pct=statistics.median(r.decoder_pct for r in rounds),
        deterministic=len({r.token_ids for r in rounds}) == 1, spin=spec.spin)


def unsteady_note(rounds: list[RoundResult]) -> tuple[str, ...]:
    """A note when the rounds' wall times spread more than UNSTEADY_SPREAD of their median, else ()."""
    walls = [r.wall_s for r in rounds]
    median = statistics.median(walls) if len(walls) > 1 else 0.0
    if median <= 0:
        return ()
    spread = (max(walls) - min(walls)) / median
    if spread <= UNSTEADY_SPREAD:
        return ()
    return (f"its rounds spread {spread:.0%} ({min(walls):.3g}-{max(walls):.3g} s): other work took the cores "
            f"in some rounds, so its ratios are less certain; re-run on a quieter machine to confirm",)


def compare(rows: list[BenchRow]) -> list[BenchRow]:
    """Fill in the ratio vs each row's reference and the token agreement with it and with the first row."""
    by_label = {r.label: r for r in rows}
    first = next((r for r in rows if not r.is_reference), rows[0] if rows else None)
    out = []
    for row in rows:
        ref = row if row.is_reference else by_label.get(row.reference or "")
        out.append(dataclasses.replace(
            row,
            ratio_vs_reference=None if ref is None else row.tokens_per_s / ref.tokens_per_s,
            same_as_reference=None if ref is None else _same(row, ref),
            same_as_first=None if first is None or _other_model(row, first) else _same(row, first)))
    return out


def _other_model(a: BenchRow, b: BenchRow) -> bool:
    """Whether a and b come from different original models, as their transformers references tell (a reference
    row stands for its own model; without references it cannot be told, and the rows are compared)."""
    origin_a, origin_b = (r.label if r.is_reference else r.reference for r in (a, b))
    return origin_a is not None and origin_b is not None and origin_a != origin_b


def _same(a: BenchRow, b: BenchRow) -> int:
    return sum(x == y for x, y in zip(a.token_ids, b.token_ids))


@dataclass(frozen=True)
class BenchReport:
    """A whole `deploylm bench` run."""

    date: str
    machine: dict[str, Any]
    versions: dict[str, Any]
    workload: dict[str, Any]
    rows: tuple[BenchRow, ...]
    rss_scope: str                      # "row" (one worker process per row) or "process" (shared)
    process_peak_rss_mib: float | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "date": self.date, "machine": self.machine, "versions": self.versions,
                "workload": self.workload, "rss_scope": self.rss_scope,
                "process_peak_rss_mib": self.process_peak_rss_mib, "notes": list(self.notes),
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchReport":
        return cls(date=data["date"], machine=data["machine"], versions=data["versions"],
                   workload=data["workload"], rows=tuple(BenchRow.from_dict(r) for r in data["rows"]),
                   rss_scope=data["rss_scope"], process_peak_rss_mib=data["process_peak_rss_mib"],
                   notes=tuple(data["notes"]))

    def json_text(self) -> str:
        """The report as strict JSON (no NaN/Infinity: null), indented."""
        return json.dumps(json_finite(self.to_dict()), indent=2, allow_nan=False)

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically (temporary file, then rename)."""
        return write_atomic(Path(path), (self.json_text() + "\n").encode())

    def table(self) -> str:
        from deploylm.benchmarking.table import format_report

        return format_report(self)

