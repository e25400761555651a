"""Greedy decoding and sampling (one row per draw): transformers 5's `_sample`, step by step.

Rows: R = B * N where N = num_return_sequences (sampling) or 1 (greedy); draws of an input contiguous.
Processors act on raw fp32 logits. A finished row keeps receiving the pad token, as in transformers.
The score of a row is the model's log-likelihood of its generated tokens (log_softmax of the raw
logits, before processors and warpers) divided by generated_len ** length_penalty. This equals the
score of a one-beam search whenever processors only ban tokens (n-gram ban, min_new_tokens), not
when they rescale them (repetition penalty, temperature): transformers reports no score here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from deploylm.decoding.beam import _chunk_maxima
from deploylm.decoding.draws import draw, overflow
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.processors import ProcessorList
from deploylm.decoding.threads import no_threads


def first_argmax(scores: Tensor) -> Tensor:
    """torch.argmax(scores, dim=-1) for scores [R, V], the same index (the first maximum; a NaN counts as the
    maximum, as in torch), found through beam search's chunk maxima (`_chunk_maxima`): torch's argmax
    over the full row is a scalar loop on CPU (0.21 ms at 8 x 49,152), its amax is vectorized (0.02 ms).
    The first chunk holding the row's maximum holds its first occurrence; argmax runs inside that chunk."""
    R, vocab = scores.shape
    maxima = _chunk_maxima(scores, 1) if scores.device.type == "cpu" else None           # [R, 1, n]
    if maxima is None:
        return torch.argmax(scores, dim=-1)
    n = maxima.shape[-1]
    c = vocab // n                                                                      # chunk width
    chunk = torch.argmax(maxima[:, 0], dim=-1)                                          # [R] first chunk with the max
    window = scores.reshape(R, n, c)[torch.arange(R, device=scores.device), chunk]      # [R, c]
    return chunk * c + torch.argmax(window, dim=-1)                                     # [R]


class SampleSearch:
    """Rows that each pick one token per step, by argmax or by a seeded multinomial draw."""

    def __init__(self, options: DecodingOptions, prompt: Tensor, eos_ids: tuple[int, ...], pad: int,
                 processors: ProcessorList, generator: torch.Generator | None = None):
        B, P = prompt.shape
        dev = prompt.device
        self.N = options.rows_per_input
        self.B, self.P = B, P
        self.options, self.processors, self.generator = options, processors, generator
        self.max_len = P + options.max_new_tokens
        self.cur_len = P
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
        self.has_eos = len(eos_ids) > 0
        self.pad = pad
        self.sequences = torch.full((B * self.N, self.max_len), pad, dtype=torch.long, device=dev)  # [R, L]
        self.sequences[:, :P] = prompt.repeat_interleave(self.N, dim=0)
        self.unfinished = torch.ones(B * self.N, dtype=torch.bool, device=dev)
        self.sum_logprobs = torch.zeros(B * self.N, dtype=torch.float, device=dev)
        self.gen_len = torch.zeros(B * self.N, dtype=torch.long, device=dev)
        self.all_done = False
        self._log_probs: Tensor | None = None                                   # [R, V] reused every step
        self._scores: Tensor | None = None                                      # [R, V] processors' scratch
        self.vocab_threads = no_threads   # context around the full-vocabulary passes (run_search: StepThreads.vocab)

    def step(self, logits: Tensor, time_up: bool = False) -> tuple[None, Tensor]:
        """logits [R, V] -> (None: rows never move, next tokens [R])."""
        with self.vocab_threads():                         # the passes over all R x V entries
            logits = scores = logits.float()                                                # [R, V]
            if self.processors:   # into our own buffer: processors may then write in place (not the backend's logits)
                scores = self.processors(self.sequences[:, :self.cur_len], self._scratch(logits), inplace=True)
            log_probs = self._log_softmax(logits)                                           # [R, V]
        if self.options.do_sample:
            tokens = draw(scores, 1, self.generator, self.unfinished, self.cur_len - self.P, self.N).squeeze(1)
        else:
            tokens = first_argmax(scores)
        logprob = log_probs.gather(1, tokens[:, None]).squeeze(1)                           # [R]
        nan = torch.isnan(logprob)                                                           # [R]
        if bool(nan.any()) and bool((nan & self.unfinished).any()):
            # argmax takes a NaN as the maximum: the token would be arbitrary and the score NaN
            raise overflow(self.cur_len - self.P, "there is no best token to pick")
        self.sum_logprobs += torch.where(self.unfinished, logprob, 0.0)
        self.gen_len += self.unfinished.long()
        if self.has_eos:
            tokens = torch.where(self.unfinished, tokens, self.pad)
        self.sequences[:, self.cur_len] = tokens
        self.cur_len += 1
        stop = torch.isin(tokens, self.eos)
        if self.cur_len >= self.max_len or time_up:
            stop = torch.ones_like(stop)
        self.unfinished = self.unfinished & ~stop
        self.all_done = not bool(self.unfinished.any())
        return None, tokens

    def _scratch(self, logits: Tensor) -> Tensor:
        """A copy of logits [R, V] in a buffer reused across steps."""
        if self._scores is None or self._scores.shape != logits.shape or self._scores.device != logits.device:
            self._scores = torch.empty_like(logits)
        return self._scores.copy_(logits)

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """log_softmax of fp32 logits [R, V] into a buffer reused across steps (no allocation per step)."""
        if self._log_probs is None or self._log_probs.shape != logits.shape \
                or self._log_probs.device != logits.device:
            self._log_probs = torch.empty_like(logits)
        return torch.log_softmax(logits, dim=-1, out=self._log_probs)

    def input_done(self) -> Tensor:
        """[B] bool: every draw of the input has finished."""
        return ~self.unfinished.view(self.B, self.N).any(dim=1)

    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        """ids [B, N, t], lengths [B, N], valid [B, N]: every draw may end up best."""
        ids = self.sequences[:, self.P:self.cur_len].reshape(self.B, self.N, -1)
        lengths = self.gen_len.view(self.B, self.N)
        return ids, lengths, torch.ones_like(lengths, dtype=torch.bool)

    def result(self, num_return_sequences: int) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per input, its draws (tokens, score), best score first (stable for ties)."""
        penalty = self.gen_len.clamp(min=1).double() ** self.options.length_penalty
        scores = (self.sum_logprobs.double() / penalty).view(self.B, self.N).tolist()
        ids = self.sequences[:, self.P:].view(self.B, self.N, -1).tolist()
        lengths = self.gen_len.view(self.B, self.N).tolist()
        out = []
        for b in range(self.B):
            hyps = [(tuple(ids[b][j][:lengths[b][j]]), scores[b][j]) for j in range(self.N)]
            out.append(sorted(hyps, key=lambda h: -h[1])[:num_return_sequences])
        return out
