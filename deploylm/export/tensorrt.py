"""ONNX -> TensorRT engines inside an artifact folder (`trt/*.plan`, `trt/timing.cache`).

`build_engines(artifact_dir, profile)` is called by the export pipeline on its temporary artifact
folder (renamed into place only when everything succeeded). It parses the exported ONNX graphs,
configures the builder from the profile (precision flags, workspace, timing cache, fp32 islands for
[precision_fallback], int8 calibration) and adds one optimization profile per phase:
decoder-only `model.onnx` -> prefill (0) + decode (1); `encoder_model.onnx` -> encoder;
`decoder_model.onnx` -> decode. `trt_manifest_section` binds the engines to this GPU and TensorRT
version in the manifest. Written against the TensorRT 10 Python API; `tensorrt` is imported only
through deploylm.export.trt_env.import_tensorrt.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from deploylm.errors import ArtifactError, UsageError
from deploylm.export.trt_env import TrtEnv, current_trt_env, import_tensorrt, require_trt_gpu, trt_dtype_name
from deploylm.export.trt_shapes import Dims, ShapeSet, TrtShapes, engine_phases, profile_shapes, shapes_from_profile

TRT_DIR = "trt"
TIMING_CACHE = f"{TRT_DIR}/timing.cache"
GRAPHS = ("model", "encoder_model", "decoder_model")   # file stems of the io spec
FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


@dataclass(frozen=True)
class EngineInfo:
    """One serialized engine in the artifact, as recorded in the manifest."""

    name: str                                   # graph stem: model | encoder_model | decoder_model
    file: str                                   # relative path: trt/model.plan
    graph: str                                  # the ONNX file it was built from
    precision: str
    phases: tuple[str, ...]                     # optimization profile index -> phase
    shapes: dict[str, ShapeSet]                 # phase -> input -> (min, opt, max)
    bytes: int
    fp32_layers: int = 0                        # layers pinned to fp32 by [precision_fallback]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- pure helpers (tested without TensorRT) -------------------------------------------------------

def builder_flags(precision: str, *, pinned: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(flags to set, flags to clear) on trt.BuilderFlag for a profile precision.

    fp32 clears TF32 so the engine matches the fp32 reference; int8 also enables FP16 for layers
    without an int8 kernel; `pinned` (some layers forced to fp32) adds OBEY_PRECISION_CONSTRAINTS.
    """
    table = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
    if precision not in table:
        raise UsageError(f"TensorRT cannot build precision {precision!r}: expected one of {', '.join(table)}")
    flags = table[precision] + (("OBEY_PRECISION_CONSTRAINTS",) if pinned and precision != "fp32" else ())
    return flags, (("TF32",) if precision == "fp32" else ())


def find_graphs(artifact_dir: Path) -> list[str]:
    """Graph stems present: ["model"] (decoder-only) or ["encoder_model", "decoder_model"]."""
    found = [g for g in GRAPHS if (artifact_dir / f"{g}.onnx").is_file()]
    if found == ["model"] or found == ["encoder_model", "decoder_model"]:
        return found
    raise ArtifactError(f"{artifact_dir}: expected model.onnx (decoder-only) or encoder_model.onnx + "
                        f"decoder_model.onnx (encoder-decoder), found {found or 'no ONNX graph'}")


def graph_inputs(onnx_path: Path) -> dict[str, Dims]:
    """Graph input name -> dims (None where dynamic), read without loading external weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    out: dict[str, Dims] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        out[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return out


def fallback_tensors(nodes: Iterable[tuple[str, str, tuple[str, ...]]], ops: Iterable[str],
                     names: Iterable[str] = ()) -> set[str]:
    """Output tensor names of ONNX nodes (name, op_type, outputs) to keep in fp32."""
    ops, names = set(ops), set(names)
    return {out for name, op, outs in nodes if op in ops or name in names for out in outs}


def needs_calibrator(precision: str, nodes: Iterable[tuple[str, str, tuple[str, ...]]]) -> bool:
    """int8 without Q/DQ nodes needs calibration; a QDQ graph carries its own scales (explicit
    quantization), where TensorRT takes no calibrator."""
    return precision == "int8" and not any(op in ("QuantizeLinear", "DequantizeLinear") for _, op, _ in nodes)


def onnx_nodes(onnx_path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type, tuple(n.output)) for n in model.graph.node]


def layers_to_pin(layers: Iterable[tuple[str, tuple[tuple[str, str], ...]]], targets: set[str]) -> list[int]:
    """Indices of network layers (name, ((output name, dtype name), ...)) that produce a target
    tensor with a float type; the ONNX parser keeps ONNX tensor names on each node's outputs."""
    return [i for i, (_, outs) in enumerate(layers)
            if any(name in targets and dtype in FLOAT_TYPES for name, dtype in outs)]


