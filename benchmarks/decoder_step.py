"""Decoder step micro-benchmark (issue 7): one beam-search step of the shared decoder, no model.

A fake backend hands `BeamSearch.step` random fp32 logits [32, 49152] (8 inputs x 4 beams, SmolLM2's
vocabulary, a 20-token prompt, 64 new tokens); the step is timed alone. Two implementations of
deploylm/decoding/beam.py run interleaved search by search: BEFORE (a file, default: the committed
HEAD version via `git show`) and AFTER (the working tree; its steps run as the tree's decode loop runs
them: small ops on one torch thread, the full-vocabulary block on the count deploylm/decoding/threads.py
measures faster; BEFORE runs with the same StepThreads, so a HEAD without the vocab block gets one thread). Reports the median and minimum ms per step
and the decoder's share of a step, decoder / (decoder + backend), at `--backend-ms` (70.8 ms: the ORT
time of the onnx fp32 beam-4 bench, 4.53 s / 64 steps, docs/benchmarks.md).

--bench-options: the searches use `deploylm bench`'s options (min_new_tokens = max_new_tokens, so EOS is
banned by the MinNewTokens processor every step), BEFORE with HEAD's processors.py (or --before-processors)
and AFTER with the working tree's; otherwise no processors.

    .venv/bin/python benchmarks/decoder_step.py [--rounds 20] [--before PATH] [--threads 2] [--bench-options]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_beam(path: Path, name: str):
    """Import a beam.py file as module `name` (it imports deploylm's options/processors as usual)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def committed_beam(tmp: Path, name: str = "beam.py") -> Path:
    """deploylm/decoding/<name> as committed in HEAD, written to `tmp`."""
    text = subprocess.run(["git", "show", f"HEAD:deploylm/decoding/{name}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    out = tmp / name.replace(".py", "_before.py")
    out.write_text(text)
    return out


def one_search(module, logits: list[torch.Tensor], prompt: torch.Tensor, new_tokens: int,
               processors=None, step_threads: bool = True) -> list[float]:
    """Seconds of every step of one beam search fed `logits` in turn (no EOS: runs all steps).
    processors: a module with MinNewTokens/ProcessorList (bench options: EOS banned every step), or None."""
    from deploylm.decoding.options import DecodingOptions
    from deploylm.decoding.processors import ProcessorList

    options = DecodingOptions(num_beams=4, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens if processors is not None else 0)
    chain = ProcessorList() if processors is None else processors.ProcessorList(
        [processors.MinNewTokens(prompt.shape[1], new_tokens, (0,))])
    search = module.BeamSearch(options, prompt, (0,), 0, chain)
    from contextlib import nullcontext

    from deploylm.decoding.threads import for_logits

    threads = for_logits(logits[0]) if step_threads else None
    if threads is not None:
        search.vocab_threads = threads.vocab
    times, i = [], 0
    while not search.all_done:
        start = time.perf_counter()
        with threads.step() if threads is not None else nullcontext():  # as the tree's decode loop runs a step
            search.step(logits[i % len(logits)])
        times.append(time.perf_counter() - start)
        i += 1
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="searches per implementation")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend-ms", type=float, default=70.8)
    parser.add_argument("--before", type=Path, help="beam.py to compare against (default: git HEAD)")
    parser.add_argument("--bench-options", action="store_true",
                        help="min_new_tokens = max_new_tokens, as deploylm bench (the MinNewTokens processor runs)")
    parser.add_argument("--before-processors", type=Path, help="processors.py for BEFORE (default: git HEAD)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, K, V, P = 8, 4, 49152, 20
    logits = [torch.randn(B * K, V, generator=gen) * 3 for _ in range(8)]            # [R, V] fp32
    logits = [x.masked_fill(torch.arange(V) == 0, -1e4) for x in logits]              # token 0 = EOS, never hit
    prompt = torch.randint(1, V, (B, P), generator=gen)                                # [B, P]
    with tempfile.TemporaryDirectory() as tmp:
        before = load_beam(args.before or committed_beam(Path(tmp)), "beam_before")
        after = load_beam(ROOT / "deploylm" / "decoding" / "beam.py", "beam_after")
        procs = {"before": None, "after": None}
        if args.bench_options:
            import deploylm.decoding.processors as tree_processors

            procs = {"before": load_beam(args.before_processors or committed_beam(Path(tmp), "processors.py"),
                                         "processors_before"), "after": tree_processors}
        impls = {"before": before, "after": after}
        for name, module in impls.items():                                             # warm-up
            one_search(module, logits, prompt, 8, procs[name], True)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, module in impls.items():
                times[name] += one_search(module, logits, prompt, args.new_tokens, procs[name], True)
    report = {}
    for name, ts in times.items():
        med = 1000 * statistics.median(ts)
        report[name] = {"median_ms": round(med, 3), "min_ms": round(1000 * min(ts), 3), "steps": len(ts),
                        "share_pct": round(100 * med / (med + args.backend_ms), 2)}
        print(f"{name:>6}: median {med:.3f} ms/step, min {1000 * min(ts):.3f} ms, {len(ts)} steps, "
              f"share {report[name]['share_pct']:.2f}% at backend {args.backend_ms} ms")
    print(f"speed-up (median): {report['before']['median_ms'] / report['after']['median_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
