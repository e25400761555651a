"""The parity grid: every built-in profile x each of its backends has a row here, checked against
the fp32 torch reference with that profile's own [parity] tolerances (nothing in the test body).

onnx rows: the fp32 graphs of a tiny Llama are exported once; each profile's precision step
(deploylm.export.precision_step.apply_precision, what `deploylm export` runs) converts a copy,
which is then compared with torch step by step. torch rows: the torch backend in the profile's
dtype. trt rows need TensorRT and CUDA (skipped with the reason otherwise).
"""
from __future__ import annotations

import shutil

import pytest

from deploylm.backends.onnx_backend import OnnxBackend
from deploylm.backends.torch_backend import TorchBackend
from deploylm.decoding.options import DecodingOptions
from deploylm.generator import Generator
from deploylm.models.source import resolve_source
from deploylm.models.tokenizer import load_tokenizer
from deploylm.parity import DEFAULT_PROMPTS, compare_backends
from deploylm.profiles import builtin_profiles, load_profile

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# every (profile, backend) pair with a parity row below; the meta-test keeps this complete
ROWS = [("fp32", "onnx"), ("fp16", "onnx"), ("fp16", "torch"), ("bf16", "onnx"), ("bf16", "torch"),
        ("int4", "onnx"), ("int8", "onnx"), ("int8-dynamic", "onnx"), ("int8-rowwise", "onnx"), ("int8-static", "onnx"),
        ("trt-fp16", "trt"), ("trt-int8", "trt")]


def test_every_builtin_profile_and_backend_has_a_parity_row():
    wanted = {(p.name, b) for p in builtin_profiles() for b in p.backends}
    assert sorted(wanted - set(ROWS)) == [], "add a parity row for these (profile, backend) pairs"
    assert sorted(set(ROWS) - wanted) == [], "these rows name no built-in profile/backend"


def _options(profile):
    options = DecodingOptions.from_mapping(profile.generation)
    return options.replace(max_new_tokens=12, min_new_tokens=0)


def _compare(src, candidate, profile, name):
    reference = TorchBackend.from_source(resolve_source(src))
    tokenizer = load_tokenizer(resolve_source(src))
    options = _options(profile)
    batch = Generator(reference, tokenizer).encode(list(DEFAULT_PROMPTS), options)
    return compare_backends(reference, {name: candidate}, batch, options, profile.parity, tokenizer)


@pytest.fixture(scope="module")
def llama_fp32_artifact(tiny_llama_dir, tmp_path_factory):
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("grid") / "llama-fp32"
    export_model(tiny_llama_dir, "fp32", out)
    return out


def _params():
    out = []
    for profile, backend in ROWS:
        marks = [pytest.mark.trt] if backend == "trt" else []
        marks += [pytest.mark.slow] if backend == "onnx" else []
        out.append(pytest.param(profile, backend, marks=marks, id=f"{profile}-{backend}"))
    return out


@pytest.mark.parametrize("name,backend", _params())
def test_parity_row(name, backend, request, tiny_llama_dir, tmp_path):
    profile = load_profile(name)
    if backend == "torch":
        candidate = TorchBackend.from_source(resolve_source(tiny_llama_dir), dtype=TORCH_DTYPES[profile.precision])
    elif backend == "onnx":
        candidate = _onnx_candidate(request.getfixturevalue("llama_fp32_artifact"), profile, tiny_llama_dir, tmp_path)
    else:
        candidate = _trt_candidate(profile, tiny_llama_dir, tmp_path)
    report = _compare(tiny_llama_dir, candidate, profile, backend)
    assert report.passed, report.table()


def _onnx_candidate(artifact, profile, src, tmp_path):
    from deploylm.export.pipeline import export_model
    from deploylm.profiles import needs_concat_layout
    from deploylm.export.precision_step import apply_precision

    if needs_concat_layout(profile):      # graphs in the concat layout: the whole export, as a user runs it
        out = tmp_path / f"llama-{profile.name}"
        export_model(src, profile, out, allow_quality_loss=True)
        return OnnxBackend.from_folder(out, name=profile.name)
    folder = tmp_path / "candidate"
    shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns("manifest.json", "parity.json"))
    apply_precision(folder, profile, resolve_source(src), allow_quality_loss=True, rounds=0, auto=False)
    return OnnxBackend.from_folder(folder, name=profile.name)


def _trt_candidate(profile, src, tmp_path):
    from deploylm.backends.trt_backend import TrtBackend
    from deploylm.export.pipeline import export_model

    out = tmp_path / f"llama-{profile.name}"
    export_model(src, profile, out)
    return TrtBackend.from_source(resolve_source(out))
