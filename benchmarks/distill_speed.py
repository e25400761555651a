"""Decoding speed of a distilled student against its teacher, through the project's shared decoder.

Both models are opened with `deploylm.load(path, backend="torch")` in this one process and decode
the teacher's test-split sources (the task and split seed recorded in the teacher's
training_state.pt) with beam search. Rounds interleave the two (teacher, student, teacher, ...), so a
machine shared with other work slows both alike; the reported speed-up is the ratio of the median
round times (wall clock; the process's CPU time is reported beside it, which the load disturbs
less). Exact match of both (beam search, same decodes) and the number of generated tokens are
printed too, so a faster student that merely stops early is visible, and so are the decoder steps
each model needed (a less confident student keeps beams alive longer: more steps for the same
outputs) and the split of each round between backend calls (the model) and the shared decoder
(beam bookkeeping, the same work for both models).

The deployment path: `--backend onnx --teacher-model A --student-model B` times the exported
artifacts of both (e.g. `deploylm export --model runs/d2w --profile fp32 --out A`) on the same
workload; --teacher/--student still name the checkpoints (task, split, layer counts).

    .venv/bin/python benchmarks/distill_speed.py --teacher runs/d2w --student runs/d2w-half
        [--examples 200] [--rounds 3] [--num-beams 4] [--batch-size 32] [--threads 1] [--json FILE]
        [--backend torch|onnx] [--teacher-model DIR] [--student-model DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deploylm  # noqa: E402
from deploylm.decoding.search import SearchStats  # noqa: E402
from deploylm.models.checkpoint import load_config, load_generation_config, load_training_state  # noqa: E402
from deploylm.training.metrics import exact_match  # noqa: E402
from deploylm.training.tasks import task_splits  # noqa: E402


def test_examples(teacher: Path, limit: int) -> tuple[list[str], list[str]]:
    """(sources, references): the first `limit` test examples of the teacher's own task and split seed."""
    identity = (load_training_state(teacher) or {}).get("identity", {})
    if not identity.get("task"):
        raise SystemExit(f"{teacher}: no built-in task recorded in training_state.pt")
    test = task_splits(identity["task"], int(identity.get("seed", 0))).test[:limit]
    return [ex.source for ex in test], [ex.target for ex in test]


