"""PyTorch's 4-bit weight kernel with fp32 activations (`_weight_int4pack_mm_for_cpu`) against `F.linear`
on the same chain of 30 MLP-shaped layers (576 -> 3072 -> 576, SmolLM2-135M's) at 8 rows: could 4-bit
storage of weights that are exact on a 4-bit grid (a GGUF) speed greedy fp32 decoding (issue 7, ninth
session)? Interleaved runs, medians.

    .venv/bin/python benchmarks/int4pack_fp32.py [--runs 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

K, F, LAYERS, ROWS = 576, 1536, 30, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, packed = [], []
    for _ in range(LAYERS):
        for n, k in ((2 * F, K), (K, F)):
            dense.append(torch.randn(n, k))
            q = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), torch.rand(k // 32, n, 2)))
    x = torch.randn(ROWS, K)

    def run_dense() -> None:
        h = x
        for i in range(0, len(dense), 2):
            h = torch.tanh(torch.nn.functional.linear(h, dense[i])[:, :F])
            h = torch.nn.functional.linear(h, dense[i + 1])

    def run_packed() -> None:
        h = x
        for i in range(0, len(packed), 2):
            h = torch.tanh(torch.ops.aten._weight_int4pack_mm_for_cpu(h, packed[i][0], 32, packed[i][1])[:, :F])
            h = torch.ops.aten._weight_int4pack_mm_for_cpu(h, packed[i + 1][0], 32, packed[i + 1][1])

    run_dense(), run_packed()                                                   # warm-up
    times: dict[str, list[float]] = {"F.linear fp32": [], "int4pack fp32": []}
    for _ in range(args.runs):
        for name, fn in (("F.linear fp32", run_dense), ("int4pack fp32", run_packed)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
