"""Logits processors: small pure objects `(sequences [R, L], scores [R, V]) -> scores [R, V]`
(those marked `in_place` may instead write into `scores` when the caller's ProcessorList says it owns it).

`sequences` is what transformers' loop holds as `input_ids` at that step: for decoder-only models the
left-padded prompt plus the generated tokens, for encoder-decoder models the decoder start token plus
the generated tokens. Each processor mirrors the transformers 5 class of the same purpose
(SequenceBiasLogitsProcessor, EncoderRepetitionPenaltyLogitsProcessor, RepetitionPenaltyLogitsProcessor,
NoRepeatNGramLogitsProcessor, EncoderNoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor,
MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, ForcedBOSTokenLogitsProcessor,
ForcedEOSTokenLogitsProcessor, ExponentialDecayLengthPenalty, SuppressTokensLogitsProcessor,
SuppressTokensAtBeginLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), and
`build_processors` builds them in the order `generate()` does, from the call's options and the model's own
settings (ModelInfo.generation: bad_words_ids, min_length, forced_bos/eos_token_id, suppress_tokens,
begin_suppress_tokens, and sequence_bias, encoder_repetition_penalty, encoder_no_repeat_ngram_size,
exponential_decay_length_penalty unless the call gives its own; num_beam_groups > 1 with beam search is
refused, as transformers 5 refuses it). The "encoder" settings look at the batch's input ids: the source of
an encoder-decoder, the left-padded prompt (padding included) of a decoder-only model, as transformers does.
In beam search they see log-probs, in greedy/sampling raw logits.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from deploylm.backends.base import ModelInfo
from deploylm.decoding.options import (GROUP_BEAM_SEARCH_UNSUPPORTED, DecodingOptions, invalid,
                                       parse_exponential_decay, parse_sequence_bias)
from deploylm.errors import UsageError

Processor = Callable[[Tensor, Tensor], Tensor]


class RepetitionPenalty:
    """Each distinct token already in the sequence: score < 0 -> score * penalty, else score / penalty.

    `ignore_prefix` [R] (optional): per row, how many leading positions (left padding) not to count, as
    transformers does when the prompt's attention mask has padding.
    """

    def __init__(self, penalty: float, ignore_prefix: Tensor | None = None):
        if not penalty > 0:
            raise UsageError(f"repetition_penalty={penalty!r} is invalid: use a penalty > 0")
        self.penalty = float(penalty)
        self.ignore_prefix = ignore_prefix

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        vocab = scores.shape[-1]
        last = sequences[:, -1:]                                             # [R, 1], always counted
        if bool((last >= vocab).any()):
            return self._padded(sequences, scores)
        skip = sequences >= vocab                                            # ids the logits cannot score
        if self.ignore_prefix is not None:
            positions = torch.arange(sequences.shape[1], device=sequences.device)
            skip |= positions[None, :] < self.ignore_prefix[:, None]
        ids = torch.where(skip, last, sequences)   # a skipped position repeats a counted token: no effect
        return _penalize(scores, ids, self.penalty)

    def _padded(self, sequences: Tensor, scores: Tensor) -> Tensor:
        """transformers' formulation (a spare column past the vocab); used when the last token is out of vocab."""
        vocab = scores.shape[-1]
        if self.ignore_prefix is not None:
            positions = torch.arange(sequences.shape[1], device=sequences.device)
            sequences = sequences.masked_fill(positions[None, :] < self.ignore_prefix[:, None], vocab)
        ids = sequences.clamp(max=vocab)                                     # [R, L]
        padded = torch.nn.functional.pad(scores, (0, 1))                     # [R, V + 1]
        return _penalize(padded, ids, self.penalty)[..., :vocab].contiguous()


