"""Beam search state and step, vectorized over the batch: transformers 5's `_beam_search`, step by step.

Shapes: B inputs, K beams, R = B * K rows (beams of an input contiguous), V vocab, L = P + max_new_tokens
where P is the running-sequence length before generation (padded prompt, or 1 start token).
Every tensor op mirrors transformers (`_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
`_update_finished_beams`, `_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`),
including the -1e9 masks in fp32, so ties and scores come out identical.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from deploylm.decoding.draws import draw, overflow
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.processors import ProcessorList
from deploylm.decoding.threads import no_threads

NEG = -1.0e9


def _gather(tensor: Tensor, idx: Tensor) -> Tensor:
    """tensor [B, N, ...], idx [B, M] with 0 <= idx < N -> [B, M, ...] (transformers' `_gather_beams`).

    The same values as `take_along_dim(tensor, idx[..., None, ...], dim=1)`, which first wraps the index broadcast
    to the output's full size (a `remainder` over [B, M, L] for the sequences); every index here comes from a
    top-k or argmax over N, so nothing needs wrapping: [B, N] is one gather, [B, N, ...] one row gather
    (issue 7: [8, 4, 117] sequences -> 8 rows took 10 against 50 us alone; inside the steps of
    benchmarks/decoder_step.py, where the vocab block has just evicted them, 46 against 66 us; docs/benchmarks.md)."""
    if tensor.dim() == 2:
        return torch.gather(tensor, 1, idx)
    B, N = tensor.shape[:2]
    rows = (idx + torch.arange(0, B * N, N, device=idx.device)[:, None]).view(-1)       # [B*M] rows of [B*N, ...]
    return tensor.reshape(B * N, *tensor.shape[2:]).index_select(0, rows).view(B, idx.shape[1], *tensor.shape[2:])


@functools.lru_cache(maxsize=64)
def _chunk_size(vocab: int) -> int | None:
    """Chunk width for `_chunked_topk`: the largest divisor of the vocabulary up to 128 that leaves at least
    2 chunks, or None when it is under 4 (too small a vocabulary or a prime one: chunking would not help)."""
    c = next(c for c in range(min(128, vocab // 2), 0, -1) if vocab % c == 0) if vocab >= 2 else 1
    return c if c >= 4 else None


def _chunk_maxima(log_probs: Tensor, beams: int) -> Tensor | None:
    """[B, K, n] the maximum of every chunk of `_chunk_size(V)` log-probs of log_probs [R, V] (R = B * K
    rows), or None when the vocabulary does not chunk. A full-vocabulary pass: part of the step's vocab block."""
    R, vocab = log_probs.shape
    c = _chunk_size(vocab)
    if c is None:
        return None
    return log_probs.reshape(R // beams, beams, vocab // c, c).amax(dim=-1)


def _chunked_topk(log_probs: Tensor, chunk_max: Tensor | None, beam_scores: Tensor,
                  k: int) -> tuple[Tensor, Tensor] | None:
    """`torch.topk(log_probs.view(B, K, V) + beam_scores[..., None]).view(B, K*V), k)` without the full sum
    and the full top-k: the top k + 1 candidates lie in the k + 1 chunks with the highest maxima, so only
    those are summed and ranked. Returns (scores [B, k], flat indices [B, k]) when those k + 1 values are
    all distinct (the answer is then unique: the same values and indices as the full top-k), else None
    (ties or NaN: the caller runs the full top-k, whose tie order is torch's).
    log_probs [R, V], chunk_max [B, K, n] (`_chunk_maxima`), beam_scores [B, K].
    """
    R, vocab = log_probs.shape
    B, K = beam_scores.shape
    if chunk_max is None:
        return None
    n = chunk_max.shape[-1]                                                           # chunks per beam
    c = vocab // n
    if K * n < k + 1:
        return None
    chunk_max = chunk_max + beam_scores[:, :, None]                                   # [B, K, n]
    chunks = torch.topk(chunk_max.view(B, K * n), k + 1)[1]                           # [B, k+1] flat chunk ids
    cand = (chunks[:, :, None] * c + torch.arange(c, device=chunks.device)).view(B, -1)  # [B, (k+1)*c]
    values = torch.gather(log_probs.reshape(B, K * vocab), 1, cand).view(B, k + 1, c)
    values = (values + torch.gather(beam_scores, 1, chunks // n)[:, :, None]).view(B, -1)
    scores, pos = torch.topk(values, k + 1)                                           # [B, k+1]
    if not bool((scores[:, :-1] > scores[:, 1:]).all()):
        return None
    return scores[:, :k], torch.gather(cand, 1, pos[:, :k])


class BeamSearch:
    """Running and finished beams of B inputs. `step(logits)` consumes one decoder output."""

    def __init__(self, options: DecodingOptions, prompt: Tensor, eos_ids: tuple[int, ...], fill: int,
                 processors: ProcessorList, generator: torch.Generator | None = None):
        B, P = prompt.shape
        K = options.num_beams
        dev = prompt.device
        self.B, self.K, self.P = B, K, P
        self.options, self.processors, self.generator = options, processors, generator
        self.max_len = P + options.max_new_tokens
        self.cur_len = P
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
        self.keep = max(2, 1 + len(eos_ids)) * K
        self.top_mask = torch.cat((torch.ones(K, dtype=torch.bool), torch.zeros(self.keep - K, dtype=torch.bool)))
        self.top_mask = self.top_mask.to(dev)
        self.running = torch.full((B, K, self.max_len), fill, dtype=torch.long, device=dev)   # [B, K, L]
        self.running[:, :, :P] = prompt[:, None, :]
        self.finished = self.running.clone()                                                  # [B, K, L]
        self.running_scores = torch.zeros((B, K), dtype=torch.float, device=dev)
        self.running_scores[:, 1:] = NEG
        self.finished_scores = torch.full((B, K), NEG, dtype=torch.float, device=dev)
        self.is_finished = torch.zeros((B, K), dtype=torch.bool, device=dev)
        self.finished_len = torch.zeros((B, K), dtype=torch.long, device=dev)  # generated tokens, EOS included
        self.unsatisfied = torch.ones((B, 1), dtype=torch.bool, device=dev)   # early-stop heuristic not met
        self.all_done = False
        self._offsets = torch.arange(B, device=dev)[:, None] * K               # [B, 1]
        self._log_probs: Tensor | None = None                                   # [R, V] reused every step
        self.vocab_threads = no_threads   # context around the full-vocabulary passes (run_search: StepThreads.vocab)

    # --- one step -------------------------------------------------------------------------------
    def step(self, logits: Tensor, time_up: bool = False) -> tuple[Tensor, Tensor]:
        """logits [R, V] -> (parent rows [R] to reorder the state by, next tokens [R])."""
        B, K = self.B, self.K
        with self.vocab_threads():                         # the passes over all R x V entries
            log_probs = self._log_softmax(logits)                                            # [R, V]
            if self.processors:
                flat_sequences = self.running[:, :, :self.cur_len].reshape(B * K, self.cur_len)  # [R, cur_len]
                log_probs = self.processors(flat_sequences, log_probs, inplace=True)          # [R, V] (our buffer)
            chunk_max = None if self.options.do_sample else _chunk_maxima(log_probs, K)      # [B, K, n]
        vocab = log_probs.shape[-1]

        topk_scores, topk_seqs, topk_parents = self._top_candidates(log_probs, vocab, chunk_max)
        nan = torch.isnan(topk_scores)                                                       # [B, 2K]
        if bool(nan.any()):   # NaN (or +inf) logits: top-k ranks NaN first, and a NaN score would win every merge
            if bool(nan[~self.input_done()].any()):
                raise overflow(self.cur_len - self.P, "the beams cannot be ranked")
            topk_scores = topk_scores.masked_fill(nan, NEG)   # a settled input: keep its finished hypotheses
        hits = torch.isin(topk_seqs[:, :, self.cur_len], self.eos)                        # [B, 2K]
        if self.cur_len + 1 >= self.max_len or time_up:
            hits = torch.ones_like(hits)
        parents = self._next_running(topk_scores, topk_seqs, topk_parents, hits)
        self._update_finished(topk_scores, topk_seqs, hits)

        self.cur_len += 1
        self._update_stop_heuristic()
        improvement_possible = bool(torch.any(self.unsatisfied))
        exists_open_beam = not (bool(torch.all(self.is_finished)) and self.options.early_stopping is True)
        valid_continuations = not bool(torch.all(hits))
        self.all_done = not (improvement_possible and exists_open_beam and valid_continuations)
        return (parents + self._offsets).view(-1), self.running[:, :, self.cur_len - 1].reshape(-1)

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """fp32 log-softmax of logits [R, V], written into a buffer reused across steps (no 6 MB allocation
        per step at R=32, V=49,152). Same kernel and values as `log_softmax(logits.float())`."""
        logits = logits.float()
        if self._log_probs is None or self._log_probs.shape != logits.shape \
                or self._log_probs.device != logits.device:
            self._log_probs = torch.empty_like(logits)
        return torch.log_softmax(logits, dim=-1, out=self._log_probs)

    def _top_candidates(self, log_probs: Tensor, vocab: int,
                        chunk_max: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Best `keep` continuations per input: scores [B, 2K], sequences [B, 2K, L], parent beam [B, 2K].

        log_probs [R, V] are the step's (processed) log-probs, not yet added to the running beam scores;
        chunk_max [B, K, n] their chunk maxima (None: sampling, or a vocabulary that does not chunk).
        """
        B, K = self.B, self.K
        found = None if self.options.do_sample else _chunked_topk(log_probs, chunk_max, self.running_scores,
                                                                  self.keep)
        if found is not None:
            scores, idx = found
        else:
            flat = log_probs.view(B, K, vocab).add_(self.running_scores[:, :, None]).view(B, K * vocab)
            if self.options.do_sample:
                idx = draw(flat, self.keep, self.generator, ~self.input_done(), self.cur_len - self.P)
                scores = torch.gather(flat, 1, idx)
                scores, order = scores.sort(dim=-1, descending=True)
                idx = idx.gather(dim=-1, index=order)
            else:
                scores, idx = torch.topk(flat, k=self.keep)
        parent = idx // vocab
        seqs = _gather(self.running, parent)
        seqs[:, :, self.cur_len] = idx % vocab
        return scores, seqs, parent

    def _next_running(self, topk_scores: Tensor, topk_seqs: Tensor, topk_parents: Tensor,
                      hits: Tensor) -> Tensor:
        """Keep the K best candidates that did not stop; returns their parent beams [B, K]."""
        running_scores = topk_scores + hits.to(torch.float32) * NEG
        best = torch.topk(running_scores, k=self.K)[1]
        self.running = _gather(topk_seqs, best)
        self.running_scores = _gather(running_scores, best)
        return _gather(topk_parents, best)

    def _update_finished(self, topk_scores: Tensor, topk_seqs: Tensor, hits: Tensor) -> None:
        """Merge candidates that stopped within the top K into the finished set (best K kept)."""
        just_finished = hits & self.top_mask[None, :]
        gen_len = self.cur_len + 1 - self.P
        scores = topk_scores / (gen_len ** self.options.length_penalty)
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (self.options.early_stopping is True)
        scores += full.to(torch.float32) * NEG
        scores += (~self.unsatisfied).to(torch.float32) * NEG
        scores += (~just_finished) * NEG
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=self.K)[1]
        self.finished = _gather(torch.cat((self.finished, topk_seqs), dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.is_finished = _gather(torch.cat((self.is_finished, just_finished), dim=1), best)
        new_len = torch.full_like(topk_scores, gen_len, dtype=torch.long)
        self.finished_len = _gather(torch.cat((self.finished_len, new_len), dim=1), best)

    def _update_stop_heuristic(self) -> None:
        """Can a running beam still beat the worst finished one? (transformers' heuristic, per input)."""
        lp, early = self.options.length_penalty, self.options.early_stopping
        if early == "never" and lp > 0.0:
            best_len = self.max_len - self.P
        else:
            best_len = self.cur_len - self.P
        best_running = self.running_scores[:, :1] / (best_len ** lp)
        # amin, not torch.min(dim): the latter also computes indices and enters the OpenMP pool even for
        # [B, K], which costs milliseconds when the cores are shared (same values).
        worst_finished = torch.where(self.is_finished, self.finished_scores.amin(dim=1, keepdim=True), NEG)
        self.unsatisfied = self.unsatisfied & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    # --- views for the loop, streaming and the result -------------------------------------------
    def input_done(self) -> Tensor:
        """[B] bool: the input's returned hypotheses can no longer change."""
        if self.all_done:
            return torch.ones(self.B, dtype=torch.bool, device=self.running.device)
        full = torch.all(self.is_finished, dim=-1) & (self.options.early_stopping is True)
        return ~self.unsatisfied[:, 0] | full

    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        """Generated tokens that any final best hypothesis must start with one of.

        Returns ids [B, K + 1, t], lengths [B, K + 1], valid [B, K + 1]: the K running beams (valid while
        the input is not done) and the best finished hypothesis (valid once one exists).
        """
        t = self.cur_len - self.P
        done = self.input_done()
        ids = torch.cat((self.running[:, :, self.P:self.cur_len], self.finished[:, :1, self.P:self.cur_len]), 1)
        lengths = torch.cat((torch.full_like(self.finished_len, t), self.finished_len[:, :1]), dim=1)
        valid = torch.cat((~done[:, None].expand(-1, self.K), self.is_finished[:, :1]), dim=1)
        return ids, lengths, valid

    def result(self, num_return_sequences: int) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per input, the best `num_return_sequences` finished hypotheses (tokens, score), best first."""
        ids = self.finished[:, :num_return_sequences, self.P:].tolist()
        lengths = self.finished_len[:, :num_return_sequences].tolist()
        scores = self.finished_scores[:, :num_return_sequences].tolist()
        return [[(tuple(ids[b][j][:lengths[b][j]]), scores[b][j]) for j in range(num_return_sequences)]
                for b in range(self.B)]
