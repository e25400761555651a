"""One decode step of an exported decoder-only graph, A/B interleaved: the micro-benchmark of issue 7.

    .venv/bin/python benchmarks/onnx_step.py GRAPH.onnx[@SLACK] [GRAPH2.onnx[@SLACK] ...] [--rows 32]
                                             [--past 100] [--slack 0] [--runs 30] [--threads 2] [--profile]
                                             [--beams 4 --prompt 33]

Every graph gets the same inputs: `rows` rows (the first quarter left-padded by up to 40 tokens), a
random past of length `past`, one new token. Graphs of the "append" and "shared-prompt" KV layouts
(io_spec.KV_APPEND, KV_SHARED) get that past inside a buffer of `past + slack` positions (the unwritten ones zero and masked, as
the backend's arena feeds them; `GRAPH@SLACK` sets it per graph, else `--slack`); "concat" graphs
get it as is. With `--beams B --prompt L`, rows come in blocks of B sharing their first L past positions,
which shared-prompt graphs get once per block as their prompt K/V (`--prompt 0`: an empty prompt, as the
backend feeds greedy decoding). As in the backend, inputs and outputs are bound once (IO binding) to preallocated
arrays, so no run allocates its outputs. Sessions use the backend's options
(ORT_ENABLE_ALL, `threads` intra-op threads, spinning off). Runs are interleaved (A, B, A, B, ...)
after a warm-up; the median of each is printed with the ratio to the first graph and the largest
difference of the logits and the new position's K/V from the first graph's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def layout(session) -> str:
    from deploylm.export import io_spec

    return io_spec.kv_layout([o.name for o in session.get_outputs()], [i.name for i in session.get_inputs()])


def is_append(session) -> bool:
    """Graphs that read a past buffer with unwritten room (the append and shared-prompt layouts)."""
    from deploylm.export import io_spec

    return layout(session) in (io_spec.KV_APPEND, io_spec.KV_SHARED)


def feeds_for(session, rows: int, past: int, slack: int = 0, seed: int = 0, beams: int = 1,
              prompt: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step: ids [R,1], mask [R,P+1] (some prompts left-padded), positions, past
    (append layout: a [R, H, P + slack, Dh] buffer, mask [R, P + slack + 1]). Rows come in blocks of
    `beams` rows of one prompt: the first `prompt` past positions are the same in a block. Shared-prompt
    graphs get those once per block as their prompt K/V [R / beams, H, prompt, Dh], and the rest in the
    buffer; the mask is the same for every layout (prompt, buffer, new)."""
    from deploylm.export import io_spec

    rng = np.random.default_rng(seed)
    mask = np.ones((rows, past + 1), dtype=np.int64)
    for r in range(rows // 4):
        mask[r, : (r // beams * beams * 7) % 40] = 0
    positions = (mask.sum(-1, keepdims=True) - 1).astype(np.int64)  # [R, 1]
    append, shared = is_append(session), layout(session) == io_spec.KV_SHARED
    if append and slack:
        mask = np.concatenate([mask[:, :past], np.zeros((rows, slack), np.int64), mask[:, past:]], axis=1)
    feeds = {"input_ids": rng.integers(0, 250, (rows, 1), dtype=np.int64), "attention_mask": mask,
             "position_ids": positions}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values."):
            _, heads, _, head_dim = arg.shape
            kv = rng.standard_normal((rows, heads, past, head_dim), dtype=np.float32)
            kv[:, :, :prompt] = np.repeat(kv[::beams, :, :prompt], beams, axis=0)     # one prompt per block
            if shared:
                feeds[arg.name.replace("past_key_values.", "prompt_key_values.")] = np.ascontiguousarray(kv[::beams, :, :prompt])
                kv = kv[:, :, prompt:]
            if append and slack:
                kv = np.concatenate([kv, np.zeros((rows, heads, slack, head_dim), np.float32)], axis=2)
            feeds[arg.name] = np.ascontiguousarray(kv)
    return feeds


def bind(session, feeds: dict[str, np.ndarray], rows: int, past: int):
    """IO binding of `feeds` and of preallocated outputs (logits, present [R,H,P+1,Dh] or new K/V [R,H,1,Dh])."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    outputs = {}
    for arg in session.get_outputs():
        if arg.name == "logits":
            shape = (rows, 1, arg.shape[-1])
        else:
            shape = (rows, arg.shape[1], 1 if arg.name.startswith("new_key_values.") else past + 1, arg.shape[3])
        outputs[arg.name] = np.empty(shape, dtype=np.float32)
        value = ort.OrtValue.ortvalue_from_numpy(outputs[arg.name])
        binding.bind_output(arg.name, "cpu", 0, np.float32, shape, value.data_ptr())
    return binding, outputs


def comparable(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """logits and the new position's K/V under layout-independent names."""
    out = {}
    for name, value in outputs.items():
        if name.startswith(("present.", "new_key_values.")):
            out["kv." + name.split(".", 1)[1]] = value[:, :, -1:]
        else:
            out[name] = value
    return out


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
    with tempfile.TemporaryDirectory() as tmp:  # ORT writes its profile into a file: not into the checkout
        options.profile_file_prefix = str(Path(tmp) / "ort_profile")
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = _kernel_kind(e.get("args", {}))
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / (runs + 1)
    total = sum(by_op.values())
    print(f"  ORT profile of {path} (ms per step, kernels only; total {total:.1f}):")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:16]:
        print(f"    {op:<40} {ms:7.1f}  {100 * ms / total:4.1f}%")


def _kernel_kind(args: dict) -> str:
    """The op type; a MatMul by its shapes: `MatMul 576->1536` for a weight (one 2-D operand the profile
    does not list, being prepacked), `MatMul attention` for a product of two activations."""
    op = args.get("op_name", "?")
    if op not in ("MatMul", "FusedMatMul"):
        return op
    inputs = [next(iter(t.values())) for t in args.get("input_type_shape", [])]
    outputs = [next(iter(t.values())) for t in args.get("output_type_shape", [])]
    if len(inputs) == 1 and outputs:
        return f"{op} {inputs[0][-1]}->{outputs[0][-1]}"
    return f"{op} attention"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slack", type=int, default=0,
                        help="append-layout graphs: unwritten (masked) positions in the past buffer")
    parser.add_argument("--beams", type=int, default=1, help="rows per prompt")
    parser.add_argument("--prompt", type=int, default=0,
                        help="past positions that are the prompt's (shared-prompt graphs hold them once per prompt)")
    parser.add_argument("--profile", action="store_true", help="also print ORT's per-op profile of each graph")
    args = parser.parse_args()
    slacks = [int(g.rpartition("@")[2]) if "@" in g else args.slack for g in args.graphs]
    paths = [g.rpartition("@")[0] if "@" in g else g for g in args.graphs]
    sessions = [open_session(p, args.threads) for p in paths]
    feeds = [feeds_for(s, args.rows, args.past, slack, beams=args.beams, prompt=args.prompt)
             for s, slack in zip(sessions, slacks)]
    bound = [bind(s, f, args.rows, args.past) for s, f in zip(sessions, feeds)]
    for s, (binding, _) in zip(sessions, bound):
        s.run_with_iobinding(binding)  # warm-up
    outputs = [comparable(out) for _, out in bound]
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run_with_iobinding(bound[i][0])
            times[i].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    print(f"rows {args.rows}, past {args.past}, {args.runs} interleaved runs, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for graph, t, out in zip(args.graphs, times, outputs):
        diff = max(float(np.abs(out[k] - outputs[0][k]).max()) for k in outputs[0])
        print(f"  {graph}: median {statistics.median(t) * 1e3:.1f} ms (min {min(t) * 1e3:.1f}), "
              f"x{base / statistics.median(t):.2f} vs first, max |diff| {diff:.2e}")
    for graph, f in zip(paths, feeds) if args.profile else ():
        profile_ops(graph, f, args.threads)


if __name__ == "__main__":
    main()
