"""The export pipeline's precision step: fp32 graphs -> the profile's precision, checked.

`apply_precision(tmp_dir, profile, source, calibration)` runs after the fp32 graphs are written
into the artifact's temporary folder and before parity. It keeps a copy of the fp32 graphs as the
reference, converts (fp16/bf16, deploylm.export.precision) or quantizes (int8/int4,
deploylm.export.quantize) with the [precision_fallback] ops/nodes kept in fp32, judges the result
on decoding outputs against fp32 (the profile's [parity] tolerances and [quality] budget), runs the
auto fallback search when asked (deploylm.export.fallback), writes the chosen graphs back into
tmp_dir and returns a PrecisionReport (stored in the manifest as `quality`, printed by export).
A budget that is not met raises CheckFailed unless `allow_quality_loss`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from deploylm.errors import CheckFailed, UsageError
from deploylm.export import io_spec
from deploylm.export.fallback import (Exclusions, SearchResult, Verdict, listed_nodes, quantizable_nodes, rank_nodes,
                                      search)

GRAPH_FILES = (io_spec.MODEL_FILE, io_spec.ENCODER_FILE, io_spec.DECODER_FILE)
JUDGE_NEW_TOKENS = 16
SENSITIVITY_SAMPLES = 8
SPEED_ROUNDS = 3


@dataclass(frozen=True)
class PrecisionReport:
    profile: str
    precision: str
    applied: bool                                     # False: graphs stay fp32 (fp32 or trt-only profiles)
    method: str | None = None
    kept_fp32: dict[str, tuple[str, ...]] = field(default_factory=dict)   # graph -> nodes kept in fp32
    auto_kept: int = 0                                # of those, chosen by the auto search
    attempts: int = 0                                 # candidates converted and judged
    quality: dict[str, Any] | None = None             # QualityReport.to_dict() of the final graphs
    budget_failures: tuple[str, ...] = ()             # non-empty only with allow_quality_loss
    fallback_cost: dict[str, Any] | None = None       # size/speed before and after the auto fallback
    calibration: str | None = None                    # where calibration text came from
    held_out: str | None = None                       # where the quality report's held-out text came from
    notes: tuple[str, ...] = ()
    calibration_samples: int | None = None            # token sequences that fed the graphs (None: none were read)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "precision": self.precision, "applied": self.applied,
                "method": self.method, "kept_fp32": {k: list(v) for k, v in self.kept_fp32.items()},
                "auto_kept": self.auto_kept, "attempts": self.attempts, **(self.quality or {}),
                "budget_met": not self.budget_failures, "budget_failures": list(self.budget_failures),
                "fallback_cost": self.fallback_cost, "calibration": self.calibration,
                "calibration_samples": self.calibration_samples, "held_out": self.held_out, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionReport":
        """The report a manifest's `quality` field (to_dict) holds."""
        from deploylm.export.quality import QualityReport

        # a report written before a field with a default existed (round_ratios, cpu_ratio) still reads
        fields = QualityReport.__dataclass_fields__.values()
        needed = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING]
        quality = {f.name: data[f.name] for f in fields if f.name in data} if all(k in data for k in needed) else None
        return cls(data["profile"], data["precision"], bool(data["applied"]), data.get("method"),
                   {k: tuple(v) for k, v in (data.get("kept_fp32") or {}).items()}, int(data.get("auto_kept", 0)),
                   int(data.get("attempts", 0)), quality, tuple(data.get("budget_failures") or ()),
                   data.get("fallback_cost"), data.get("calibration"), data.get("held_out"),
                   tuple(data.get("notes") or ()), data.get("calibration_samples"))

    def lines(self) -> list[str]:
        if not self.applied:
            return [f"precision: {n}" for n in self.notes]
        kept = sum(len(v) for v in self.kept_fp32.values())
        out = [f"precision: {self.precision}{f' ({self.method})' if self.method else ''}, {kept} node(s) kept in fp32 "
               f"({self.auto_kept} by the auto search, {self.attempts} candidate(s) judged)"]
        if self.quality:
            from deploylm.export.calibration import describe
            from deploylm.export.quality import QualityReport

            fields = {k: self.quality[k] for k in QualityReport.__dataclass_fields__ if k in self.quality}
            where = f" (held out: {describe(self.held_out)})" if self.held_out else ""
            out.append(f"quality{where}: " + QualityReport(**{k: (float("inf") if v is None else v)
                                                       for k, v in fields.items()}).line())
        if self.fallback_cost:
            c = self.fallback_cost
            speed = (f", speed {c['speed_before']:.2f}x -> {c['speed_after']:.2f}x fp32"
                     if c["speed_before"] is not None and c["speed_before"] == c["speed_before"] else "")
            out.append(f"fallback cost: size {c['bytes_before'] / 2**20:.1f} -> {c['bytes_after'] / 2**20:.1f} MiB{speed}")
        out += [f"quality budget NOT met (--allow-quality-loss): {f}" for f in self.budget_failures]
        return out + [f"note: {n}" for n in self.notes]