def trt_manifest_section(engines: list[EngineInfo], env: TrtEnv) -> dict[str, Any]:
    """manifest["tensorrt"]: engines bound to this GPU and TensorRT version."""
    return {**env.to_dict(), "engines": [e.to_dict() for e in engines]}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


# ---- the TensorRT build ---------------------------------------------------------------------------

def build_engines(artifact_dir: str | Path, profile: Any, *, num_beams: int | None = None,
                  calibration: Iterable[list[int]] | None = None) -> list[EngineInfo]:
    """Build and save one engine per ONNX graph of `artifact_dir` for a trt-* `profile`.

    calibration: token id lists for int8 (default: built-in English text through the artifact's
    tokenizer). Raises MissingDependencyError before writing anything when TensorRT or CUDA is absent.
    """
    require_trt_gpu(f"export --profile {getattr(profile, 'name', 'trt')}")
    artifact_dir = Path(artifact_dir)
    shapes = shapes_from_profile(profile, num_beams)
    graphs = find_graphs(artifact_dir)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = _read_bytes(artifact_dir / TIMING_CACHE)
    infos = []
    for graph in graphs:
        info, cache_bytes = _build_one(trt, logger, artifact_dir, graph, profile, shapes,
                                       cache_bytes, calibration)
        infos.append(info)
    _write_atomic(artifact_dir / TIMING_CACHE, cache_bytes)
    return infos


def _read_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _build_one(trt: Any, logger: Any, artifact_dir: Path, graph: str, profile: Any, shapes: TrtShapes,
               cache_bytes: bytes, calibration: Iterable[list[int]] | None) -> tuple[EngineInfo, bytes]:
    onnx_path = artifact_dir / f"{graph}.onnx"
    builder = trt.Builder(logger)
    network = builder.create_network(0)                  # TensorRT 10: explicit batch always
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):       # resolves model.onnx.data next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors}")
    fallback, nodes = profile.precision_fallback, onnx_nodes(onnx_path)
    targets = fallback_tensors(nodes, fallback.ops, fallback.nodes)
    pinned = _pin_fp32(trt, network, targets) if profile.precision != "fp32" else 0
    config = _builder_config(trt, builder, profile, pinned=pinned > 0, cache_bytes=cache_bytes)
    inputs = graph_inputs(onnx_path)
    decoder_only = graph == "model"
    phases = engine_phases(graph)
    phase_shapes = {p: profile_shapes(inputs, shapes, p, decoder_only=decoder_only) for p in phases}
    trt_profiles = [_add_profile(builder, config, phase_shapes[p]) for p in phases]
    if needs_calibrator(profile.precision, nodes):
        from deploylm.export.trt_calibration import make_calibrator

        config.set_calibration_profile(trt_profiles[0])
        config.int8_calibrator = make_calibrator(trt, artifact_dir, phase_shapes[phases[0]],
                                                 profile, calibration, cache=artifact_dir / TRT_DIR / f"{graph}.calib")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    data = bytes(plan)
    _write_atomic(artifact_dir / TRT_DIR / f"{graph}.plan", data)
    info = EngineInfo(graph, f"{TRT_DIR}/{graph}.plan", onnx_path.name, profile.precision, phases,
                      phase_shapes, len(data), pinned)
    return info, bytes(config.get_timing_cache().serialize())


def _builder_config(trt: Any, builder: Any, profile: Any, *, pinned: bool, cache_bytes: bytes) -> Any:
    config = builder.create_builder_config()
    set_flags, clear_flags = builder_flags(profile.precision, pinned=pinned)
    for flag in set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(profile.tensorrt.workspace_gb * (1 << 30)))
    cache = config.create_timing_cache(cache_bytes)
    if config.set_timing_cache(cache, ignore_mismatch=False) is False:    # another GPU's or TensorRT's cache
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return config


def _add_profile(builder: Any, config: Any, shapes: ShapeSet) -> Any:
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(trt_profile) < 0:
        raise ArtifactError(f"TensorRT rejected the optimization profile {shapes}")
    return trt_profile


def _pin_fp32(trt: Any, network: Any, targets: set[str]) -> int:
    """Force the layers producing `targets` to compute and output fp32; returns how many."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    described = [(layer.name, tuple((layer.get_output(j).name, trt_dtype_name(layer.get_output(j).dtype))
                                    for j in range(layer.num_outputs))) for layer in layers]
    chosen = layers_to_pin(described, targets)
    for i in chosen:
        layer = layers[i]
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if trt_dtype_name(layer.get_output(j).dtype) in FLOAT_TYPES:
                layer.set_output_type(j, trt.float32)
    return len(chosen)


def build_for_export(artifact_dir: str | Path, profile: Any, **options: Any) -> dict[str, Any]:
    """Build engines and return the manifest's `tensorrt` section (what the export pipeline calls)."""
    engines = build_engines(artifact_dir, profile, **options)
    return trt_manifest_section(engines, current_trt_env())

