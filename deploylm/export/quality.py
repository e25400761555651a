"""The quality report: what a precision profile costs against fp32, both run through ONNX Runtime.

- perplexity on held-out text (teacher-forced through the Backend protocol: prefill, then one
  decode step per target token), fp32 graphs vs the profile's graphs;
- on the same teacher-forced positions, both graphs run side by side: the mean KL(fp32 || profile) of the
  next-token distributions, and the share of positions whose most likely next token is the same. Unlike
  the beam agreement below, where one early different token shifts every later one, these move little when
  a change only moves rounding (on SmolLM2's int8-rowwise export, KL 0.011-0.014 and top-1 0.91-0.93 where
  beam agreement swung from 0.28 to 0.81: docs/benchmarks.md, twenty-fifth session);
- beam-4 token agreement with fp32 on held-out prompts: the share of fp32's best-beam tokens that
  the profile's best beam reproduces at the same position;
- size on disk of the graph files;
- speed: the same beam-4 workload timed on both, rounds interleaved (fp32, profile, fp32, ...) so
  load on the machine hits both alike; ratio = fp32 time / profile time (> 1: the profile is faster).
The budget is the profile's [quality] table (deploylm.profiles.QualityBudget).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from deploylm.errors import NumericalOverflow

if TYPE_CHECKING:     # torch is imported where a report is measured: `deploylm info` formats one without it
    from torch import Tensor

    from deploylm.backends.base import EncodedBatch

GRAPH_SUFFIXES = (".onnx", ".data", ".onnx_data")
AGREEMENT_BEAMS = 4
AGREEMENT_NEW_TOKENS = 16
MAX_TOKENS = 128  # held-out texts and prompts are cut to this (or the model's window)
MAX_EXP_ARGUMENT = 709.0  # exp() of more overflows a float: such a perplexity is infinite


@dataclass(frozen=True)
class QualityReport:
    perplexity_fp32: float
    perplexity: float
    beam_agreement: float          # 0..1, share of fp32 best-beam tokens reproduced in place
    sequences_identical: int       # prompts whose best beam equals fp32's
    prompts: int
    fp32_bytes: int
    bytes: int
    fp32_seconds: float            # median beam-4 generation time (same run, interleaved)
    seconds: float
    scored_tokens: int
    round_ratios: tuple[float, ...] = ()   # fp32 / profile wall time of each round (the two runs adjacent)
    cpu_ratio: float = math.nan            # fp32 / profile process CPU time over all rounds
    mean_kl: float = math.nan              # teacher-forced: mean KL(fp32 || profile) of the next-token distributions
    top1_agreement: float = math.nan       # teacher-forced: share of positions with the same most likely next token

    @property
    def perplexity_increase(self) -> float:
        """Relative: 0.02 = +2% over fp32."""
        return self.perplexity / self.perplexity_fp32 - 1.0 if math.isfinite(self.perplexity) else math.inf

    @property
    def size_ratio(self) -> float:
        return self.bytes / max(1, self.fp32_bytes)

    @property
    def speed_ratio(self) -> float:
        """The median of the per-round ratios (each round times fp32 and the profile back to back, so a
        burst of load on a shared machine hits both); NaN when not timed."""
        if self.round_ratios:
            return statistics.median(self.round_ratios)
        return self.fp32_seconds / self.seconds if self.seconds > 0 else math.nan

    def failures(self, budget: Any) -> list[str]:
        """Why the report misses `budget` (a QualityBudget); empty when it is met."""
        out = []
        limit = budget.max_perplexity_increase
        if limit is not None and not self.perplexity_increase <= limit + 1e-9:
            out.append(f"perplexity +{_pct(self.perplexity_increase)} over fp32 > max_perplexity_increase "
                       f"+{_pct(limit)}")
        if budget.min_beam_agreement is not None and not self.beam_agreement >= budget.min_beam_agreement:
            out.append(f"beam-4 token agreement {self.beam_agreement:.3f} < min_beam_agreement "
                       f"{budget.min_beam_agreement:g}")
        if budget.max_mean_kl is not None and not self.mean_kl <= budget.max_mean_kl + 1e-12:
            out.append(f"mean KL(fp32 || profile) {self.mean_kl:.4g} of the next-token distributions > max_mean_kl "
                       f"{budget.max_mean_kl:g}")
        if budget.min_top1_agreement is not None and not self.top1_agreement >= budget.min_top1_agreement:
            out.append(f"next-token top-1 agreement {self.top1_agreement:.3f} < min_top1_agreement "
                       f"{budget.min_top1_agreement:g}")
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(perplexity_increase=self.perplexity_increase, size_ratio=self.size_ratio,
                    speed_ratio=self.speed_ratio)
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in data.items()}

    def line(self) -> str:
        return ((f"perplexity {_ppl(self.perplexity)} vs fp32 {_ppl(self.perplexity_fp32)} "
                f"({'+' if self.perplexity_increase >= 0 else ''}{_pct(self.perplexity_increase)}), "
                f"beam-4 agreement {self.beam_agreement:.3f} ({self.sequences_identical}/{self.prompts} identical), "
                + (f"next token: top-1 {self.top1_agreement:.3f}, KL {self.mean_kl:.4g}, "
                   if math.isfinite(self.top1_agreement) else "")   # a report from before they were measured: none
                + f"size {self.size_ratio:.1%} of fp32 ({self.bytes / 2**20:.1f} MiB), ")
                + (f"speed {self.speed_ratio:.2f}x fp32" + (f" (CPU time {self.cpu_ratio:.2f}x)" if math.isfinite(self.cpu_ratio) else "")
                   if math.isfinite(self.speed_ratio) else "speed not measured"))


def _ppl(x: float) -> str:
    """A perplexity as the quality line prints it: 3 decimals, or 4 significant digits once it is too large for
    decimals to mean anything (a random tiny model's runs to 1e110: 111 digits with `.3f`)."""
    return f"{x:.3f}" if abs(x) < 1e6 else f"{x:.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if math.isfinite(x) else "inf"


def graph_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(GRAPH_SUFFIXES))


