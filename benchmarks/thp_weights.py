"""Does ONNX Runtime's fp32 decode step get faster with its weights on transparent huge pages? (issue 7, fifth session)

This machine has THP in `madvise` mode, so ONNX Runtime's weight buffers (its prepacked MatMul weights
are ~540 MB of malloc'd memory) sit on 4 KiB pages. The script opens the graph twice in one process; for
the second session only, it finds the anonymous mappings that session's creation added (/proc/self/maps)
and asks the kernel to back them with 2 MiB pages (madvise MADV_HUGEPAGE, then MADV_COLLAPSE, Linux ≥ 6.1).
Then it times decode steps of both sessions, interleaved, with the same inputs (benchmarks/onnx_step.py).

    .venv/bin/python benchmarks/thp_weights.py export/smollm2-fp32-v2/model.onnx [--rows 8] [--past 100] [--runs 40]

Only for measuring: collapsing whole mappings also backs their untouched parts, so the RSS grows.
What it showed (docs/benchmarks.md, "Issue 7, fifth session"): 1.1 GiB of AnonHugePages, the same
logits, and the same step time (27.19 vs 27.30 ms at 8 rows): the MatMul kernel, not the TLB, is the limit.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_step import bind, feeds_for, open_session  # noqa: E402

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
HUGE = 2 << 20


def anonymous_mappings(min_bytes: int = 4 << 20) -> set[tuple[int, int]]:
    """(start, end) of this process's writable anonymous mappings (and the heap) of at least min_bytes."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 or (len(fields) == 6 and fields[5] == "[heap]"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "w" in fields[1] and end - start >= min_bytes:
                found.add((start, end))
    return found


def anon_huge_kib() -> int:
    line = next(x for x in Path("/proc/self/smaps_rollup").read_text().splitlines() if x.startswith("AnonHugePages:"))
    return int(line.split()[1])


def collapse(mappings: set[tuple[int, int]]) -> int:
    """Back the 2 MiB-aligned part of each mapping with huge pages; returns how many refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    refused = 0
    for start, end in mappings:
        first, last = (start + HUGE - 1) & ~(HUGE - 1), end & ~(HUGE - 1)
        if last > first:
            libc.madvise(first, last - first, MADV_HUGEPAGE)
            refused += libc.madvise(first, last - first, MADV_COLLAPSE) != 0
    return refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--slack", type=int, default=16)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    plain = open_session(args.graph, 2)
    before = anonymous_mappings()
    huge = open_session(args.graph, 2)
    added = anonymous_mappings() - before
    refused = collapse(added)
    print(f"second session: {len(added)} new mappings, {sum(e - s for s, e in added) >> 20} MiB; "
          f"MADV_COLLAPSE refused on {refused}; AnonHugePages now {anon_huge_kib() >> 10} MiB")
    bound = [bind(s, feeds_for(s, args.rows, args.past, args.slack), args.rows, args.past) for s in (plain, huge)]
    for session, (binding, _) in zip((plain, huge), bound):
        session.run_with_iobinding(binding)   # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(args.runs):
        for i, session in enumerate((plain, huge)):
            start = time.perf_counter()
            session.run_with_iobinding(bound[i][0])
            times[i].append(time.perf_counter() - start)
    a, b = (statistics.median(t) for t in times)
    diff = float(np.abs(bound[0][1]["logits"] - bound[1][1]["logits"]).max())
    print(f"rows {args.rows}, past {args.past}: 4 KiB pages {a * 1e3:.2f} ms, huge pages {b * 1e3:.2f} ms "
          f"(x{a / b:.3f}); logits max|diff| {diff:.1e}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