def _penalize(scores: Tensor, ids: Tensor, penalty: float) -> Tensor:
    """Scores with each entry at `ids` [R, L] scaled: negative ones * penalty, others / penalty."""
    picked = torch.gather(scores, 1, ids)                                    # [R, L]
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the sequence."""

    def __init__(self, size: int):
        if size < 1:
            raise UsageError(f"no_repeat_ngram_size={size!r} is invalid: use an n-gram size >= 1")
        self.size = size

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        length = sequences.shape[-1]
        if length < self.size:
            return scores
        prefix = sequences[:, length + 1 - self.size:]                       # [R, n-1]
        windows = sequences.unfold(dimension=1, size=self.size, step=1)      # [R, W, n]
        return _ban_completions(windows, prefix, scores)


def _ban_completions(windows: Tensor, prefix: Tensor, scores: Tensor) -> Tensor:
    """Scores with -inf for the last token of every n-gram window [R, W, n] whose first n-1 tokens equal
    the row's prefix [R, n-1] (ids past the logits: nothing to ban)."""
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)         # [R, W]
    rows, starts = matches.nonzero(as_tuple=True)
    tokens = windows[rows, starts, -1]
    keep = tokens < scores.shape[-1]
    out = scores.clone()
    out[rows[keep], tokens[keep]] = -float("inf")
    return out


class SequenceBias:
    """Add a bias to the last token of each biased token sequence when the running sequence ends with the
    rest of it (one-token sequences: always), as transformers' SequenceBiasLogitsProcessor."""

    def __init__(self, sequence_bias: Any, vocab_size: int, device=None, where: str = "decoding option"):
        pairs = parse_sequence_bias(sequence_bias, where)
        outside = sorted({t for ids, _ in pairs for t in ids if t >= vocab_size})
        if outside:
            raise invalid(where, "sequence_bias",
                          f"sequence_bias has token(s) {outside} outside the vocabulary of {vocab_size}")
        self.pairs = pairs
        self.single = torch.zeros(vocab_size, dtype=torch.float, device=device)           # [V]
        singles = [(ids[0], bias) for ids, bias in pairs if len(ids) == 1]
        if singles:
            self.single[[t for t, _ in singles]] = torch.tensor([b for _, b in singles], device=device)
        by_prefix: dict[int, list[tuple[tuple[int, ...], float]]] = {}
        for ids, bias in pairs:
            if len(ids) > 1:
                by_prefix.setdefault(len(ids) - 1, []).append((ids, bias))
        self.groups = [(torch.tensor([ids[:-1] for ids, _ in group], device=device),     # [G, n] prefixes
                        torch.tensor([ids[-1] for ids, _ in group], device=device),      # [G] last tokens
                        torch.tensor([b for _, b in group], dtype=torch.float, device=device))  # [G]
                       for group in by_prefix.values()]

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        bias = torch.zeros_like(scores)
        bias += self.single
        for prefixes, last, biases in self.groups:
            n = prefixes.shape[1]
            if n > sequences.shape[1]:
                continue
            matches = (sequences[:, None, -n:] == prefixes).all(dim=-1)                   # [R, G]
            bias.index_add_(1, last, torch.where(matches, biases, 0.0).to(bias.dtype))
        return scores + bias


