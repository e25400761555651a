"""Cross-backend parity: does a candidate backend say what the reference says, step by step?

Teacher-forced: the reference decodes (greedy, and beam search when num_beams > 1) with the shared
decoder; every candidate is then fed the REFERENCE's chosen tokens through the Backend protocol
(prefill, reorder, decode), so each step compares logits for the same prefix: max |Δ logit|,
max |Δ log-prob|, top-1 agreement and the first step where the argmax tokens diverge. Then each
candidate runs its own search, and the final token ids (and texts, with a tokenizer) are compared.
Tolerances come only from the profile's [parity] table (deploylm.profiles.Parity).
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from deploylm.backends.base import Backend, EncodedBatch
from deploylm.errors import CheckFailed, NumericalOverflow, UsageError, WriteFailed
from deploylm.fsutil import json_finite

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Translate to French: the house is wonderful.",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
)


@dataclass
class StepStats:
    """One decoding step over every active teacher-forced row."""

    step: int
    rows: int
    max_abs_logit: float
    max_abs_logprob: float
    top1_agreement: float


@dataclass
class BackendParity:
    """One candidate against the reference."""

    backend: str
    steps: list[StepStats]
    max_abs_logit: float
    max_abs_logprob: float
    token_agreement: float
    first_divergence: int | None            # earliest step any row's argmax differs; None = never
    first_divergence_by_row: list[int | None]
    greedy_identical: bool
    beams_identical: bool
    max_abs_score: float | None = None      # largest |Δ final beam score| where the beams are identical
    text_identical: bool | None = None      # None without a tokenizer
    settings_difference: str | None = None  # special tokens / model-level decoding settings unlike the reference's
    overflow: str | None = None             # "its own beam search stopped: <the NumericalOverflow>", else None

    def failures(self, tol: Any, prompts: int | None = None) -> list[str]:
        """Why this backend is outside `tol` (a deploylm.profiles.Parity), each line naming the backend;
        empty when it passes. `prompts` (the report's count) lets a line name the prompt that diverged."""
        return [f"{self.backend}: {reason}" for reason in self.reasons(tol, prompts)]

    def divergence(self, prompts: int | None = None) -> str | None:
        """Where the top-1 tokens first differ: "step 3, prompt 2 of 4, its greedy output"; None when never.
        Rows are prompts x (greedy output, best beam), in prompt order (deploylm.parity.teacher_force)."""
        if self.first_divergence is None:
            return None
        where = f"step {self.first_divergence}"
        rows = self.first_divergence_by_row
        if prompts and rows and len(rows) % prompts == 0:
            per_input = len(rows) // prompts
            row = rows.index(self.first_divergence)
            kind = "its greedy output" if row % per_input == 0 else "its best beam"
            where += f", prompt {row // per_input + 1} of {prompts}, {kind}"
        return where

    def reasons(self, tol: Any, prompts: int | None = None) -> list[str]:
        """Each of `tol`'s budgets this backend is outside, by how much ("max |Δ logit| 0.237 > logits_atol 0.05
        at step 4")."""
        out = []
        if not _within(self.max_abs_logit, tol.logits_atol):
            out.append(f"max |Δ logit| {_num(self.max_abs_logit)} > logits_atol {tol.logits_atol:g}"
                       f"{_at_worst(self.steps, 'max_abs_logit')}")
        if not _within(self.max_abs_logprob, tol.logprob_atol):
            out.append(f"max |Δ log-prob| {_num(self.max_abs_logprob)} > logprob_atol {tol.logprob_atol:g}"
                       f"{_at_worst(self.steps, 'max_abs_logprob')}")
        if not self.token_agreement >= tol.min_token_agreement:
            first = self.divergence(prompts)
            out.append(f"top-1 agreement {self.token_agreement:.4f} < min_token_agreement {tol.min_token_agreement:g}"
                       + (f" (first differs at {first})" if first else ""))
        min_step = tol.first_divergence_min_step
        if min_step is not None and self.first_divergence is not None and self.first_divergence < min_step:
            out.append(f"tokens diverge at {self.divergence(prompts)} < first_divergence_min_step {min_step}")
        if self.settings_difference:     # not a numeric difference: no tolerance covers it
            out.append(f"decodes with other settings than the reference: {self.settings_difference}")
        if self.overflow:                # every user's search over it stops so: no tolerance covers it either
            out.append(self.overflow)
        if tol.identical_beams and not (self.greedy_identical and self.beams_identical):
            out.append(f"final {'beams' if not self.beams_identical else 'greedy tokens'} "
                       f"differ from the reference (identical_beams = true)")
        return out


def _at_worst(steps: list[StepStats], key: str) -> str:
    """" at step N": the step holding the largest (or a NaN) `key`; "" without steps."""
    if not steps:
        return ""
    worst = max(steps, key=lambda s: _nan_first(_nan(getattr(s, key))))
    return f" at step {worst.step}"


def _within(value: float | None, atol: float) -> bool:
    return value is not None and math.isfinite(value) and value <= atol


def _num(value: float | None) -> str:
    return "nan/inf" if value is None or not math.isfinite(value) else f"{value:.3g}"


@dataclass
class ParityReport:
    reference: str
    tolerances: dict[str, Any]              # the profile's [parity] table (Parity.__dict__)
    options: dict[str, Any]                 # the decoding options used
    prompts: int
    backends: list[BackendParity] = field(default_factory=list)

    def _tol(self) -> Any:
        from deploylm.profiles import Parity

        return Parity(**self.tolerances)

    def failures(self) -> list[str]:
        tol = self._tol()
        return [line for row in self.backends for line in row.failures(tol, self.prompts)]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        data = json_finite(asdict(self))
        data["passed"] = self.passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ParityReport":
        rows = []
        for row in data.get("backends", []):
            row = dict(row)
            row["steps"] = [StepStats(**{k: _nan(v) for k, v in s.items()}) for s in row.get("steps", [])]
            for key in ("max_abs_logit", "max_abs_logprob"):
                row[key] = _nan(row.get(key))
            rows.append(BackendParity(**{f.name: row[f.name] for f in fields(BackendParity) if f.name in row}))
        return cls(reference=data["reference"], tolerances=dict(data["tolerances"]),
                   options=dict(data.get("options", {})), prompts=int(data.get("prompts", 0)), backends=rows)

    def summary(self) -> dict[str, Any]:
        """The short form stored in the manifest (the full report goes to parity.json)."""
        keys = ("max_abs_logit", "max_abs_logprob", "token_agreement", "first_divergence",
                "greedy_identical", "beams_identical", "text_identical")
        tol = self._tol()
        backends = {r.backend: {**{k: getattr(r, k) for k in keys}, "passed": not r.failures(tol)}
                    for r in self.backends}
        return json_finite({"reference": self.reference, "passed": self.passed, "prompts": self.prompts,
                        "num_beams": self.options.get("num_beams"), "max_new_tokens": self.options.get("max_new_tokens"),
                        "tolerances": self.tolerances, "backends": backends})

    def table(self) -> str:
        """A terminal table: one row per candidate, then the tolerances and any failure."""
        opts = self.options
        head = (f"parity vs {self.reference} (teacher-forced): {self.prompts} prompt(s), "
                f"num_beams {opts.get('num_beams', '?')}, max_new_tokens {opts.get('max_new_tokens', '?')}")
        cols = f"{'backend':<8} {'max|Δlogit|':>11} {'max|Δlogp|':>10} {'top-1':>7} {'1st div':>7}  greedy beams text   result"
        lines = [head, cols]
        tol = self._tol()
        for r in self.backends:
            div = "none" if r.first_divergence is None else str(r.first_divergence)
            lines.append(f"{r.backend:<8} {_num(r.max_abs_logit):>11} {_num(r.max_abs_logprob):>10} "
                         f"{r.token_agreement:>7.4f} {div:>7}  {_same(r.greedy_identical):<6} "
                         f"{_same(r.beams_identical):<5} {_same(r.text_identical):<6} "
                         f"{'FAIL' if r.failures(tol) else 'PASS'}")
        lines.append("tolerances: " + ", ".join(f"{k} {v}" for k, v in self.tolerances.items() if v is not None))
        for r in self.backends:      # where top-1 first differs, unless a failure line below says it
            said = any(w in x for x in r.reasons(tol, self.prompts) for w in ("differs at step", "diverge at step"))
            if r.first_divergence is not None and not said:
                lines.append(f"  {r.backend}: top-1 first differs at {r.divergence(self.prompts)}")
        lines += [f"  {line}" for line in self.failures()]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _same(ok: bool | None) -> str:
    return "-" if ok is None else ("same" if ok else "DIFF")


def _nan(value: Any) -> Any:
    return float("nan") if value is None else value


@dataclass
class _Forced:
    """Accumulates per-step comparisons of one candidate against the reference."""

    steps: list[StepStats] = field(default_factory=list)
    agree: int = 0
    total: int = 0
    first_by_row: list[int | None] = field(default_factory=list)

    def add(self, step: int, ref: Tensor, cand: Tensor, active: Tensor) -> None:
        """ref, cand: logits [R, V]; active: [R] bool (rows still generating at this step)."""
        ref, cand = ref.float().cpu()[active], cand.float().cpu()[active]          # [A, V]
        d_logit = (ref - cand).abs().amax().item()
        d_logprob = (ref.log_softmax(-1) - cand.log_softmax(-1)).abs().amax().item()
        if torch.isnan(cand).any():
            d_logit = d_logprob = float("nan")
        same = ref.argmax(-1) == cand.argmax(-1)                                    # [A]
        for row, ok in zip(active.nonzero().flatten().tolist(), same.tolist()):
            if not ok and self.first_by_row[row] is None:
                self.first_by_row[row] = step
        self.agree += int(same.sum())
        self.total += int(active.sum())
        self.steps.append(StepStats(step, int(active.sum()), d_logit, d_logprob, same.float().mean().item()))


def _pad_sequences(seqs: list[tuple[int, ...]], pad: int) -> tuple[Tensor, Tensor]:
    """Token sequences -> tokens [R, S] (padded with `pad`) and lengths [R]."""
    width = max(1, max(len(s) for s in seqs))
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    for row, seq in enumerate(seqs):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def _open(backend: Backend, batch: EncodedBatch, expand: int) -> tuple[Tensor, Any]:
    """Prefill, then repeat each input's row `expand` times (rows of an input stay contiguous)."""
    logits, state = backend.prefill(batch.to(backend.device))                      # [B, V]
    if expand > 1:
        idx = torch.arange(batch.batch_size).repeat_interleave(expand).to(backend.device)  # [B * expand]
        state = backend.reorder(state, idx)
        logits = logits.index_select(0, idx.to(logits.device))
    return logits, state


def teacher_force(reference: Backend, candidate: Backend, batch: EncodedBatch,
                  sequences: list[list[tuple[int, ...]]]) -> _Forced:
    """Feed both backends the same generated tokens and compare their logits at every step.

    sequences[b] holds the token sequences forced for input b (same count for every input);
    row r of the forced batch is input r // len(sequences[b]).
    """
    per_input = len(sequences[0])
    flat = [seq for group in sequences for seq in group]
    tokens, lengths = _pad_sequences(flat, reference.info.special.pad_token_id)    # [R, S], [R]
    forced = _Forced(first_by_row=[None] * len(flat))
    ref_logits, ref_state = _open(reference, batch, per_input)
    cand_logits, cand_state = _open(candidate, batch, per_input)
    if cand_logits.shape[-1] != ref_logits.shape[-1]:   # no logit to compare with: another model, or a broken graph
        raise CheckFailed(f"{candidate.name} returns {cand_logits.shape[-1]} logits per token and the reference "
                          f"{reference.name} {ref_logits.shape[-1]}: they are not the same model (a changed "
                          "lm_head or vocabulary)")
    for step in range(tokens.shape[1]):
        forced.add(step, ref_logits, cand_logits, lengths > step)
        if step + 1 == tokens.shape[1]:
            break
        column = tokens[:, step]                                                   # [R]
        ref_logits, ref_state = reference.decode(column.to(reference.device), ref_state)
        cand_logits, cand_state = candidate.decode(column.to(candidate.device), cand_state)
    return forced


def _settings_difference(reference: Backend, candidate: Backend) -> str | None:
    """The stop/start tokens and model-level decoding settings (generation_config) in which `candidate`
    differs from `reference`, e.g. "eos_token_ids (1, 262), the reference's (1,)"; None when the same.
    Teacher forcing compares raw logits, so an artifact that stops at another token would otherwise only
    show in its own outputs, which loose budgets (identical_beams = false) do not judge."""
    ref, cand = reference.info, candidate.info
    pairs = [("eos_token_ids", tuple(sorted(ref.special.eos_token_ids)), tuple(sorted(cand.special.eos_token_ids))),
             ("decoder_start_token_id", ref.special.decoder_start_token_id, cand.special.decoder_start_token_id)]
    pairs += [(key, ref.generation.get(key), cand.generation.get(key))
              for key in sorted(set(ref.generation) | set(cand.generation))]
    diffs = [f"{key} {theirs!r}, the reference's {ours!r}" for key, ours, theirs in pairs if ours != theirs]
    return "; ".join(diffs) or None


def _search(backend: Backend, batch: EncodedBatch, options: Any) -> list[list[Any]]:
    from deploylm.decoding.search import generate_ids

    return generate_ids(backend, batch.to(backend.device), options)


def _candidate_search(backend: Backend, batch: EncodedBatch, options: Any,
                      overflows: list[str]) -> list[list[Any]] | None:
    """A candidate's search, or None when its logits overflow (NaN/inf) on the way: a failed check, not a crash of
    the whole check. The overflow is appended to `overflows`: the teacher-forced steps locate it only where it
    lies on the reference's outputs, not on the candidate's own path (its other beams, a diverged greedy)."""
    try:
        return _search(backend, batch, options)
    except NumericalOverflow as exc:
        overflows.append(f"its own {'beam search' if options.num_beams > 1 else 'greedy search'} stopped: {exc}")
        return None


def _same_ids(a: list[list[Any]], b: list[list[Any]] | None) -> bool:
    if b is None:
        return False
    return [[tuple(h.token_ids) for h in hyps] for hyps in a] == [[tuple(h.token_ids) for h in hyps] for hyps in b]


def _score_gap(a: list[list[Any]], b: list[list[Any]] | None) -> float | None:
    if not _same_ids(a, b):
        return None
    gaps = [abs(float(x.score) - float(y.score)) for ha, hb in zip(a, b) for x, y in zip(ha, hb)]
    return max(gaps, default=0.0)


def _texts(tokenizer: Any, hyps: list[list[Any]] | None) -> list[str] | None:
    if hyps is None:
        return None
    return [tokenizer.decode(list(h[0].token_ids), skip_special_tokens=True) for h in hyps]


def export_check_options(generation: Any, most_new_tokens: int) -> Any:
    """The DecodingOptions an export's own parity checks decode with: the profile's [generation] defaults, at most
    `most_new_tokens` new tokens, and no minimum of the profile's (it could exceed that cap). min_new_tokens is left
    unset (None), not 0: 0 turns the model's own min_length off too (as transformers' min_new_tokens=0 does), and
    the check is to decode as the artifact's users do, a BART-style summarizer's min_length included."""
    from deploylm.decoding.options import DecodingOptions

    options = DecodingOptions.from_mapping(generation)
    return options.replace(max_new_tokens=min(options.max_new_tokens, most_new_tokens), min_new_tokens=None)


def compare_backends(reference: Backend, candidates: dict[str, Backend], batch: EncodedBatch,
                     options: Any, tolerances: Any, tokenizer: Any = None) -> ParityReport:
    """Compare every candidate with `reference` on `batch` (see the module docstring).

    options: DecodingOptions (sampling and max_time are turned off); tolerances: the profile's Parity.
    """
    from deploylm.long_inputs import check_fits

    # no sampling, and no wall-clock limit: a slower backend would stop earlier and "differ"
    beam_opts = options.replace(do_sample=False, max_time=None)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    for cand in candidates.values():   # an engine built for fewer positions than the model (trt): refused before the
        check_fits(lengths, cand.info, beam_opts.max_new_tokens)   # reference decodes, not once forced past it
    greedy_opts = beam_opts.replace(num_beams=1, num_return_sequences=1)
    ref_greedy = _search(reference, batch, greedy_opts)
    ref_beam = _search(reference, batch, beam_opts) if beam_opts.num_beams > 1 else ref_greedy
    forced = [[g[0].token_ids] + ([b[0].token_ids] if beam_opts.num_beams > 1 else [])
              for g, b in zip(ref_greedy, ref_beam)]
    report = ParityReport(reference=reference.name, tolerances=asdict(tolerances),
                          options=beam_opts.to_dict(), prompts=batch.batch_size)
    for name, cand in candidates.items():
        stats = teacher_force(reference, cand, batch, forced)
        overflows: list[str] = []
        cand_greedy = _candidate_search(cand, batch, greedy_opts, overflows)
        cand_beam = _candidate_search(cand, batch, beam_opts, overflows) if beam_opts.num_beams > 1 else cand_greedy
        firsts = [s for s in stats.first_by_row if s is not None]
        report.backends.append(BackendParity(
            backend=name, steps=stats.steps,
            max_abs_logit=max((s.max_abs_logit for s in stats.steps), key=_nan_first),
            max_abs_logprob=max((s.max_abs_logprob for s in stats.steps), key=_nan_first),
            token_agreement=stats.agree / max(1, stats.total),
            first_divergence=min(firsts, default=None), first_divergence_by_row=stats.first_by_row,
            greedy_identical=_same_ids(ref_greedy, cand_greedy), beams_identical=_same_ids(ref_beam, cand_beam),
            max_abs_score=_score_gap(ref_beam, cand_beam),
            text_identical=None if tokenizer is None else _texts(tokenizer, ref_beam) == _texts(tokenizer, cand_beam),
            settings_difference=_settings_difference(reference, cand), overflow=(overflows or [None])[0],
        ))
    return report


def _nan_first(value: float) -> float:
    """Sort key making NaN the largest, so a NaN anywhere is the reported maximum."""
    return math.inf if math.isnan(value) else value


def read_prompts_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one prompt per line; parity and bench)."""
    if not str(path):   # an unset variable in --prompts "$FILE": not the built-in prompts, and not the folder '.'
        raise UsageError("--prompts '': expected a UTF-8 text file with one prompt per line")
    file = Path(path)
    try:
        # a byte-order mark is no prompt text; lines end at \n (\r\n, \r) only, as generate --input reads them:
        # a form feed or U+2028 inside a prompt stays in it
        lines = file.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts {str(path)!r}: cannot read it ({getattr(exc, 'strerror', None) or exc}): "
                         "expected a UTF-8 text file with one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {str(path)!r} has no prompts: expected one prompt per line")
    return prompts


def backend_source(name: str, source: Any, reference: str | Path | None = None) -> Any:
    """What backend `name` opens for SRC: the torch reference of an artifact is the model it came from,
    at the path its manifest records, or `reference` (that model moved elsewhere). A model whose weights
    are not the ones the manifest recorded is refused: parity against it would measure another model."""
    from deploylm.artifact import read_manifest, weights_sha256
    from deploylm.models.source import resolve_source

    if name != "torch" or source.kind != "artifact":
        return source
    manifest = read_manifest(source.path)
    recorded = manifest.get("source") or {}
    origin, digest = recorded.get("path"), recorded.get("weights_sha256")
    profile = (manifest.get("profile") or {}).get("name", "fp32")
    if reference is not None:
        try:
            chosen = resolve_source(reference)
        except UsageError as exc:
            raise UsageError(f"--reference: {exc}") from None
        if digest and weights_sha256(chosen.path) != digest:
            raise UsageError(f"--reference {str(reference)!r} is not the model artifact {source.path} was exported from "
                             f"(its weights' sha256 is not the manifest's {digest[:12]}...): give that model")
        return chosen
    if not origin or not Path(origin).exists():
        raise UsageError(f"the torch reference for artifact {source.path} is the model it was exported from, "
                         f"{origin!r}, which is gone: pass --reference SRC with that model where it is now, or "
                         "drop torch from --backends")
    if digest and weights_sha256(Path(origin)) != digest:
        raise UsageError(f"the model at {origin} changed since artifact {source.path} was exported (its weights' "
                         f"sha256 is not the manifest's), so it is no reference for it: pass --reference SRC with the "
                         f"model it came from, or re-export: deploylm export --model {origin} --profile {profile} "
                         f"--out {source.path} --force")
    return resolve_source(origin)


def default_profile(source: Any) -> Any:
    """The artifact's own profile (from its manifest), else the built-in fp32."""
    from deploylm.artifact import load_artifact
    from deploylm.profiles import load_profile

    if source.kind == "artifact":
        return load_artifact(source.path, verify=False).profile
    return load_profile("fp32")


