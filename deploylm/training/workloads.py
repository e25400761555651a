"""What differs between training the encoder-decoder and the decoder-only LM, behind one interface.

The trainer asks a workload for: the texts its tokenizer is learnt from, the training items (one per
batch row; the BatchStream orders them), the batch of a list of items, the summed loss of a batch,
validation and test metrics. Seq2SeqWork trains on (source, target) pairs; LMWork on windows of a
token stream.
"""
from __future__ import annotations

import heapq

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tokenizers import Tokenizer

from deploylm.models.config import TransformerConfig
from deploylm.training.data import Batch, SpecialIds, make_batch
from deploylm.training.evaluate import evaluate
from deploylm.training.lm_eval import continue_greedily, lm_nll, ngram_baseline
from deploylm.training.metrics import perplexity
from deploylm.training.tasks import Splits
from deploylm.training.text import TextSplits, make_lm_batch, token_stream, window_starts
from deploylm.training.tokenizer import decode, for_language_model, train_tokenizer

TOKENIZER_SAMPLE = 20_000     # training examples (or documents) the BPE is learnt from (the first ones)
LM_EXAMPLES = 3               # greedy continuations shown after an LM run
LM_PROMPT_TOKENS = 8          # tokens of a test paragraph given as the prompt (<s> included)
LM_MAX_NEW_TOKENS = 32            # of the greedy continuations shown (and of the reference shown)


class Seq2SeqWork:
    """(source, target) pairs for Seq2SeqTransformer; metrics: loss, perplexity, exact match, BLEU."""

    arch = "seq2seq"

    def __init__(self, splits: Splits, eval_examples: int) -> None:
        self.splits, self.eval_examples = splits, eval_examples
        self.train_items: list[Any] = splits.train

    def make_tokenizer(self, vocab_size: int) -> Tokenizer:
        sample = self.splits.train[:TOKENIZER_SAMPLE]
        return train_tokenizer([text for ex in sample for text in (ex.source, ex.target)], vocab_size)

    def bind(self, tok: Tokenizer, config: TransformerConfig) -> None:
        """Remember the tokenizer and model shape the batches and metrics need."""
        self.tok, self.max_len = tok, config.max_positions
        self.ids = SpecialIds(config.pad_token_id, config.decoder_start_token_id, config.eos_token_id)
        # the 2000 longest targets in characters (not the first 2000 in file order): the longest in tokens
        # is among them, and tokenizing 2000 is cheap whatever the size of the data
        sample = heapq.nlargest(2000, (ex.target for ex in self.splits.train), key=len)
        lengths = [len(enc.ids) for enc in tok.encode_batch(sample, add_special_tokens=False)]
        self.max_new_tokens = min(config.max_positions - 1, 2 * max(lengths) + 8)   # 2 x longest target + 8
        sources = heapq.nlargest(2000, (ex.source for ex in self.splits.train), key=len)
        cut_targets = sum(n > config.max_positions - 1 for n in lengths)          # room for </s>
        cut_sources = sum(len(enc.ids) > config.max_positions - 1
                          for enc in tok.encode_batch(sources, add_special_tokens=False))
        self.notice = cut_notice(cut_sources, cut_targets, len(self.splits.train), config.max_positions)

    def batch(self, items: list[Any]) -> Batch:
        return make_batch(self.tok, items, self.ids, self.max_len)

    def loss_sum(self, model: nn.Module, batch: Batch, smoothing: float) -> tuple[Tensor, int]:
        logits = model(batch.src_ids, batch.src_mask, batch.tgt_in)                  # [B, T, V]
        return _summed_loss(logits, batch.labels, smoothing), int((batch.labels != -100).sum())

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        res = evaluate(model, self.tok, self.splits.validation[:self.eval_examples], self.ids, device,
                       self.max_len, self.max_new_tokens)
        return res.as_dict()

    def test(self, model: nn.Module, device: torch.device) -> tuple[dict[str, float], list[tuple[str, str, str]], dict | None]:
        res = evaluate(model, self.tok, self.splits.test, self.ids, device, self.max_len, self.max_new_tokens)
        return res.as_dict(), res.examples, None


