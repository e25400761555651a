"""Inputs longer than the model's window (seed §9.2): refuse by default, or truncate, or slide a window.

A prompt fits when its tokens (the tokenizer's special tokens included) fit the model's window:
- decoder-only: prompt + max_new_tokens - 1 <= max_positions (the last generated token is never fed back);
- encoder-decoder: source <= max_positions (the encoder's window) and max_new_tokens <= max_positions.
A backend whose engine was built for fewer positions (ModelInfo.engine: a TensorRT engine's shapes) has the
engine's window where it is the shorter one, and a longest prompt (its prefill profile's).
A prompt that does not fit is a UsageError naming the lengths and these options, unless the call asks:

- ``truncation="left"``: keep the END of the prompt (drop tokens from its start) so it fits;
- ``truncation="right"``: keep the START of the prompt (drop tokens from its end);
- ``truncation="sliding-window"`` (encoder-decoder only): split the source into chunks of the window,
  consecutive chunks sharing ``window_overlap`` tokens, decode every chunk, and join the outputs in order.

Truncation is done by the tokenizer (`truncation_side`, `max_length`), and the windows are its
overflowing tokens (`return_overflowing_tokens`, `stride=window_overlap`), so the special tokens (BOS,
`</s>`) stay on every prompt and chunk, exactly as a transformers user who truncates gets them.

Joining the chunk outputs (`join_outputs`): the outputs' ids are concatenated in chunk order; every chunk's
EOS is dropped except the last one's, and so is every chunk's leading forced BOS (a generation_config's
`forced_bos_token_id`, e.g. mBART's target language code) except the first one's. With an overlap, the overlapping source tokens are decoded twice,
so where the joined output so far ends with the same tokens the next chunk's output starts with, that
shared run is kept once: the longest run of at most `window_overlap` tokens. Bounding it by the
overlap means a copy-like model (copying, translation of similar length) gets its duplicate removed
exactly, while repetitive text ("la la la") never loses more than the overlap could have duplicated.
A model whose output is longer than its input per token can keep part of the duplicate: use overlap 0
(plain concatenation) when that matters. The joined score is the sum of the chunk scores. The joined
text (`join_texts`) is each part's text in order, with a space where a window's output meets the one
before it without a shared run and neither side has whitespace (a model starts its output without
one): so the text can differ from decoding the joined ids by those spaces.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from deploylm.backends.base import EncodedBatch, ModelInfo
from deploylm.errors import OptionError, UsageError

TRUNCATION_MODES = ("left", "right", "sliding-window")


@dataclass(frozen=True, kw_only=True)
class LongInputs:
    """What to do with a prompt longer than the model's window; validated on construction.

    truncation: None (refuse, the default) | "left" | "right" | "sliding-window".
    window_overlap: tokens shared by consecutive windows (sliding-window only; default 0).
    """

    truncation: str | None = None
    window_overlap: int | None = None

    def __post_init__(self) -> None:
        if self.truncation is not None and self.truncation not in TRUNCATION_MODES:
            raise OptionError(f"truncation {self.truncation!r}: expected one of {', '.join(TRUNCATION_MODES)} "
                              "(or leave it out, to refuse over-long prompts)", "truncation")
        overlap = self.window_overlap
        if overlap is None:
            return
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise OptionError(f"window_overlap {overlap!r}: expected an integer >= 0", "window_overlap")
        if self.truncation != "sliding-window":
            raise OptionError(f"window_overlap={overlap} applies only with truncation='sliding-window'",
                              "window_overlap")

    @property
    def overlap(self) -> int:
        return self.window_overlap or 0


def prompt_budget(info: ModelInfo, max_new_tokens: int, specials: int = 0) -> int | None:
    """Most prompt tokens that fit the window with `max_new_tokens` (None: unbounded), and an engine's longest
    prompt (info.engine: a TensorRT engine's prefill profile).

    Raises UsageError when max_new_tokens alone does not fit: no truncation can help then. `specials`: the
    special tokens every prompt carries (a truncating caller), which leave no room for text if the budget
    holds only them.
    """
    window, where, widen = _window(info)
    if window is None:
        return None
    if info.is_encoder_decoder:
        if max_new_tokens > window:
            raise OptionError(f"max_new_tokens={max_new_tokens} is over the model's window of {window}: "
                              f"lower max_new_tokens to at most {window}", "max_new_tokens")
        return window
    budget = window - max_new_tokens + 1  # the last generated token is never fed back
    if budget < 1:
        raise OptionError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {where}: lower "
                          f"max_new_tokens to at most {window}{widen and ', or ' + widen}", "max_new_tokens")
    if budget <= specials:
        raise OptionError(f"max_new_tokens={max_new_tokens} leaves {budget} prompt position{'s' * (budget > 1)} in "
                          f"{where}, no room for a token of text next to the tokenizer's {specials} "
                          f"special token{'s' * (specials > 1)}: lower max_new_tokens to at most {window - specials}"
                          f"{widen and ', or ' + widen}", "max_new_tokens")
    return budget if info.engine is None else min(budget, info.engine.prompt_tokens)


def _window(info: ModelInfo) -> tuple[int | None, str, str]:
    """The positions a decoder-only prompt + max_new_tokens - 1 may take: the model's window, or an engine's
    where it was built for fewer (info.engine); with how messages name it and what raises it ("": nothing to do)."""
    window, engine = info.max_positions, info.engine
    if engine is not None and not info.is_encoder_decoder and (window is None or engine.positions < window):
        return (engine.positions, f"{engine.name}'s window of {engine.positions} positions",
                f"re-export with a larger {engine.positions_setting}")
    return window, f"the model's window of {window}", ""


def new_token_room(info: ModelInfo, prompt_tokens: int) -> int | None:
    """The largest max_new_tokens a prompt of `prompt_tokens` tokens fits the window with (prompt_budget's inverse;
    an engine's window and longest prompt where it has them): None when the window is unbounded, 0 when the prompt
    alone is over it."""
    window = _window(info)[0]
    if window is None:
        return None
    if info.is_encoder_decoder:    # the source has the encoder's window: the output has the decoder's
        return window
    if info.engine is not None and prompt_tokens > info.engine.prompt_tokens:
        return 0
    return max(0, window - prompt_tokens + 1)   # the last generated token is never fed back


_TRUNCATION_ADVICE = re.compile(r",? or pass truncation=.*\(deploylm generate: --truncation [a-z|-]+\)")


def without_truncation_advice(message: str) -> str:
    """check_fits' message for callers that offer no truncation (the HTTP API, the benchmark): the advice to
    pass one removed, the rest (shorten the prompt, lower max_new_tokens) kept."""
    return _TRUNCATION_ADVICE.sub("", message)


def prompts_flags_advice(message: str, command: str) -> str:
    """A check_fits refusal (truncation advice already removed) with the flags of a `command` that reads its
    prompts from --prompts FILE (bench, parity): --max-new-tokens only where fewer new tokens would help, i.e. where
    the message names max_new_tokens (not for a prompt over the window by itself)."""
    flags = "--prompts FILE, --max-new-tokens N" if "max_new_tokens" in message else "--prompts FILE"
    return f"{message} ({command}: {flags})"


def check_fits(lengths: list[int], info: ModelInfo, max_new_tokens: int) -> None:
    """Refuse the longest prompt that does not fit, naming the lengths and the options that help."""
    budget = prompt_budget(info, max_new_tokens)
    longest = max(lengths)
    if budget is None or longest <= budget:
        return
    index, engine = lengths.index(longest) + 1, info.engine
    if info.is_encoder_decoder:
        raise UsageError(f"prompt {index} has {longest} tokens, over the model's window of {info.max_positions}: "
                         "shorten it, or pass truncation='left', 'right' or 'sliding-window' (deploylm generate: "
                         "--truncation left|right|sliding-window)")
    if engine is not None and longest > engine.prompt_tokens:   # no max_new_tokens makes this one fit
        raise UsageError(f"prompt {index} has {longest} tokens, over {engine.name}'s longest prompt of "
                         f"{engine.prompt_tokens} tokens: shorten the prompt, re-export with a larger "
                         f"{engine.prompt_setting}, or pass truncation='left' or 'right' (deploylm generate: "
                         "--truncation left|right)")
    window, where, widen = _window(info)
    if longest > window:   # over it before any new token: fewer new tokens would not help
        raise UsageError(f"prompt {index} has {longest} tokens, over {where} before any new token: shorten it, "
                         f"{widen and widen + ', '}or pass truncation='left' or 'right' (deploylm generate: "
                         "--truncation left|right)")
    needed = longest + max_new_tokens - 1
    raise UsageError(f"prompt {index} has {longest} tokens; with max_new_tokens={max_new_tokens} that needs {needed} "
                     f"positions, over {where}: shorten the prompt, lower max_new_tokens, {widen and widen + ', '}"
                     "or pass truncation='left' or 'right' (deploylm generate: --truncation left|right)")


@contextmanager
def encoding(tokenizer: Any, texts: Sequence[str]) -> Iterator[None]:
    """A text the tokenizer itself refuses (a WordLevel vocabulary without an unknown token meeting a word
    it lacks) is a UsageError naming that text, not the `tokenizers` library's bare Exception."""
    try:
        yield
    except Exception as exc:
        if type(exc) is not Exception:   # tokenizers raises plain Exception; anything else is not the input's fault
            raise
        bad = next((t for t in texts if not _encodes(tokenizer, t)), texts[0] if texts else "")
        short = bad if len(bad) <= 60 else bad[:57] + "..."
        raise UsageError(f"prompt {short!r}: the model's tokenizer cannot encode it ({exc}); a tokenizer "
                         "without an unknown token cannot encode words outside its vocabulary") from None


def _encodes(tokenizer: Any, text: str) -> bool:
    try:
        tokenizer(text, verbose=False)
    except Exception:
        return False
    return True


def tokenize(tokenizer: Any, texts: list[str], *, padding_side: str, max_length: int | None = None,
             truncation_side: str | None = None) -> EncodedBatch:
    """Tokenize and pad `texts`; with `truncation_side`, cut each to `max_length` tokens from that side.

    The caller holds the tokenizer lock: `truncation_side` is tokenizer state, restored afterwards.
    """
    if truncation_side is None or max_length is None:
        # verbose=False: no "longer than the maximum sequence length" warning; check_fits says it better
        with encoding(tokenizer, texts):
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side, verbose=False)
        return EncodedBatch(enc["input_ids"], enc["attention_mask"])
    _check_room(tokenizer, max_length, 0)
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = truncation_side
    try:
        with encoding(tokenizer, texts):
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side=padding_side,
                            truncation=True, max_length=max_length)
    finally:
        tokenizer.truncation_side = saved
    return EncodedBatch(enc["input_ids"], enc["attention_mask"])


