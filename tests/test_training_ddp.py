"""Data-parallel training (`deploylm train --nproc 2`, torchrun + gloo on CPU) through the CLI.

`--batch-size` is the global batch: 2 processes x 4 examples must train exactly like 1 process x 8
(dropout 0), step by step, and a checkpoint written by the 2-process run resumes in 1 process (and
the other way round) to the same weights as an uninterrupted 1-process run.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.models.checkpoint import load_training_state
from deploylm.training.tasks import SplitSizes, task_splits

TOLERANCE = dict(rtol=1e-4, atol=1e-5)   # float sums in another order (all-reduce), nothing else


def run(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


@pytest.fixture(autouse=True)
def torchrun_tmpdir(tmp_path_factory, monkeypatch):
    """The launched processes' temporary directory: a pytest folder, so that whatever they leave there
    stays out of /tmp, and a test can see it (torchrun without --log-dir leaves a torchelastic_* folder)."""
    folder = tmp_path_factory.mktemp("torchrun-tmp")
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """Variable-length pairs (so ranks hold different token counts) and settings for 5-step runs."""
    path = tmp_path_factory.mktemp("ddp") / "reverse.jsonl"
    examples = task_splits("reverse", 0, SplitSizes(train=60, validation=0, test=0)).train
    path.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples))
    return ["--data", path, "--batch-size", 8, "--dropout", 0, "--warmup", 2, "--lr", 3e-3, "--eval-every", 100]


@pytest.fixture(scope="module")
def single(tmp_path_factory, common):
    """The reference: one process, global batch 8, 5 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = run(*common, "--out", out, "--steps", 5)
    assert result.exit_code == 0, result.output
    return out


def assert_same_run(a, b):
    """Same loss at every step and the same test-split loss (teacher forcing) of the final model.

    Weights are compared through what they compute: Adam (eps 1e-9) turns rounding-level gradient
    differences of near-zero entries (e.g. key biases, which softmax ignores) into lr-sized steps,
    so single weights may differ by ~1e-5 while the function they compute does not."""
    losses_a, losses_b = load_training_state(a)["losses"], load_training_state(b)["losses"]
    assert len(losses_a) == len(losses_b) == 5
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), **TOLERANCE)
    test_a, test_b = (json.loads((run / "metrics.json").read_text())["test"] for run in (a, b))
    torch.testing.assert_close(test_a["loss"], test_b["loss"], **TOLERANCE)


