"""Evaluation of the decoder-only LM: perplexity on held-out text with a sliding window, the n-gram
baseline on exactly the same tokens, and greedy continuations to look at.

Every token of the held-out stream except the first `<s>` is scored exactly once, by both models:
the neural LM with up to `block_size` tokens of context (windows every `stride` tokens; each window
scores only the tokens the previous window did not reach), the n-gram with its n-1 previous tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploylm.training.metrics import perplexity
from deploylm.training.ngram import NGramLM


def eval_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over a stream of `n_tokens` tokens."""
    windows, start, scored = [], 0, 1
    while scored < n_tokens:
        windows.append((start, scored))
        scored = min(start + block_size + 1, n_tokens)
        start += stride
    return windows


@torch.no_grad()
def lm_nll(model: nn.Module, stream: np.ndarray, block_size: int, stride: int, device: torch.device,
           pad_id: int, batch_size: int = 32) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods in nats, tokens scored) over `stream`."""
    model.eval()
    windows = eval_windows(len(stream), block_size, stride)
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        inputs, labels = [], []
        for start, scored in windows[first:first + batch_size]:
            row = stream[start:start + block_size + 1].tolist()
            target = [t if start + 1 + j >= scored else -100 for j, t in enumerate(row[1:])]
            inputs.append(row[:-1] + [pad_id] * (block_size - len(row) + 1))
            labels.append(target + [-100] * (block_size - len(target)))
        ids = torch.tensor(inputs, device=device)                                   # [B, T]
        gold = torch.tensor(labels, device=device)                                  # [B, T]
        logits, _ = model(ids)                                                      # [B, T, V]
        total += float(F.cross_entropy(logits.float().flatten(0, 1), gold.flatten(), reduction="sum"))
        count += int((gold != -100).sum())
    return total, count


def ngram_baseline(train: np.ndarray, test: np.ndarray, order: int, vocab_size: int) -> dict[str, float | int | str]:
    """An order-`order` Kneser-Ney model fitted on the training stream, scored on the test stream's
    tokens 1..N-1 (the ones the neural LM is scored on)."""
    lm = NGramLM(order, vocab_size).fit([train.tolist()])
    ids = test.tolist()
    nll = -sum(math.log(lm.prob(ids[i], ids[max(0, i - order + 1):i])) for i in range(1, len(ids)))
    loss = nll / max(1, len(ids) - 1)
    return {"model": f"{order}-gram Kneser-Ney", "order": order, "loss": loss, "perplexity": perplexity(loss),
            "tokens": len(ids) - 1}


@torch.no_grad()
def continue_greedily(model: nn.Module, prompt: list[int], max_new_tokens: int, eos: int,
                      device: torch.device) -> list[int]:
    """Greedy continuation of `prompt` (token ids) with the KV cache; stops at `eos` (not returned)."""
    model.eval()
    limit = min(max_new_tokens, model.config.max_positions - len(prompt))
    logits, past = model(torch.tensor([prompt], device=device))                    # [1, P, V]
    out: list[int] = []
    for position in range(len(prompt), len(prompt) + limit):
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        step = torch.tensor([[token]], device=device)                               # [1, 1]
        logits, past = model(step, None, torch.tensor([[position]], device=device), past)
    return out
