"""What a SRC path is: a deploylm checkpoint, a Hugging Face folder, a .gguf file, or an artifact."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deploylm.errors import UsageError

SourceKind = Literal["checkpoint", "hf", "gguf", "artifact"]


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    path: Path

    @property
    def name(self) -> str:
        """A short name for default output folders: the folder or file stem ("." and ".." by the folder's own
        name, not "" or "..": `export --model .` would write export/-fp32)."""
        path = self.path if self.path.name not in ("", ".", "..") else self.path.resolve()
        return path.stem if self.kind == "gguf" else path.name

    @property
    def a_kind(self) -> str:
        """The kind in words, for messages: "an exported artifact", "a Hugging Face folder", ..."""
        return KIND_WORDS[self.kind]


KIND_WORDS = {"artifact": "an exported artifact", "hf": "a Hugging Face folder",
              "checkpoint": "a deploylm checkpoint", "gguf": "a .gguf file"}


ANY_MODEL = "a checkpoint folder, a Hugging Face folder, a .gguf file or an artifact folder"


def resolve_source(src: str | Path, expected: str = ANY_MODEL) -> Source:
    """Classify SRC by its files; a clear UsageError when it is none of the known kinds.

    - artifact:   a folder with manifest.json (made by `deploylm export`)
    - checkpoint: a folder whose config.json has "model_type": "deploylm-seq2seq" or "deploylm-lm"
    - hf:         any other folder with config.json
    - gguf:       a file ending in .gguf

    expected: the kinds the caller takes, in words, for the error when SRC is empty or missing.
    """
    if not isinstance(src, (str, Path)) or not str(src).strip():
        raise UsageError(f"model {src!r}: expected the path of {expected}")
    path = Path(src).expanduser()
    try:
        return _classify(path, src, expected)
    except PermissionError as exc:   # a folder that cannot be searched, a config.json that cannot be read
        raise UsageError(f"model {str(src)!r}: cannot read {exc.filename or path} ({exc.strerror}): check its "
                         "permissions") from None


def _classify(path: Path, src: str | Path, expected: str) -> Source:
    if not path.exists():
        raise UsageError(f"model {str(src)!r} does not exist: expected {expected}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Source("gguf", path)
        raise UsageError(f"model file {str(src)!r} is not a .gguf file: expected a .gguf file or a model folder")
    if (path / "manifest.json").is_file():
        return Source("artifact", path)
    graphs = sorted(p.name for p in path.glob("*.onnx")) + sorted(p.name for p in path.glob("*.engine"))
    if graphs and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UsageError(f"model folder {str(src)!r} holds exported graphs ({', '.join(graphs[:3])}) but no "
                         "manifest.json: not a deploylm artifact, or an incomplete one; export the model with "
                         "deploylm export (--force to replace this folder's artifact)")
    return folder_source(path, str(src))


def folder_source(path: Path, name: str | None = None) -> Source:
    """A model folder by its config.json: a deploylm checkpoint, else a Hugging Face folder. Export's own
    working folders (graphs and the model's files, no manifest yet) are read this way too."""
    src = name or str(path)
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"model folder {str(src)!r} has no config.json: expected a checkpoint, Hugging Face or artifact folder")
    try:
        settings = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise UsageError(f"{config}: expected a JSON object of model settings, got {type(settings).__name__}")
    model_type = settings.get("model_type", "")
    if str(model_type).startswith("deploylm"):
        return Source("checkpoint", path)
    return Source("hf", path)
