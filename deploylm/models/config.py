"""The seed Transformer's configuration: a frozen dataclass, size presets, and its JSON form."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal

from deploylm.errors import UsageError

Arch = Literal["seq2seq", "decoder"]
MODEL_TYPES: dict[str, str] = {"seq2seq": "deploylm-seq2seq", "decoder": "deploylm-lm"}


@dataclass(frozen=True)
class TransformerConfig:
    """Shape and special tokens of the seed model.

    arch "seq2seq" is the encoder-decoder (Seq2SeqTransformer); "decoder" is the decoder-only
    causal LM (CausalTransformerLM), which uses n_decoder_layers and ignores n_encoder_layers.
    tie_embeddings shares one matrix between source embedding, target embedding and output layer.
    """

    arch: Arch = "seq2seq"
    vocab_size: int = 1000
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    max_positions: int = 512
    tie_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 1

    def __post_init__(self) -> None:
        if self.arch not in MODEL_TYPES:
            raise UsageError(f"config arch {self.arch!r}: expected one of {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "d_model", "n_heads", "n_decoder_layers", "d_ff", "max_positions"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("n_encoder_layers", self.n_encoder_layers, minimum=1 if self.arch == "seq2seq" else 0)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            _check_int(name, value, minimum=0)
            if value >= self.vocab_size:
                raise UsageError(f"config {name}={value}: expected an id below vocab_size={self.vocab_size}")
        if self.d_model % self.n_heads:
            raise UsageError(f"config d_model={self.d_model}: expected a multiple of n_heads={self.n_heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UsageError(f"config dropout={self.dropout!r}: expected a number in [0, 1)")
        if not isinstance(self.tie_embeddings, bool):
            raise UsageError(f"config tie_embeddings={self.tie_embeddings!r}: expected true or false")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def model_type(self) -> str:
        """The "model_type" written to config.json; deploylm.models.source keys on its prefix."""
        return MODEL_TYPES[self.arch]

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (without model_type; the checkpoint adds it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        """Inverse of to_dict. Accepts a consistent "model_type"; any other unknown key is an error."""
        data = dict(data)
        model_type = data.pop("model_type", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"config has unknown keys {', '.join(unknown)}: expected only {', '.join(sorted(known))}")
        config = cls(**data)
        if model_type is not None and model_type != config.model_type:
            raise UsageError(f"config model_type {model_type!r} does not match arch {config.arch!r}: expected {config.model_type!r}")
        return config


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"config {name}={value!r}: expected an integer >= {minimum}")


# Sizes; vocab_size is a placeholder replaced by make_config. "base" is the paper's base model.
PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256, dropout=0.1),
    "small": TransformerConfig(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024, dropout=0.1),
    "base": TransformerConfig(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1),
}


def make_config(size: str, vocab_size: int, **overrides: Any) -> TransformerConfig:
    """PRESETS[size] with vocab_size and the given field overrides (names checked)."""
    if size not in PRESETS:
        raise UsageError(f"unknown model size {size!r}: expected one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"unknown config fields {', '.join(unknown)}: expected some of {', '.join(sorted(known))}")
    return dataclasses.replace(PRESETS[size], vocab_size=vocab_size, **overrides)
