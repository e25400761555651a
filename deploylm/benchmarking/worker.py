"""Rows in worker processes: one spawned process per row, so each row's peak RSS is its own.

The parent drives the interleaving; a worker loads its model once, then runs one round per "run"
message and answers with the RoundResult. While one worker runs, the others wait on their pipe, so
rows never compete for the CPU. Peak RSS is the worker's high-water mark (VmHWM): imports, model load and every
round of that row, nothing of the others.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

from deploylm.errors import DeployLMError, UsageError


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB: Linux's VmHWM (the high-water mark of this
    program's own memory), else `ru_maxrss`. On Linux `ru_maxrss` of a spawned worker starts at its parent's
    peak (exec hands the parent's high-water mark on), so a worker started by a process holding 2 GiB (a
    notebook with a model loaded) reported >= 2 GiB whatever its row used."""
    try:
        with open("/proc/self/status") as fh:
            line = next((x for x in fh if x.startswith("VmHWM:")), "")
        return int(line.split()[1]) / 1024                                  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024   # bytes on macOS, KiB on Linux


def current_rss_mib() -> float | None:
    """This process's resident set size now, in MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars or advice from transformers around the measurements (imports transformers); its
    verbosity and progress bars are as they were afterwards (run_bench is a library call too)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def quiet_libraries_env() -> None:
    """The same as quiet_libraries for a fresh worker process, through the environment that transformers
    and huggingface_hub read when (if ever) they are imported: a row that does not need transformers (the
    onnx backend) does not pay for importing it (its RSS is part of the row's peak)."""
    os.environ.setdefault("TQDM_DISABLE", "1")              # no GGUF conversion bars (read when tqdm loads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class ProcessRunner:
    """A row in a spawned worker process (same interface as the in-process runners)."""

    def __init__(self, spec: Any, workload: Any) -> None:
        _check_main_importable()
        context = multiprocessing.get_context("spawn")
        self.label = spec.label
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=serve, args=(child, spec, workload), daemon=True,
                                     name=f"deploylm-bench-{spec.backend}")
        self._proc.start()
        child.close()
        self.load_s, self.rss_after_load_mib = 0.0, None

    def ready(self) -> None:
        """Wait until the worker has loaded its model (workers start together, then are awaited)."""
        self.load_s, self.rss_after_load_mib = self._reply()

    def run(self) -> Any:
        self._conn.send("run")
        return self._reply()

    def close(self) -> float | None:
        """Stop the worker; its peak RSS in MiB."""
        if not self._proc.is_alive():
            return None
        try:
            self._conn.send("close")
            peak = self._reply()
        finally:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            self._conn.close()
        return peak

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)

    def _reply(self) -> Any:
        try:
            kind, payload = self._conn.recv()
        except (EOFError, ConnectionError):
            self._proc.join(10)
            raise RuntimeError(f"the benchmark worker for {self.label} {_death(self._proc.exitcode)}") from None
        if kind == "error":
            raise payload
        if kind == "crash":
            raise RuntimeError(f"the benchmark worker for {self.label} failed:\n{payload}")
        return payload


def _check_main_importable() -> None:
    """A spawned worker runs the caller's main script again from its path; a program read from standard input
    (`python - < script.py`, a heredoc) has the path '<stdin>', which every worker died on (FileNotFoundError) while
    the error advised an `if __name__ == "__main__":` guard that does not help. Refuse that before any worker."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return                                          # `python -m module`: workers import it by name
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", path)):
        return                                          # a REPL or notebook (no file), or a script on disk
    raise UsageError(f"bench: the calling program was read from {path!r}, not from a file, and each row's spawned "
                     "worker process imports the caller's program again: save it as a script (with an "
                     "`if __name__ == \"__main__\":` guard) or pass BenchConfig(isolate=False) to run the rows in "
                     "this process")


def _death(exitcode: int | None) -> str:
    """How a worker that stopped answering ended, and the likely cause."""
    if exitcode is not None and exitcode < 0:
        cause = " (the system's out-of-memory killer sends this one)" if exitcode == -9 else ""
        return f"was killed by signal {-exitcode}{cause}"
    return (f"died (exit code {exitcode}) before answering; its error is printed above. Called from a script, "
            "the script needs an `if __name__ == \"__main__\":` guard around run_bench: each worker is a spawned "
            "process that imports the script again (or pass BenchConfig(isolate=False) to run rows in this process)")


def serve(conn: Any, spec: Any, workload: Any) -> None:
    """Worker main: load the row, answer ("ok", (load_s, rss)), then one round per "run" until "close"."""
    _die_with_parent()
    quiet_libraries_env()
    try:
        import torch

        from deploylm.benchmarking.measure import open_local_runner

        torch.set_num_threads(workload.threads)
        runner = open_local_runner(spec, workload)
        getattr(runner, "ready", lambda: None)()      # a workload the row refuses, before any row's warm-up
        conn.send(("ok", (runner.load_s, current_rss_mib())))
        while conn.recv() == "run":
            conn.send(("ok", runner.run()))
        conn.send(("ok", peak_rss_mib()))
    except DeployLMError as exc:
        conn.send(("error", exc))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        if not _parent_alive():   # the bench was killed outright: nobody reads the report (no traceback)
            return
        conn.send(("crash", traceback.format_exc()))
    finally:
        conn.close()


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


def _die_with_parent() -> None:
    """Linux: this worker is killed when the bench process dies, even by SIGKILL (PR_SET_PDEATHSIG), as
    `train --nproc` ties its launcher; else a `kill -9` of `deploylm bench` left the worker loading its model,
    then printing a BrokenPipeError traceback into the terminal once it found its parent gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if not _parent_alive():      # it died before the call above
        os._exit(0)


