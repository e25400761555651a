"""Teacher/student pairs and their data for deploylm.training.distill, and the atomic output folder.

Three teacher kinds: a deploylm encoder-decoder checkpoint (task or .jsonl data through the training
package), a deploylm decoder-only checkpoint and a Hugging Face causal LM (plain text, in blocks).
Every check that can fail on bad input runs before the teacher's weights load; nothing is written
before the run ends.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deploylm.errors import CheckpointWriteFailed, UsageError
from deploylm.fsutil import check_output_folder, remove_stale_temporaries, replace_dir, temporary_sibling
from deploylm.models.source import Source, resolve_source
from deploylm.training.distill import REPORT, DistillConfig, Setup, plan_layers, remap_layers

TOKENIZER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HELD_OUT_FRACTION = 10          # text: one block in ten is held out for perplexity
DEFAULT_BLOCK_SIZE = 128        # text: tokens per block when neither --block-size nor the teacher says


def check_output(config: DistillConfig) -> None:
    """--out must be new or empty, or (with --force) a model folder that may be replaced."""
    out = config.out
    if config.teacher.exists() and out.exists() and out.resolve() == config.teacher.resolve():
        raise UsageError(f"--out {str(out)!r} is the teacher's folder: choose another folder for the student")
    check_output_folder(out, config.force, holds="the student", ours=is_model_folder,
                        inputs={"--data": config.data, "--teacher": config.teacher},
                        not_ours=f"holds no model (no config.json beside {' or '.join(MODEL_WEIGHTS)})",
                        without_force="choose another folder or use --force to replace it")


MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_model_folder(folder: Path) -> bool:
    """A model folder --force may replace: config.json beside model weights, and not an exported artifact."""
    return ((folder / "config.json").is_file() and any((folder / name).is_file() for name in MODEL_WEIGHTS)
            and not (folder / "manifest.json").exists())


TEACHER_KINDS = "a deploylm checkpoint folder or a Hugging Face causal LM folder"


def build(config: DistillConfig) -> Setup:
    """The teacher, the initialised student and the data of `config`."""
    from deploylm.models.hf import resolve_device

    try:
        source = resolve_source(config.teacher, expected=TEACHER_KINDS)
    except UsageError as exc:
        raise UsageError(f"--teacher: {exc}") from None
    device = resolve_device(config.device)
    if source.kind == "checkpoint":
        from deploylm.models.checkpoint import load_config

        if load_config(source.path).arch == "seq2seq":
            return _seq2seq_setup(config, source, device)
        return _text_setup(config, source, device, _seed_causal_pair)
    if source.kind == "hf":
        return _text_setup(config, source, device, _hf_causal_pair)
    raise UsageError(f"--teacher {str(config.teacher)!r} is {source.a_kind}: expected {TEACHER_KINDS} "
                     "(distil before exporting)")


def publish(config: DistillConfig, save: Callable[[Path], None], report: dict[str, Any]) -> None:
    """Write the student into a temporary folder next to --out, then rename it into place."""
    from safetensors import SafetensorError

    out = config.out
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)              # students of killed runs
    tmp = temporary_sibling(out)
    try:
        save(tmp)
        (tmp / REPORT).write_text(json.dumps({"settings": _settings(config), **report}, indent=2) + "\n")
        replace_dir(tmp, out)      # an existing student is swapped out atomically where the system can
    except (OSError, RuntimeError, SafetensorError, CheckpointWriteFailed) as exc:
        raise _write_failed(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_failed(out: Path, exc: BaseException) -> CheckpointWriteFailed:
    """One line for a student that could not be written (a full disk, a folder made read-only), naming --out, not
    the temporary folder it was written in: save_pretrained's safetensors reports a full disk as its own error
    (a traceback before), and save_checkpoint's CheckpointWriteFailed names that temporary folder."""
    from deploylm.models.checkpoint import io_reason

    cause = exc.__context__ if isinstance(exc, CheckpointWriteFailed) and exc.__context__ is not None else exc
    kept = "the student already there is kept" if out.is_dir() and any(out.iterdir()) else "nothing was written"
    return CheckpointWriteFailed(f"could not save the student in {str(out)!r}: {io_reason(cause)}; {kept}; free "
                                 "space or choose another --out")


