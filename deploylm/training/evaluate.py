"""Evaluation during and after training: loss/perplexity by teacher forcing, exact match and BLEU
by greedy decoding.

The greedy loop here is the trainer's own (a small batched loop over encode/decode_step with the
KV cache); user-facing generation goes through deploylm.decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tokenizers import Tokenizer

from deploylm.models.transformer import Seq2SeqTransformer
from deploylm.training.data import Batch, SpecialIds, make_batch
from deploylm.training.metrics import bleu, exact_match, perplexity
from deploylm.training.tasks import Example
from deploylm.training.tokenizer import decode


@dataclass(frozen=True)
class EvalResult:
    loss: float            # mean token cross-entropy (nats), no label smoothing
    perplexity: float
    exact_match: float     # 0..1
    bleu: float            # 0..100
    examples: list[tuple[str, str, str]]   # (source, prediction, reference), first few

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "perplexity": self.perplexity,
                "exact_match": self.exact_match, "bleu": self.bleu}


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, batch: Batch, ids: SpecialIds, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each source in `batch`; token ids without start/end tokens."""
    memory = model.encode(batch.src_ids, batch.src_mask)                    # [B, S, D]
    cross = model.cross_kv(memory)
    rows = batch.src_ids.shape[0]
    tokens = torch.full((rows, 1), ids.bos, dtype=torch.long, device=memory.device)   # [B, 1]
    done = torch.zeros(rows, dtype=torch.bool, device=memory.device)
    out: list[Tensor] = []
    past = None
    for _ in range(max_new_tokens):
        logits, past = model.decode_step(tokens, past, cross, batch.src_mask)   # [B, 1, V]
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)                    # [B, 1]
        tokens = tokens.masked_fill(done[:, None], ids.pad)
        out.append(tokens)
        done |= tokens[:, 0] == ids.eos
        if bool(done.all()):
            break
    generated = torch.cat(out, dim=1).tolist() if out else [[] for _ in range(rows)]
    return [_until_eos(row, ids) for row in generated]


def _until_eos(row: list[int], ids: SpecialIds) -> list[int]:
    return row[:row.index(ids.eos)] if ids.eos in row else row


@torch.no_grad()
def evaluate(model: Seq2SeqTransformer, tok: Tokenizer, examples: list[Example], ids: SpecialIds,
             device: torch.device, max_len: int, max_new_tokens: int, batch_size: int = 256,
             n_examples: int = 5) -> EvalResult:
    """Loss, perplexity, exact match and BLEU of `model` on `examples` (model left in eval mode)."""
    model.eval()
    total_loss, total_tokens, predictions = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = make_batch(tok, examples[start:start + batch_size], ids, max_len).to(device)
        logits = model(batch.src_ids, batch.src_mask, batch.tgt_in)          # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), reduction="sum")
        total_loss += float(loss)
        total_tokens += int((batch.labels != -100).sum())
        predictions += decode(tok, greedy_decode(model, batch, ids, max_new_tokens))
    references = [ex.target for ex in examples]
    mean_loss = total_loss / max(1, total_tokens)
    shown = [(ex.source, pred, ex.target) for ex, pred in zip(examples[:n_examples], predictions)]
    return EvalResult(mean_loss, perplexity(mean_loss), exact_match(predictions, references),
                      bleu(predictions, references), shown)
