"""Profiles: TOML files that say how to export, quantize, check and run a model (DESIGN.md §7).

A profile is data. `load_profile("int8")` reads a built-in from deploylm/builtin_profiles
(profiles/ at the top of the tree links to it), `load_profile("my.toml")` a user's file. Every key is validated here:
unknown keys, wrong types and out-of-range values raise ProfileError naming the file, the key and
what is allowed. Parity tolerances live in the profile's [parity] table and nowhere else.
"""
from __future__ import annotations

import importlib.resources
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploylm.errors import UsageError
from deploylm.export.io_spec import KV_APPEND, KV_CONCAT, KV_SHARED

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
BACKENDS = ("torch", "onnx", "trt")
# precision -> quantization methods it allows (the first is the default); others allow none
METHODS = {"int8": ("dynamic", "static", "weight-only", "rowwise"), "int4": ("weight-only",)}
# method -> the [quantization] keys that apply to it, with their defaults
METHOD_KEYS: dict[str, dict[str, Any]] = {
    "dynamic": {"weight_type": "quint8", "per_channel": False, "reduce_range": False},
    "static": {"weight_type": "quint8", "per_channel": False, "reduce_range": False,
               "calibration_samples": 64, "calibration_method": "minmax"},
    "weight-only": {"block_size": 32, "accuracy_level": 0, "algorithm": "rtn", "symmetric": False,
                    "embedding": False},
    "rowwise": {"smooth_alpha": 0.5, "calibration_samples": 32, "reduce_range": False, "embedding": False},
}
TOP_KEYS = ("name", "description", "precision", "backends", "kv_layout", "quantization", "precision_fallback",
            "tensorrt", "parity", "quality", "generation")
# the decoder-only graphs' KV layout (docs/formats.md); "auto": shared-prompt where the model allows it, concat
# where the profile needs it (TensorRT, static int8) or the model takes nothing else
KV_LAYOUTS = ("auto", KV_SHARED, KV_APPEND, KV_CONCAT)
SHAPE_DEFAULTS = {"batch": (1, 4, 16), "sequence": (1, 64, 512), "past": (0, 64, 512)}
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")      # whole names only (fullmatch: no trailing newline)
_ONE_LINE = re.compile(r"[^\n\r]*")


class ProfileError(UsageError):
    """A profile file that cannot be read or does not validate. Exit status 2."""


@dataclass(frozen=True)
class Quantization:
    """[quantization]: int8 (dynamic | static | weight-only | rowwise) or int4 (weight-only). None = does not apply."""

    method: str
    weight_type: str | None = None          # quint8 | qint8 (int8)
    per_channel: bool | None = None         # int8
    reduce_range: bool | None = None        # int8: 7-bit weights, avoids saturation without VNNI
    calibration_samples: int | None = None  # static, rowwise (smoothing)
    calibration_method: str | None = None   # static: minmax | percentile
    block_size: int | None = None           # weight-only: 16..256, power of two
    accuracy_level: int | None = None       # weight-only: onnxruntime MatMulNBits 0..4
    algorithm: str | None = None            # weight-only: rtn | hqq | q4_1 (hqq, q4_1: int4 only)
    symmetric: bool | None = None           # weight-only rtn: no zero points
    embedding: bool | None = None           # weight-only, rowwise: quantize the token embedding table too
    smooth_alpha: float | None = None       # rowwise: SmoothQuant's migration strength 0..1 (0: no smoothing)


@dataclass(frozen=True)
class PrecisionFallback:
    """[precision_fallback]: op types and node names kept in fp32; `auto` searches for more."""

    ops: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    auto: bool = False


@dataclass(frozen=True)
class TensorRT:
    """[tensorrt]: builder workspace and optimization-profile shapes (min, opt, max) per axis."""

    workspace_gb: float = 4.0
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(SHAPE_DEFAULTS))


@dataclass(frozen=True)
class Parity:
    """[parity]: tolerances against the fp32 torch reference (the only place they live)."""

    logits_atol: float
    logprob_atol: float
    min_token_agreement: float
    first_divergence_min_step: int | None = None  # teacher-forced argmax may not differ before it
    identical_beams: bool = False                 # the candidate's own beams must equal the reference's


