"""`deploylm info SRC`: what a model or artifact is. Artifacts: manifest, io signature, sizes, parity."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

# config.json keys, first present wins: (label, keys)
CONFIG_FIELDS = [
    ("model_type", ("model_type",)),
    ("architectures", ("architectures",)),
    ("vocab_size", ("vocab_size",)),
    ("hidden size", ("hidden_size", "n_embd", "d_model")),
    ("layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ("encoder layers", ("encoder_layers", "n_encoder_layers")),
    ("decoder layers", ("num_decoder_layers", "decoder_layers", "n_decoder_layers")),
    ("heads", ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")),
    ("kv heads", ("num_key_value_heads",)),
    ("max positions", ("max_position_embeddings", "n_positions", "max_positions")),
    ("encoder-decoder", ("is_encoder_decoder",)),
]


@click.command(name="info")
@click.argument("src", metavar="SRC")
def command(src: str) -> None:
    """Describe SRC: an artifact (manifest, io signature, sizes, parity; checksums verified), a
    checkpoint or Hugging Face folder (config summary), or a .gguf file (metadata)."""
    from deploylm.artifact import load_artifact, summary, verify_files
    from deploylm.models.source import resolve_source

    source = resolve_source(src)
    if source.kind == "artifact":
        artifact = load_artifact(source.path, verify=False)
        click.echo(summary(artifact))
        verify_files(artifact.path, artifact.manifest)   # a damaged artifact still shows, then exits 2
        click.echo("verified   every file's sha256 and every graph's io match the manifest")
    elif source.kind == "gguf":
        click.echo("\n".join(describe_gguf(source.path)))
    else:
        click.echo("\n".join(describe_folder(source.kind, source.path)))


def _size(path: Path) -> str:
    from deploylm.artifact import format_size

    return format_size(path.stat().st_size)


def describe_folder(kind: str, path: Path) -> list[str]:
    """kind, path, config summary and weight files of a checkpoint or Hugging Face folder."""
    config: dict[str, Any] = json.loads((path / "config.json").read_text())
    lines = [f"{'kind':<15} {kind}", f"{'path':<15} {path}"]
    for label, keys in CONFIG_FIELDS:
        value = next((config[k] for k in keys if k in config), None)
        if value is not None:
            lines.append(f"{label:<15} {', '.join(value) if isinstance(value, list) else value}")
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".model"):
            lines.append(f"  {_size(file):>10}  {file.name}")
    return lines


def describe_gguf(path: Path) -> list[str]:
    """kind, path, size and the model metadata of a .gguf file (tokenizer tables left out)."""
    import collections

    from gguf import GGUFReader

    from deploylm.errors import UsageError

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises assorted errors (ValueError, struct.error, ...) on damaged files
        raise UsageError(f"{path}: not a readable .gguf file ({exc})") from None
    lines = ["kind       gguf", f"path       {path}", f"size       {_size(path)}"]
    for key, field in reader.fields.items():
        if key.startswith(("general.", "GGUF.")) or ("." in key and not key.startswith("tokenizer.")):
            value = field.contents()
            if isinstance(value, list) and len(value) > 8:
                value = f"[{len(value)} values]"
            elif key == "general.file_type":
                value = _gguf_file_type(value)
            lines.append(f"  {key:<44} {value}")
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    lines.append("tensors    " + ", ".join(f"{n} {name}" for name, n in types.most_common()))
    return lines


def _gguf_file_type(value: object) -> str:
    """general.file_type as its name, e.g. 3 -> "3 (MOSTLY_Q4_1)"; an unknown number stays a number."""
    from gguf import LlamaFileType

    try:
        return f"{value} ({LlamaFileType(value).name})"
    except (ValueError, TypeError):
        return str(value)
