"""`python -m deploylm.demo` (what `make demo` runs): the main job on the built-in default.

A clean list of stages, each a function of the shared DemoState: train a tiny model, report its
held-out score, export it to a verified ONNX artifact (parity checked against PyTorch at export),
decode with the ONNX Runtime backend through the shared beam-search decoder, and say how to serve it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deploylm.training.config import TrainConfig, TrainResult

DEMO_DIR = Path("runs/demo-digits2words")
DEMO_ARTIFACT = Path("export/demo-digits2words-fp32")
DEMO_STEPS = 1000         # ~2-3 minutes on 2 CPU cores for the tiny model; 500 steps misread 1000000


@dataclass
class DemoState:
    """What the stages hand on to each other."""

    out: Path = DEMO_DIR
    artifact: Path = DEMO_ARTIFACT
    train: TrainResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


def stage_train(state: DemoState) -> None:
    """Train a tiny digits2words model ("4096" -> "four thousand ninety-six") from scratch."""
    from deploylm.training.trainer import train

    config = TrainConfig(out=state.out, task="digits2words", size="tiny", steps=DEMO_STEPS, force=True)
    state.train = train(config)


def stage_report(state: DemoState) -> None:
    """Held-out (test split) exact match, the numbers below 1000, and a few generated examples."""
    result = state.train
    print(f"held-out test exact match (4-6 digit numbers): {result.test['exact_match']:.1%}  "
          f"(BLEU {result.test['bleu']:.1f}, {len(result.losses)} steps, checkpoint in {result.out})")
    right, wrong = short_number_check(state.out)
    print(f"numbers below 1000 (all in training), greedy: {right}/{right + len(wrong)} exact"
          + "".join(f"; {source} -> {generated}" for source, generated in wrong[:3]))
    for source, generated, reference in result.examples:
        mark = "ok " if generated == reference else "BAD"
        print(f"  [{mark}] {source:>7} -> {generated}" + ("" if generated == reference else f"   (reference: {reference})"))


def short_number_check(model: Path) -> tuple[int, list[tuple[str, str]]]:
    """Greedy words for 0..999 through the shared decoder: (how many are right, [(source, wrong words)])."""
    import deploylm
    from deploylm.training.numbers import number_to_words

    sources = [str(n) for n in range(1000)]
    results = deploylm.load(model, backend="torch").generate(sources, num_beams=1, max_new_tokens=24)
    wrong = [(source, r.sequences[0].text) for source, r in zip(sources, results)
             if r.sequences[0].text != number_to_words(int(source))]
    return len(sources) - len(wrong), wrong


def stage_export(state: DemoState) -> None:
    """Export to an fp32 ONNX artifact; export validates the graphs and checks parity vs PyTorch."""
    from deploylm.export.pipeline import export_model

    report = export_model(state.out, "fp32", state.artifact, force=True)
    for line in report.lines():
        print("  " + line)


def stage_onnx(state: DemoState) -> None:
    """Beam search (4 beams) on ONNX Runtime through the shared decoder, tokens compared with PyTorch."""
    import deploylm

    sources = [source for source, _, _ in state.train.examples][:3] + ["4096", "1000000"]
    onnx_results = deploylm.load(state.artifact, backend="onnx").generate(sources, num_beams=4, max_new_tokens=24)
    torch_results = deploylm.load(state.out, backend="torch").generate(sources, num_beams=4, max_new_tokens=24)
    same = sum(a.sequences[0].token_ids == b.sequences[0].token_ids for a, b in zip(onnx_results, torch_results))
    for result in onnx_results:
        best = result.sequences[0]
        print(f"  onnx  {result.prompt:>7} -> {best.text}   (score {best.score:.3f})")
    print(f"  parity: onnx beam-4 tokens identical to torch on {same}/{len(sources)} inputs")


def deploylm_command(python: str | None = None, cwd: str | None = None) -> str:
    """The `deploylm` script of the Python running the demo: .venv/bin/deploylm under `make demo`, the absolute path
    in a venv elsewhere (a `pip install deploylm`), `python -m deploylm` where there is no script beside it."""
    python = python or sys.executable
    script = Path(python).parent / ("deploylm.exe" if os.name == "nt" else "deploylm")
    if not script.is_file():
        return f"{python} -m deploylm"
    cwd = os.path.abspath(cwd or os.getcwd())
    return os.path.relpath(script, cwd) if os.path.abspath(script).startswith(cwd + os.sep) else str(script)


def stage_next(state: DemoState) -> None:
    """What to run next: the CLI on this artifact and the HTTP server."""
    art, cli = state.artifact, deploylm_command()
    print(f"  {cli} generate --model {art} --backend onnx 4096 --json")
    print(f"  {cli} parity --model {art} --backends torch,onnx")
    print(f"  {cli} serve --model {art} --backend onnx --port 8000   # then:")
    print("  curl -s localhost:8000/v1/generate -H 'content-type: application/json' -d '{\"prompt\": \"4096\"}'")


STAGES: list[tuple[str, Callable[[DemoState], None]]] = [
    ("train", stage_train),
    ("report", stage_report),
    ("export", stage_export),
    ("onnx", stage_onnx),
    ("next", stage_next),
]


def main() -> None:
    state = DemoState()
    for name, stage in STAGES:
        print(f"== {name}: {stage.__doc__.splitlines()[0]}", flush=True)
        started = time.perf_counter()
        stage(state)
        state.timings[name] = time.perf_counter() - started
    print("== done in " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in state.timings.items()))


if __name__ == "__main__":
    main()
