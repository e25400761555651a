"""Data-parallel training with torch.distributed (DDP): the worker side and the `--nproc` launcher.

Worker side: a process started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in its environment) joins
the process group (gloo on CPU, NCCL on CUDA). `--batch-size` is the GLOBAL batch: the batch of
step k is the same list of examples whatever the number of processes, and rank r trains on the r-th
contiguous slice of it. The loss is summed over each rank's tokens and divided by the token count of
the whole global batch (all-reduced), times the world size, because DDP averages gradients: so the
gradient is exactly that of one process on the whole batch (dropout aside).

Launcher side: `deploylm train --nproc N ...` runs `python -m torch.distributed.run ... -m
deploylm.training <the same options>` and relays the workers' stdout.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deploylm.errors import DeployLMError, UsageError


class WorkersFailed(DeployLMError):
    """The training processes started by --nproc exited with an error (already printed). Exit status 1."""

    exit_code = 1


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; world 1 means no process group (plain single-process training)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous slice of the global batch `items` (len(items) divisible by world)."""
        per = len(items) // self.world
        return items[self.rank * per:(self.rank + 1) * per]

    def sum(self, value: float, device: torch.device) -> float:
        """`value` summed over all ranks (itself when world is 1)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's `text` on every rank."""
        if not self.active:
            return text or ""
        box = [text]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def in_worker() -> bool:
    """True inside a process started by torchrun."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun; (Dist, the device this rank trains on)."""
    if not in_worker() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(), torch.device(device)
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl")
        return dist, torch.device("cuda", dist.local_rank)
    torch.distributed.init_process_group("gloo")
    return dist, torch.device("cpu")


def teardown(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel (which copies rank 0's weights to every rank), or as is."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass(frozen=True)
class Launch:
    """How many processes and where: torchrun's --nproc-per-node, --nnodes, --node-rank, --master-addr/port."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    def __post_init__(self) -> None:
        for name, low in (("nproc", 1), ("nnodes", 1), ("node_rank", 0), ("master_port", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {low}")
        if self.node_rank >= self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank}: expected below --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.master_addr:
            raise UsageError(f"--nnodes {self.nnodes}: give --master-addr (the address of the node with --node-rank 0)")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def needed(self) -> bool:
        """True when this request starts worker processes (more than one process in all)."""
        return self.world > 1

    def torchrun_args(self) -> list[str]:
        """The torch.distributed.run options for this launch."""
        args = [f"--nproc-per-node={self.nproc}"]
        if self.nnodes == 1 and not self.master_addr:
            return args + ["--standalone"]          # one machine: a free port, no rendezvous setup
        return args + [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                       f"--master-addr={self.master_addr or '127.0.0.1'}", f"--master-port={self.master_port}"]


STOP_GRACE_S = 30   # how long torchrun gets to stop its workers after SIGTERM before it is killed


def stop_workers(proc: subprocess.Popen) -> None:
    """Stop torchrun and, through it, every worker: SIGTERM (torchrun passes it on and waits for them),
    then SIGKILL if they are not gone within STOP_GRACE_S. Without this a signal to `deploylm train`
    left the workers training (and writing --out) after the command had returned."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def spawn_tied(command: Sequence[str]) -> subprocess.Popen:
    """Popen(command), stdout piped as text lines, that gets SIGTERM when this process dies, even by
    SIGKILL (Linux PR_SET_PDEATHSIG): a killed `deploylm train --nproc N` no longer leaves its launcher
    and workers training and writing --out. Elsewhere a plain Popen."""
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=_term_with_parent if sys.platform == "linux" else None)


def _term_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def launch(launch: Launch, worker_args: Sequence[str], echo: Any) -> None:
    """Run `python -m torch.distributed.run ... -m deploylm.training worker_args`; `echo(line)` for
    each line the workers print on stdout (stderr passes through). WorkersFailed on a non-zero exit."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    args = [*launch.torchrun_args(), "-m", "deploylm.training", *worker_args]
    # torchrun's log folder: without --log-dir it makes a torchelastic_* folder in the temporary
    # directory and leaves it there, one more per run; this one goes when the run ends
    with tempfile.TemporaryDirectory(prefix="deploylm-torchrun-") as log_dir:
        proc = spawn_tied([*torchrun, f"--log-dir={log_dir}", *args])
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                echo(line.rstrip("\n"))
            proc.wait()
        except BaseException:        # Ctrl-C, SIGTERM (SystemExit), a closed stdout: the workers stop too
            stop_workers(proc)
            raise
        finally:
            proc.stdout.close()
    if proc.returncode != 0:
        raise WorkersFailed(f"training processes exited with status {proc.returncode} (their errors are above); "
                            f"command: {' '.join([*torchrun, *args])}")
