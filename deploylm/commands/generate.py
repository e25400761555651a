"""`deploylm generate`: generate text from prompts with any backend (DESIGN.md §2)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from deploylm.commands._options import (INT, decoding_options, given_input_options, given_options, input_options,
                                        quiet_transformers, spin_option, threads_option, torch_options)
from deploylm.errors import UsageError, counted_over_all


@click.command(name="generate")
@click.option("--model", "src", metavar="SRC", help="Checkpoint, Hugging Face folder, .gguf file or artifact. Required.")
@click.option("--backend", default=None, help="torch, onnx or trt. Default: onnx for an artifact, else torch.")
@click.argument("prompts", nargs=-1)
@click.option("--input", "input_file", metavar="FILE", help="Read prompts from FILE, one per line ('-' = stdin).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt.")
@click.option("--batch-size", type=INT, default=8, show_default=True, help="Prompts decoded together.")
@decoding_options
@input_options
@torch_options
@threads_option
@spin_option
def command(src, backend, prompts, input_file, as_json, batch_size, device, dtype, threads, spin, **flags) -> None:
    """Generate from PROMPT arguments and/or --input lines; print text, or JSON lines with --json.

    Prompts over the model's window are refused unless --truncation says what to do (docs/long-inputs.md).
    """
    options = {**given_options(flags), **given_input_options(flags)}
    if not src:
        raise UsageError("--model SRC is required: a checkpoint, Hugging Face folder, .gguf file or artifact")
    texts = list(prompts) + (read_prompts(input_file) if input_file else [])
    if not texts and input_file:   # the file was read: "pass --input FILE" would be no help
        raise UsageError(f"no prompts given: --input {input_file!r} has no line with text (blank lines are skipped)")
    if not texts:
        raise UsageError("no prompts given: pass PROMPT arguments or --input FILE")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected an integer >= 1")
    from deploylm.generator import load

    quiet_transformers()
    generator = load(src, backend=backend, **backend_options(src, backend, device, dtype, spin, threads))
    check_sampling_flags(options, generator)
    for start in range(0, len(texts), batch_size):   # a bad prompt is refused before any output goes out
        try:
            generator.check(texts[start:start + batch_size], **options)
        except UsageError as exc:
            raise counted_over_all(exc, start) from None
    for start in range(0, len(texts), batch_size):
        try:
            results = generator.generate(texts[start:start + batch_size], **options)
        except UsageError as exc:   # it numbers the prompts of its batch: name the user's prompt
            raise counted_over_all(exc, start) from None
        for result in results:
            click.echo(format_result(result, as_json))


SAMPLING_FLAGS = (("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"), ("--seed", "seed"))


def check_sampling_flags(options: dict[str, object], generator) -> None:
    """--temperature/--top-k/--top-p/--seed change nothing unless the call samples (--do-sample, or an artifact
    whose profile samples by default): given without it, they are a UsageError, not silently dropped."""
    given = [flag for flag, name in SAMPLING_FLAGS if name in options]
    if given and not generator.options(**{k: v for k, v in options.items()
                                          if k not in ("truncation", "window_overlap")}).do_sample:
        raise UsageError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only when sampling, and this "
                         "call searches deterministically (greedy or beam search): add --do-sample, or leave "
                         f"{'them' if len(given) > 1 else 'it'} out")


def backend_options(src: str, backend: str | None, device: str, dtype: str, spin: bool = False,
                    threads: int | None = None) -> dict[str, object]:
    """--device/--dtype/--spin/--threads for the backend: device, dtype and threads for torch; others take
    --device only (when not cpu); --spin is the onnx backend's only, --threads torch's and onnx's."""
    name = backend_name(src, backend)
    if spin and name != "onnx":
        raise UsageError(f"--spin applies to the onnx backend (ONNX Runtime's threads), not to {name}")
    if threads is not None and name not in ("torch", "onnx"):
        raise UsageError(f"--threads applies to the torch and onnx backends (CPU threads), not to {name}")
    given = {"threads": threads} if threads is not None else {}
    if name == "torch":
        return {"device": device, "dtype": dtype, **given}
    if dtype != "float32":
        raise UsageError(f"--dtype {dtype} applies to the torch backend only: an artifact's precision comes from its export profile")
    return {**({"device": device} if device != "cpu" else {}), "spin": spin, **given}


def backend_name(src: str, backend: str | None) -> str:
    """--backend, else onnx for an artifact and torch for anything else."""
    from deploylm.models.source import resolve_source

    return backend or ("onnx" if resolve_source(src).kind == "artifact" else "torch")


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of `path` (or stdin for '-'; pipes and /dev/fd paths work too), without their line
    endings or a UTF-8 byte-order mark. Lines end at \n only: a form feed or U+2028 inside a line stays."""
    if path == "-":
        text = sys.stdin.buffer.read()
    else:
        file = Path(path)
        if file.is_dir():
            raise UsageError(f"--input {path!r} is a folder: expected a text file with one prompt per line")
        if not file.exists():
            raise UsageError(f"--input {path!r} does not exist: expected a text file with one prompt per line")
        try:
            text = file.read_bytes()
        except OSError as exc:
            raise UsageError(f"--input {path!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        lines = text.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError:
        raise UsageError(f"--input {path!r} is not UTF-8 text: expected one prompt per line") from None
    return [line.removesuffix("\r") for line in lines if line.strip()]


def format_result(result, as_json: bool) -> str:
    """JSON: {"prompt", "outputs": [{"text", "token_ids", "score"}]}; text: one output per line."""
    if as_json:
        outputs = [{"text": s.text, "token_ids": list(s.token_ids), "score": s.score if math.isfinite(s.score) else None}
                   for s in result.sequences]            # strict JSON: no Infinity/NaN (the server writes null too)
        return json.dumps({"prompt": result.prompt, "outputs": outputs}, ensure_ascii=False, allow_nan=False)
    if len(result.sequences) == 1:
        return result.sequences[0].text
    return "\n".join(f"[{i + 1}] {s.text}" for i, s in enumerate(result.sequences))
