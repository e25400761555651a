"""One decode step of an exported decoder-only graph, A/B interleaved: the micro-benchmark of issue 7.

    .venv/bin/python benchmarks/onnx_step.py GRAPH.onnx [GRAPH2.onnx ...] [--rows 32] [--past 100]
                                             [--runs 30] [--threads 2] [--profile]

Every graph gets the same inputs: `rows` rows (the first quarter left-padded by up to 40 tokens), a
random past of length `past`, one new token. Sessions use the backend's options (ORT_ENABLE_ALL,
`threads` intra-op threads, spinning off). Runs are interleaved (A, B, A, B, ...) after a warm-up;
the median of each is printed with the ratio to the first graph and the largest difference of the
logits and present K/V from the first graph's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def feeds_for(session, rows: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step: ids [R,1], mask [R,P+1] (some rows left-padded), positions, past."""
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, past + 1), dtype=np.int64)
    for r in range(rows // 4):
        mask[r, : (r * 7) % 40] = 0
    positions = (mask.sum(-1, keepdims=True) - 1).astype(np.int64)  # [R, 1]
    feeds = {"input_ids": rng.integers(0, 250, (rows, 1), dtype=np.int64), "attention_mask": mask,
             "position_ids": positions}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values."):
            _, heads, _, head_dim = arg.shape
            feeds[arg.name] = rng.standard_normal((rows, heads, past, head_dim), dtype=np.float32)
    return feeds


def open_session(path: str, threads: int):
    from deploylm.backends.onnx_backend import create_session

    return create_session(Path(path), threads=threads)


def profile_ops(path: str, feeds: dict[str, np.ndarray], threads: int, runs: int = 5) -> None:
    """ORT's own profile of `runs` steps of one graph: time per op type, largest first."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling, options.log_severity_level = True, 3
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / (runs + 1)
    total = sum(by_op.values())
    print(f"  ORT profile of {path} (ms per step, kernels only; total {total:.1f}):")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {op:<34} {ms:7.1f}  {100 * ms / total:4.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also print ORT's per-op profile of each graph")
    args = parser.parse_args()
    sessions = [open_session(g, args.threads) for g in args.graphs]
    feeds = feeds_for(sessions[0], args.rows, args.past)
    outputs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for s in sessions]  # warm-up
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    print(f"rows {args.rows}, past {args.past}, {args.runs} interleaved runs, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for graph, t, out in zip(args.graphs, times, outputs):
        diff = max(float(np.abs(out[k] - outputs[0][k]).max()) for k in outputs[0])
        print(f"  {graph}: median {statistics.median(t) * 1e3:.1f} ms (min {min(t) * 1e3:.1f}), "
              f"x{base / statistics.median(t):.2f} vs first, max |diff| {diff:.2e}")
    for graph in args.graphs if args.profile else ():
        profile_ops(graph, feeds, args.threads)


if __name__ == "__main__":
    main()
