"""`python -m deploylm.demo` (what `make demo` runs): the main job on the built-in default.

A clean list of stages, each a function of the shared DemoState; later issues append stages
(export, ONNX generation, parity) to STAGES.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deploylm.training.config import TrainConfig, TrainResult

DEMO_DIR = Path("runs/demo-digits2words")
DEMO_STEPS = 500          # ~1-2 minutes on 2 CPU cores for the tiny model; ~97% test exact match


@dataclass
class DemoState:
    """What the stages hand on to each other."""

    out: Path = DEMO_DIR
    train: TrainResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


def stage_train(state: DemoState) -> None:
    """Train a tiny digits2words model ("4096" -> "four thousand ninety-six") from scratch."""
    from deploylm.training.trainer import train

    config = TrainConfig(out=state.out, task="digits2words", size="tiny", steps=DEMO_STEPS, force=True)
    state.train = train(config)


def stage_report(state: DemoState) -> None:
    """Held-out (test split) exact match and a few generated examples."""
    result = state.train
    print(f"held-out test exact match: {result.test['exact_match']:.1%}  (BLEU {result.test['bleu']:.1f}, "
          f"{len(result.losses)} steps, checkpoint in {result.out})")
    for source, generated, reference in result.examples:
        mark = "ok " if generated == reference else "BAD"
        print(f"  [{mark}] {source:>7} -> {generated}" + ("" if generated == reference else f"   (reference: {reference})"))


STAGES: list[tuple[str, Callable[[DemoState], None]]] = [
    ("train", stage_train),
    ("report", stage_report),
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
