"""`deploylm train` through click's CliRunner: help, a short real run, and every bad input
(one line on stderr, exit status 2, nothing written)."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploylm.cli import cli


def run(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def assert_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": f"{i}", "target": f"n{i}"}) + "\n" for i in range(40)))
    return path


def test_help_lists_options():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--task", "--data", "--out", "--size", "--steps", "--resume", "--force", "--batch-size",
                   "--lr", "--seed", "--eval-every", "--checkpoint-every", "--device", "--arch", "--block-size", "--stride", "--ngram-order",
                   "--clean", "--no-clean", "--min-length", "--max-length", "--length-unit", "--dropout", "--warmup",
                   "--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port"):
        assert option in result.stdout


def test_short_run_writes_checkpoint_and_metrics(tmp_path, data):
    out = tmp_path / "run"
    result = run("--data", data, "--out", out, "--steps", 4, "--batch-size", 8, "--eval-every", 2)
    assert result.exit_code == 0, result.output
    assert "test: exact match" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    again = run("--data", data, "--out", out, "--steps", 6, "--batch-size", 8, "--eval-every", 2, "--resume")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6 and "nothing to train" not in again.stdout
    past = run("--data", data, "--out", out, "--steps", 5, "--batch-size", 8, "--eval-every", 2, "--resume")
    assert past.exit_code == 0, past.output
    assert f"--resume: {out} is already at step 6 (--steps 5): nothing to train, evaluated again" in past.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    done = run("--data", data, "--out", out, "--steps", 6, "--batch-size", 8, "--eval-every", 2, "--resume")
    assert f"--resume: {out} is already at step 6 (--steps 6): nothing to train" in done.stdout   # at, not only past
    forced = run("--data", data, "--out", out, "--steps", 2, "--batch-size", 8, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_no_progress_bar_redraws_when_stderr_is_no_terminal(tmp_path, data):
    """In a CI log or `2> train.log`, tqdm's carriage-return redraws (10 a second) piled up as one endless line:
    off a terminal there is no bar, and the validation lines still show."""
    result = run("--data", data, "--out", tmp_path / "run", "--steps", 4, "--batch-size", 8, "--eval-every", 2)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and "step/s" not in result.stderr, result.stderr
    assert "step 2: validation" in result.stderr and "step 4: validation" in result.stderr


def test_the_worker_entry_point_unwinds_on_sigterm(tmp_path):
    """`python -m deploylm.training` is what torchrun starts on every rank of `train --nproc N`, and torchrun passes
    a SIGTERM on to it: the worker died silently (status -15) where `deploylm train` prints the line naming the last
    checkpoint and exits 143."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "deploylm.training", "--task", "reverse", "--size", "tiny",
                             "--steps", "100000", "--eval-every", "1", "--checkpoint-every", "1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:             # training: a validation line after every step
            if line.startswith("step 2: validation"):
                break
        os.kill(proc.pid, signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(60)
    finally:
        proc.kill()
    assert proc.returncode == 143, rest
    assert "interrupted at step" in rest and "--resume" in rest and "Traceback" not in rest, rest


@pytest.mark.parametrize("args, words", [
    (["--task", "nope"], ["unknown task 'nope'", "digits2words, reverse (seq2seq), or stories with --arch decoder"]),
    (["--task", "stories"], ["task 'stories' is text for the decoder-only LM: add --arch decoder"]),
    (["--data", "{tmp}/missing.jsonl"], ["missing.jsonl", "does not exist"]),
    (["--data", "{bad}"], ["bad.jsonl:2:", "not valid JSON"]),
    (["--task", "reverse", "--steps", "0"], ["--steps 0", "positive"]),
    (["--task", "reverse", "--steps", "-5"], ["--steps -5", "positive"]),
    (["--task", "reverse", "--batch-size", "0"], ["--batch-size 0"]),
    (["--task", "reverse", "--data", "{data}"], ["exactly one of --task", "--data"]),
    ([], ["exactly one of --task", "--data"]),
    (["--task", "reverse", "--size", "huge"], ["--size 'huge'", "tiny, small, base"]),
    (["--task", "reverse", "--resume"], ["--resume", "nothing to resume"]),
    (["--task", "reverse", "--resume", "--force"], ["--resume and --force"]),
    (["--task", "reverse", "--seed", "-1"], ["--seed -1: expected an integer from 0 to 4294967295"]),
    (["--task", "reverse", "--seed", str(2 ** 64)], [f"--seed {2 ** 64}: expected an integer"]),
    # the decoder-only LM's options are refused for the seq2seq model, not silently ignored
    (["--data", "{data}", "--steps", "1", "--block-size", "32"], ["--block-size applies to the decoder-only LM (--arch decoder)"]),
    (["--task", "reverse", "--steps", "1", "--stride", "8", "--ngram-order", "4"], ["--stride, --ngram-order apply to the decoder-only"]),
    (["--task", "reverse", "--steps", "1", "--ngram-order", "0"], ["--ngram-order applies to the decoder-only"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, data, args, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{oops\n')
    args = [a.format(tmp=tmp_path, bad=bad, data=data) for a in args]
    out = tmp_path / "out"
    assert_usage_error(run(*args, "--out", out), *words)
    assert not out.exists()


def test_missing_out_is_one_line():
    assert_usage_error(run("--task", "reverse"), "--out")


def test_existing_output_needs_resume_or_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "training_state.pt").write_bytes(b"")                          # a run with a checkpoint to resume
    assert_usage_error(run("--task", "reverse", "--out", out), "exists", "--resume", "--force")
    assert [p.name for p in out.iterdir()] == ["training_state.pt"]


def test_an_existing_folder_that_is_not_a_run_is_refused_without_suggesting_resume_or_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")                 # a Hugging Face folder, say: --force would refuse it
    assert_usage_error(run("--task", "reverse", "--out", out), "already exists and does not look like a training run",
                       "choose another --out")
    assert "--resume" not in run("--task", "reverse", "--out", out).output


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_usage_error(run("--task", "reverse", "--out", out, "--force"), "does not look like a training run")
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("files", [
    {"config.json": '{"model_type": "llama"}', "model.safetensors": "weights"},                  # a Hugging Face folder
    {"config.json": '{"model_type": "deploylm-seq2seq"}', "manifest.json": "{}"},                # an exported artifact
    {"config.json": "{}", "notes.txt": "keep me"},
    {"metrics.json": '{"accuracy": 0.9}', "README.md": "my project", "main.py": "print(1)"},  # another tool's
    {"cleaning.json": '{"rules": []}', "notes.txt": "keep me"},
    {"metrics.json": "not json", "notes.txt": "keep me"},
])
def test_force_refuses_folders_with_a_config_that_are_no_training_run(tmp_path, files):
    out = tmp_path / "precious"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    assert_usage_error(run("--task", "reverse", "--out", out, "--force"), "does not look like a training run")
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_runs_stopped_before_their_first_checkpoint_are_training_runs(tmp_path):
    from deploylm.training.outdir import is_training_run

    (tmp_path / "cleaning.json").write_text(                # all that `train --data` had written when stopped
        '{"options": {}, "records_in": 9, "kept": 9, "normalized": 0, "dropped": {}, "examples": {}}')
    assert is_training_run(tmp_path)
    (tmp_path / "cleaning.json").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "deploylm-lm"}')
    assert is_training_run(tmp_path)


def test_a_model_without_training_state_is_not_called_a_run_stopped_before_its_first_checkpoint(tmp_path):
    """A distilled student (a deploylm checkpoint, no training_state.pt): the messages used to say the run
    "stopped before its first checkpoint" and to start it again with --force, which deletes the student."""
    from tests.helpers.tiny_seed import tiny_checkpoint

    student = tiny_checkpoint(tmp_path / "student", "seq2seq")
    (student / "training_state.pt").unlink(missing_ok=True)
    for args in (["--resume"], []):
        result = run("--task", "reverse", "--out", student, "--steps", "1", *args)
        assert_usage_error(result, "holds a model without training_state.pt (a distilled student or a saved model")
        assert "stopped before its first" not in result.stderr
    assert (student / "model.safetensors").is_file()


def test_force_refuses_a_run_folder_that_holds_the_data(tmp_path, data):
    """--force deletes the run folder: it used to delete the --data file kept in it too, which the new
    run then recorded as its data (so --resume, distill and export's calibration could not find it)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_state.pt").write_bytes(b"")
    inside = out / "pairs.jsonl"
    inside.write_text(data.read_text())
    assert_usage_error(run("--data", inside, "--out", out, "--force", "--steps", "1"),
                       "is inside --out", "which --force replaces")
    assert inside.read_text() == data.read_text()


def test_force_refuses_the_current_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    monkeypatch.chdir(out)
    assert_usage_error(run("--task", "reverse", "--out", ".", "--force"), "--out '.' is the current folder or holds it")
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_an_empty_current_folder_is_refused_too(tmp_path, monkeypatch):
    here = tmp_path / "here"      # --force used to delete the (empty) working folder before training into it
    here.mkdir()
    monkeypatch.chdir(here)
    assert_usage_error(run("--task", "reverse", "--out", ".", "--force"), "--out '.' is the current folder or holds it")
    assert here.is_dir() and list(here.iterdir()) == []


def test_an_unwritable_output_is_refused_before_training():
    assert_usage_error(run("--task", "reverse", "--out", "/proc/deploylm-run"), "--out '/proc/deploylm-run': cannot write in '/proc'")


def test_cuda_requested_without_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert_usage_error(run("--task", "reverse", "--out", out, "--device", "cuda"), "--device cuda", "--device cpu")
    assert not out.exists()


def test_a_diverged_run_stops_with_one_line_and_saves_nothing(tmp_path):
    """lr 1e9 makes the loss NaN within a few steps: exit 1, one line naming the step and the remedy, and no
    checkpoint of NaN weights (which generate would answer with empty text and export blame on ONNX)."""
    out = tmp_path / "nan"
    result = run("--task", "reverse", "--out", out, "--steps", 30, "--batch-size", 8, "--lr", "1e9")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the training loss became nan at step") and "lower --lr" in lines[-1]
    assert "no checkpoint was saved" in lines[-1]
    assert not (out / "model.safetensors").exists()


def test_force_on_a_symlinked_run_replaces_the_run_it_points_to(tmp_path, data):
    """--out a symbolic link to a run folder (as export and checkpoints allow): --force was a traceback from
    shutil.rmtree ("Cannot call rmtree on a symbolic link") after every check had passed."""
    real = tmp_path / "runs" / "v1"
    assert run("--data", data, "--out", real, "--steps", 2, "--batch-size", 8).exit_code == 0
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    forced = run("--data", data, "--out", link, "--steps", 3, "--batch-size", 8, "--force")
    assert forced.exit_code == 0, forced.output
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "metrics.json").read_text())["steps"] == 3
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]      # no temporary folder left beside it


def test_workers_get_the_options_as_given_without_the_launchers():
    """What each torchrun worker receives: every option with a value, --no-clean as itself, flags only when set,
    and none of --nproc/--nnodes/--node-rank/--master-addr/--master-port (a worker given them would refuse)."""
    from deploylm.commands.train import command, worker_args

    ctx = command.make_context("train", ["--task", "reverse", "--out", "o", "--steps", "3", "--no-clean",
                                         "--nproc", "2", "--master-port", "1234"])
    args = worker_args(ctx)
    assert args[args.index("--steps") + 1] == "3" and args[args.index("--out") + 1] == "o"
    assert "--no-clean" in args and "--clean" not in args
    assert not {"--resume", "--force", "--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port"} & set(args)
    assert "--resume" in worker_args(command.make_context("train", ["--out", "o", "--resume"]))


def test_report_lines_say_data_parallel_only_for_several_processes_and_which_model_is_better():
    from types import SimpleNamespace

    from deploylm.commands.train import report_lines

    def result(world_size, baseline_perplexity):
        return SimpleNamespace(arch="decoder", test={"perplexity": 10.0, "loss": 2.3, "tokens": 100}, steps=3,
                               baseline={"model": "3-gram", "perplexity": baseline_perplexity},
                               world_size=world_size, cleaning=None, examples=[], out=Path("o"))

    one, two = report_lines(result(1, 20.0)), report_lines(result(2, 5.0))
    assert not any("data-parallel" in line for line in one) and "trained data-parallel on 2 processes" in two
    assert one[1].endswith("(the neural LM is better)") and two[1].endswith("(the n-gram is still better)")


def test_nproc_inside_a_torchrun_worker_is_refused_not_launched_again(tmp_path, monkeypatch):
    from deploylm.training import distributed

    monkeypatch.setattr(distributed, "in_worker", lambda: True)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched torchrun from a worker"))
    result = run("--task", "reverse", "--out", tmp_path / "o", "--nproc", 2)
    assert (result.exit_code, result.stderr) == (2, "error: --nproc/--nnodes start torchrun: inside torchrun leave "
                                                    "them out\n")