def _targets(tokenizer: Any, texts: tuple[str, ...], eos: int | None) -> list[list[int]]:
    out = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return out


def _forced_steps(backend: Any, batch: EncodedBatch, targets: list[list[int]]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Teacher forcing: prefill, then one decode step per target token. Yields per target position
    (log-probs [B, V] fp32, active [B] bool: rows whose target has that position, the target tokens [B])."""
    import torch

    width = max(len(t) for t in targets)
    tokens = torch.zeros((len(targets), width), dtype=torch.long)                    # [B, T]
    for row, seq in enumerate(targets):
        tokens[row, : len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(t) for t in targets])                                # [B]
    logits, state = backend.prefill(batch)                                            # [B, V]
    for step in range(width):
        yield logits.float().log_softmax(-1), lengths > step, tokens[:, step]
        if step + 1 < width:
            logits, state = backend.decode(tokens[:, step], state)


def forced_nll(backend: Any, batch: EncodedBatch, targets: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(target token) over every target position, teacher-forced; and the count."""
    nll, count = 0.0, 0
    for logp, active, target in _forced_steps(backend, batch, targets):
        nll += _target_nll(logp, active, target)
        count += int(active.sum())
    return nll, count


def _target_nll(logp: Tensor, active: Tensor, target: Tensor) -> float:
    """-sum of log p(target) over the active rows of one teacher-forced position (log-probs [B, V])."""
    return -float(logp.gather(1, target[:, None]).squeeze(1)[active].sum())


@dataclass(frozen=True)
class ForcedPair:
    """Two backends teacher-forced over the same targets (`forced_pair`): each one's summed -log p(target), the
    positions scored, KL(ref || cand) summed over them and how many have the same most likely next token."""

    nll_ref: float
    nll: float
    count: int
    kl_sum: float
    top1_same: int


def forced_pair(ref: Any, cand: Any, batch: EncodedBatch, targets: list[list[int]]) -> ForcedPair:
    """`forced_nll` of both backends, run side by side, and how far apart their next-token distributions are at
    each scored position. A position where the candidate gives no chance (log-prob -inf) to a token the reference
    gives some, or computes NaN, has KL +inf."""
    import torch

    nll_ref = nll = kl_sum = 0.0
    count = top1_same = 0
    for (lp_ref, active, target), (lp, _, _) in zip(_forced_steps(ref, batch, targets),
                                                   _forced_steps(cand, batch, targets)):
        nll_ref += _target_nll(lp_ref, active, target)
        nll += _target_nll(lp, active, target)
        lp_ref, lp = lp_ref[active], lp[active]                                      # [A, V] scored rows
        p_ref = lp_ref.exp()                                                          # [A, V]
        terms = (lp_ref - lp).mul_(p_ref).masked_fill_(p_ref == 0, 0.0)              # 0 where fp32 rules a token out
        kl = terms.sum(-1)                                                            # [A]
        del p_ref, terms
        kl_sum += float(torch.nan_to_num(kl, nan=math.inf, posinf=math.inf).double().sum())
        top1_same += int((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        count += int(active.sum())
    return ForcedPair(nll_ref, nll, count, kl_sum, top1_same)


def _window(backend: Any) -> int:
    return min(MAX_TOKENS, int(backend.info.max_positions or MAX_TOKENS))


def perplexity(backend: Any, tokenizer: Any, inputs: tuple[str, ...], targets: tuple[str, ...] | None) -> tuple[float, int]:
    """exp(mean NLL): decoder-only scores each text after its first token; seq2seq the targets.
    Texts are truncated to the model's window (at most MAX_TOKENS)."""
    nll, n = forced_nll(backend, *_forced_inputs(backend, tokenizer, inputs, targets))
    return _exp_mean(nll, n), n


def _exp_mean(nll: float, n: int) -> float:
    """exp(nll / n): a perplexity; +inf when it overflows a float or nothing was scored."""
    mean = nll / n if n else math.inf
    return math.exp(mean) if mean < MAX_EXP_ARGUMENT else math.inf


def _forced_inputs(backend: Any, tokenizer: Any, inputs: tuple[str, ...],
                   targets: tuple[str, ...] | None) -> tuple[EncodedBatch, list[list[int]]]:
    """The batch and target tokens `perplexity` teacher-forces (see there)."""
    import torch

    from deploylm.backends.base import EncodedBatch

    window = _window(backend)
    if targets is None:  # decoder-only: prefill on the first token, score the rest
        seqs = [list(tokenizer(t)["input_ids"])[:window] for t in inputs]
        seqs = [s for s in seqs if len(s) > 1]
        batch = EncodedBatch(torch.tensor([[s[0]] for s in seqs]), torch.ones((len(seqs), 1), dtype=torch.long))
        return batch, [s[1:] for s in seqs]
    enc = tokenizer(list(inputs), return_tensors="pt", padding=True, padding_side="right",
                    truncation=True, max_length=window)
    eos = backend.info.special.eos_token_ids[0] if backend.info.special.eos_token_ids else None
    return (EncodedBatch(enc["input_ids"], enc["attention_mask"]),
            [t[: window - 1] for t in _targets(tokenizer, targets, eos)])


def _prompts(backend: Any, tokenizer: Any, prompts: tuple[str, ...]) -> EncodedBatch:
    """Held-out prompts, truncated so that prompt + AGREEMENT_NEW_TOKENS fit the window."""
    from deploylm.backends.base import EncodedBatch

    seq2seq = backend.info.is_encoder_decoder
    room = _window(backend) - (1 if seq2seq else AGREEMENT_NEW_TOKENS)
    saved = tokenizer.truncation_side   # tokenizer state: a truncation_side call argument is ignored (transformers 5)
    tokenizer.truncation_side = "right" if seq2seq else "left"   # decoder-only: keep the end it continues
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right" if seq2seq else "left",
                        truncation=True, max_length=max(1, room))
    finally:
        tokenizer.truncation_side = saved
    return EncodedBatch(enc["input_ids"], enc["attention_mask"])


def token_agreement(reference: list[tuple[int, ...]], candidate: list[tuple[int, ...]]) -> tuple[float, int]:
    """(share of reference tokens matched in place, count of identical sequences)."""
    total = sum(max(1, len(r)) for r in reference)
    same = sum(sum(1 for a, b in zip(r, c) if a == b) for r, c in zip(reference, candidate))
    return same / total, sum(1 for r, c in zip(reference, candidate) if tuple(r) == tuple(c))


def _beam_run(backend: Any, batch: EncodedBatch, options: Any) -> tuple[list[tuple[int, ...]], float, float]:
    """Best beams, wall seconds and process CPU seconds of one beam search. A candidate whose logits overflow
    (NaN/inf) on the way reproduces no token: empty outputs, so its agreement budget fails and the fallback
    search can try graphs with more fp32 nodes, rather than the export stopping on the search's error."""
    from deploylm.decoding.search import generate_ids

    start, cpu = time.perf_counter(), time.process_time()
    try:
        outputs = [tuple(h[0].token_ids) for h in generate_ids(backend, batch, options)]
    except NumericalOverflow:
        outputs = [()] * batch.batch_size
    return outputs, time.perf_counter() - start, time.process_time() - cpu


def measure_quality(ref_dir: Path, cand_dir: Path, held: Any, *, rounds: int = 3, name: str = "model") -> QualityReport:
    """Compare the graphs in cand_dir with the fp32 graphs in ref_dir (each a full artifact folder).

    rounds: timed beam-4 rounds after one warm-up round; 0 measures no speed (speed_ratio NaN).
    """
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.decoding.options import DecodingOptions
    from deploylm.export.calibration import perplexity_texts
    from deploylm.models.source import folder_source
    from deploylm.models.tokenizer import load_tokenizer, pad_like_the_model

    ref = OnnxBackend.from_folder(ref_dir, name=name)
    cand = OnnxBackend.from_folder(cand_dir, name=name)
    tokenizer = load_tokenizer(folder_source(ref_dir))
    pad_like_the_model(tokenizer, ref.info.special)       # the prompts below are padded
    texts, targets = perplexity_texts(held)
    forced = forced_pair(ref, cand, *_forced_inputs(ref, tokenizer, texts, targets))
    n = forced.count
    options = DecodingOptions(num_beams=AGREEMENT_BEAMS, max_new_tokens=AGREEMENT_NEW_TOKENS)
    batch = _prompts(ref, tokenizer, held.inputs)
    times: dict[str, list[float]] = {"ref": [], "cand": []}
    cpu: dict[str, float] = {"ref": 0.0, "cand": 0.0}
    outs: dict[str, list[tuple[int, ...]]] = {}
    pairs = (("ref", ref), ("cand", cand))
    for round_ in range(rounds + 1):                        # round 0 warms both up and is not timed
        for key, backend in (pairs if round_ % 2 == 0 else pairs[::-1]):   # alternate who goes first
            outs[key], seconds, cpu_seconds = _beam_run(backend, batch, options)
            if round_:
                times[key].append(seconds)
                cpu[key] += cpu_seconds
    agreement, identical = token_agreement(outs["ref"], outs["cand"])
    ratios = tuple(r / c for r, c in zip(times["ref"], times["cand"]) if c > 0)
    cpu_ratio = cpu["ref"] / cpu["cand"] if rounds and cpu["cand"] > 0 else math.nan
    times = {k: v or [math.nan] for k, v in times.items()}  # rounds = 0: outputs only, no timing
    return QualityReport(perplexity_fp32=_exp_mean(forced.nll_ref, n), perplexity=_exp_mean(forced.nll, n),
                         beam_agreement=agreement,
                         sequences_identical=identical, prompts=len(outs["ref"]),
                         fp32_bytes=graph_bytes(ref_dir), bytes=graph_bytes(cand_dir),
                         fp32_seconds=statistics.median(times["ref"]), seconds=statistics.median(times["cand"]),
                         scored_tokens=n, round_ratios=ratios, cpu_ratio=cpu_ratio,
                         mean_kl=forced.kl_sum / n if n else math.nan,
                         top1_agreement=forced.top1_same / n if n else math.nan)
