"""Engine/manifest compatibility decisions and the clear refusals when TensorRT or CUDA is missing."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from deploylm.backends import load_backend
from deploylm.errors import ArtifactError, MissingDependencyError
from deploylm.export import trt_env
from deploylm.export.trt_env import TrtEnv, check_engines, engine_compatibility, missing_trt_message
from deploylm.models.source import Source
from deploylm.profiles import load_profile

H200 = TrtEnv("10.3.0.26", "NVIDIA H200", "9.0")
SECTION = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0",
           "engines": [{"name": "model", "file": "trt/model.plan"}]}
MANIFEST = {"source": {"kind": "hf", "path": "models/tiny"}, "profile": {"name": "trt-fp16"}, "tensorrt": SECTION}
FIND_SPEC = importlib.util.find_spec


def test_same_gpu_and_tensorrt_version_is_compatible():
    assert engine_compatibility(SECTION, H200) == (True, "")
    assert engine_compatibility(SECTION, H200.to_dict()) == (True, "")   # build number ignored


@pytest.mark.parametrize("env, words", [
    (TrtEnv("10.4.0", "NVIDIA H200", "9.0"), ["TensorRT 10.3.0", "TensorRT 10.4.0"]),
    (TrtEnv("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0"), ["NVIDIA H200", "A100", "8.0"]),
    (TrtEnv("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), ["NVIDIA H200", "H100"]),
])
def test_other_gpu_or_tensorrt_version_is_refused_with_reason(env, words):
    ok, reason = engine_compatibility(SECTION, env)
    assert not ok and all(w in reason for w in words)


def test_missing_or_incomplete_section_is_refused():
    assert engine_compatibility(None, H200) == (False, "the artifact has no TensorRT engines")
    ok, reason = engine_compatibility({**SECTION, "gpu_name": ""}, H200)
    assert not ok and "gpu_name" in reason


def test_foreign_engine_error_names_the_rebuild_command(tmp_path):
    with pytest.raises(ArtifactError) as err:
        check_engines(MANIFEST, tmp_path, TrtEnv("10.3.0", "NVIDIA L4", "8.9"))
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert f"deploylm export --model models/tiny --profile trt-fp16 --out {tmp_path} --force" in message
    check_engines(MANIFEST, tmp_path, H200)  # no error on the machine it was built for


def test_missing_messages_name_what_is_missing_and_the_install_command():
    assert missing_trt_message("x", has_tensorrt=True, has_cuda=True) is None
    both = missing_trt_message("--backend trt", has_tensorrt=False, has_cuda=False)
    assert "the tensorrt module and a CUDA GPU are missing" in both and "pip install 'deploylm[trt]'" in both
    only_gpu = missing_trt_message("--backend trt", has_tensorrt=True, has_cuda=False)
    assert "a CUDA GPU is missing" in only_gpu and "tensorrt module" not in only_gpu
    only_trt = missing_trt_message("--backend trt", has_tensorrt=False, has_cuda=True)
    assert "the tensorrt module is missing" in only_trt and "NVIDIA GPU" not in only_trt


def test_import_tensorrt_is_one_boundary_with_install_hint(monkeypatch):
    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(trt_env.importlib, "import_module", fail)
    with pytest.raises(MissingDependencyError, match=r"pip install 'deploylm\[trt\]'"):
        trt_env.import_tensorrt()


@pytest.fixture
def no_trt_no_gpu(monkeypatch):
    """Behave like a machine without tensorrt and without CUDA (this one, and CI)."""
    monkeypatch.setattr(trt_env.importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else FIND_SPEC(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_trt_backend_refuses_without_tensorrt_or_gpu(tmp_path, no_trt_no_gpu):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(MissingDependencyError) as err:
        load_backend("trt", Source("artifact", tmp_path))
    assert "the trt backend needs TensorRT and a CUDA GPU" in str(err.value)
    assert "pip install 'deploylm[trt]'" in str(err.value) and err.value.exit_code == 2


def test_trt_profile_build_refuses_and_writes_nothing(tmp_path, no_trt_no_gpu):
    from deploylm.export.tensorrt import build_engines

    (tmp_path / "model.onnx").write_bytes(b"not read")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MissingDependencyError, match="export --profile trt-fp16 needs TensorRT"):
        build_engines(tmp_path, load_profile("trt-fp16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before        # no trt/ folder, no cache



def test_import_tensorrt_refuses_other_majors_and_broken_installs(monkeypatch):
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0.106"
    monkeypatch.setattr(trt_env.importlib, "import_module", lambda name: fake)
    with pytest.raises(MissingDependencyError, match=r"TensorRT 11.4.0.106 is installed; deploylm builds and runs "
                                                     r"TensorRT 10.x engines .*tensorrt-cu12>=10.1,<11"):
        trt_env.import_tensorrt()
    fake.__version__ = "10.16.1.11"
    assert trt_env.import_tensorrt() is fake

    def broken(name):
        raise ImportError("libnvinfer.so.10: cannot open shared object file")

    monkeypatch.setattr(trt_env.importlib, "import_module", broken)
    with pytest.raises(MissingDependencyError, match=r"TensorRT is installed but cannot be imported "
                                                     r"\(libnvinfer.so.10: cannot open"):
        trt_env.import_tensorrt()


def test_a_tensorrt_missing_one_of_its_own_modules_is_a_broken_install(monkeypatch):
    def missing_part(name):
        raise ModuleNotFoundError("No module named 'tensorrt_bindings'", name="tensorrt_bindings")

    monkeypatch.setattr(trt_env.importlib, "import_module", missing_part)
    with pytest.raises(MissingDependencyError, match=r"TensorRT is installed but cannot be imported \(No module named "
                                                     r"'tensorrt_bindings'\): reinstall it with pip install"):
        trt_env.import_tensorrt()


def test_an_artifact_exported_without_engines_points_to_a_trt_profile(tmp_path):
    """An fp32/onnx artifact opened with --backend trt: re-exporting it with its own profile (over it, --force) builds
    no engines either; the way out is an export with a trt-* profile."""
    manifest = {"source": {"kind": "hf", "path": "models/tiny"}, "profile": {"name": "fp32", "backends": ["onnx"]}}
    with pytest.raises(ArtifactError) as err:
        check_engines(manifest, tmp_path, H200)
    message = str(err.value)
    assert "the artifact has no TensorRT engines: its profile fp32 builds none" in message and "\n" not in message
    assert "deploylm export --model models/tiny --profile trt-fp16 --out" in message
    assert "--profile fp32" not in message and "--force" not in message


# ---- what hand mutants of trt_env showed untested ------------------------------------------------

def test_refusal_names_exactly_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    for has_trt, has_cuda, words in [(False, False, "the tensorrt module and a CUDA GPU are missing"),
                                     (True, False, "but a CUDA GPU is missing"),
                                     (False, True, "but the tensorrt module is missing")]:
        monkeypatch.setattr(trt_env.importlib.util, "find_spec",
                            lambda name, *a, ok=has_trt: object() if ok and name == "tensorrt" else FIND_SPEC(name, *a))
        monkeypatch.setattr(torch.cuda, "is_available", lambda ok=has_cuda: ok)
        with pytest.raises(MissingDependencyError, match=words):
            load_backend("trt", Source("artifact", tmp_path))


def test_engines_of_another_patch_release_or_an_empty_engine_list_are_refused():
    ok, reason = engine_compatibility(SECTION, TrtEnv("10.3.1", "NVIDIA H200", "9.0"))
    assert not ok and "TensorRT 10.3.0" in reason and "TensorRT 10.3.1" in reason
    assert engine_compatibility({**SECTION, "engines": []}, H200) == (False, "the artifact has no TensorRT engines")


def test_tensorrt_dtypes_map_to_their_torch_dtypes():
    import types

    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    assert {n: trt_env.torch_dtype_for(types.SimpleNamespace(name=n)) for n in names} == names
    with pytest.raises(ArtifactError, match="FP8 has no torch equivalent"):
        trt_env.torch_dtype_for(types.SimpleNamespace(name="FP8"))


def test_current_env_reads_the_tensorrt_version_and_the_gpus_capability(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0.26"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "NVIDIA L4")
    assert trt_env.current_trt_env() == TrtEnv("10.3.0.26", "NVIDIA L4", "8.9")
