"""Logits processors: small pure objects `(sequences [R, L], scores [R, V]) -> scores [R, V]`.

`sequences` is what transformers' loop holds as `input_ids` at that step: for decoder-only models the
left-padded prompt plus the generated tokens, for encoder-decoder models the decoder start token plus
the generated tokens. Each processor mirrors the transformers 5 class of the same purpose
(RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor, MinNewTokensLengthLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), and `build_processors` builds them in
the order `generate()` does. In beam search they see log-probs, in greedy/sampling raw logits.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from deploylm.backends.base import ModelInfo
from deploylm.decoding.options import DecodingOptions
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
        picked = torch.gather(scores, 1, ids)                                # [R, L]
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)

    def _padded(self, sequences: Tensor, scores: Tensor) -> Tensor:
        """transformers' formulation (a spare column past the vocab); used when the last token is out of vocab."""
        vocab = scores.shape[-1]
        if self.ignore_prefix is not None:
            positions = torch.arange(sequences.shape[1], device=sequences.device)
            sequences = sequences.masked_fill(positions[None, :] < self.ignore_prefix[:, None], vocab)
        ids = sequences.clamp(max=vocab)                                     # [R, L]
        padded = torch.nn.functional.pad(scores, (0, 1))                     # [R, V + 1]
        picked = torch.gather(padded, 1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return padded.scatter(1, ids, picked)[..., :vocab].contiguous()


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
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)     # [R, W]
        rows, starts = matches.nonzero(as_tuple=True)
        tokens = windows[rows, starts, -1]
        keep = tokens < scores.shape[-1]                                     # ids past the logits: nothing to ban
        out = scores.clone()
        out[rows[keep], tokens[keep]] = -float("inf")
        return out


class MinNewTokens:
    """Forbid EOS while fewer than `min_new_tokens` tokens follow the first `prompt_len` positions."""

    def __init__(self, prompt_len: int, min_new_tokens: int, eos_token_ids: Sequence[int], device=None):
        if min_new_tokens < 0 or prompt_len < 0:
            raise UsageError(f"min_new_tokens={min_new_tokens!r} is invalid: use min_new_tokens >= 0")
        self.prompt_len = prompt_len
        self.min_new_tokens = min_new_tokens
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        if sequences.shape[-1] - self.prompt_len >= self.min_new_tokens:
            return scores
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        return torch.where(torch.isin(vocab, self.eos.to(scores.device)), -math.inf, scores)


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
    """Keep the smallest set of tokens whose probability mass exceeds `top_p`, at least `min_keep`."""

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


class ProcessorList(list):
    """Apply processors in order."""

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        for processor in self:
            scores = processor(sequences, scores)
        return scores


def build_processors(options: DecodingOptions, info: ModelInfo, prompt_len: int,
                     ignore_prefix: Tensor | None = None, device=None) -> ProcessorList:
    """The processors for `options`, in transformers' `_get_logits_processor` order.

    prompt_len:    length of the running sequence before the first generated token
                   (decoder-only: padded prompt length; encoder-decoder: 1, the start token).
    ignore_prefix: [R] left-padding length per row (decoder-only with padding), else None.
    """
    out = ProcessorList()
    eos = info.special.eos_token_ids
    if options.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(options.repetition_penalty, ignore_prefix))
    if options.no_repeat_ngram_size > 0:
        out.append(NoRepeatNGram(options.no_repeat_ngram_size))
    if options.min_new_tokens > 0 and eos:
        out.append(MinNewTokens(prompt_len, options.min_new_tokens, eos, device))
    if options.do_sample:
        min_keep = len(eos) + 1 if options.num_beams > 1 else 1
        if options.temperature != 1.0:
            out.append(Temperature(options.temperature))
        if options.top_k != 0:
            out.append(TopK(options.top_k, min_keep))
        if options.top_p < 1.0:
            out.append(TopP(options.top_p, min_keep))
    return out
