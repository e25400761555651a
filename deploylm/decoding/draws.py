"""Seeded draws for sampling and beam sampling, and a clear error when there is nothing to draw from."""
from __future__ import annotations

import torch
from torch import Tensor

from deploylm.errors import NumericalOverflow, UsageError


def overflow(step: int, consequence: str) -> NumericalOverflow:
    """The error for NaN or +inf logits at generated token `step + 1`: the model's numerical overflow, not the
    caller's options (a server answers 500, not 400). `consequence`: what the search cannot do with them."""
    return NumericalOverflow(f"the model's logits at generated token {step + 1} are NaN or infinite, so {consequence}: "
                         "a numerical overflow in the model (float16 is the usual cause); run it in float32 or bfloat16")


def draw(scores: Tensor, n: int, generator: torch.Generator | None, active: Tensor, step: int,
         inputs_per_row: int = 1) -> Tensor:
    """`n` draws from softmax of each row of scores [R, V] -> token indices [R, n]: torch.multinomial, the same
    call as transformers', so seeded draws match.

    A row whose every token the processors banned (n-gram bans, min_new_tokens, bad words, suppressed
    tokens: all scores -inf, so softmax gives NaN) cannot be sampled: for an active row (`active` [R])
    that is a UsageError naming the step and the prompt (row // inputs_per_row, counted from 1 as in every
    "prompt N" message), where torch.multinomial would fail deep inside; a finished row draws from a
    uniform stand-in (its token becomes padding). A row with a NaN or +inf score is the model's doing (a
    numerical overflow), not the options': a NumericalOverflow that says so."""
    probs = torch.nn.functional.softmax(scores, dim=-1)
    empty = ~torch.isfinite(probs).all(-1)                                            # [R] rows of NaN
    if bool(empty.any()):
        stuck = empty & active
        if bool(stuck.any()):
            row = int(stuck.nonzero()[0, 0])
            if bool((torch.isnan(scores[row]) | torch.isposinf(scores[row])).any()):
                raise overflow(step, "there is nothing to sample from")
            raise UsageError(f"nothing left to sample at generated token {step + 1} of prompt {row // inputs_per_row + 1}: "
                             "the options ban every token (no_repeat_ngram_size, min_new_tokens, bad_words_ids, "
                             "suppress_tokens or sequence_bias); relax them or lower max_new_tokens")
        probs = torch.where(empty[:, None], torch.ones_like(probs), probs)
    return torch.multinomial(probs, num_samples=n, generator=generator)