def decode_all(gen: Any, sources: list[str], batch_size: int, num_beams: int,
               max_new_tokens: int) -> tuple[float, float, list[str], int, SearchStats]:
    """(wall seconds, CPU seconds of this process, best texts, generated tokens, search stats summed
    over the calls) for every source, in batches of `batch_size`."""
    texts, tokens, total = [], 0, SearchStats()
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(sources), batch_size):
        stats = SearchStats()
        results = gen.generate(sources[i:i + batch_size], num_beams=num_beams, max_new_tokens=max_new_tokens,
                               stats=stats)
        total.steps += stats.steps
        total.backend_calls += stats.backend_calls
        total.backend_seconds += stats.backend_seconds
        total.total_seconds += stats.total_seconds
        for result in results:
            texts.append(result.sequences[0].text)
            tokens += len(result.sequences[0].token_ids)
    return time.perf_counter() - started, time.process_time() - cpu, texts, tokens, total


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def depth(path: Path) -> str:
    config = load_config(path)
    return f"{config.n_encoder_layers}+{config.n_decoder_layers}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=200, help="test examples decoded per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the teacher's generation_config")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate() call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"], help="backend both models run on")
    parser.add_argument("--teacher-model", type=Path, default=None,
                        help="what to time for the teacher (e.g. its ONNX artifact). Default: --teacher")
    parser.add_argument("--student-model", type=Path, default=None,
                        help="what to time for the student (e.g. its ONNX artifact). Default: --student")
    args = parser.parse_args()
    if args.backend == "onnx" and not (args.teacher_model and args.student_model):
        parser.error("--backend onnx times exported artifacts: give --teacher-model and --student-model "
                     "(deploylm export --model CHECKPOINT --profile fp32 --out DIR)")

    torch.set_num_threads(args.threads)
    load_before = _loadavg()
    max_new = args.max_new_tokens or int(load_generation_config(args.teacher).get("max_new_tokens", 64))
    sources, references = test_examples(args.teacher, args.examples)
    models = {"teacher": args.teacher, "student": args.student}
    timed = {"teacher": args.teacher_model or args.teacher, "student": args.student_model or args.student}
    extra = {"threads": args.threads} if args.backend == "onnx" else {}
    gens = {name: deploylm.load(path, backend=args.backend, **extra) for name, path in timed.items()}
    for gen in gens.values():                                              # warm-up, untimed
        decode_all(gen, sources[:max(args.batch_size, 8)], args.batch_size, args.num_beams, max_new)
    times: dict[str, list[float]] = {name: [] for name in gens}
    cpu: dict[str, list[float]] = {name: [] for name in gens}
    backend_s: dict[str, list[float]] = {name: [] for name in gens}
    decoder_s: dict[str, list[float]] = {name: [] for name in gens}
    outputs: dict[str, tuple[list[str], int]] = {}
    steps: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name, gen in gens.items():                                     # interleaved: A, B, A, B, ...
            seconds, cpu_s, texts, tokens, stats = decode_all(gen, sources, args.batch_size, args.num_beams, max_new)
            times[name].append(seconds)
            cpu[name].append(cpu_s)
            backend_s[name].append(stats.backend_seconds)
            decoder_s[name].append(stats.decoder_seconds)
            outputs[name] = (texts, tokens)
            steps[name] = stats.steps
            print(f"round {round_ + 1} {name}: {seconds:.2f} s wall, {cpu_s:.2f} s CPU, "
                  f"{stats.backend_seconds:.2f} s in backend calls, {stats.decoder_seconds:.2f} s in the decoder",
                  file=sys.stderr, flush=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    backend_medians = {name: statistics.median(values) for name, values in backend_s.items()}
    decoder_medians = {name: statistics.median(values) for name, values in decoder_s.items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"max_new_tokens": max_new},
        "load_average": load_before,
        "layers": {name: depth(path) for name, path in models.items()},
        "seconds": times,
        "median_s": medians,
        "speedup": medians["teacher"] / medians["student"],
        "round_speedups": [t / s for t, s in zip(times["teacher"], times["student"])],
        "cpu_s": cpu,
        "cpu_median_s": cpu_medians,
        "cpu_speedup": cpu_medians["teacher"] / cpu_medians["student"],
        "backend_median_s": backend_medians,   # wall time inside prefill/decode/reorder (the models)
        "decoder_median_s": decoder_medians,   # wall time in the shared decoder outside backend calls
        "backend_speedup": backend_medians["teacher"] / backend_medians["student"],
        "decoder_steps": steps,                # decode steps (all batches) the search needed, per round
        "exact_match": {name: exact_match(texts, references) for name, (texts, _) in outputs.items()},
        "generated_tokens": {name: tokens for name, (_, tokens) in outputs.items()},
        "examples": len(sources),
    }
    for name in gens:
        print(f"{name:8s} layers {report['layers'][name]:5s} median {medians[name]:.2f} s  "
              f"exact match {report['exact_match'][name]:.3f}  tokens {report['generated_tokens'][name]}  "
              f"rounds {', '.join(f'{t:.2f}' for t in times[name])}  steps {steps[name]}  "
              f"backend {backend_medians[name]:.2f} s  decoder {decoder_medians[name]:.2f} s")
    print(f"speed-up (median teacher / median student): {report['speedup']:.2f}x wall  "
          f"(per round: {', '.join(f'{r:.2f}' for r in report['round_speedups'])}), "
          f"{report['cpu_speedup']:.2f}x CPU time (medians {cpu_medians['teacher']:.2f} / {cpu_medians['student']:.2f} s); "
          f"inside backend calls {report['backend_speedup']:.2f}x")
    print(f"load average before / after: {report['load_average']} / {_loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