@dataclass
class _Workspace:
    """The scratch folder: fp32 reference, candidates, calibration feeds, held-out text."""

    root: Path
    ref: Path            # the validated fp32 graphs the candidates are made from
    shipped: Path        # the same as `--profile fp32` ships them (packed, same bits): the quality reference
    profile: Any
    graphs: list[str]
    feeds: dict[str, list[dict]]
    held: Any
    calibration_origin: str | None = None
    calibration_note: str | None = None     # a --calibration file shorter or longer than calibration_samples
    calibration_count: int | None = None    # sequences that fed the graphs (empty texts dropped)
    tries: int = 0
    dirs: dict[int, Path] = field(default_factory=dict)   # id(verdict) -> its folder
    verdicts: list[Verdict] = field(default_factory=list)

    def convert(self, kept: Exclusions, dest: Path) -> None:
        """The profile's conversion of every graph into dest (non-graph files copied from ref)."""
        from deploylm.export.onnx_export import save_graph
        from deploylm.export.precision import convert_float
        from deploylm.export.quantize import quantize_graph

        shutil.copytree(self.ref, dest, ignore=shutil.ignore_patterns("*.onnx", "*.data", "*.onnx_data"))
        p = self.profile
        ops = p.precision_fallback.ops if p.precision_fallback else ()
        for file in self.graphs:
            if p.precision in ("fp16", "bf16"):
                import onnx

                model = convert_float(onnx.load(str(self.ref / file)), p.precision, ops, kept.get(file, ()))
                save_graph(model, dest / file)
            else:
                quantize_graph(self.ref / file, dest / file, p.precision, p.quantization,
                               feeds=self.feeds.get(file), exclude=kept.get(file, ()))

    def judge(self, kept: Exclusions, rounds: int = 0) -> Verdict:
        from deploylm.export.quality import measure_quality

        self.tries += 1
        dest = self.root / f"try-{self.tries}"
        self.convert(kept, dest)
        failures = self._parity(dest)
        quality = measure_quality(self.shipped, dest, self.held, rounds=rounds)
        verdict = Verdict(kept, tuple(failures + quality.failures(self.profile.quality)), quality)
        self._prune(verdict)
        self.dirs[id(verdict)] = dest
        self.verdicts.append(verdict)
        return verdict

    def _prune(self, newest: Verdict) -> None:
        """Delete candidate folders the search can no longer choose: it keeps the first, the newest
        and (while the newest fails) the newest passing one; bisection only moves to smaller passes."""
        if not self.verdicts:
            return
        keep = {id(self.verdicts[0])}
        if not newest.passed:
            keep |= {id(v) for v in [v for v in self.verdicts if v.passed][-1:]}
        for v in self.verdicts:
            if id(v) not in keep and id(v) in self.dirs:
                shutil.rmtree(self.dirs.pop(id(v)), ignore_errors=True)

    def _parity(self, dest: Path) -> list[str]:
        from deploylm.backends.onnx_backend import OnnxBackend
        from deploylm.generator import Generator
        from deploylm.models.source import folder_source
        from deploylm.models.tokenizer import load_tokenizer
        from deploylm.parity import DEFAULT_PROMPTS, compare_backends, export_check_options

        ref = OnnxBackend.from_folder(self.ref, name="fp32")
        cand = OnnxBackend.from_folder(dest, name=self.profile.name)
        options = export_check_options(self.profile.generation, JUDGE_NEW_TOKENS)
        tokenizer = load_tokenizer(folder_source(self.ref))
        batch = Generator(ref, tokenizer).encode(list(DEFAULT_PROMPTS), options)
        report = compare_backends(ref, {"onnx": cand}, batch, options, self.profile.parity)
        return report.failures()


