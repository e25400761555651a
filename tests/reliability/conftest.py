"""Servers for the reliability suite: real uvicorn on 127.0.0.1 (a free port), started and stopped here.

- `real_server`: `deploylm serve` as a subprocess over the tiny random GPT-2 (torch backend).
- `start_fake_server(...)`: `python -m tests.reliability.fake_server` (the scripted generator) as a
  subprocess, for timing-sensitive faults (shutdown with a request in flight).
- `inproc_server(...)`: uvicorn on a thread of this process over a FakeGenerator we can inspect.
Every server is stopped at teardown (SIGTERM, then SIGKILL after a bound); nothing outlives the test.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0   # importing torch + transformers on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn(args: list[str], log: Path) -> ServerProcess:
    """Start a server subprocess listening on a free port; wait until /health answers."""
    for _attempt in range(3):
        port = free_port()
        handle = log.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=ROOT, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)
        server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
        if _wait_healthy(server):
            return server
        server.stop()
        if "address already in use" not in log.read_text(errors="replace"):
            break
    pytest.fail(f"server did not start: {' '.join(args)}\n{server.log_tail()}")


def _wait_healthy(server: ServerProcess) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return True
        time.sleep(0.2)
    return False


# Limits the reliability suite runs the real server with (the bad-input cases refer to them).
REAL_LIMITS = {"--max-prompt-tokens": 120, "--max-new-tokens": 16, "--max-beams": 4, "--max-body-bytes": 65536,
               "--max-queue": 256, "--max-batch-size": 8, "--max-wait-ms": 5}


@pytest.fixture(scope="package")
def real_server(tiny_gpt2_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    limits = [str(x) for kv in REAL_LIMITS.items() for x in kv]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    server = spawn(["-m", "deploylm.cli", "serve", "--model", str(tiny_gpt2_dir), "--backend", "torch",
                    "--log-level", "warning", *limits], log)
    yield server
    server.stop()


@pytest.fixture()
def start_fake_server(tmp_path) -> Iterator:
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = spawn(["-m", "tests.reliability.fake_server", *args], tmp_path / f"fake{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@contextlib.contextmanager
def inproc_server(generator, config, *, app=None, outer=None) -> Iterator[tuple[str, object]]:
    """uvicorn on a thread of this process; yields (base url, the app). Stops on exit. `app`: serve this one
    (made by create_app) instead of a new one; `outer(app)`: the ASGI app to serve around it (one it is
    mounted in)."""
    import uvicorn

    from deploylm.serving import create_app

    app = app if app is not None else create_app(generator, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(outer(app) if outer else app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("in-process uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
