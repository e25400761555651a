"""Clear refusals on the command line: `--backend trt` / a trt-* profile without TensorRT or CUDA, and
an artifact whose engines were built for another GPU — one `error:` line, exit 2, nothing written."""
from __future__ import annotations

import importlib.util
import json
import pytest
import torch
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.export import trt_env

FIND_SPEC = importlib.util.find_spec


@pytest.fixture
def no_trt_no_gpu(monkeypatch):
    """Behave like a machine without tensorrt and without CUDA (this one, and CI)."""
    monkeypatch.setattr(trt_env.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else FIND_SPEC(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_generate_backend_trt_without_tensorrt_or_gpu(tiny_gpt2_dir, no_trt_no_gpu):
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_gpt2_dir), "--backend", "trt", "hello"])
    line = _one_error_line(result)
    assert "the trt backend needs TensorRT and a CUDA GPU" in line and "pip install 'deploylm[trt]'" in line
    assert result.stdout == ""


def test_export_trt_profile_without_tensorrt_writes_nothing(tiny_gpt2_dir, tmp_path, no_trt_no_gpu):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_gpt2_dir), "--profile", "trt-fp16",
                                      "--out", str(out)])
    line = _one_error_line(result)
    assert "export --profile trt-fp16 needs TensorRT and a CUDA GPU" in line and "deploylm[trt]" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_trt_profile_refused_before_the_model_loads(tiny_gpt2_dir, tmp_path, no_trt_no_gpu, monkeypatch):
    """The refusal comes before minutes of export (SmolLM2: ~2 min of load, export and validation), not after."""
    from deploylm.export import pipeline

    monkeypatch.setattr(pipeline, "_load_model", lambda source: pytest.fail("loaded the model before checking TensorRT"))
    for profile in ("trt-fp16", "trt-int8"):
        result = CliRunner().invoke(cli, ["export", "--model", str(tiny_gpt2_dir), "--profile", profile,
                                          "--out", str(tmp_path / profile)])
        assert f"export --profile {profile} needs TensorRT and a CUDA GPU" in _one_error_line(result)
    assert list(tmp_path.iterdir()) == []


SECTION = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0",
           "engines": [{"name": "model", "file": "trt/model.plan", "phases": ["prefill", "decode"]}]}


@pytest.fixture
def trt_artifact(tiny_gpt2_dir, tmp_path):
    """An artifact folder as a trt-fp16 export on an H200 would write it (the plan is a stand-in)."""
    import shutil

    from deploylm.artifact import write_artifact
    from deploylm.profiles import load_profile

    def build(folder):
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_gpt2_dir / name, folder / name)
        (folder / "trt").mkdir()
        (folder / "trt" / "model.plan").write_bytes(b"engine")

    profile = load_profile("trt-fp16")
    fields = {"source": {"kind": "hf", "path": str(tiny_gpt2_dir)}, "profile": profile.to_dict(),
              "generation": dict(profile.generation), "io": {}, "tensorrt": SECTION}
    return write_artifact(tmp_path / "gpt2-trt-fp16", build, fields)


