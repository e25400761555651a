"""How a search step sets torch's thread count: `torch_threads` (torch.set_num_threads, which also moves the
process's default for threads that start meanwhile) against `own_threads` (the calling thread's OpenMP count
only; deploylm/decoding/threads.py), around the beam step's full-vocabulary block (log-softmax of [32, 49152]
into a reused buffer, then the top 2 x beams of each prompt's 4 x 49152 scores) and its one-thread small ops.
Interleaved, medians of `--rounds` steps after 10 warm-up steps each, for the block on 1 and on 2 threads.

    .venv/bin/python benchmarks/step_threads_ab.py [--rounds 300]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deploylm.decoding import threads as threads_module
from deploylm.decoding.threads import own_threads, torch_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits, scores = torch.randn(32, 49152), torch.randn(32, 1)   # 8 prompts x 4 beams, SmolLM2's vocabulary
    out = torch.empty_like(logits)

    def step(setter, threads: int) -> float:
        start = time.perf_counter()
        with setter(1):
            running = scores + 0.0
            with setter(threads):
                torch.log_softmax(logits, -1, out=out)
                (out + running).view(8, -1).topk(8, dim=-1)
        return time.perf_counter() - start

    per_thread = threads_module._omp_set_num_threads() is not None
    print(f"torch {torch.__version__}; own_threads sets {'OpenMP' if per_thread else 'torch'}'s count "
          f"({'this thread only' if per_thread else 'no OpenMP setter found: the same as torch_threads'})")
    for threads in (1, 2):
        times: dict[str, list[float]] = {"torch_threads": [], "own_threads": []}
        for _ in range(10):
            step(torch_threads, threads), step(own_threads, threads)
        for _ in range(args.rounds):
            times["torch_threads"].append(step(torch_threads, threads))
            times["own_threads"].append(step(own_threads, threads))
        a, b = (statistics.median(times[k]) * 1e3 for k in ("torch_threads", "own_threads"))
        print(f"block on {threads} thread(s): torch_threads {a:.3f} ms, own_threads {b:.3f} ms per step "
              f"(torch_threads / own_threads = {a / b:.3f})")


if __name__ == "__main__":
    main()
