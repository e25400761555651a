"""`deploylm serve --port 0`: the system picks a free port, and the startup line names that port, not 0."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

from tests.reliability.conftest import ROOT, START_TIMEOUT_S


def test_port_zero_serves_on_the_port_it_prints(tiny_gpt2_dir, tmp_path):
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "deploylm.cli", "serve", "--model", str(tiny_gpt2_dir),
                                 "--backend", "torch", "--port", "0", "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline, port, healthy = time.monotonic() + START_TIMEOUT_S, None, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            found = re.search(r"serving \S+ \(torch\) on http://127\.0\.0\.1:(\d+)", log.read_text())
            if found:
                port = int(found.group(1))
                try:
                    healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        assert port and port != 0 and healthy, log.read_text()[-2000:]
    finally:
        proc.terminate()
        proc.wait(20)
