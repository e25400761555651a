"""Training, distillation and generation on a CUDA GPU (marker gpu: skipped with the reason where
there is no CUDA GPU). The CPU versions of these are in test_training_loop.py, test_distill.py and
test_cli_generate.py; these check that the same commands work on the GPU, with mixed precision."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.training.config import TrainConfig
from deploylm.training.tasks import SplitSizes, task_splits
from deploylm.training.trainer import train

# DEPLOYLM_GPU_TESTS_ON=cpu runs this file on the CPU (without AMP) to check the tests themselves.
DEVICE = os.environ.get("DEPLOYLM_GPU_TESTS_ON", "cuda")
pytestmark = [] if DEVICE == "cpu" else [pytest.mark.gpu]


@pytest.fixture(scope="module")
def reverse_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reverse.jsonl"
    examples = task_splits("reverse", 0, SplitSizes(train=400, validation=0, test=0)).train
    path.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def cuda_run(reverse_jsonl, tmp_path_factory):
    """A short AMP training run on the GPU; the trained checkpoint is shared by the tests below."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    result = train(TrainConfig(out=out, data=reverse_jsonl, steps=60, lr=3e-3, warmup=5, batch_size=32,
                               eval_every=30, checkpoint_every=30, eval_examples=16, device=DEVICE, progress=False))
    return out, result


def test_amp_training_on_cuda_lowers_the_loss_and_saves_fp32_weights(cuda_run):
    from safetensors import safe_open

    out, result = cuda_run
    assert result.steps == 60 and len(result.losses) == 60
    assert all(loss == loss for loss in result.losses)                       # no NaN under autocast
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.float32}                                        # AMP keeps master weights fp32


def test_resume_on_cuda_continues_the_run(cuda_run, reverse_jsonl, tmp_path):
    import shutil

    out, first = cuda_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    again = train(TrainConfig(out=copy, data=reverse_jsonl, steps=70, lr=3e-3, warmup=5, batch_size=32,
                              eval_every=30, checkpoint_every=30, eval_examples=16, device=DEVICE, progress=False,
                              resume=True))
    assert again.steps == 70 and len(again.losses) == 70
    assert again.losses[:60] == pytest.approx(first.losses)                   # the history is the saved one


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_generate_cli_on_cuda(cuda_run, dtype):
    if DEVICE == "cpu" and dtype == "float16":
        pytest.skip("fp16 runs on CUDA only")
    if dtype == "bfloat16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16 support")
    out, _ = cuda_run
    result = CliRunner().invoke(cli, ["generate", "--model", str(out), "--device", DEVICE, "--dtype", dtype, "--num-beams", "4",
                                      "--max-new-tokens", "8", "--json", "red fox blue"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.splitlines()[0])
    assert row["prompt"] == "red fox blue" and row["outputs"][0]["token_ids"]


def test_distill_on_cuda(cuda_run, tmp_path):
    from deploylm.training.distill import DistillConfig, distill

    out, _ = cuda_run
    result = distill(DistillConfig(teacher=out, out=tmp_path / "student", task="reverse", steps=30, alpha=0.9,
                                   batch_size=32, lr=3e-3, eval_examples=8, device=DEVICE, progress=False))
    first = sum(step["kd"] for step in result.losses[:5]) / 5
    last = sum(step["kd"] for step in result.losses[-5:]) / 5
    assert last < first and (tmp_path / "student" / "model.safetensors").is_file()


def test_onnx_export_of_a_cuda_trained_checkpoint_matches_torch(cuda_run, tmp_path):
    """The checkpoint trained on the GPU exports on the CPU like any other (fp32 parity checked by export)."""
    from deploylm.export.pipeline import export_model

    out, _ = cuda_run
    artifact = tmp_path / "artifact"
    export_model(out, "fp32", artifact)
    result = CliRunner().invoke(cli, ["parity", "--model", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] is True
