"""The terminal table of a BenchReport, and its bar chart (`--plot`)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from deploylm.errors import MissingDependencyError

COLUMNS = ("row", "profile", "tok/s", "× tf", "latency p50/p95 s", "step p50/p95 ms", "TTFT s",
           "decoder ms/step (%)", "peak RSS MiB", "= tf", "= #1")


def format_report(report: Any) -> str:
    """Header lines (machine, workload), one line per row, then the notes."""
    w, m = report.workload, report.machine
    lines = [f"deploylm bench  {report.date}  {m.get('cpu')}, {m.get('physical_cores')} cores, "
             f"{m.get('threads')} threads, load {m.get('load_average')}",
             f"workload: {_prompts(w['prompts'])} in {w['calls_per_round']} call(s) of batch {w['batch_size']}, "
             f"num_beams={w['options']['num_beams']}, exactly {w['options']['max_new_tokens']} new tokens, "
             f"{w['warmup']} warm-up + {w['rounds']} interleaved round(s), medians"]
    cells = [list(COLUMNS)] + [_cells(row) for row in report.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * n for n in widths))
    notes = list(report.notes) + [f"{row.label}: {n}" for row in report.rows for n in row.notes]
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _prompts(count: int) -> str:
    return f"{count} prompt{'' if count == 1 else 's'}"


def _cells(row: Any) -> list[str]:
    n = len(row.token_ids)
    return [row.label, row.profile, f"{row.tokens_per_s:.1f}", _num(row.ratio_vs_reference, "{:.2f}×"),
            f"{row.latency_p50_s:.2f}/{row.latency_p95_s:.2f}",
            "-" if row.step_p50_ms != row.step_p50_ms else f"{row.step_p50_ms:.1f}/{row.step_p95_ms:.1f}",   # NaN: no step after the first
            f"{row.ttft_s:.2f}", f"{row.decoder_ms_per_step:.2f} ({row.decoder_pct:.1f}%)",
            _num(row.peak_rss_mib, "{:.0f}"), _count(row.same_as_reference, n), _count(row.same_as_first, n)]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _count(value: int | None, total: int) -> str:
    return "-" if value is None else f"{value}/{total}"


def check_plot_path(path: str | Path) -> Path:
    """A writable .png path, and matplotlib importable: checked before anything runs."""
    from deploylm.fsutil import check_output_file

    out = check_output_file(path, "--plot", ".png")
    _figure_class()
    return out


def plot_report(report: Any, path: str | Path) -> Path:
    """Bars of tokens/s per row (references grey), each labelled with its ratio vs transformers (its tokens/s
    when it has no reference: --no-reference); PNG."""
    from deploylm.fsutil import write_atomic

    out = check_plot_path(path)
    rows = list(report.rows)
    fig = _figure_class()(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    colors = ["#9e9e9e" if r.is_reference else "#1f77b4" for r in rows]
    bars = ax.bar(range(len(rows)), [r.tokens_per_s for r in rows], color=colors)
    for bar, row in zip(bars, rows):
        label = f"{row.tokens_per_s:.1f}" if row.ratio_vs_reference is None else f"{row.ratio_vs_reference:.2f}×"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9)
    ax.set_xticks(range(len(rows)), [f"{r.label}\n{r.profile}" for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s (best sequence)")
    w = report.workload
    ax.set_title(f"{_prompts(w['prompts'])}, batch {w['batch_size']}, beams {w['options']['num_beams']}, "
                 f"{w['options']['max_new_tokens']} new tokens, {report.machine.get('threads')} threads", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_atomic(out, buffer.getvalue())


def _figure_class() -> Any:
    """matplotlib's Figure (drawn without pyplot: no display, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'deploylm[plot]'") from None
    return Figure
