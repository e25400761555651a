"""Training state for --resume: optimizer, scheduler, AMP scaler, step, RNG states, data position.

`capture` builds a dict of tensors, numbers, strings and lists only, so the checkpoint can store it
as training_state.pt and read it back with torch.load(weights_only=True) (no arbitrary pickle);
`restore` is its inverse.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from deploylm.errors import UsageError

STATE_FORMAT = 1


def capture(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, step: int,
            extra: dict[str, Any]) -> dict[str, Any]:
    """The run's state after `step` optimizer steps; `extra` holds the trainer's own entries."""
    np_state = np.random.get_state()
    return {
        "format": STATE_FORMAT, "step": step, **extra,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()),
        "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
    }


def check(state: dict[str, Any], where: str) -> None:
    """UsageError when `state` is not a training state this version can resume."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UsageError(f"{where}: training state format {found!r}: expected {STATE_FORMAT}; use --force to start over")


def restore(state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
    """Put optimizer, scheduler, scaler and every RNG back as `capture` saw them."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"][:torch.cuda.device_count()])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["rng_numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