def test_generate_with_engines_from_another_gpu_names_the_rebuild(trt_artifact, tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr("deploylm.backends.trt_backend.require_trt_gpu", lambda purpose: None)
    monkeypatch.setattr("deploylm.backends.trt_backend.current_trt_env",
                        lambda device=0: trt_env.TrtEnv("10.3.0", "NVIDIA L4", "8.9"))
    before = {p: p.stat().st_mtime_ns for p in trt_artifact.rglob("*")}
    result = CliRunner().invoke(cli, ["generate", "--model", str(trt_artifact), "--backend", "trt", "hello"])
    line = _one_error_line(result)
    assert "built for NVIDIA H200 (compute capability 9.0), this machine has NVIDIA L4" in line
    assert f"deploylm export --model {tiny_gpt2_dir} --profile trt-fp16 --out {trt_artifact} --force" in line
    assert {p: p.stat().st_mtime_ns for p in trt_artifact.rglob("*")} == before


def test_engines_for_this_gpu_open_with_the_torch_backends_special_tokens(trt_artifact, tiny_gpt2_dir, monkeypatch):
    from deploylm.backends import load_backend
    from deploylm.backends.torch_backend import TorchBackend
    from deploylm.models.source import Source, resolve_source
    from tests.test_trt_backend import V, engine_shapes, fake_runner

    manifest = json.loads((trt_artifact / "manifest.json").read_text())
    section = {**manifest["tensorrt"], "engines": [{**SECTION["engines"][0], "shapes": engine_shapes()}]}
    (trt_artifact / "manifest.json").write_text(json.dumps({**manifest, "tensorrt": section}))
    monkeypatch.setattr("deploylm.backends.trt_backend.require_trt_gpu", lambda purpose: None)
    monkeypatch.setattr("deploylm.backends.trt_backend.current_trt_env",
                        lambda device=0: trt_env.TrtEnv("10.3.0.1", "NVIDIA H200", "9.0"))
    monkeypatch.setattr("deploylm.backends.trt_backend._load_runner", lambda folder, entry, device: fake_runner())
    backend = load_backend("trt", Source("artifact", trt_artifact))
    torch_info = TorchBackend.from_source(resolve_source(tiny_gpt2_dir)).info
    assert backend.info.special == torch_info.special and backend.info.vocab_size == V
    assert (backend.plan.rows, backend.plan.max_len) == (8, 33)        # 4 inputs x 2 beams; 32 past + 1
    assert backend.generation_defaults["num_beams"] == 4               # the trt-fp16 profile's [generation]


def test_export_trt_int8_hands_the_calibration_file_to_tensorrt(tiny_llama_dir, tmp_path, monkeypatch):
    """`--calibration FILE` with trt-int8 passed the refusal check and was then never used: TensorRT calibrated on
    built-in English text. Its samples now reach the engine build as token ids through the artifact's tokenizer.
    (The build itself needs TensorRT and a GPU: it is replaced here by one that records what it was given.)"""
    from transformers import AutoTokenizer

    from deploylm.export import pipeline, tensorrt

    given = {}

    class Stop(Exception):
        pass

    def build_for_export(folder, profile, **options):
        given.update(options)
        raise Stop

    monkeypatch.setattr(trt_env, "require_trt_gpu", lambda what: None)
    monkeypatch.setattr(tensorrt, "build_for_export", build_for_export)
    texts = ["the quick brown fox", "hello world again"]
    file = tmp_path / "calib.txt"
    file.write_text("\n".join(texts) + "\n")
    with pytest.raises(Stop):
        pipeline.export_model(tiny_llama_dir, "trt-int8", tmp_path / "out", calibration=file)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert given["calibration"] == [list(tok(t)["input_ids"]) for t in texts]
    assert not (tmp_path / "out").exists()


def test_parity_with_trt_of_a_model_folder_needs_a_trt_profile_before_exporting(tiny_gpt2_dir, monkeypatch):
    """`parity --model FOLDER --backends torch,trt` exported FOLDER with fp32 (minutes for a real model), which
    builds no engines, and only then failed: on a machine without TensorRT for want of it, on a GPU machine
    because the fresh artifact had no engines (with a rebuild command for its temporary folder)."""
    from deploylm.export import pipeline

    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: pytest.fail("exported before the refusal"))
    result = CliRunner().invoke(cli, ["parity", "--model", str(tiny_gpt2_dir), "--backends", "torch,trt"])
    line = _one_error_line(result)
    assert "with profile fp32, which builds no TensorRT engines" in line and "--profile trt-fp16" in line


def test_export_trt_int8_of_an_encoder_decoder_is_refused_before_the_graphs_are_exported(tiny_t5_dir, tmp_path,
                                                                                         monkeypatch):
    """TensorRT's int8 calibrator cannot feed a decoder with encoder inputs: the build refused it only after the
    graphs were exported and validated and the encoder engine was built (minutes on a real model)."""
    from deploylm.errors import UsageError
    from deploylm.export import pipeline

    monkeypatch.setattr(trt_env, "require_trt_gpu", lambda what: None)
    monkeypatch.setattr(pipeline, "_export_graphs", lambda *a: pytest.fail("exported the graphs before the refusal"))
    with pytest.raises(UsageError, match="trt-int8: .*encoder-decoder.*trt-fp16"):
        pipeline.export_model(tiny_t5_dir, "trt-int8", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