def _settings(config: DistillConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


# ---- deploylm encoder-decoder on a task -------------------------------------------------------


def _seq2seq_setup(config: DistillConfig, source: Source, device: torch.device) -> Setup:
    from deploylm.models.checkpoint import load_checkpoint, load_config, load_generation_config
    from deploylm.training.data import BatchStream, SpecialIds, make_batch
    from deploylm.training.tokenizer import load_tokenizer

    if config.block_size is not None:
        raise UsageError(f"--block-size {config.block_size} applies to causal LM teachers (text in blocks): teacher "
                         f"{str(source.path)!r} is an encoder-decoder, distilled on source/target pairs")
    tconfig = load_config(source.path)
    width = config.d_model is not None and config.d_model != tconfig.d_model
    kept = plan_layers({"encoder_layers": tconfig.n_encoder_layers, "decoder_layers": tconfig.n_decoder_layers},
                       config.layers, width)
    sconfig = _student_config(tconfig, kept, config.d_model if width else None)
    if not (source.path / "tokenizer.json").is_file():
        raise UsageError(f"teacher {str(source.path)!r} has no tokenizer.json: the student needs the teacher's tokenizer")
    splits, record = _seq2seq_splits(config, source.path)
    teacher, _ = load_checkpoint(source.path, device)
    student = _seed_student(teacher, sconfig, kept, width, device)
    tok = load_tokenizer(source.path)
    ids = SpecialIds(tconfig.pad_token_id, tconfig.decoder_start_token_id, tconfig.eos_token_id)
    stream = BatchStream(splits.train, config.batch_size, config.seed)
    generation = load_generation_config(source.path)
    max_new = int(generation.get("max_new_tokens", 64))

    def batch(step: int) -> tuple[dict[str, Tensor], Tensor]:
        b = make_batch(tok, stream.examples_at(step), ids, tconfig.max_positions).to(device)
        return {"src_ids": b.src_ids, "src_mask": b.src_mask, "tgt_ids": b.tgt_in}, b.labels

    def evaluate(model: nn.Module, limit: int | None) -> dict[str, float]:
        from deploylm.training.evaluate import evaluate as run_eval

        started = time.perf_counter()
        examples = splits.test[:min(limit or config.eval_examples, config.eval_examples)]
        res = run_eval(model, tok, examples, ids, device, tconfig.max_positions, max_new)
        return {**res.as_dict(), "eval_s": time.perf_counter() - started}

    def save(folder: Path) -> None:
        _save_seed(folder, student, sconfig, source.path, generation)

    return Setup(teacher, student, kept, "random" if width else "teacher", batch,
                 lambda model, x: model(x["src_ids"], x["src_mask"], x["tgt_ids"]), evaluate, save, data_record=record)


def _seq2seq_splits(config: DistillConfig, folder: Path) -> tuple[Any, dict[str, Any]]:
    """The teacher's splits: --task/--data, else the task or data (and split seed) it was trained with;
    and what they are, for distill.json (`data_record`)."""
    from deploylm.models.checkpoint import load_training_state
    from deploylm.training.clean import CleanOptions
    from deploylm.training.data import jsonl_splits
    from deploylm.training.tasks import TASKS, task_splits

    identity = (load_training_state(folder) or {}).get("identity", {})
    seed = int(identity.get("seed", config.seed))
    if config.data is None and config.task is None and not (identity.get("task") or identity.get("data")):
        raise UsageError(f"teacher {str(folder)!r} does not record its training data: give --task NAME or --data FILE.jsonl")
    if identity.get("arch") == "decoder":
        raise UsageError(f"teacher {str(folder)!r} is a decoder-only LM: distill it with --data FILE.txt, not a seq2seq task")
    if config.data is not None or (config.task is None and identity.get("data")):
        # the teacher's cleaning (its splits), else the defaults `train --data` cleans with (recorded, so
        # export's calibration draws the same splits again)
        clean = CleanOptions(**identity["clean"]) if identity.get("clean") else CleanOptions()
        path = data_path(config.data, identity, folder)
        _, sha256 = check_teacher_data(path, identity, folder)
        splits = jsonl_splits(path, seed, clean)
        return splits, data_record(path, seed, clean, "seq2seq", sha256)
    task = config.task or identity["task"]
    if task not in TASKS:
        from deploylm.training.outdir import TEXT_TASKS

        raise UsageError(f"unknown task {task!r} for an encoder-decoder teacher: expected one of {', '.join(TASKS)} "
                         f"(a decoder-only teacher is distilled on text: --data FILE.txt, or --task "
                         f"{' or '.join(TEXT_TASKS)} for a deploylm one)")
    return task_splits(task, seed), {"task": task, "seed": seed}


def data_path(given: str | Path | None, identity: dict[str, Any], teacher: Path) -> Path:
    """--data, else the file the teacher's training_state.pt records; a recorded file that is gone (the teacher
    moved to another folder or machine) is named as the teacher's, with --data as the way out."""
    if given is not None:
        return Path(given)
    path = Path(identity["data"])
    if not path.is_file():
        raise UsageError(f"teacher {str(teacher)!r} was trained on {str(path)!r}, which is not there any more: "
                         "give --data FILE (that file, moved or copied, keeps the teacher's splits)")
    return path


def check_teacher_data(path: Path, identity: dict[str, Any], teacher: Path) -> tuple[bool, str | None]:
    """(whether `path` is the --data file the teacher's training_state.pt `identity` records, its sha256; None for
    a path that is no file, which reading it refuses later). The teacher's file is that path, or a copy of the file
    as it was (its recorded sha256: the teacher and its text moved to another folder or machine). UsageError when
    the file at that path changed since: its splits would be drawn anew, and the teacher's test examples would
    train the student. The file is hashed once, for this and for data_record."""
    from deploylm.training.config import file_sha256

    if not path.is_file():
        return False, None
    now = file_sha256(path)
    trained_on, recorded = identity.get("data"), identity.get("data_sha256")
    if not trained_on:
        return False, now
    if Path(trained_on).resolve() != path.resolve():
        return isinstance(recorded, str) and now == recorded, now
    if isinstance(recorded, str) and now != recorded:
        raise UsageError(f"--data {str(path)!r} changed since teacher {str(teacher)!r} was trained on it (sha256 "
                         f"{recorded[:12]}… then, {now[:12]}… now): its splits would be drawn anew and "
                         "the teacher's test examples would train the student; give the file as it was, or a copy "
                         "of the new contents under another name")
    return True, now


def data_record(path: Path, seed: int, clean: Any, arch: str, sha256: str | None = None) -> dict[str, Any]:
    """A --data file as export's calibration finds it again: absolute path, split seed, cleaning options
    (None: the defaults) and the contents' sha256 (to tell a file changed since; hashed here unless given)."""
    from deploylm.training.config import file_sha256

    return {"data": str(Path(path).resolve()), "seed": seed, "clean": None if clean is None else clean.as_json(),
            "data_sha256": sha256 or file_sha256(Path(path)), "arch": arch}


def _student_config(teacher: Any, kept: dict[str, list[int]], d_model: int | None) -> Any:
    """The teacher's TransformerConfig with the kept depth per stack and, if given, another width."""
    changes: dict[str, Any] = {"n_decoder_layers": len(kept.get("decoder_layers", kept.get("layers", [])))}
    if "encoder_layers" in kept:
        changes["n_encoder_layers"] = len(kept["encoder_layers"])
    if d_model is not None:
        if d_model % teacher.n_heads:
            raise UsageError(f"--d-model {d_model}: expected a multiple of the teacher's n_heads={teacher.n_heads}")
        changes.update(d_model=d_model, d_ff=max(1, round(teacher.d_ff * d_model / teacher.d_model)))
    student = dataclasses.replace(teacher, **changes)
    if d_model is not None:        # a wider student can outgrow the teacher despite fewer layers
        sizes = [_parameters(c) for c in (student, teacher)]
        if sizes[0] >= sizes[1]:
            raise UsageError(f"--d-model {d_model}: the student would have {sizes[0]:,} parameters, the teacher has "
                             f"{sizes[1]:,}: expected a smaller student (a narrower --d-model than the teacher's "
                             f"{teacher.d_model}, or fewer --layers)")
    return student


def _parameters(config: Any) -> int:
    """The parameter count of a deploylm model of `config`, built on the meta device (no memory, no weights)."""
    from deploylm.models.checkpoint import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def _seed_student(teacher: nn.Module, sconfig: Any, kept: dict[str, list[int]], random_init: bool,
                  device: torch.device) -> nn.Module:
    from deploylm.models.checkpoint import build_model

    student = build_model(sconfig).to(device)
    if not random_init:
        student.load_state_dict(remap_layers(teacher.state_dict(), kept), strict=True)
    return student


def _save_seed(folder: Path, student: nn.Module, sconfig: Any, teacher_dir: Path, generation: dict[str, Any]) -> None:
    """A deploylm checkpoint with the teacher's tokenizer files and decoding defaults."""
    from deploylm.models.checkpoint import save_checkpoint

    defaults = {k: generation[k] for k in ("num_beams", "max_new_tokens") if k in generation}
    save_checkpoint(folder, student, sconfig, generation=defaults)
    for name in TOKENIZER_SIDE_FILES:
        if (teacher_dir / name).is_file():
            shutil.copyfile(teacher_dir / name, folder / name)


# ---- causal LMs on plain text -----------------------------------------------------------------

Pair = tuple[nn.Module, nn.Module, dict[str, list[int]], Callable[[Path], None]]


def _text_setup(config: DistillConfig, source: Source, device: torch.device,
                make_pair: Callable[[DistillConfig, Source, torch.device, Any], Pair]) -> Setup:
    """Causal teacher and student on blocks of --data text (the last tenth held out). The text, its
    blocks and the block size are checked before the teacher's weights load (make_pair)."""
    from deploylm.models.tokenizer import load_tokenizer
    from deploylm.training.data import BatchStream

    seed_teacher = source.kind == "checkpoint"
    if seed_teacher:           # --data, a text task (stories), or what the teacher was trained on
        text = _teacher_text(config, source.path)
    elif config.task is not None:
        raise UsageError("--task applies to encoder-decoder teachers and deploylm decoder-only ones (stories): "
                         "give --data FILE.txt for a Hugging Face causal LM")
    elif config.data is None:
        raise UsageError("--data FILE.txt is required for a causal LM teacher: the plain text to distil on")
    elif config.data.suffix.lower() == ".jsonl":
        raise UsageError(f"--data {str(config.data)!r}: a Hugging Face teacher reads plain text line by line, so JSON "
                         "lines would be distilled as raw JSON; give the text as a plain text file (.jsonl of "
                         "{\"text\"} lines is for deploylm decoder-only teachers)")
    else:
        lines = read_data_lines(config.data)
    tok = load_tokenizer(source)
    length = _block_size(config, _trained_block_size(source.path) if seed_teacher else None, _window(source))
    if seed_teacher:   # the teacher's own splits of the text, through training's token_stream
        from deploylm.models.checkpoint import load_config
        from deploylm.training.text import token_stream
        from deploylm.training.tokenizer import load_tokenizer as training_tokenizer

        tconfig = load_config(source.path)
        ttok, bos, eos = training_tokenizer(source.path), tconfig.bos_token_id, tconfig.eos_token_id
        ids = token_stream(ttok, text.splits.train, bos, eos)
        if text.splits.test:
            train = _text_blocks(ids, text.where, length)
            held_out = _text_blocks(token_stream(ttok, text.splits.test, bos, eos), text.where, length)
        else:          # too little text for a test split: hold out the last tenth of the blocks
            train, held_out = _split_blocks(_text_blocks(ids, text.where, length))
    else:
        train, held_out = _split_blocks(_text_blocks(_line_stream(lines, tok), config.data, length))
    teacher, student, kept, save = make_pair(config, source, device, tok)
    stream = BatchStream(train, config.batch_size, config.seed)
    forward = _hf_logits if source.kind == "hf" else _seed_logits

    def batch(step: int) -> tuple[dict[str, Tensor], Tensor]:
        blocks = torch.tensor(stream.examples_at(step), dtype=torch.long, device=device)   # [B, L+1]
        return {"input_ids": blocks[:, :-1]}, blocks[:, 1:]

    def evaluate(model: nn.Module, limit: int | None) -> dict[str, float]:
        from deploylm.training.metrics import perplexity

        started, total, count, rows = time.perf_counter(), 0.0, 0, held_out[:limit]
        model.eval()
        with torch.no_grad():
            for i in range(0, len(rows), config.batch_size):
                blocks = torch.tensor(rows[i:i + config.batch_size], dtype=torch.long, device=device)   # [B, L+1]
                logits = forward(model, {"input_ids": blocks[:, :-1]})                     # [B, L, V]
                total += float(F.cross_entropy(logits.float().flatten(0, 1), blocks[:, 1:].flatten(), reduction="sum"))
                count += blocks[:, 1:].numel()
        loss = total / count
        return {"loss": loss, "perplexity": perplexity(loss), "eval_s": time.perf_counter() - started,
                "held_out_tokens": count}

    record = text.record if seed_teacher else lines_record(config.data, config.seed)
    return Setup(teacher, student, kept, "teacher", batch, forward, evaluate, save, data_record=record, block_size=length)


def lines_record(path: Path, seed: int) -> dict[str, Any]:
    """distill.json's data record for a Hugging Face teacher's --data: its non-blank lines were the text, the
    last 1/HELD_OUT_FRACTION held out (`arch` "lines"), so export scores the student on that tail."""
    from deploylm.training.config import file_sha256

    return {"data": str(Path(path).resolve()), "seed": seed, "data_sha256": file_sha256(Path(path)), "arch": "lines"}


def _block_size(config: DistillConfig, trained: int | None, window: int | None) -> int:
    """Tokens per block: --block-size (at most the teacher's window), else the block size a deploylm
    teacher trained with, else DEFAULT_BLOCK_SIZE; the defaults are cut to the window."""
    if config.block_size is not None:
        if window is not None and config.block_size > window:
            raise UsageError(f"--block-size {config.block_size}: expected at most the teacher's {window} positions")
        return config.block_size
    length = trained or DEFAULT_BLOCK_SIZE
    return min(length, window) if window is not None else length


def _window(source: Source) -> int | None:
    """The teacher's positions, from its config alone (no weights loaded)."""
    if source.kind == "checkpoint":
        from deploylm.models.checkpoint import load_config

        return load_config(source.path).max_positions
    from deploylm.models.hf import load_hf_config, position_window

    return position_window(load_hf_config(source))


def _trained_block_size(folder: Path) -> int | None:
    """The --block-size a deploylm decoder-only checkpoint was trained with (its training_state.pt)."""
    from deploylm.models.checkpoint import load_training_state

    found = ((load_training_state(folder) or {}).get("identity") or {}).get("block_size")
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None


def _seed_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(inputs["input_ids"])[0]


def _hf_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(input_ids=inputs["input_ids"]).logits


def _seed_causal_pair(config: DistillConfig, source: Source, device: torch.device, tok: Any) -> Pair:
    """deploylm decoder-only teacher and its student (layers copied unless the width changes)."""
    from deploylm.models.checkpoint import load_checkpoint, load_config, load_generation_config

    tconfig = load_config(source.path)
    width = config.d_model is not None and config.d_model != tconfig.d_model
    kept = plan_layers({"layers": tconfig.n_decoder_layers}, config.layers, width)
    sconfig = _student_config(tconfig, kept, config.d_model if width else None)
    teacher, _ = load_checkpoint(source.path, device)
    student = _seed_student(teacher, sconfig, kept, width, device)
    generation = load_generation_config(source.path)
    return teacher, student, kept, lambda folder: _save_seed(folder, student, sconfig, source.path, generation)


def _hf_causal_pair(config: DistillConfig, source: Source, device: torch.device, tok: Any) -> Pair:
    """Hugging Face causal teacher and the same architecture with fewer layers, copied from it."""
    from transformers import AutoModelForCausalLM

    from deploylm.models.hf import load_hf_config, load_hf_model

    hf_config = load_hf_config(source)
    if hf_config.is_encoder_decoder:
        raise UsageError(f"--teacher {str(source.path)!r} is a Hugging Face encoder-decoder: distil deploylm seq2seq checkpoints or Hugging Face causal LMs")
    if config.d_model is not None and config.d_model != getattr(hf_config, "hidden_size", None):
        raise UsageError(f"--d-model {config.d_model}: a Hugging Face student keeps the teacher's width ({getattr(hf_config, 'hidden_size', '?')})")
    depth = getattr(hf_config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise UsageError(f"--teacher {str(source.path)!r}: its config has no num_hidden_layers; cannot choose student layers")
    indices = plan_layers({"layers": depth}, config.layers, False)["layers"]
    teacher = load_hf_model(source, dtype=torch.float32, device=device)
    kept = {_layer_list(teacher, depth): indices}
    sconfig = copy.deepcopy(teacher.config)
    sconfig.num_hidden_layers = len(indices)
    if isinstance(getattr(sconfig, "layer_types", None), list):
        sconfig.layer_types = [sconfig.layer_types[i] for i in indices]
    student = AutoModelForCausalLM.from_config(sconfig).to(device=device, dtype=torch.float32)
    student.load_state_dict(remap_layers(teacher.state_dict(), kept), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)

    def save(folder: Path) -> None:
        student.save_pretrained(folder)
        tok.save_pretrained(folder)

    return teacher, student, kept, save


def _layer_list(model: nn.Module, depth: int) -> str:
    """The name of the model's one ModuleList of `depth` blocks (transformer.h, model.layers, ...)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(names) != 1:
        raise UsageError(f"cannot tell which module list holds the {depth} layers of {type(model).__name__} "
                         f"(found {names or 'none'}): this architecture is not supported for distillation")
    return names[0]


def read_data_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, line endings kept."""
    if not path.is_file():
        raise UsageError(f"--data {str(path)!r} does not exist: expected a plain text file")
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"--data {str(path)!r} is not UTF-8 text") from None


@dataclasses.dataclass(frozen=True)
class TeacherText:
    """--data as `deploylm train --arch decoder` read it for the teacher: cleaned with its options, split
    with its seed (the same file gives the teacher's own train/validation/test documents)."""

    splits: Any           # training.text.TextSplits
    where: str            # for messages: the file, or "task stories"
    record: dict[str, Any]  # distill.json's data record (export finds the held-out split again with it)


def _teacher_text(config: DistillConfig, folder: Path) -> TeacherText:
    from deploylm.models.checkpoint import load_training_state
    from deploylm.training.clean import CleanOptions
    from deploylm.training.text import TextSplits, load_text, text_splits

    identity = (load_training_state(folder) or {}).get("identity") or {}
    task = config.task or (identity.get("task") if config.data is None else None)
    if task is not None:
        from deploylm.training.outdir import TEXT_TASKS, text_task_splits

        if task not in TEXT_TASKS:
            raise UsageError(f"unknown task {task!r} for a decoder-only teacher: expected one of {', '.join(TEXT_TASKS)}, "
                             "or --data FILE.txt")
        seed = int(identity.get("seed", config.seed)) if identity.get("task") == task else config.seed
        return TeacherText(text_task_splits(task, seed), f"task {task}", {"task": task, "seed": seed})
    if config.data is None and not identity.get("data"):
        raise UsageError(f"teacher {str(folder)!r} does not record its training text: give --data FILE.txt "
                         "(or --task stories)")
    path = data_path(config.data, identity, folder)   # default: the file the teacher was trained on
    same, sha256 = check_teacher_data(path, identity, folder)
    clean = CleanOptions(**identity["clean"]) if same and identity.get("clean") else CleanOptions()
    seed = int(identity.get("seed", config.seed)) if same else config.seed
    try:
        docs, _ = load_text(path, clean)
    except UsageError as exc:
        raise UsageError(f"--data: {exc}") from None
    record = data_record(path, seed, clean, "decoder", sha256)
    if len(set(docs)) < 3:          # too few paragraphs to split: all train, the last blocks held out
        return TeacherText(TextSplits(docs, [], []), str(path), record)
    return TeacherText(text_splits(path, docs, seed), str(path), record)


def _line_stream(lines: list[str], tok: Any) -> list[int]:
    """The lines' tokens without special tokens, concatenated (plain text for a Hugging Face LM)."""
    return [t for row in (tok(lines, add_special_tokens=False, verbose=False)["input_ids"] if lines else []) for t in row]


def _text_blocks(ids: list[int], where: str | Path, length: int) -> list[list[int]]:
    """Token blocks of length+1 (inputs and next-token labels) over the token stream `ids` of `where`
    (the --data file, or a text task)."""
    if len(ids) < 2:
        raise UsageError(f"--data {str(where)!r} holds {len(ids)} token(s): expected some text to distil on")
    if len(ids) <= length:
        return [ids]
    return [ids[i:i + length + 1] for i in range(0, len(ids) - length, length)]


def _split_blocks(blocks: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held out): the last tenth held out; with fewer than ten blocks both are all blocks."""
    n = len(blocks) // HELD_OUT_FRACTION
    return (blocks[:-n], blocks[-n:]) if n else (blocks, blocks)