class _PerRow:
    """A per-input tensor [B, ...] repeated for the R = B * k rows of a step (rows of an input contiguous),
    on the scores' device; kept for the last R (the same every step of a search)."""

    def __init__(self, per_input: Tensor):
        self.per_input = per_input
        self._rows: Tensor | None = None

    def __call__(self, scores: Tensor) -> Tensor:
        R = scores.shape[0]
        if self._rows is None or self._rows.shape[0] != R or self._rows.device != scores.device:
            self._rows = self.per_input.to(scores.device).repeat_interleave(R // self.per_input.shape[0], dim=0)
        return self._rows


class EncoderRepetitionPenalty:
    """Each token of the row's input ids (the source, or a decoder-only prompt, padding included):
    score < 0 -> score / penalty, else score * penalty (transformers' EncoderRepetitionPenaltyLogitsProcessor:
    > 1 favours tokens of the input). `encoder_input_ids` [B, S]; rows of one input are contiguous."""

    def __init__(self, penalty: float, encoder_input_ids: Tensor, vocab_size: int):
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise UsageError(f"encoder_repetition_penalty={penalty!r} is invalid: use a penalty > 0")
        self.penalty = 1 / float(penalty)
        self.vocab = vocab_size
        self.padded = bool((encoder_input_ids >= vocab_size).any())   # ids past the logits: a spare column V
        self.ids = _PerRow(encoder_input_ids.clamp(max=vocab_size) if self.padded else encoder_input_ids)

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        ids = self.ids(scores)                                                              # [R, S]
        if self.padded:   # (embedding wider than lm_head): scored in a spare column, dropped after
            scores = torch.nn.functional.pad(scores, (0, 1))
        out = _penalize(scores, ids, self.penalty)
        return out[..., :self.vocab].contiguous() if self.padded else out


class EncoderNoRepeatNGram:
    """Ban every token that would complete, at the end of the running sequence, an n-gram of the row's
    input ids (transformers' EncoderNoRepeatNGramLogitsProcessor; padding included, as there)."""

    def __init__(self, size: int, encoder_input_ids: Tensor):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UsageError(f"encoder_no_repeat_ngram_size={size!r} is invalid: use an n-gram size >= 1")
        self.size = size
        ids = encoder_input_ids
        self.windows = _PerRow(ids.unfold(1, size, 1) if ids.shape[1] >= size
                               else ids.new_empty((ids.shape[0], 0, size)))                # [B, W, n]

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        length, n = sequences.shape[-1], self.size
        if length < n - 1:                     # transformers' prefix slice cannot match any n-gram then
            return scores
        prefix = sequences[:, length + 1 - n:]                                               # [R, n-1]
        return _ban_completions(self.windows(scores), prefix, scores)                        # windows [R, W, n]


class ExponentialDecayLength:
    """After `start` generated tokens, add |eos score| * (factor ** k - 1) to each EOS score, k the tokens past
    the start (transformers' ExponentialDecayLengthPenalty; `prompt_len` as MinNewTokens')."""

    def __init__(self, setting: Any, eos_token_ids: Sequence[int], prompt_len: int, vocab_size: int,
                 device=None, where: str = "decoding option"):
        start, self.factor = parse_exponential_decay(setting, where)
        self.regulation_start = start + prompt_len
        self.eos = torch.tensor([t for t in eos_token_ids if t < vocab_size], dtype=torch.long, device=device)

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        length = sequences.shape[-1]
        if length <= self.regulation_start:
            return scores
        eos = self.eos.to(scores.device)
        picked = scores[:, eos]
        penalty = torch.abs(picked) * (pow(self.factor, length - self.regulation_start) - 1)
        penalty = penalty.masked_fill(~torch.isfinite(picked), 0.0)
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = penalty
        return scores + penalties


class MinNewTokens:
    """Forbid EOS while fewer than `min_new_tokens` tokens follow the first `prompt_len` positions."""

    def __init__(self, prompt_len: int, min_new_tokens: int, eos_token_ids: Sequence[int], device=None):
        if min_new_tokens < 0 or prompt_len < 0:
            raise UsageError(f"min_new_tokens={min_new_tokens!r} is invalid: use min_new_tokens >= 0")
        self.prompt_len = prompt_len
        self.min_new_tokens = min_new_tokens
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)

    in_place = True

    def __call__(self, sequences: Tensor, scores: Tensor, inplace: bool = False) -> Tensor:
        if sequences.shape[-1] - self.prompt_len >= self.min_new_tokens:
            return scores
        return _ban(scores, self.eos, inplace)