def test_two_processes_match_one_and_resume_in_one(tmp_path, common, single, torchrun_tmpdir):
    out = tmp_path / "ddp"
    result = run(*common, "--out", out, "--steps", 3, "--nproc", 2)
    assert result.exit_code == 0, result.output
    assert not list(torchrun_tmpdir.glob("torchelastic_*"))   # torchrun's log folder goes with the run
    assert "trained data-parallel on 2 processes" in result.stdout and "test: exact match" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temporary folders left behind
    steps3 = load_training_state(out)["losses"]
    torch.testing.assert_close(torch.tensor(steps3), torch.tensor(load_training_state(single)["losses"][:3]), **TOLERANCE)
    resumed = run(*common, "--out", out, "--steps", 5, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(out, single)


def test_one_process_checkpoint_resumes_in_two(tmp_path, common, single):
    out = tmp_path / "ddp"
    assert run(*common, "--out", out, "--steps", 3).exit_code == 0
    resumed = run(*common, "--out", out, "--steps", 5, "--resume", "--nproc", 2)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert_same_run(out, single)


def test_a_resumed_two_process_run_with_dropout_matches_the_uninterrupted_one(tmp_path, common):
    """With dropout (the default) a 2-process run stopped at its step-2 checkpoint and resumed ends as
    the uninterrupted run does: rank 1's masks depend on (seed, rank, step), not on where it started."""
    args = [*common[:common.index("--dropout")], *common[common.index("--dropout") + 2:], "--dropout", 0.1,
            "--checkpoint-every", 2, "--nproc", 2]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run(*args, "--out", whole, "--steps", 4).exit_code == 0
    assert run(*args, "--out", part, "--steps", 2).exit_code == 0
    assert run(*args, "--out", part, "--steps", 4, "--resume").exit_code == 0
    assert load_training_state(part)["losses"] == load_training_state(whole)["losses"]


@pytest.mark.parametrize("args, words", [
    (["--nproc", 3], ["--batch-size 8", "multiple of the 3 processes"]),
    (["--nproc", 0], ["--nproc 0"]),
    (["--nproc", 2, "--nnodes", 2], ["--master-addr"]),
    (["--nproc", 2, "--nnodes", 2, "--node-rank", 2, "--master-addr", "10.0.0.1"], ["--node-rank 2"]),
])
def test_bad_launch_is_one_line_and_starts_nothing(tmp_path, common, args, words):
    out = tmp_path / "out"
    result = run(*common, "--out", out, "--steps", 2, *args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


def test_failed_workers_are_one_error_naming_the_command_and_leave_no_log_folder(torchrun_tmpdir):
    """Workers that exit non-zero (a bad argument here) end in WorkersFailed with the torchrun command a user
    can rerun (without the run's temporary --log-dir), and torchrun's log folder goes with the run."""
    from deploylm.training.distributed import Launch, WorkersFailed, launch

    with pytest.raises(WorkersFailed) as info:
        launch(Launch(nproc=2), ["--no-such-option"], echo=lambda line: None)
    message = str(info.value)
    assert message.startswith("training processes exited with status ") and "--log-dir" not in message
    assert message.endswith("-m torch.distributed.run --nproc-per-node=2 --standalone -m deploylm.training "
                            "--no-such-option")
    assert not list(torchrun_tmpdir.glob("torchelastic_*"))


def test_launcher_passes_options_through_to_torchrun():
    from deploylm.training.distributed import Launch

    assert Launch(nproc=2).torchrun_args() == ["--nproc-per-node=2", "--standalone"]
    assert Launch(nproc=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234).torchrun_args() == [
        "--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=1234"]


def test_python_m_deploylm_training_is_deploylm_train():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "deploylm.training", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage: deploylm train" in result.stdout and "--nproc" in result.stdout


def _training_processes(out) -> list[int]:
    """Pids of processes whose command line names `out` (the launcher, torchrun and its workers)."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(out) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_sigterm_to_the_command_stops_every_worker(tmp_path, common):
    """`kill` on `deploylm train --nproc 2` (SIGTERM to the launcher only): the workers stop as well,
    promptly; they used to train on to the end and write --out after the command had returned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "deploylm", "train", *map(str, common), "--out", str(out),
                             "--steps", "100000", "--nproc", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(_training_processes(out)) < 4 and time.monotonic() < deadline:   # launcher, torchrun, 2 workers
            time.sleep(0.2)
        assert len(_training_processes(out)) >= 4, "the workers never started"
        time.sleep(3)                                        # they are training now
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
        deadline = time.monotonic() + 30
        while _training_processes(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _training_processes(out) == [], "workers outlived the command"
        assert proc.returncode == 143
    finally:
        for pid in _training_processes(out):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_launcher_ends_when_deploylm_is_killed_outright(tmp_path):
    """`deploylm train --nproc N` killed with SIGKILL: the torchrun launcher it started gets SIGTERM (and
    stops its workers); it used to train on and write --out after the command was gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from deploylm.training.distributed import spawn_tied\n"
        "child = spawn_tied([sys.executable, '-c', 'import time; print(1, flush=True); time.sleep(60)'])\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:                                              # reaped by init; a zombie of ours never stays
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the tied child outlived its killed parent")


def test_each_rank_trains_on_its_contiguous_slice_of_the_global_batch():
    from deploylm.training.distributed import Dist

    batch = list(range(8))
    assert [Dist(rank, 2).shard(batch) for rank in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [Dist(rank, 4).shard(batch) for rank in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert Dist().shard(batch) == batch


def test_dropout_seed_of_a_rank_depends_on_seed_rank_and_step():
    import numpy as np

    from deploylm.training.trainer import rank_seed

    assert rank_seed(0, 1, 3) == int(np.random.SeedSequence([0, 1, 3]).generate_state(1, np.uint64)[0])
    seeds = {rank_seed(seed, rank, step) for seed in (0, 1) for rank in (1, 2) for step in (0, 1, 2)}
    assert len(seeds) == 12                      # a new mask every step, on every rank, for every --seed


def test_one_node_with_a_master_address_is_not_standalone():
    from deploylm.training.distributed import Launch

    assert Launch(nproc=2, master_addr="10.0.0.1").torchrun_args() == [
        "--nproc-per-node=2", "--nnodes=1", "--node-rank=0", "--master-addr=10.0.0.1", "--master-port=29500"]