def _parity_of_a_fresh_export(source: Any, backends: list[str], prompts: list[str] | None, profile: Any,
                              overrides: dict[str, Any]) -> "ParityReport":
    """run_parity of `source` exported with `profile` into a temporary folder (removed afterwards)."""
    import tempfile

    from deploylm.export.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="deploylm-parity-") as tmp:
        artifact = Path(tmp) / "artifact"
        try:
            export_model(source.path, profile, artifact, check_parity=False)   # measured and reported below instead
        except WriteFailed as exc:   # a full disk: parity has no --out to choose, only where temporary files go
            advice = "free space or choose another --out"
            if advice not in str(exc):
                raise
            raise WriteFailed(str(exc).replace(advice, f"parity exports into {tempfile.gettempdir()} first: free "
                                               "space there, or set TMPDIR to a folder with room, or export it "
                                               "yourself (deploylm export --out DIR) and check that artifact")) from None
        reference = source.path if "torch" in backends else None     # the model itself, wherever the export ran
        return run_parity(artifact, backends, prompts, profile, reference=reference, **overrides)


def run_parity(src: str | Path, backends: list[str], prompts: list[str] | None = None, profile: Any = None,
               reference: str | Path | None = None, on_export: Any = None, **overrides: Any) -> ParityReport:
    """`deploylm parity`: open SRC with each backend (the first is the reference) and compare.

    profile: a deploylm.profiles.Profile (tolerances, decoding defaults); default: default_profile(SRC).
    reference: for an artifact, the model the torch backend opens (default: the manifest's source path).
    overrides: DecodingOptions fields replacing the profile's [generation] values.

    SRC that is not an artifact (a checkpoint, a Hugging Face folder, a .gguf file), with backends that run
    artifacts (onnx, trt): it is exported with `profile` (default fp32) into a temporary folder first, checked
    there against SRC itself, and the folder is removed (deploylm export writes an artifact that stays);
    `on_export(profile_name)` is called first (the command says what takes the time).
    """
    from deploylm.backends import backend_class, load_backend
    from deploylm.decoding.options import DecodingOptions
    from deploylm.generator import Generator
    from deploylm.models.source import resolve_source
    from deploylm.models.tokenizer import load_tokenizer

    if len(backends) < 2 or len(set(backends)) != len(backends):
        raise UsageError(f"--backends {','.join(backends)}: expected two or more different backends, "
                         "the reference first (e.g. torch,onnx)")
    for name in backends:
        backend_class(name)                      # an unknown name fails before any model loads
    source = resolve_source(src)
    if reference is not None and (source.kind != "artifact" or "torch" not in backends):
        raise UsageError(f"--reference {str(reference)!r}: applies to an artifact checked with the torch backend "
                         "(it names the model the artifact was exported from)")
    profile = profile if profile is not None else default_profile(source)
    options = DecodingOptions.from_mapping({**profile.generation, **overrides})   # before minutes of export
    if source.kind != "artifact" and any(name != "torch" for name in backends):
        if "trt" in backends and "trt" not in profile.backends:       # the fresh export would have no engines
            raise UsageError(f"--backends {','.join(backends)}: {src} is exported first, with profile {profile.name}, "
                             "which builds no TensorRT engines for the trt backend: pass --profile trt-fp16 (or "
                             "trt-int8)")
        if on_export is not None:
            on_export(profile.name)
        return _parity_of_a_fresh_export(source, backends, prompts, profile, overrides)
    # torch last: it opens any model (a GGUF for many seconds), the others refuse a non-artifact at once
    loaded = {name: load_backend(name, backend_source(name, source, reference))
              for name in sorted(backends, key=lambda name: name == "torch")}
    opened = {name: loaded[name] for name in backends}
    tokenizer = load_tokenizer(source)
    first = opened.pop(backends[0])
    batch = Generator(first, tokenizer).encode(list(prompts or DEFAULT_PROMPTS), options)
    return compare_backends(first, opened, batch, options, profile.parity, tokenizer)
