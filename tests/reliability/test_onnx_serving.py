"""`deploylm serve` over an exported ONNX artifact (the deployment path): the manifest in /v1/models,
batched answers equal to decoding alone and to the torch backend, streaming. Slow: exports first."""
from __future__ import annotations

import json

import httpx
import pytest

import deploylm
from tests.reliability.conftest import spawn
from tests.reliability.test_load import batches_so_far, check_outcomes, decode_alone, distinct_requests, hammer


@pytest.fixture(scope="module")
def onnx_server(tiny_gpt2_dir, tmp_path_factory):
    from deploylm.export.pipeline import export_model

    artifact = tmp_path_factory.mktemp("onnx") / "tiny-gpt2-fp32"
    export_model(tiny_gpt2_dir, "fp32", artifact)
    server = spawn(["-m", "deploylm.cli", "serve", "--model", str(artifact), "--max-new-tokens", "16",
                    "--log-level", "warning"], artifact.parent / "server.log")  # artifact: onnx by default
    yield server, artifact
    server.stop()


@pytest.mark.slow
def test_onnx_artifact_serves_batched_results_equal_to_alone_and_to_torch(onnx_server, tiny_gpt2_dir):
    server, artifact = onnx_server
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    assert model["id"] == artifact.name and model["deploylm"]["backend"] == "onnx"
    assert model["deploylm"]["manifest"]["profile"]["name"] == "fp32"
    assert model["deploylm"]["manifest"]["parity"]["passed"] is True

    reqs = distinct_requests()
    alone = decode_alone(server.url, reqs)
    before = batches_so_far(server.url)
    check_outcomes(hammer(server.url, reqs, 200, 16), alone, server.log_tail())
    assert batches_so_far(server.url) - before < 160

    torch_gen = deploylm.load(tiny_gpt2_dir, backend="torch")
    for (path, body), got in zip(reqs, alone):
        if path == "/v1/generate" and isinstance(body["prompt"], str):
            options = {k: v for k, v in body.items() if k != "prompt"}
            want = torch_gen.generate(body["prompt"], **options)[0]
            assert [o["token_ids"] for o in got[0]["outputs"]] == [list(s.token_ids) for s in want.sequences]


@pytest.mark.slow
def test_onnx_artifact_streams(onnx_server):
    server, _ = onnx_server
    body = {"prompt": "the quick brown fox", "max_new_tokens": 8, "stream": True}
    r = httpx.post(server.url + "/v1/generate", json=body, timeout=30)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1]["done"] is True
    assert events[-1]["text"] == "".join(e["text"] for e in events[:-1])