class BadWords:
    """Ban every token that would complete a banned token sequence (transformers' NoBadWordsLogitsProcessor).

    One-token sequences are banned at every step; a longer one when the running sequence ends with all but
    its last token. One-token sequences that are an EOS are dropped, as transformers does.
    """

    def __init__(self, bad_words_ids: Any, eos_token_ids: Sequence[int], vocab_size: int, device=None):
        words = _token_lists("bad_words_ids", bad_words_ids)
        eos = set(eos_token_ids)
        self.words = [w for w in dict.fromkeys(words) if not (len(w) == 1 and w[0] in eos)]
        outside = sorted({t for w in self.words for t in w if t >= vocab_size})
        if outside:
            raise UsageError(f"bad_words_ids has token(s) {outside} outside the vocabulary of {vocab_size}")
        self.single = torch.zeros(vocab_size, dtype=torch.float, device=device)         # [V] 0 or -inf
        self.single[[w[0] for w in self.words if len(w) == 1]] = -math.inf
        by_prefix: dict[int, list[tuple[int, ...]]] = {}
        for w in self.words:
            if len(w) > 1:
                by_prefix.setdefault(len(w) - 1, []).append(w)
        self.groups = [(torch.tensor([w[:-1] for w in group], device=device),        # [G, n] prefixes
                        torch.tensor([w[-1] for w in group], device=device))          # [G] last tokens
                       for group in by_prefix.values()]

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        if not self.groups:
            return scores + self.single
        bias = torch.zeros_like(scores) + self.single                                   # [R, V]
        for prefixes, last in self.groups:
            n = prefixes.shape[1]
            if n > sequences.shape[1]:
                continue
            matches = (sequences[:, None, -n:] == prefixes).all(dim=-1)                # [R, G]
            bias.index_add_(1, last, torch.where(matches, -math.inf, 0.0).to(bias.dtype))
        return scores + bias


class MinLength:
    """Forbid EOS while the running sequence (prompt or start token included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_ids: Sequence[int], device=None):
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
            raise UsageError(f"min_length={min_length!r} is invalid: use an integer >= 0")
        self.min_length = min_length
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)

    in_place = True

    def __call__(self, sequences: Tensor, scores: Tensor, inplace: bool = False) -> Tensor:
        if sequences.shape[-1] >= self.min_length:
            return scores
        return _ban(scores, self.eos, inplace)


class ForcedBOS:
    """Force `token_id` as the first generated token (when the running sequence has length 1)."""

    def __init__(self, token_id: int):
        self.token_id = _token_ids("forced_bos_token_id", token_id, single=True)[0]

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        if sequences.shape[-1] != 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.token_id] = 0
        return out


class ForcedEOS:
    """Force (any of) `token_ids` at the last step: when the running sequence has length `max_length` - 1."""

    def __init__(self, max_length: int, token_ids: Any):
        self.max_length = max_length
        self.token_ids = list(_token_ids("forced_eos_token_id", token_ids))

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        if sequences.shape[-1] != self.max_length - 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.token_ids] = 0
        return out


class SuppressTokens:
    """Ban `token_ids` at every step, or only when the running sequence has length `begin_index`
    (transformers' SuppressTokensAtBeginLogitsProcessor). Ids past the logits are ignored."""

    def __init__(self, token_ids: Any, vocab_size: int, begin_index: int | None = None, device=None):
        name = "suppress_tokens" if begin_index is None else "begin_suppress_tokens"
        ids = torch.tensor(list(_token_ids(name, token_ids)), dtype=torch.long, device=device)
        self.mask = torch.isin(torch.arange(vocab_size, device=device), ids)           # [V] bool
        self.begin_index = begin_index

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        if self.begin_index is not None and sequences.shape[-1] != self.begin_index:
            return scores
        return torch.where(self.mask.to(scores.device), -math.inf, scores)


class Temperature:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise UsageError(f"temperature={temperature!r} is invalid: use a temperature > 0")
        self.temperature = float(temperature)

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        return scores / self.temperature


class TopK:
    """Keep the `top_k` highest scores (ties with the k-th kept), at least `min_keep`."""

    def __init__(self, top_k: int, min_keep: int = 1):
        if top_k < 1:
            raise UsageError(f"top_k={top_k!r} is invalid: use top_k >= 1 (0 turns it off)")
        self.top_k = max(top_k, min_keep)

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        k = min(self.top_k, scores.size(-1))
        remove = scores < torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(remove, -float("inf"))


class TopP:
    """Keep the smallest set of most probable tokens whose probability mass reaches `top_p` (>=: a set summing to
    exactly `top_p` is enough, as in transformers), at least `min_keep`."""

    def __init__(self, top_p: float, min_keep: int = 1):
        if not 0 < top_p <= 1:
            raise UsageError(f"top_p={top_p!r} is invalid: use 0 < top_p <= 1")
        self.top_p = float(top_p)
        self.min_keep = min_keep

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - self.top_p)
        remove_sorted[..., -self.min_keep:] = 0
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        return scores.masked_fill(remove, -float("inf"))