def apply_precision(tmp_dir: Path, profile: Any, source: Any, calibration: str | Path | None = None, *,
                    allow_quality_loss: bool = False, rounds: int = SPEED_ROUNDS,
                    auto: bool | None = None) -> PrecisionReport:
    """Convert the fp32 graphs in tmp_dir to `profile`'s precision in place (see module docstring).

    rounds: interleaved timed rounds for the reported speed ratio (0: not measured).
    auto: run the fallback search when the first candidate fails (None: as the profile says).
    """
    from deploylm.export.calibration import check_calibration_file
    from deploylm.export.quality import measure_quality

    tmp_dir = Path(tmp_dir)
    file = check_calibration_file(calibration)
    if profile.precision == "fp32":
        return PrecisionReport(profile.name, "fp32", False, notes=("fp32 graphs, nothing to convert",))
    if "onnx" not in profile.backends:
        return PrecisionReport(profile.name, profile.precision, False,
                               notes=(f"ONNX graphs stay fp32: {', '.join(profile.backends)} applies {profile.precision} itself",))
    with _scratch_beside(tmp_dir) as scratch:
        work = _workspace(scratch, tmp_dir, profile, source, file)
        base = _base_exclusions(work)
        first = work.judge(base)
        result = SearchResult(first, first, 1, 0)
        fallback = profile.precision_fallback
        auto = (fallback is not None and fallback.auto) if auto is None else auto
        if not first.passed and auto:
            ranked = rank_nodes(work.ref, work.dirs[id(first)], _few(work.feeds), profile.precision, base,
                                gathers=quantizes_embedding(profile.quantization))
            result = search(ranked, base, work.judge, first)
        chosen = work.dirs[id(result.final)]
        if rounds:   # the reported numbers: speed timed in `rounds` interleaved rounds
            quality = measure_quality(work.shipped, chosen, work.held, rounds=rounds)
            first = result.first
            if result.final is not first:   # what the fallback cost: time the first candidate too
                first = replace(first, quality=measure_quality(work.shipped, work.dirs[id(first)], work.held,
                                                               rounds=rounds))
            result = replace(result, first=first, final=replace(result.final, quality=quality))
        report = _report(profile, work, base, result, allow_quality_loss)   # raises before tmp_dir changes
        _replace_graphs(chosen, tmp_dir, work.graphs)
        return report


@contextlib.contextmanager
def _scratch_beside(tmp_dir: Path) -> Iterator[Path]:
    """A work folder beside the export's temporary folder, named after it and ending in this process's
    id (`.<name>.tmp-<id>-<pid>.precision-<pid>`), so that when the export is killed outright, the next
    export of the same folder removes it with the temporary folder (fsutil.remove_stale_temporaries)."""
    scratch = tmp_dir.parent / f"{tmp_dir.name}.precision-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _replace_graphs(chosen: Path, tmp_dir: Path, graphs: list[str]) -> None:
    """Copy the converted graphs over the fp32 ones; the fp32 graphs' external data files (model.onnx.data,
    large exports) go with them unless a converted graph still reads them."""
    from deploylm.artifact import external_data_files

    stale = {f for name in graphs for f in external_data_files(tmp_dir / name)}
    for name in graphs:
        shutil.copy2(chosen / name, tmp_dir / name)
        for data in external_data_files(chosen / name):
            shutil.copy2(chosen / data, tmp_dir / data)
            stale.discard(data)
    for data in stale:
        (tmp_dir / data).unlink(missing_ok=True)


