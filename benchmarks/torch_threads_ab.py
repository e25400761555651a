"""PyTorch's CPU threads, 2 against 1, for the torch backend (the measurement behind `--threads`, ninth
session): a small model's calls, interleaved, medians. Run it beside other work to see the slowdown
PyTorch's default thread count suffers on a busy machine.

    .venv/bin/python benchmarks/torch_threads_ab.py [--model runs/d2w] [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import deploylm

PROMPTS = ["4096", "12", "777", "31337"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/d2w")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    gen = deploylm.load(args.model, backend="torch")
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for n in (2, 1):
            torch.set_num_threads(n)
            start = time.perf_counter()
            gen.generate(PROMPTS, num_beams=4, max_new_tokens=16)
            times[n].append(time.perf_counter() - start)
    print("load average", os.getloadavg())
    for n in (2, 1):
        print(f"{n} thread(s): median call {statistics.median(times[n]):.4f} s")
    print(f"ratio 2/1: {statistics.median(times[2]) / statistics.median(times[1]):.2f}")


if __name__ == "__main__":
    main()