def _ban(scores: Tensor, eos: Tensor, inplace: bool) -> Tensor:
    """scores [R, V] with the columns `eos` (ids past V ignored) set to -inf: written into `scores` when
    `inplace`, else into a copy. Same values as transformers' `torch.where(isin(arange(V), eos), -inf, scores)`
    without its [V] mask and [R, V] select (issue 7: that cost ~1 ms a step at 32 x 49,152, far more under load)."""
    ids = eos.to(scores.device)
    if bool((ids >= scores.shape[-1]).any()):
        ids = ids[ids < scores.shape[-1]]
    return scores.index_fill_(1, ids, -math.inf) if inplace else scores.index_fill(1, ids, -math.inf)


class ProcessorList(list):
    """Apply processors in order.

    inplace=True says `scores` is the caller's own scratch buffer: processors with `in_place = True` then
    write into it instead of returning a modified copy (the values are the same either way). Without it,
    no processor modifies `scores` (it may be the backend's output).
    """

    def __call__(self, sequences: Tensor, scores: Tensor, inplace: bool = False) -> Tensor:
        for processor in self:
            if inplace and getattr(processor, "in_place", False):
                scores = processor(sequences, scores, inplace=True)
            else:
                scores = processor(sequences, scores)
        return scores


def build_processors(options: DecodingOptions, info: ModelInfo, prompt_len: int,
                     ignore_prefix: Tensor | None = None, device=None,
                     encoder_input_ids: Tensor | None = None) -> ProcessorList:
    """The processors for `options` and the model's settings, in transformers' `_get_logits_processor` order.

    prompt_len:        length of the running sequence before the first generated token
                       (decoder-only: padded prompt length; encoder-decoder: 1, the start token).
    ignore_prefix:     [R] left-padding length per row (decoder-only with padding), else None.
    encoder_input_ids: [B, S] the batch's input ids (source, or left-padded prompt): what transformers passes
                       as `encoder_input_ids`; needed by encoder_repetition_penalty/encoder_no_repeat_ngram_size.
    """
    model = info.generation
    groups = model.get("num_beam_groups")
    if options.num_beams > 1 and isinstance(groups, int) and groups > 1:
        # any beam search of this model is group beam search: only num_beams=1 decodes it (as transformers)
        raise UsageError(f"model {info.name!r}: its generation_config sets num_beam_groups={groups}: "
                         f"{GROUP_BEAM_SEARCH_UNSUPPORTED}; decode it with num_beams=1 (greedy or sampling: the "
                         "groups then change nothing, as in transformers)")
    out = ProcessorList()
    eos = info.special.eos_token_ids
    bias, where = _setting(options, info, "sequence_bias")
    if bias:
        out.append(SequenceBias(bias, info.vocab_size, device, where))
    penalty, _ = _setting(options, info, "encoder_repetition_penalty")
    if penalty is not None and penalty != 1.0:
        out.append(EncoderRepetitionPenalty(penalty, _encoder_ids(encoder_input_ids, "encoder_repetition_penalty"),
                                            info.vocab_size))
    if options.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(options.repetition_penalty, ignore_prefix))
    if options.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGram(options.no_repeat_ngram_size))
    size, _ = _setting(options, info, "encoder_no_repeat_ngram_size")
    if size:
        out.append(EncoderNoRepeatNGram(size, _encoder_ids(encoder_input_ids, "encoder_no_repeat_ngram_size")))
    out.extend(_length_processors(options, info, prompt_len, device))
    out.extend(_forcing_processors(options, info, prompt_len, device))
    decay, where = _setting(options, info, "exponential_decay_length_penalty")
    if decay is not None and eos:
        out.append(ExponentialDecayLength(decay, eos, prompt_len, info.vocab_size, device, where))
    out.extend(_suppress_processors(info, prompt_len, device))
    if options.do_sample:
        # beams keep one token more than there are EOS ids to continue with; 2 for a model without EOS
        # (transformers' `_get_logits_processor`: its `_eos_token_tensor` is then None)
        min_keep = (len(eos) + 1 if eos else 2) if options.num_beams > 1 else 1
        if options.temperature != 1.0:
            out.append(Temperature(options.temperature))
        if options.top_k != 0:
            out.append(TopK(options.top_k, min_keep))
        if options.top_p < 1.0:
            out.append(TopP(options.top_p, min_keep))
    return out