def tokenize_windows(tokenizer: Any, text: str, *, window: int, overlap: int) -> EncodedBatch:
    """One text as C chunks of at most `window` tokens (specials included), sharing `overlap` tokens.

    Returns a right-padded batch [C, <= window] (the encoder-decoder layout). Caller holds the lock.
    """
    _check_room(tokenizer, window, overlap)
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = "right"
    try:
        with encoding(tokenizer, [text]):
            enc = tokenizer([text], return_tensors="pt", padding=True, padding_side="right", truncation=True,
                            max_length=window, stride=overlap, return_overflowing_tokens=True)
    finally:
        tokenizer.truncation_side = saved
    return EncodedBatch(enc["input_ids"], enc["attention_mask"])                   # [C, T]


def join_outputs(outputs: Sequence[Sequence[int]], overlap: int, eos_ids: Sequence[int],
                 forced_bos: int | None = None) -> tuple[int, ...]:
    """Chunk outputs joined in order: EOS only at the end, a forced BOS only at the start, each overlap's
    duplicated run kept once."""
    return tuple(t for part, _ in join_parts(outputs, overlap, eos_ids, forced_bos) for t in part)


def join_parts(outputs: Sequence[Sequence[int]], overlap: int, eos_ids: Sequence[int],
               forced_bos: int | None = None) -> list[tuple[tuple[int, ...], bool]]:
    """What each chunk output adds to the join (join_outputs), and whether it continues the output before
    it through a shared run (True) or starts after it (False: the two met without sharing a token)."""
    joined: list[int] = []
    parts = []
    for index, output in enumerate(outputs):
        tokens = list(output)
        if index and forced_bos is not None and tokens[:1] == [forced_bos]:
            tokens = tokens[1:]
        if index < len(outputs) - 1:
            tokens = [t for t in tokens if t not in eos_ids]
        shared = shared_run(joined, tokens, overlap)
        joined.extend(tokens[shared:])
        parts.append((tuple(tokens[shared:]), shared > 0))
    return parts