@dataclass(frozen=True)
class QualityBudget:
    """[quality]: what quantization may cost, measured at export against fp32."""

    max_perplexity_increase: float | None = None  # relative: 0.02 = +2%
    min_beam_agreement: float | None = None       # beam-search token agreement with fp32, 0..1
    max_mean_kl: float | None = None              # teacher-forced mean KL(fp32 || profile), nats per token
    min_top1_agreement: float | None = None       # teacher-forced share of positions with fp32's top-1 token, 0..1


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    precision: str
    backends: tuple[str, ...]
    parity: Parity
    kv_layout: str = "auto"
    quantization: Quantization | None = None
    precision_fallback: PrecisionFallback | None = None  # None for fp32 (nothing to fall back to)
    tensorrt: TensorRT | None = None
    quality: QualityBudget = QualityBudget()
    generation: dict[str, Any] = field(default_factory=dict)  # for DecodingOptions.from_mapping
    origin: str = field(default="", compare=False)            # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile as plain JSON data (stored in manifests); inverse of from_dict."""
        data = asdict(self)
        data.pop("origin")
        return _drop_none(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> "Profile":
        return _parse(_older_trt_int8(data), origin)


def _older_trt_int8(data: Any) -> Any:
    """A manifest's trt int8 profile as older versions stored it (ONNX Runtime's quantization keys,
    which TensorRT never used), reduced to the keys that apply."""
    quant = data.get("quantization") if isinstance(data, dict) else None
    backends = data.get("backends", ()) if isinstance(data, dict) else ()
    if not isinstance(quant, dict) or data.get("precision") != "int8" or not isinstance(backends, (list, tuple)) \
            or "trt" not in backends or "onnx" in backends:
        return data
    return {**data, "quantization": {k: v for k, v in quant.items() if k in TRT_INT8_KEYS}}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


class _Table:
    """Reads one TOML table, checking types and ranges; every error names origin and key."""

    def __init__(self, data: Any, origin: str, prefix: str, known: tuple[str, ...]):
        self.origin, self.prefix = origin, prefix
        if not isinstance(data, dict):
            raise ProfileError(f"{origin}: {prefix.rstrip('.') or 'the file'} = {data!r} is not valid: expected a table")
        self.data = data
        for key in data:
            if key not in known:
                raise ProfileError(f"{origin}: unknown key {prefix}{key!s}: allowed keys are {', '.join(known)}")

    def fail(self, key: str, problem: str, allowed: str) -> None:
        raise ProfileError(f"{self.origin}: {self.prefix}{key} {problem}: expected {allowed}")

    def has(self, key: str) -> bool:
        return key in self.data

    def _value(self, key: str, default: Any, required: bool, expected: str = "a value") -> Any:
        if key not in self.data:
            if required:
                raise ProfileError(f"{self.origin}: missing key {self.prefix}{key}: expected {expected}")
            return default
        return self.data[key]

    def choice(self, key: str, choices: tuple[str, ...], default: Any = None, required: bool = False) -> Any:
        expected = f"one of {', '.join(choices)}"
        value = self._value(key, default, required, expected)
        if key in self.data and value not in choices:
            self.fail(key, f"= {value!r} is not allowed", expected)
        return value

    def text(self, key: str, default: Any = None, required: bool = False, pattern: re.Pattern | None = None) -> Any:
        expected = "a string" + (f" matching {pattern.pattern}" if pattern else "")
        value = self._value(key, default, required, expected)
        if key in self.data and (not isinstance(value, str) or (pattern and not pattern.fullmatch(value))):
            self.fail(key, f"= {value!r} is not valid", expected)
        return value

    def boolean(self, key: str, default: Any = None) -> Any:
        value = self._value(key, default, False)
        if key in self.data and not isinstance(value, bool):
            self.fail(key, f"= {value!r} is not a boolean", "true or false")
        return value

    def integer(self, key: str, lo: int, hi: int | None = None, default: Any = None, required: bool = False) -> Any:
        value = self._value(key, default, required, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if key in self.data:
            ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok or value < lo or (hi is not None and value > hi):
                self.fail(key, f"= {value!r} is {'out of range' if ok else 'not an integer'}",
                          f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return value

    def number(self, key: str, lo: float, hi: float | None = None, *, lo_open: bool = False,
               default: Any = None, required: bool = False) -> Any:
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        value = self._value(key, default, required, f"a number {rng}")
        if key not in self.data:
            return value
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = numeric and math.isfinite(value)
        if not ok or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            self.fail(key, f"= {value!r} is {'out of range' if numeric else 'not a number'}", f"a number {rng}")
        return float(value)

    def strings(self, key: str, choices: tuple[str, ...] | None = None, default: tuple = ()) -> tuple[str, ...]:
        value = self._value(key, default, False)
        allowed = f"a list of {', '.join(choices)}" if choices else "a list of strings"
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"= {value!r} is not valid", allowed)
        if choices and any(v not in choices for v in value):
            self.fail(key, f"= {value!r} is not allowed", allowed)
        return tuple(value)


def _parse(data: dict[str, Any], origin: str) -> Profile:
    top = _Table(data, origin, "", TOP_KEYS)
    precision = top.choice("precision", PRECISIONS, required=True)
    backends = top.strings("backends", BACKENDS, default=("onnx",))
    if not backends:
        top.fail("backends", "is empty", f"a list of {', '.join(BACKENDS)}")
    profile = Profile(
        name=top.text("name", required=True, pattern=_NAME),
        description=top.text("description", default="", pattern=_ONE_LINE),
        precision=precision,
        backends=backends,
        kv_layout=top.choice("kv_layout", KV_LAYOUTS, default="auto"),
        quantization=_quantization(data.get("quantization"), origin, precision, backends),
        precision_fallback=_fallback(data.get("precision_fallback"), origin, precision),
        tensorrt=_tensorrt(data.get("tensorrt"), origin, backends),
        parity=_parity(data.get("parity"), origin),
        quality=_quality(data.get("quality", {}), origin),
        generation=_generation(data.get("generation", {}), origin),
        origin=origin,
    )
    if profile.kv_layout in (KV_SHARED, KV_APPEND) and needs_concat_layout(profile):
        top.fail("kv_layout", "does not apply: TensorRT engines and static int8 need the concat layout",
                 '"auto" or "concat"')
    return profile


def needs_concat_layout(profile: Profile) -> bool:
    """Profiles whose graphs keep optimum's KV layout (present = past + new) instead of the shared-prompt or append
    one:
    TensorRT engines (the trt backend pairs past_key_values.X with present.X), and static int8, whose
    calibrated activation ranges lost top-1 agreement on the append graph (tiny Llama: 0.82 against
    the profile's 0.85, 1.0 on the concat graph; cause not found yet)."""
    q = profile.quantization
    return "trt" in profile.backends or (q is not None and q.method == "static")


# TensorRT calibrates int8 engines itself (its entropy calibrator on the fp32 graphs): of [quantization]
# only the method (static) and the number of calibration samples apply.
TRT_INT8_KEYS = ("method", "calibration_samples")


def _check_trt_int8(data: Any, origin: str, backends: tuple[str, ...]) -> None:
    """int8 for TensorRT: TensorRT's own calibration, so no ORT quantization keys, and not with onnx."""
    if "onnx" in backends:
        raise ProfileError(f"{origin}: precision 'int8' with backends {list(backends)}: ONNX Runtime's int8 graphs "
                           "use asymmetric uint8 activations, which TensorRT does not take; expected one int8 "
                           "profile for onnx and another for trt (as the built-in int8 and trt-int8)")
    table = _Table(data, origin, "quantization.", tuple(dict.fromkeys(k for m in METHODS["int8"] for k in METHOD_KEYS[m])) + ("method",))
    for key in table.data:
        if key not in TRT_INT8_KEYS:
            table.fail(key, "does not apply to TensorRT engines (TensorRT calibrates them itself)",
                       f"only {', '.join(TRT_INT8_KEYS)}")
    if data.get("method", "static") != "static":
        table.fail("method", f"= {data['method']!r} does not apply to TensorRT engines", "'static' (calibrated)")


def _quantization(data: Any, origin: str, precision: str, backends: tuple[str, ...] = ("onnx",)) -> Quantization | None:
    methods = METHODS.get(precision)
    if methods is None:
        if data is not None:
            raise ProfileError(f"{origin}: [quantization] does not apply to precision {precision!r}: "
                               f"expected it only with precision int8 (dynamic, static, weight-only, rowwise) or int4 (weight-only)")
        return None
    trt_int8 = "trt" in backends and precision == "int8"   # TensorRT calibrates: its own rules
    default = methods[0]
    if trt_int8:
        _check_trt_int8({} if data is None else data, origin, backends)
        default = "static"
    all_keys = ("method",) + tuple(dict.fromkeys(k for m in methods for k in METHOD_KEYS[m]))
    table = _Table({} if data is None else data, origin, "quantization.", all_keys)
    method = table.choice("method", methods, default=default)
    for key in table.data:
        if key != "method" and key not in METHOD_KEYS[method]:
            table.fail(key, f"does not apply to method {method!r}", f"only {', '.join(METHOD_KEYS[method])}")
    d = METHOD_KEYS[method]
    values: dict[str, Any] = {}
    # each key the method takes (METHOD_KEYS) is read once, whichever methods share it
    if "weight_type" in d:
        values.update(weight_type=table.choice("weight_type", ("quint8", "qint8"), d["weight_type"]),
                      per_channel=table.boolean("per_channel", d["per_channel"]))
    if "reduce_range" in d:
        values["reduce_range"] = table.boolean("reduce_range", d["reduce_range"])
    if "calibration_samples" in d:
        values["calibration_samples"] = table.integer("calibration_samples", 1, 100_000, d["calibration_samples"])
    if "calibration_method" in d:
        values["calibration_method"] = table.choice("calibration_method", ("minmax", "percentile"),
                                                    d["calibration_method"])
    if "smooth_alpha" in d:
        values["smooth_alpha"] = table.number("smooth_alpha", 0.0, 1.0, default=d["smooth_alpha"])
    if "block_size" in d:
        block = table.integer("block_size", 16, 256, d["block_size"])
        if block & (block - 1):
            table.fail("block_size", f"= {block} is not a power of two", "16, 32, 64, 128 or 256")
        values.update(block_size=block, accuracy_level=table.integer("accuracy_level", 0, 4, d["accuracy_level"]),
                      algorithm=table.choice("algorithm", ("rtn", "hqq", "q4_1"), d["algorithm"]),
                      symmetric=table.boolean("symmetric", d["symmetric"]))
    if "embedding" in d:
        values["embedding"] = table.boolean("embedding", d["embedding"])
    if values.get("algorithm") in ("hqq", "q4_1") and precision != "int4":
        table.fail("algorithm", f"= {values['algorithm']!r} does not apply to precision {precision!r}",
                   "'rtn' (onnxruntime's CPU MatMulNBits takes no float zero points at 8 bits)")
    if trt_int8:
        return Quantization(method=method, calibration_samples=values["calibration_samples"])
    return Quantization(method=method, **values)


def _fallback(data: Any, origin: str, precision: str) -> PrecisionFallback | None:
    if data is None:
        return None if precision == "fp32" else PrecisionFallback()
    if precision == "fp32":
        raise ProfileError(f"{origin}: [precision_fallback] does not apply to precision 'fp32': "
                           f"expected it only with {', '.join(PRECISIONS[1:])}")
    table = _Table(data, origin, "precision_fallback.", ("ops", "nodes", "auto"))
    return PrecisionFallback(ops=table.strings("ops"), nodes=table.strings("nodes"),
                             auto=table.boolean("auto", False))


def _tensorrt(data: Any, origin: str, backends: tuple[str, ...]) -> TensorRT | None:
    if "trt" not in backends:
        if data is not None:
            raise ProfileError(f"{origin}: [tensorrt] applies only when backends include 'trt'")
        return None
    table = _Table({} if data is None else data, origin, "tensorrt.", ("workspace_gb", "shapes"))
    shapes_data = table._value("shapes", {}, False)
    shapes = _Table(shapes_data, origin, "tensorrt.shapes.", tuple(SHAPE_DEFAULTS))
    resolved = {}
    for axis, default in SHAPE_DEFAULTS.items():
        value = shapes._value(axis, default, False)
        lo = 0 if axis == "past" else 1
        ok = (isinstance(value, (list, tuple)) and len(value) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
              and lo <= value[0] <= value[1] <= value[2])
        if not ok:
            shapes.fail(axis, f"= {value!r} is not valid", f"[min, opt, max] integers with {lo} <= min <= opt <= max")
        resolved[axis] = tuple(value)
    return TensorRT(workspace_gb=table.number("workspace_gb", 0.0, 1024.0, lo_open=True, default=4.0),
                    shapes=resolved)


def _parity(data: Any, origin: str) -> Parity:
    if data is None:
        raise ProfileError(f"{origin}: missing table [parity]: expected logits_atol, logprob_atol and "
                           f"min_token_agreement (tolerances live in the profile)")
    table = _Table(data, origin, "parity.", tuple(Parity.__dataclass_fields__))
    return Parity(
        logits_atol=table.number("logits_atol", 0.0, lo_open=True, required=True),
        logprob_atol=table.number("logprob_atol", 0.0, lo_open=True, required=True),
        min_token_agreement=table.number("min_token_agreement", 0.0, 1.0, required=True),
        first_divergence_min_step=table.integer("first_divergence_min_step", 0),
        identical_beams=table.boolean("identical_beams", False),
    )


def _quality(data: Any, origin: str) -> QualityBudget:
    table = _Table(data, origin, "quality.", tuple(QualityBudget.__dataclass_fields__))
    return QualityBudget(max_perplexity_increase=table.number("max_perplexity_increase", 0.0, 10.0),
                         min_beam_agreement=table.number("min_beam_agreement", 0.0, 1.0),
                         max_mean_kl=table.number("max_mean_kl", 0.0, 100.0),
                         min_top1_agreement=table.number("min_top1_agreement", 0.0, 1.0))


def _generation(data: Any, origin: str) -> dict[str, Any]:
    """Decoding defaults: keys and values validated by DecodingOptions (the one place that knows them)."""
    from deploylm.decoding.options import DecodingOptions, option_names

    table = _Table(data, origin, "generation.", option_names())
    try:
        DecodingOptions.from_mapping(table.data)
    except UsageError as exc:
        raise ProfileError(f"{origin}: [generation] {exc}") from None
    return dict(table.data)


def builtin_dir() -> Path:
    """The folder of built-in profiles (a real folder of the package: profiles/ is only a link to it)."""
    return Path(str(importlib.resources.files("deploylm") / "builtin_profiles"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def builtin_profiles() -> list[Profile]:
    """Every built-in profile, validated, sorted by name."""
    return [read_profile(builtin_dir() / f"{name}.toml") for name in builtin_names()]


def read_profile(path: Path) -> Profile:
    """Read and validate one TOML file."""
    origin = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{origin}: cannot read profile ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{origin}: not valid TOML ({exc})") from None
    profile = _parse(data, origin)
    # checked for files only: an artifact exported before this rule still loads its manifest's profile
    if profile.precision == "int4" and set(profile.backends) != {"onnx"}:   # torch runs int8 at most; TensorRT no int4
        raise ProfileError(f"{origin}: backends = {list(profile.backends)} is not allowed with precision 'int4': "
                           "expected ['onnx'] (int4 is ONNX Runtime's MatMulNBits: neither TensorRT engines nor "
                           "the torch backend run int4)")
    if len(set(profile.backends)) != len(profile.backends):
        raise ProfileError(f"{origin}: backends = {list(profile.backends)} names a backend twice: expected each once")
    q = profile.quantization
    if q is not None and q.symmetric and q.algorithm in ("hqq", "q4_1"):
        raise ProfileError(f"{origin}: quantization.symmetric = true does not apply to algorithm = {q.algorithm!r}, "
                           "which fits zero points of its own: expected symmetric only with algorithm = 'rtn'")
    if profile.precision_fallback is not None and profile.precision_fallback.auto and "onnx" not in profile.backends:
        raise ProfileError(f"{origin}: precision_fallback.auto does not apply: the search keeps ONNX Runtime's "
                           f"quantized nodes in fp32, and backends = {list(profile.backends)} has no onnx: expected "
                           "auto = false, or 'onnx' among the backends")
    if "quality" in data and "onnx" not in profile.backends:
        raise ProfileError(f"{origin}: [quality] applies to ONNX Runtime graphs (export measures it on them), and "
                           f"backends = {list(profile.backends)} has no onnx: expected no [quality] table (a TensorRT "
                           "engine is checked against [parity] by `deploylm parity --backends torch,trt`), or 'onnx' "
                           "among the backends")
    return profile


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in by name ("int8") or a user's TOML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file() or "/" in text:
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise ProfileError(f"profile file {text!r} {what}: expected a .toml file")
        return read_profile(path)
    if text not in builtin_names():
        raise ProfileError(f"unknown profile {text!r}: expected one of {', '.join(builtin_names())} "
                           f"or a path to a .toml file")
    return read_profile(builtin_dir() / f"{text}.toml")
