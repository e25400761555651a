"""deploylm checkpoint folders: save atomically, load with clear errors.

Layout of a checkpoint folder:
  config.json             TransformerConfig fields + "model_type" ("deploylm-seq2seq" | "deploylm-lm")
  model.safetensors       weights (tied weights exist once: the tied model has a single embedding)
  generation_config.json  special token ids and decoding defaults (num_beams, max_new_tokens)
  tokenizer.json          Hugging Face `tokenizers` file, when given
  training_state.pt       optional resume state (optimizer, scheduler, step, RNG)

Weights never go through pickle. training_state.pt is written with torch.save and read back only
with torch.load(weights_only=True), which refuses arbitrary objects: the state may hold tensors,
numbers, strings, None and dicts/lists/tuples of them (optimizer/scheduler state_dicts and
torch.get_rng_state() and random.getstate() qualify; numpy RNG state holds an ndarray: convert
it to lists before saving).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploylm.errors import CheckpointWriteFailed, UsageError
from deploylm.fsutil import remove_stale_temporaries, replace_dir, temporary_sibling
from deploylm.models.config import TransformerConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GENERATION = "generation_config.json"
TOKENIZER = "tokenizer.json"
TRAINING_STATE = "training_state.pt"
CHECKPOINT_FILES = (CONFIG, WEIGHTS, GENERATION, TOKENIZER, TRAINING_STATE)
GENERATION_DEFAULTS = {"num_beams": 4, "max_new_tokens": 64}


def build_model(config: TransformerConfig) -> nn.Module:
    """A freshly initialised model for `config` (Seq2SeqTransformer or CausalTransformerLM)."""
    if config.arch == "decoder":
        from deploylm.models.causal_lm import CausalTransformerLM

        return CausalTransformerLM(config)
    from deploylm.models.transformer import Seq2SeqTransformer

    return Seq2SeqTransformer(config)


def generation_config(config: TransformerConfig, **defaults: Any) -> dict[str, Any]:
    """The generation_config.json content: special ids plus decoding defaults (overridable)."""
    data: dict[str, Any] = {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
    }
    if config.arch == "seq2seq":
        data["decoder_start_token_id"] = config.decoder_start_token_id
    return {**data, **GENERATION_DEFAULTS, **defaults}


def save_checkpoint(
    directory: str | Path, model: nn.Module, config: TransformerConfig, tokenizer: Any = None,
    training_state: dict[str, Any] | None = None, *, overwrite: bool = False,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (temp folder next to it, then rename).

    tokenizer: a path to tokenizer.json, an object with `.save(path)` (tokenizers.Tokenizer), or None.
    overwrite: replace an existing folder; files it holds that this save does not write (logs, a
    tokenizer.json or training state saved earlier) are kept. Without overwrite an existing folder
    is an error. Returns the folder.
    """
    from safetensors import SafetensorError

    target = Path(directory)
    if target.exists() and not overwrite:
        raise UsageError(f"checkpoint folder {str(target)!r} exists: choose another folder or overwrite it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)           # saves of this folder that were killed outright
        tmp = temporary_sibling(target)
        tmp.mkdir()
        try:
            _write_files(tmp, model, config, tokenizer, training_state, generation or {})
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as exc:   # a full disk, a read-only folder (torch.save:
        # RuntimeError; safetensors: its own error, neither OSError nor RuntimeError)
        kept = " the previous checkpoint there is kept" if (target / WEIGHTS).exists() else ""
        raise CheckpointWriteFailed(f"could not save the checkpoint in {str(target)!r}: {io_reason(exc)};"
                                    f"{kept or ' nothing was written'}; free space or choose another folder") from None
    return target


def io_reason(exc: BaseException) -> str:
    """One line for an I/O failure: the OS's reason when there is one; torch.save's error for a full disk
    names none ("[enforce fail at inline_container.cc] . unexpected pos ...")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"the write failed ({first}; is the disk full?)"


def _write_files(
    folder: Path, model: nn.Module, config: TransformerConfig, tokenizer: Any,
    training_state: dict[str, Any] | None, generation: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    _write_json(folder / CONFIG, {"model_type": config.model_type, **config.to_dict()})
    _write_json(folder / GENERATION, generation_config(config, **generation))
    if tokenizer is not None:
        _write_tokenizer(folder / TOKENIZER, tokenizer)
    if training_state is not None:
        torch.save(training_state, folder / TRAINING_STATE)
    # safetensors (>= 0.6) creates its file owner-only (0600); give it the mode every other file got from
    # the umask, so another user or a server account can read the weights beside the config
    os.chmod(folder / WEIGHTS, (folder / CONFIG).stat().st_mode & 0o777)
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(path: Path, tokenizer: Any) -> None:
    if isinstance(tokenizer, (str, Path)):
        if not Path(tokenizer).is_file():
            raise UsageError(f"tokenizer file {str(tokenizer)!r} does not exist: expected a tokenizer.json")
        shutil.copyfile(tokenizer, path)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(str(path))
    else:
        raise UsageError(f"tokenizer of type {type(tokenizer).__name__}: expected a tokenizer.json path or a tokenizers.Tokenizer")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target is swapped out (atomically where the system can: see
    deploylm.fsutil), what tmp lacks is carried over from it, then it is removed."""
    replace_dir(tmp, target, carry_over=True)


def load_config(directory: str | Path) -> TransformerConfig:
    """TransformerConfig from `directory`/config.json; UsageError naming the file when missing or bad."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise UsageError(f"{path}: missing; expected a deploylm checkpoint folder with config.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not str(data.get("model_type", "")).startswith("deploylm"):
        raise UsageError(f"{path}: not a deploylm config (model_type should be 'deploylm-seq2seq' or 'deploylm-lm')")
    try:
        return TransformerConfig.from_dict(data)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TransformerConfig]:
    """(model in eval mode on `device`, config) from a checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = load_config(directory)
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise UsageError(f"{path}: missing; expected the checkpoint's weights")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable or corrupt safetensors file ({exc})") from None
    model = build_model(config).to(device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise UsageError(f"{path}: weights do not match {CONFIG} ({first})") from None
    return model.eval(), config


def load_training_state(directory: str | Path) -> dict[str, Any] | None:
    """The resume state saved with the checkpoint (None when absent), loaded with weights_only=True."""
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or unsafe files
        raise UsageError(f"{path}: unreadable training state ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def load_generation_config(directory: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    path = Path(directory) / GENERATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
