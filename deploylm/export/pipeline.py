"""`deploylm export`: a fixed pipeline from SRC to a verified artifact folder.

resolve source -> load the torch model -> export graphs into the artifact's temporary folder -> pack
MatMuls that share an input (fp32 profiles for ONNX Runtime) -> config, generation config, tokenizer ->
validate graphs against PyTorch -> precision (non-fp32 profiles) -> TensorRT engines (profiles listing
trt) -> parity (torch vs onnx, step by step, on the parity prompts) -> manifest, then rename into place
(deploylm.artifact). Any failure leaves nothing behind; an existing output folder is refused unless `force`.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploylm.errors import CheckFailed, UsageError
from deploylm.export.onnx_export import DEFAULT_OPSET, GraphPlan, export_graph, plan_graphs
from deploylm.export.validate import ValidationReport, validate_graphs
from deploylm.models.source import Source, resolve_source
from deploylm.profiles import needs_concat_layout

PARITY_MAX_NEW_TOKENS = 16  # parity at export: enough steps to catch drift, short enough to be quick


@dataclass(frozen=True)
class ExportReport:
    """What `export_model` made and how it checked it."""

    out_dir: Path
    profile: str
    kind: str
    files: dict[str, int]                 # file -> bytes
    validation: ValidationReport
    parity: dict[str, Any]                # ParityReport.summary() (torch vs onnx)
    details: tuple[str, ...] = ()         # printed as they are (precision step, ...)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def lines(self) -> list[str]:
        mib = self.total_bytes / 2**20
        out = [f"exported {self.kind} model to {self.out_dir} ({len(self.files)} files, {mib:.1f} MiB) "
               f"with profile {self.profile} in {sum(self.seconds.values()):.1f} s "
               f"({', '.join(f'{k} {v:.1f} s' for k, v in self.seconds.items())})",
               f"validation: {self.validation.summary()}"]
        from deploylm.artifact import format_parity

        return [*out, *self.details, "parity:", *format_parity(self.parity)]


def default_out_dir(source: Source, profile_name: str) -> Path:
    return Path("export") / f"{source.name}-{profile_name}"


def kv_layout(profile: Any) -> str | None:
    """The KV layout a profile asks of the graphs (io_spec.KV_*), or None for the model's own (shared-prompt for
    Hugging Face causal LMs that allow it, else concat): its `kv_layout` key, and concat where it needs it."""
    if profile.kv_layout != "auto":
        return profile.kv_layout
    from deploylm.export.io_spec import KV_CONCAT

    return KV_CONCAT if needs_concat_layout(profile) else None


def export_model(src: str | Path, profile: Any = "fp32", out_dir: str | Path | None = None,
                 force: bool = False, *, calibration: str | Path | None = None,
                 allow_quality_loss: bool = False, check_parity: bool = True) -> ExportReport:
    """Export SRC with `profile` (a name, a TOML path or a Profile) to an artifact folder.

    check_parity=False skips the export's own parity check (manifest `parity` null): for `deploylm parity`,
    which measures the fresh export with its own prompts and options and reports the result, pass or fail.

    Non-fp32 profiles convert/quantize the validated fp32 graphs (deploylm.export.precision_step,
    `calibration` text for static int8); profiles listing "trt" also build TensorRT engines.
    """
    from deploylm.artifact import check_output_folder, source_fields, write_artifact
    from deploylm.fsutil import exclusive_writer
    from deploylm.profiles import load_profile

    source = resolve_source(src)
    if source.kind == "artifact":
        raise UsageError(f"model {str(src)!r} is already an exported artifact: export a checkpoint, Hugging Face folder or .gguf file")
    profile = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    apply_precision = _precision_step(profile)
    fp32_atol = load_profile("fp32").parity.logits_atol  # the graphs validated here are always fp32
    out = Path(out_dir) if out_dir is not None else default_out_dir(source, profile.name)
    with exclusive_writer(out):   # a second export into the same --out is refused while this one runs
        # before minutes of export, not after
        check_output_folder(out, force, inputs={"--model": src, "--calibration": calibration})
        from deploylm.export.calibration import check_calibration_file
        from deploylm.export.precision_step import uses_calibration

        check_calibration_file(calibration)  # before minutes of export, not after
        if "trt" in profile.backends:        # so is a machine without TensorRT or a CUDA GPU
            from deploylm.export.trt_env import require_trt_gpu

            require_trt_gpu(f"export --profile {profile.name}")
        if calibration is not None and not (apply_precision is not None and uses_calibration(profile)):
            raise UsageError(f"--calibration: profile {profile.name} reads no calibration text (static int8, rowwise "
                             "int8 with smooth_alpha > 0 and profiles with [precision_fallback] auto = true do): drop --calibration or choose such a profile")
        timings: dict[str, float] = {}
        model = _timed(timings, "load", _load_model, source)
        plan = plan_graphs(model)
        if "trt" in profile.backends and profile.precision == "int8" and plan.kind == "encoder-decoder":
            raise UsageError(f"profile {profile.name}: TensorRT's int8 calibration cannot feed an encoder-decoder's "
                             "decoder (it takes encoder outputs): use --profile trt-fp16")
        result: dict[str, Any] = {"details": []}
        layout = kv_layout(profile)
        if layout is not None:
            from deploylm.export.hf_graphs import with_layout

            chosen = with_layout(plan, layout)
            if chosen is not plan and apply_precision is not None:
                result["layout_note"] = (f"note: speed is against fp32 graphs in the {layout} KV layout this profile "
                                         "asks for; the fp32 profile ships the shared-prompt layout, faster at beam "
                                         "search: compare the two artifacts with deploylm bench")
            plan = chosen
        result["details"] += _overridden_defaults(source, profile)
        fields = {"source": source_fields(source), "profile": profile.to_dict(), "generation": dict(profile.generation),
                  "export": {"kind": plan.kind, "family": plan.family, "opset": DEFAULT_OPSET,
                             "cross_rows": plan.cross_rows if plan.kind == "encoder-decoder" else None}}

        def build(tmp: Path) -> None:
            _timed(timings, "export", _export_graphs, plan, tmp)
            if packs_matmuls(profile):
                fields["export"]["packed_matmuls"] = _timed(timings, "pack", _pack_graphs, plan, tmp)
            _write_model_files(source, model, tmp)
            result["validation"] = _timed(timings, "validate", validate_graphs, plan, tmp, fp32_atol)
            if not result["validation"].ok:
                raise CheckFailed(f"exported graphs do not match PyTorch: {result['validation'].summary()}")
            if apply_precision is not None:
                precision = _timed(timings, "precision", apply_precision, tmp, profile, source, calibration,
                                   allow_quality_loss=allow_quality_loss)
                fields["quality"] = precision.to_dict()
                result["details"] += precision.lines() + ([result["layout_note"]] if "layout_note" in result else [])
            if "trt" in profile.backends:
                from deploylm.export.tensorrt import build_for_export

                given = {} if calibration is None else {"calibration": trt_calibration_ids(tmp, calibration)}
                fields["tensorrt"] = _timed(timings, "tensorrt", build_for_export, tmp, profile, **given)
            result["parity"] = (_timed(timings, "parity", _parity, source, tmp, profile, fields["generation"])
                                if check_parity else None)
            fields["parity"] = result["parity"]

        write_artifact(out, build, fields, force=force)
        files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
        return ExportReport(out, profile.name, plan.kind, files, result["validation"], result["parity"],
                            tuple(result["details"]), timings)


def _overridden_defaults(source: Any, profile: Any) -> list[str]:
    """A note for each of the model's own decoding defaults (its generation_config.json) that the profile's
    [generation] replaces in the artifact: the artifact carries that file too, and decodes otherwise."""
    import json

    file = source.path / "generation_config.json"          # a model folder's; a .gguf file has none
    try:
        own = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        return []
    changed = {k: (own[k], v) for k, v in profile.generation.items() if isinstance(own, dict) and k in own
               and own[k] != v}
    return [f"note: the profile's [generation] {k} = {new!r} replaces the model's own {old!r} "
            f"(generation_config.json) as the artifact's default" for k, (old, new) in sorted(changed.items())]


def trt_calibration_ids(folder: Path, calibration: str | Path) -> list[list[int]]:
    """--calibration's samples as token ids through the artifact's tokenizer, for TensorRT's int8 calibrator (which
    otherwise calibrates on built-in English text)."""
    from deploylm.export.calibration import read_samples
    from deploylm.models.source import folder_source
    from deploylm.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder_source(folder))
    return [ids for ids in (list(tokenizer(text)["input_ids"]) for text, _ in read_samples(Path(calibration))) if ids]


def packs_matmuls(profile: Any) -> bool:
    """Graphs for ONNX Runtime whose MatMuls that share an input are packed (deploylm.export.pack_matmuls:
    the same bits, a faster step): fp32, int8 weight-only, whose MatMulNBits quantizes each weight
    column and each activation block along K alike whatever the width, and int8 rowwise, whose rows are
    quantized once for the whole group. The other quantized profiles
    quantize the graphs as exported (int4 packs the same groups itself); TensorRT fuses on its own."""
    if "trt" in profile.backends:
        return False
    q = profile.quantization
    return profile.precision == "fp32" or (profile.precision == "int8" and q is not None
                                           and q.method in ("weight-only", "rowwise"))


def _pack_graphs(plan: GraphPlan, folder: Path) -> dict[str, int]:
    """Pack each graph in place; {graph file: MatMul groups packed}."""
    from deploylm.export.pack_matmuls import pack_graph_file

    return {spec.file: len(pack_graph_file(folder / spec.file)) for spec, _ in plan.graphs}


def _precision_step(profile: Any) -> Any:
    """deploylm.export.precision_step.apply_precision for non-fp32 profiles (None for fp32)."""
    if profile.precision == "fp32":
        return None
    try:
        from deploylm.export.precision_step import apply_precision
    except ImportError:
        raise UsageError(f"profile {profile.name} needs quantization support (not built yet): use --profile fp32") from None
    return apply_precision


def _timed(timings: dict[str, float], key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _load_model(source: Source) -> Any:
    import torch

    if source.kind == "checkpoint":
        from deploylm.models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(source.path)
        return model.float().eval()
    from deploylm.models import hf

    return hf.load_hf_model(source, dtype=torch.float32, device=torch.device("cpu"))


def _export_graphs(plan: GraphPlan, folder: Path) -> None:
    for spec, module in plan.graphs:
        export_graph(module, spec, folder, plan.dims.vocab_size)


def _write_model_files(source: Source, model: Any, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as the source has them."""
    from deploylm.models.tokenizer import TOKENIZER_FILES, load_tokenizer

    if source.kind == "checkpoint":
        extra = ("config.json", "generation_config.json", "special_tokens_map.json", "tokenizer_config.json")
        for name in dict.fromkeys((*extra, *TOKENIZER_FILES)):
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, folder / name)
        return
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)


def _parity(source: Source, folder: Path, profile: Any, generation: dict[str, Any]) -> dict[str, Any]:
    """torch vs the new graphs, step by step (deploylm.parity); parity.json written into folder."""
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.backends.torch_backend import TorchBackend
    from deploylm.generator import Generator
    from deploylm.models.tokenizer import load_tokenizer
    from deploylm.parity import DEFAULT_PROMPTS, compare_backends, export_check_options

    reference = TorchBackend.from_source(source)
    candidate = OnnxBackend.from_folder(folder, name=source.name, generation=generation)
    options = export_check_options(profile.generation, PARITY_MAX_NEW_TOKENS)
    tokenizer = load_tokenizer(source)
    batch = Generator(reference, tokenizer).encode(list(DEFAULT_PROMPTS), options)
    report = compare_backends(reference, {"onnx": candidate}, batch, options, profile.parity, tokenizer)
    (folder / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.passed:
        raise CheckFailed(f"onnx does not match torch within the profile's [parity] tolerances: {'; '.join(report.failures())}")
    return report.summary()
