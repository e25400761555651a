"""The Python API (DESIGN.md §3): `load(src)` -> Generator; `generate` and `stream` over the one decoder.

Decoding options are flat keywords (DecodingOptions fields). Precedence, highest first:
  1. the keywords of the call (`gen.generate(p, num_beams=2)`),
  2. the model's defaults (an artifact's manifest/generation_config, a Hugging Face
     generation_config.json, a checkpoint's generation_config.json: num_beams, max_new_tokens, ...),
  3. DecodingOptions' own defaults.
Prompts are tokenized as a transformers user would (`tokenizer(prompts, padding=True)`): left padding
for decoder-only models, right for encoder-decoders, the tokenizer's own special tokens and nothing
more. Outputs are decoded with `skip_special_tokens=True`.

Thread safety: each Generator holds a `threading.Lock` around every use of its backend (a whole
`generate` call, or a whole `stream` iteration), so concurrent calls are safe and run one at a time;
a second lock, held only for the moment of each tokenizer call, guards the tokenizer (so
`count_tokens` and `encode` do not wait for a running generation).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from deploylm.backends import Backend, EncodedBatch, backend_class
from deploylm.decoding.options import DecodingOptions, option_names
from deploylm.errors import UsageError
from deploylm.models.source import Source, resolve_source


@dataclass(frozen=True)
class Sequence:
    """One output: its text, the generated token ids (no prompt; EOS included when produced), its score."""

    text: str
    token_ids: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class Result:
    """The outputs for one prompt, best first (`num_return_sequences` of them)."""

    prompt: str
    sequences: list[Sequence]


def load(src: str | Path | Source, backend: str | None = None, **backend_options: Any) -> "Generator":
    """Open SRC (checkpoint, Hugging Face folder, .gguf file or artifact) with `backend`.

    backend: "torch" | "onnx" | "trt"; default "onnx" for an artifact, "torch" otherwise.
    backend_options go to the backend (torch: device="cpu"|"cuda", dtype="float32"|"float16"|"bfloat16").
    """
    from deploylm.models.tokenizer import load_tokenizer

    source = src if isinstance(src, Source) else resolve_source(src)
    name = backend or ("onnx" if source.kind == "artifact" else "torch")
    opened = backend_class(name).from_source(source, **backend_options)  # unknown name: UsageError listing them
    return Generator(opened, load_tokenizer(source))


class Generator:
    """Generates text from prompts with one backend and its tokenizer; safe to share between threads."""

    def __init__(self, backend: Backend, tokenizer: Any, defaults: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = backend.info
        model_defaults = defaults if defaults is not None else getattr(backend, "generation_defaults", {})
        known = {k: v for k, v in dict(model_defaults).items() if k in option_names()}
        self.defaults = DecodingOptions.from_mapping(known)
        if tokenizer.pad_token_id is None:  # e.g. GPT-2: pad with the model's pad id (transformers: first EOS)
            tokenizer.pad_token_id = self.info.special.pad_token_id
        self._lock = threading.Lock()            # held for every use of the backend
        self._tokenizer_lock = threading.Lock()  # held briefly for every tokenizer call

    def options(self, **options: Any) -> DecodingOptions:
        """The options a call with these keywords uses: call > model defaults > DecodingOptions defaults."""
        return self.defaults.replace(**options)

    def generate(self, prompts: str | list[str], **options: Any) -> list[Result]:
        """One Result per prompt, each with `num_return_sequences` sequences, best first."""
        from deploylm.decoding.search import generate_ids

        texts = _prompt_list(prompts)
        opts = self.options(**options)
        batch = self.encode(texts, opts)
        with self._lock:
            hyps = generate_ids(self.backend, batch, opts)
        return [Result(prompt, [self._sequence(h.token_ids, h.score) for h in per_prompt])
                for prompt, per_prompt in zip(texts, hyps)]

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """Yield the best output's text in pieces, each as soon as every live beam agrees on it.

        The lock is held while the stream is being iterated; close the iterator to release it early.
        """
        from deploylm.decoding.stream import stream_ids

        if not isinstance(prompt, str):
            raise UsageError(f"stream takes one prompt string, got {type(prompt).__name__}")
        opts = self.options(**options)
        batch = self.encode([prompt], opts)
        with self._lock:
            ids: list[int] = []
            emitted = text = ""
            for pieces in stream_ids(self.backend, batch, opts):
                if not pieces[0]:
                    continue
                ids.extend(pieces[0])
                text = self.decode(ids)
                if text.startswith(emitted) and len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted):]  # held back while it ends in a half-decoded character
                    emitted = text
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]

    def encode(self, prompts: list[str], options: DecodingOptions | None = None) -> EncodedBatch:
        """Tokenize and pad `prompts` (left for decoder-only, right for encoder-decoder).

        Empty prompts are an error; with `options`, so is a prompt that cannot fit max_new_tokens more.
        """
        texts = _prompt_list(prompts)
        side = "right" if self.info.is_encoder_decoder else "left"
        with self._tokenizer_lock:  # a Rust tokenizer's padding settings are shared state
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
        batch = EncodedBatch(enc["input_ids"], enc["attention_mask"])
        self._check_lengths(batch, options)
        return batch

    def decode(self, token_ids: list[int] | tuple[int, ...]) -> str:
        """Text of generated ids, special tokens skipped."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as a prompt (the tokenizer's special tokens included)."""
        with self._tokenizer_lock:
            return len(self.tokenizer(text)["input_ids"])

    def _sequence(self, token_ids: tuple[int, ...], score: float) -> Sequence:
        return Sequence(self.decode(token_ids), tuple(int(t) for t in token_ids), float(score))

    def _check_lengths(self, batch: EncodedBatch, options: DecodingOptions | None) -> None:
        """Every prompt has tokens, and prompt + max_new_tokens fit the model's window (if bounded)."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        if 0 in lengths:
            raise UsageError(f"prompt {lengths.index(0) + 1} has no tokens after tokenization: give some text")
        window = self.info.max_positions
        if window is None or options is None:
            return
        new = options.max_new_tokens
        longest = max(lengths)
        index = lengths.index(longest) + 1
        if self.info.is_encoder_decoder and longest > window:
            raise UsageError(f"prompt {index} has {longest} tokens, over the model's window of {window}: shorten it")
        # the last generated token is never fed back: the model sees new - 1 generated positions
        needed = new if self.info.is_encoder_decoder else longest + new - 1
        if needed > window:
            raise UsageError(f"prompt {index} has {longest} tokens; with max_new_tokens={new} that needs {needed} "
                             f"positions, over the model's window of {window}: shorten the prompt or lower max_new_tokens")


def _prompt_list(prompts: str | list[str]) -> list[str]:
    """A list of non-empty prompt strings (a single string becomes a list of one)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if texts is None:
        raise UsageError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not texts:
        raise UsageError("no prompts given: expected at least one prompt")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise UsageError(f"prompt {index + 1} is a {type(text).__name__}: expected a string")
        if not text:
            raise UsageError(f"prompt {index + 1} is empty: expected some text")
    return texts