class LMWork:
    """Plain text for CausalTransformerLM; metrics: loss and perplexity, beside an n-gram baseline."""

    arch = "decoder"

    def __init__(self, splits: TextSplits, block_size: int, stride: int, ngram_order: int, eval_examples: int) -> None:
        self.splits, self.block_size, self.stride = splits, block_size, stride
        self.ngram_order, self.eval_examples = ngram_order, eval_examples
        self.train_items: list[Any] = []

    def make_tokenizer(self, vocab_size: int) -> Tokenizer:
        return for_language_model(train_tokenizer(self.splits.train[:TOKENIZER_SAMPLE], vocab_size))

    def bind(self, tok: Tokenizer, config: TransformerConfig) -> None:
        self.tok, self.pad, self.eos, self.vocab_size = tok, config.pad_token_id, config.eos_token_id, config.vocab_size
        self.max_new_tokens = min(LM_MAX_NEW_TOKENS, config.max_positions - LM_PROMPT_TOKENS)

        def stream(docs: list[str]) -> np.ndarray:
            return np.asarray(token_stream(tok, docs, config.bos_token_id, config.eos_token_id), dtype=np.int64)

        self.train_stream = stream(self.splits.train)
        self.validation_stream = stream(self.splits.validation[:self.eval_examples])
        self.test_stream = stream(self.splits.test)
        self.train_items = window_starts(len(self.train_stream), self.block_size, self.stride, "the training text")

    def batch(self, items: list[Any]) -> Any:
        return make_lm_batch(self.train_stream, items, self.block_size)

    def loss_sum(self, model: nn.Module, batch: Any, smoothing: float) -> tuple[Tensor, int]:
        logits, _ = model(batch.input_ids)                                           # [B, T, V]
        return _summed_loss(logits, batch.labels, smoothing), batch.input_ids.numel()

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self._scores(model, self.validation_stream, device)

    def test(self, model: nn.Module, device: torch.device) -> tuple[dict[str, float], list[tuple[str, str, str]], dict | None]:
        scores = self._scores(model, self.test_stream, device)
        baseline = None
        if self.ngram_order:
            baseline = ngram_baseline(self.train_stream, self.test_stream, self.ngram_order, self.vocab_size)
        return scores, self._examples(model, device), baseline

    def _scores(self, model: nn.Module, stream: np.ndarray, device: torch.device) -> dict[str, float]:
        total, count = lm_nll(model, stream, self.block_size, self.stride, device, self.pad)
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}

    def _examples(self, model: nn.Module, device: torch.device) -> list[tuple[str, str, str]]:
        """(prompt, greedy continuation, the paragraph's real continuation) for the first test paragraphs."""
        shown = []
        for doc in self.splits.test[:LM_EXAMPLES]:
            ids = [model.config.bos_token_id, *self.tok.encode(doc, add_special_tokens=False).ids]
            cut = _whole_characters(self.tok, ids, LM_PROMPT_TOKENS)
            prompt = ids[:cut]
            rest = ids[cut:][:_whole_characters(self.tok, ids[cut:], self.max_new_tokens)]
            generated = continue_greedily(model, prompt, self.max_new_tokens, self.eos, device)
            shown.append(tuple(decode(self.tok, [part])[0] for part in (prompt, generated, rest)))
        return shown


def _whole_characters(tok: Tokenizer, ids: list[int], at: int) -> int:
    """The largest n <= `at` (and >= 2) where ids[:n] ends at a character boundary: a byte-level token
    can hold part of a multi-byte (e.g. Chinese) character, and cutting there shows it as U+FFFD on
    both sides. `at` itself when there is no such n."""
    whole = decode(tok, [ids])[0]
    for n in range(min(at, len(ids)), 1, -1):
        head, tail = decode(tok, [ids[:n], ids[n:]])
        if head + tail == whole:
            return n
    return at


def _summed_loss(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy summed over the non-ignored labels (-100); fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=smoothing, reduction="sum")


def cut_notice(sources: int, targets: int, pairs: int, window: int) -> str | None:
    """One line when training pairs are longer than the model's window: they are cut to it, and a cut
    target teaches the model to stop mid-text. Counted among the 2000 longest of each side ("2000+")."""
    if not (sources or targets):
        return None
    def count(n: int) -> str:
        return f"{n}+" if n >= 2000 else str(n)

    return (f"warning: of {pairs} training pairs, {count(sources)} sources and {count(targets)} targets are longer "
            f"than the model's window of {window} tokens and are cut to it; drop them with --max-length "
            "(cleaning) or split them")