def _setting(options: DecodingOptions, info: ModelInfo, name: str) -> tuple[Any, str]:
    """The call's value of `name` when it gives one, else the model's (generation_config); and where it came from."""
    value = getattr(options, name)
    if value is not None:
        return value, "decoding option"
    return info.generation.get(name), "generation setting"


def _encoder_ids(ids: Tensor | None, name: str) -> Tensor:
    if ids is None:
        raise UsageError(f"{name} needs the prompt's input ids")
    return ids


def _length_processors(options: DecodingOptions, info: ModelInfo, prompt_len: int, device) -> list[Processor]:
    """bad_words_ids, min_length (the model's), min_new_tokens (the call's, else the model's).

    transformers replaces the model's min_length by prompt_len + min_new_tokens when min_new_tokens is given
    (min_new_tokens=0 too: no minimum); MinNewTokens then bans exactly what that MinLength would, so the model's
    min_length applies only when min_new_tokens is None (neither the call nor the model's defaults give one).
    """
    out: list[Processor] = []
    model, eos = info.generation, info.special.eos_token_ids
    if model.get("bad_words_ids") is not None:
        bad = BadWords(model["bad_words_ids"], eos, info.vocab_size, device)
        if bad.words:
            out.append(bad)
    if model.get("min_length") and eos and options.min_new_tokens is None:
        out.append(MinLength(model["min_length"], eos, device))
    if options.min_new_tokens and eos:
        out.append(MinNewTokens(prompt_len, options.min_new_tokens, eos, device))
    return out


def _forcing_processors(options: DecodingOptions, info: ModelInfo, prompt_len: int, device) -> list[Processor]:
    """forced_bos_token_id, forced_eos_token_id (at prompt_len + max_new_tokens - 1)."""
    out: list[Processor] = []
    model = info.generation
    if model.get("forced_bos_token_id") is not None:
        out.append(ForcedBOS(model["forced_bos_token_id"]))
    if model.get("forced_eos_token_id") is not None:
        out.append(ForcedEOS(prompt_len + options.max_new_tokens, model["forced_eos_token_id"]))
    return out


def _suppress_processors(info: ModelInfo, prompt_len: int, device) -> list[Processor]:
    """suppress_tokens, begin_suppress_tokens (at the first generated token; the second when a BOS is forced there)."""
    out: list[Processor] = []
    model = info.generation
    bos = model.get("forced_bos_token_id")
    if model.get("suppress_tokens") is not None:
        out.append(SuppressTokens(model["suppress_tokens"], info.vocab_size, device=device))
    if model.get("begin_suppress_tokens") is not None:
        begin = prompt_len if (prompt_len > 1 or bos is None) else prompt_len + 1
        out.append(SuppressTokens(model["begin_suppress_tokens"], info.vocab_size, begin, device))
    return out


def _token_ids(name: str, value: Any, single: bool = False) -> tuple[int, ...]:
    """An id or a sequence of ids (>= 0) as a tuple; anything else is a UsageError naming the setting."""
    ids = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else None
    if ids is None or (single and len(ids) != 1) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        expected = "a token id >= 0" if single else "a token id >= 0 or a list of them"
        raise UsageError(f"generation setting {name}={value!r} is invalid: expected {expected}")
    return ids


def _token_lists(name: str, value: Any) -> list[tuple[int, ...]]:
    """A non-empty list of non-empty token id lists, as tuples."""
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(w, (list, tuple)) and w for w in value):
        raise UsageError(f"generation setting {name}={value!r} is invalid: expected a list of token id lists")
    return [_token_ids(name, w) for w in value]