def _few(feeds: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {f: batches[:1] for f, batches in feeds.items()}


def _workspace(root: Path, tmp_dir: Path, profile: Any, source: Any, file: Path | None) -> _Workspace:
    from deploylm.export.calibration import graph_feeds, text_sets, token_ids
    from deploylm.models.source import folder_source
    from deploylm.models.tokenizer import load_tokenizer

    ref = root / "fp32"
    shutil.copytree(tmp_dir, ref)
    graphs = [g for g in GRAPH_FILES if (ref / g).is_file()]
    seq2seq = io_spec.ENCODER_FILE in graphs
    q = profile.quantization
    needs_feeds = _calibrates(q) or _searches(profile)
    samples = (q.calibration_samples if q is not None and q.calibration_samples else SENSITIVITY_SAMPLES)
    calib, held = text_sets(source, file, samples, seq2seq)
    feeds: dict[str, list[dict]] = {}
    pairs: list = []
    if needs_feeds:
        tokenizer = load_tokenizer(folder_source(ref))
        room = _window(ref)
        pairs = [(s, t) for s, t in zip(token_ids(tokenizer, calib.inputs, room),
                                        token_ids(tokenizer, calib.targets or calib.inputs, room))]
        feeds = graph_feeds(ref, [s for s, _ in pairs], [t for _, t in pairs] if seq2seq else None)
    short = None
    if _calibrates(q) and file is not None:
        total = calib.available
        if total < samples:
            short = (f"--calibration {file} has {total} sample(s), fewer than the profile's "
                     f"calibration_samples = {samples}: all of them were used")
        elif total > samples:     # said, as the short case is: the rest of the file goes unused
            short = (f"--calibration {file} has {total} samples: the first {samples} (the profile's "
                     "calibration_samples) were used")
    return _Workspace(root, ref, _shipped_fp32(root, ref, graphs, profile), profile, graphs, feeds, held,
                      calib.origin if needs_feeds else None, short, len(pairs) if needs_feeds else None)


def _shipped_fp32(root: Path, ref: Path, graphs: list[str], profile: Any) -> Path:
    """The fp32 reference in the form the fp32 profile ships: `ref` itself when this profile's graphs
    were packed too (fp32, int8 weight-only and rowwise), else a packed copy, so that "speed N× fp32" compares with
    the fp32 artifact a user would otherwise deploy, not with slower unpacked graphs."""
    from deploylm.export.pack_matmuls import pack_graph_file
    from deploylm.export.pipeline import packs_matmuls

    if packs_matmuls(profile) or "trt" in profile.backends:
        return ref
    shipped = root / "fp32-shipped"
    shutil.copytree(ref, shipped)
    for file in graphs:
        pack_graph_file(shipped / file)
    return shipped


def _window(folder: Path) -> int:
    """Calibration tokens per sample: 64, or less for a model whose window is shorter (minus a start token)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    window = next((config[k] for k in ("max_positions", "max_position_embeddings", "n_positions") if config.get(k)), 65)
    return max(2, min(64, int(window) - 1))


def _base_exclusions(work: _Workspace) -> Exclusions:
    """The [precision_fallback] ops/nodes, as node names per graph: what the report lists as kept in fp32
    (int8/int4: not quantized; fp16/bf16 also block the op types themselves, onnxruntime's converter's way)."""
    import onnx

    fb = work.profile.precision_fallback
    if fb is None:
        return {}
    q = work.profile.quantization
    out, names, types = {}, set(), set()
    for file in work.graphs:
        model = onnx.load(str(work.ref / file), load_external_data=False)
        out[file] = listed_nodes(model, fb.ops, fb.nodes)
        if q is not None:    # int8/int4 quantize constant-weight nodes only: an attention MatMul is not "kept"
            can = quantizable_nodes(model, gathers=quantizes_embedding(q))
            out[file] = tuple(n for n in out[file] if n in can)
        names |= {n.name for n in model.graph.node}
        types |= {n.op_type for n in model.graph.node}
    _check_listed(fb, names, types, work.profile.name)
    return out


def _check_listed(fallback: Any, names: set[str], types: set[str], profile: str) -> None:
    """A [precision_fallback] node that no exported graph holds, or an op type that is neither in them nor
    an ONNX operator, is a typo that would keep nothing in fp32: a UsageError naming it. (An ONNX op type
    absent from this model is fine: a profile serves many models.)"""
    import onnx.defs

    unknown_nodes = [n for n in fallback.nodes if n not in names]
    if unknown_nodes:
        some = ", ".join(sorted(names)[:3])
        raise UsageError(f"profile {profile}: [precision_fallback] nodes {unknown_nodes} are not nodes of the exported "
                         f"graphs (names as in the .onnx files, e.g. {some})")
    unknown_ops = [op for op in fallback.ops if op not in types and not onnx.defs.has(op)]
    if unknown_ops:
        raise UsageError(f"profile {profile}: [precision_fallback] ops {unknown_ops} are not ONNX operator types "
                         f"(the graphs hold {', '.join(sorted(types))})")


def _searches(profile: Any) -> bool:
    """The profile runs the automatic fp32-fallback search."""
    return bool(profile.precision_fallback and profile.precision_fallback.auto)


def uses_calibration(profile: Any) -> bool:
    """The profile reads calibration text: static int8 (activation ranges), rowwise int8 with smoothing (channel
    maxima) or the fallback search (node sensitivities); the others would ignore --calibration."""
    q = profile.quantization
    return profile.precision != "fp32" and (_calibrates(q) or _searches(profile))


def quantizes_embedding(q: Any) -> bool:
    """The quantization turns the token embedding Gather into int8 rows too (weight-only and rowwise int8 with
    `embedding = true`), so the fallback can keep it in fp32."""
    return q is not None and q.method in ("weight-only", "rowwise") and bool(q.embedding)


def _calibrates(q: Any) -> bool:
    """The quantization reads calibration feeds: static int8 (activation ranges), rowwise int8 with smoothing
    (activation channel maxima)."""
    return q is not None and (q.method == "static" or (q.method == "rowwise" and bool(q.smooth_alpha)))


def _report(profile: Any, work: _Workspace, base: Exclusions, result: SearchResult,
            allow_quality_loss: bool) -> PrecisionReport:
    final = result.final
    failures = final.failures
    if failures and not allow_quality_loss:
        raise CheckFailed(f"profile {profile.name} misses its checks against fp32 ({'; '.join(failures)}); "
                          f"kept {final.kept_count} node(s) in fp32"
                          f"{' after the auto search' if result.attempts > 1 else ''}: loosen [parity]/[quality], "
                          f"{'' if _searches(profile) else 'set [precision_fallback] auto = true, '}"
                          "or pass --allow-quality-loss")
    cost = None
    if result.attempts > 1:
        before, after = result.first.quality, final.quality
        cost = {"bytes_before": before.bytes, "bytes_after": after.bytes,
                "speed_before": before.speed_ratio, "speed_after": after.speed_ratio}
    base_count = sum(len(v) for v in base.values())
    notes = [f"without the auto fallback: {'; '.join(result.first.failures)}"] if result.attempts > 1 else []
    auto_kept = final.kept_count - base_count
    if result.attempts > 1 and 0 < result.ranked <= auto_kept:   # nothing of the profile's conversion is left
        notes.append(f"the auto search kept every one of the {result.ranked} node(s) {profile.precision} would convert "
                     f"in fp32: these graphs compute in fp32, {profile.precision} in name only; for this model "
                     "--profile fp32 gives the same quality without the casts")
    if work.calibration_note:
        notes.append(work.calibration_note)
    if profile.precision == "bf16":
        notes.append("bf16 weights are stored as bf16 and computed in fp32 on CPU")
    if profile.precision == "fp16":   # ONNX Runtime's CPU build has few fp16 kernels: it casts around the rest
        notes.append("fp16 on CPU: ONNX Runtime runs most MatMuls in fp32 behind casts it inserts, so these checks "
                     "measured fp16 storage more than fp16 arithmetic; check again on the GPU that will run it")
    q = profile.quantization
    return PrecisionReport(
        profile=profile.name, precision=profile.precision, applied=True, method=q.method if q else None,
        kept_fp32={f: v for f, v in final.kept.items() if v}, auto_kept=auto_kept,
        attempts=result.attempts, quality=final.quality.to_dict(), budget_failures=tuple(failures),
        fallback_cost=cost, calibration=work.calibration_origin, held_out=work.held.origin,
        notes=tuple(notes), calibration_samples=work.calibration_count)
