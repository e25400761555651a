"""The one place `tensorrt` is imported, and the decisions about whether TensorRT can run here.

- `import_tensorrt()`: the lazy import boundary (MissingDependencyError with the install command).
- `require_trt_gpu(purpose)`: TensorRT and a CUDA GPU, or one line saying what is missing.
- `current_trt_env()`: TensorRT version, GPU name and compute capability of this machine.
- `engine_compatibility(section, env)`: may engines recorded in a manifest run here? (pure)
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from deploylm.errors import ArtifactError, MissingDependencyError

INSTALL_HINT = "pip install 'deploylm[trt]'"
# deploylm builds with the TensorRT 10 API: 11 removed the precision builder flags (FP16, INT8,
# OBEY_PRECISION_CONSTRAINTS) and the int8 calibrator it uses; the [trt] extra pins 10.x.
SUPPORTED_MAJOR = 10


@dataclass(frozen=True)
class TrtEnv:
    """What a TensorRT engine is bound to: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str      # "9.0"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# TensorRT DataType names -> torch dtype names (pure, so the mapping is tested without TensorRT)
TORCH_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
                     "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def trt_dtype_name(dtype: Any) -> str:
    """"FLOAT" for trt.DataType.FLOAT (pybind11 enums have .name; str() gives "DataType.FLOAT")."""
    return str(getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1])


def torch_dtype_for(dtype: Any) -> Any:
    """The torch dtype of a TensorRT tensor dtype."""
    import torch

    name = trt_dtype_name(dtype)
    if name not in TORCH_DTYPE_NAMES:
        raise ArtifactError(f"TensorRT tensor type {name} has no torch equivalent")
    return getattr(torch, TORCH_DTYPE_NAMES[name])


def import_tensorrt() -> Any:
    """`import tensorrt` (TensorRT 10.x), or MissingDependencyError saying how to install it."""
    try:
        trt = importlib.import_module("tensorrt")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "tensorrt":
            raise MissingDependencyError(f"TensorRT is installed but cannot be imported ({exc.msg}): "
                                         f"reinstall it with {INSTALL_HINT}") from None
        raise MissingDependencyError(f"TensorRT is not installed ({exc.msg}): {INSTALL_HINT} "
                                     "on a machine with an NVIDIA GPU") from None
    except (ImportError, OSError) as exc:       # the wheel is there, its libraries (libnvinfer, CUDA) are not
        raise MissingDependencyError(f"TensorRT is installed but cannot be imported ({exc}): check the NVIDIA "
                                     f"driver and CUDA libraries, or reinstall it with {INSTALL_HINT}") from None
    check_trt_version(str(getattr(trt, "__version__", "")))
    return trt


def check_trt_version(version: str) -> None:
    """MissingDependencyError unless `version` is a TensorRT deploylm builds and runs engines with."""
    major = version.split(".")[0]
    if major != str(SUPPORTED_MAJOR):
        raise MissingDependencyError(
            f"TensorRT {version or '(unknown version)'} is installed; deploylm builds and runs TensorRT "
            f"{SUPPORTED_MAJOR}.x engines (TensorRT 11 removed the precision flags and the int8 calibrator "
            f"it uses): {INSTALL_HINT}, which installs tensorrt-cu12>=10.1,<11")


def missing_trt_message(purpose: str, *, has_tensorrt: bool, has_cuda: bool) -> str | None:
    """One line naming what `purpose` lacks (TensorRT, a CUDA GPU or both), or None if nothing."""
    missing = [what for what, ok in (("the tensorrt module", has_tensorrt), ("a CUDA GPU", has_cuda)) if not ok]
    if not missing:
        return None
    gpu_hint = "" if has_cuda else " on a machine with an NVIDIA GPU and a CUDA build of PyTorch"
    return f"{purpose} needs TensorRT and a CUDA GPU, but {' and '.join(missing)} " \
           f"{'is' if len(missing) == 1 else 'are'} missing: {INSTALL_HINT}{gpu_hint}"


def require_trt_gpu(purpose: str) -> None:
    """Raise MissingDependencyError (exit 2) unless tensorrt imports and CUDA is available."""
    import torch

    has_tensorrt = importlib.util.find_spec("tensorrt") is not None
    message = missing_trt_message(purpose, has_tensorrt=has_tensorrt, has_cuda=torch.cuda.is_available())
    if message:
        raise MissingDependencyError(message)


def current_trt_env(device: int = 0) -> TrtEnv:
    """This machine's TensorRT version and GPU (needs tensorrt and CUDA: call require_trt_gpu first)."""
    import torch

    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability(device)
    return TrtEnv(str(trt.__version__), torch.cuda.get_device_name(device), f"{major}.{minor}")


def _version_key(version: str) -> tuple[str, ...]:
    """TensorRT engines are tied to major.minor.patch; the build number does not matter."""
    return tuple(str(version).split(".")[:3])


def engine_compatibility(section: Mapping[str, Any] | None, env: TrtEnv | Mapping[str, Any]) -> tuple[bool, str]:
    """(ok, reason): may the engines described by a manifest's `tensorrt` section run in `env`?

    Engines are specific to the TensorRT version (major.minor.patch) and the GPU model (name and
    compute capability); `reason` is one line naming the first mismatch, "" when ok.
    """
    here = env.to_dict() if isinstance(env, TrtEnv) else dict(env)
    if not section or not section.get("engines"):
        return False, "the artifact has no TensorRT engines"
    built = {key: str(section.get(key, "")) for key in ("tensorrt_version", "gpu_name", "compute_capability")}
    if not all(built.values()):
        absent = [k for k, v in built.items() if not v]
        return False, f"the manifest's tensorrt section lacks {', '.join(absent)}"
    if _version_key(built["tensorrt_version"]) != _version_key(here["tensorrt_version"]):
        return False, (f"the engines were built with TensorRT {built['tensorrt_version']}, "
                       f"this machine has TensorRT {here['tensorrt_version']}")
    if built["compute_capability"] != str(here["compute_capability"]) or built["gpu_name"] != here["gpu_name"]:
        return False, (f"the engines were built for {built['gpu_name']} (compute capability "
                       f"{built['compute_capability']}), this machine has {here['gpu_name']} "
                       f"(compute capability {here['compute_capability']})")
    return True, ""


def check_engines(manifest: dict[str, Any], artifact_dir: Path, env: TrtEnv) -> None:
    """ArtifactError (exit 2) with the rebuild command unless the artifact's engines run in `env`."""
    from deploylm.artifact import rebuild_hint

    ok, reason = engine_compatibility(manifest.get("tensorrt"), env)
    profile = manifest.get("profile") if isinstance(manifest.get("profile"), dict) else {}
    if not ok and not (manifest.get("tensorrt") or {}).get("engines") and "trt" not in (profile.get("backends") or ()):
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        raise ArtifactError(f"{artifact_dir}: {reason}: its profile {profile.get('name', '?')} builds none; export "
                            f"the model with a trt-* profile: deploylm export --model {source.get('path', 'SRC')} "
                            "--profile trt-fp16 --out DIR")
    if not ok:
        raise ArtifactError(f"{artifact_dir}: {reason}; to rebuild the engines on this machine, "
                            f"{rebuild_hint(artifact_dir, manifest)}")