def join_texts(texts: Sequence[str], separate: Sequence[bool]) -> str:
    """The texts of join_parts' parts, in order. Where a part is separate from the output before it
    (`separate[i]`: it does not continue it through a shared run) and neither side has whitespace there,
    a space goes between: each window's output is a text of its own, which a tokenizer starts without
    one ("...one hundred" + "ten" is "...one hundred ten", not "hundredten"). Not between wide (CJK)
    characters, in scripts written without spaces."""
    out = ""
    for text, apart in zip(texts, separate):
        if apart and out and text and not out[-1].isspace() and not text[0].isspace() \
                and not (_wide(out[-1]) or _wide(text[0])):
            out += " "
        out += text
    return out


def _wide(char: str) -> bool:
    """CJK and other wide characters: scripts written without spaces between words."""
    import unicodedata

    return unicodedata.east_asian_width(char) in ("W", "F")


def shared_run(joined: Sequence[int], following: Sequence[int], limit: int) -> int:
    """Length of the longest run (<= limit) that ends `joined` and starts `following`."""
    for size in range(min(limit, len(joined), len(following)), 0, -1):
        if list(joined[-size:]) == list(following[:size]):
            return size
    return 0


def split_rows(batch: EncodedBatch, size: int) -> list[EncodedBatch]:
    """`batch` in pieces of at most `size` rows, each trimmed of all-padding columns (right padding)."""
    pieces = []
    for start in range(0, batch.batch_size, size):
        mask = batch.attention_mask[start:start + size]                             # [b, T]
        width = int(mask.sum(dim=1).max())
        pieces.append(EncodedBatch(batch.input_ids[start:start + size, :width], mask[:, :width]))
    return pieces


def concat_rows(batches: list[EncodedBatch], pad_token_id: int) -> EncodedBatch:
    """Right-padded batches stacked into one (padded to the widest)."""
    width = max(int(b.input_ids.shape[1]) for b in batches)
    ids = [torch.nn.functional.pad(b.input_ids, (0, width - b.input_ids.shape[1]), value=pad_token_id) for b in batches]
    mask = [torch.nn.functional.pad(b.attention_mask, (0, width - b.attention_mask.shape[1]), value=0) for b in batches]
    return EncodedBatch(torch.cat(ids), torch.cat(mask))                            # [sum C, width]


def _check_room(tokenizer: Any, max_length: int, overlap: int) -> None:
    """The window holds the special tokens, at least one real token, and more than the overlap."""
    room = max_length - tokenizer.num_special_tokens_to_add()
    if room < 1:
        raise UsageError(f"a window of {max_length} tokens has no room for the prompt next to the tokenizer's "
                         "special tokens: lower max_new_tokens")
    if overlap >= room:
        raise OptionError(f"window_overlap={overlap} must be smaller than the {room} prompt tokens each window "
                          f"holds (window {max_length}, special tokens included): lower window_overlap to at most "
                          f"{room - 1}", "window_overlap")
