"""ONNX Runtime's threads sleeping or spinning between kernels (`deploylm.load(..., spin=...)`), on idle cores
and beside busy processes: the measurement behind the onnx backend's `spin` option (issue 7, sixth session).

    .venv/bin/python benchmarks/spin_ab.py [--artifact export/smollm2-fp32-v3] [--num-beams 1] [--calls 3]
                                           [--pairs 2] [--busy 0] [--spin-us 20 ...] [--unbounded]

Each configuration runs in a fresh process (a spinning pool must not steal the cores from the next one):
`deploylm.load(artifact, threads=2, spin=...)`, one warm-up call, then `--calls` calls of the bench
workload (the 8 standard prompts, one batch, exactly 64 new tokens); the median call is printed with the
process's CPU time per wall second. Configurations alternate (off, spin, ..., off, spin, ...) `--pairs`
times. `--busy N` starts N processes that spin in a Python loop for the whole run (other work on the
machine); `--spin-us` lists spin durations (the child patches `onnx_backend.SPIN_US`); `--unbounded` adds
ONNX Runtime's own default (spinning without a bound, also between runs); `--pin` adds each bounded
setting with its threads pinned (`-pin`: the calling thread on the first CPU, ORT's worker on the second
through `session.intra_op_thread_affinities`; torch's own pool is started before, so it keeps every CPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, statistics, sys, time
sys.path.insert(0, {root!r})
import deploylm
from deploylm.backends import onnx_backend
from deploylm.benchmarking.workload import STANDARD_PROMPTS

mode = {mode!r}
if mode.endswith("pin"):                      # ORT's worker on the second CPU, this thread on the first
    import onnxruntime as ort, torch
    first, second = sorted(os.sched_getaffinity(0))[:2]
    torch.ones(1 << 22).sum()                 # torch's own pool starts first and keeps every CPU
    init = ort.InferenceSession.__init__
    def pinned(self, path, sess_options=None, *args, **kwargs):
        sess_options.add_session_config_entry("session.intra_op_thread_affinities", str(second + 1))  # 1-based
        init(self, path, sess_options, *args, **kwargs)
    ort.InferenceSession.__init__ = pinned
    if mode.endswith("-callerpin"):
        os.sched_setaffinity(0, {{first}})
    mode = mode.split("-")[0]
if mode.startswith("spin"):
    onnx_backend.SPIN_US = int(mode[4:])
if mode == "unbounded":                       # ORT's default: spin, also between runs
    import onnxruntime as ort
    add = ort.SessionOptions.add_session_config_entry
    ort.SessionOptions.add_session_config_entry = lambda self, k, v: add(self, k, "1" if k.endswith("allow_spinning") else v)
model = deploylm.load({artifact!r}, backend="onnx", threads=2, spin=mode.startswith("spin"))
prompts = list(STANDARD_PROMPTS)
run = lambda: model.generate(prompts, num_beams={beams}, max_new_tokens=64, min_new_tokens=64)
run()
walls, cpu = [], os.times()
for _ in range({calls}):
    start = time.perf_counter(); run(); walls.append(time.perf_counter() - start)
after = os.times()
print(statistics.median(walls), (after.user + after.system - cpu.user - cpu.system) / sum(walls))
"""


def measure(mode: str, artifact: str, beams: int, calls: int) -> tuple[float, float]:
    code = CHILD.format(root=str(ROOT), mode=mode, artifact=artifact, beams=beams, calls=calls)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    wall, cpu = out.split()[-2:]
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(ROOT / "export" / "smollm2-fp32-v3"))
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning in a Python loop meanwhile")
    parser.add_argument("--spin-us", type=int, nargs="+", default=[20])
    parser.add_argument("--unbounded", action="store_true", help="also ONNX Runtime's unbounded spinning")
    parser.add_argument("--pin", action="store_true", help="also each bounded setting with its threads pinned")
    args = parser.parse_args()
    bounded = ["off", *(f"spin{us}" for us in args.spin_us)]
    modes = [*bounded, *(["unbounded"] if args.unbounded else []), *([f"{m}-{p}" for p in ("pin", "callerpin") for m in bounded] if args.pin else [])]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(0.5 if busy else 0)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for _ in range(args.pairs):
            for mode in modes:
                results[mode].append(measure(mode, args.artifact, args.num_beams, args.calls))
    finally:
        for proc in busy:
            proc.kill()
    print(f"{Path(args.artifact).name}, num_beams {args.num_beams}, {args.busy} busy process(es), "
          f"{args.pairs} x {args.calls} calls per configuration, load {os.getloadavg()[0]:.1f}")
    base = statistics.median(w for w, _ in results["off"])
    for mode, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        print(f"  {mode:14s} median call {wall:6.3f} s  x{base / wall:4.2f} vs off  "
              f"(runs {' '.join(f'{w:.2f}' for w, _ in runs)}; CPU s per wall s {statistics.median(c for _, c in runs):.2f})")


if __name__ == "__main__":
    main()
