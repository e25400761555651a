"""Bad input against `deploylm serve` (tiny GPT-2, torch, limits from conftest.REAL_LIMITS): every case is
a 4xx with a JSON error that says what is wrong, and the server keeps serving after each one."""
from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import httpx
import pytest

GOOD = {"prompt": "hello world", "max_new_tokens": 3, "num_beams": 2}


def j(value) -> bytes:
    return json.dumps(value).encode()


# (id, path, raw body, status, param, words in the message)
CASES = [
    ("malformed-json", "/v1/generate", b'{"prompt": "a",', 400, None, "not valid JSON"),
    ("not-an-object", "/v1/generate", b'["a"]', 400, None, "must be a JSON object"),
    ("empty-body", "/v1/generate", b"", 400, None, "empty"),
    ("nan", "/v1/generate", b'{"prompt": "a", "temperature": NaN}', 400, None, "NaN is not allowed"),
    ("non-utf8", "/v1/generate", b'{"prompt": "caf\xe9"}', 400, None, "not valid UTF-8"),
    ("utf16-bom", "/v1/generate", '{"prompt": "a"}'.encode("utf-16"), 400, None, "not valid UTF-8"),
    ("prompt-missing", "/v1/generate", j({"num_beams": 2}), 400, "prompt", "missing field 'prompt'"),
    ("prompt-number", "/v1/generate", j({"prompt": 42}), 400, "prompt", "string or a list of strings"),
    ("prompt-object", "/v1/generate", j({"prompt": {"text": "a"}}), 400, "prompt", "got an object"),
    ("prompt-list-mixed", "/v1/generate", j({"prompt": ["a", None]}), 400, "prompt", "non-string"),
    ("prompt-empty", "/v1/generate", j({"prompt": ""}), 400, "prompt", "is empty"),
    ("prompt-blank", "/v1/generate", j({"prompt": " \n\t"}), 400, "prompt", "is only whitespace"),
    ("prompt-empty-list", "/v1/generate", j({"prompt": []}), 400, "prompt", "empty list"),
    ("prompt-nul", "/v1/generate", j({"prompt": "a\x00b"}), 400, "prompt", "NUL"),
    ("prompt-over-limit", "/v1/generate", j({"prompt": "word " * 200}), 400, "prompt", "over this server's limit of 120"),
    ("prompt-over-window", "/v1/generate", j({"prompt": "hello world " * 15, "max_new_tokens": 16}), 400, "prompt",
     "over the model's window of 128"),
    ("stream-over-window", "/v1/generate", j({"prompt": "hello world " * 15, "max_new_tokens": 16, "stream": True}),
     400, "prompt", "over the model's window of 128"),
    ("too-many-prompts", "/v1/generate", j({"prompt": ["a"] * 100}), 400, "prompt", "limit of 64 per request"),
    ("unknown-field", "/v1/generate", j({"prompt": "a", "beam_size": 4}), 400, "beam_size", "unknown decoding option"),
    ("beams-string", "/v1/generate", j({"prompt": "a", "num_beams": "4"}), 400, "num_beams", "expected an integer"),
    ("beams-float", "/v1/generate", j({"prompt": "a", "num_beams": 2.5}), 400, "num_beams", "expected an integer"),
    ("beams-negative", "/v1/generate", j({"prompt": "a", "num_beams": -3}), 400, "num_beams", "num_beams >= 1"),
    ("beams-huge", "/v1/generate", j({"prompt": "a", "num_beams": 10**9}), 400, "num_beams", "limit of 4"),
    ("new-tokens-zero", "/v1/generate", j({"prompt": "a", "max_new_tokens": 0}), 400, "max_new_tokens", ">= 1"),
    ("new-tokens-huge", "/v1/generate", j({"prompt": "a", "max_new_tokens": 10**18}), 400, "max_new_tokens",
     "limit of 16"),
    ("new-tokens-bignum", "/v1/generate", b'{"prompt": "a", "max_new_tokens": 1e400}', 400, "max_new_tokens",
     "expected an integer"),
    ("temperature-negative", "/v1/generate", j({"prompt": "a", "do_sample": True, "temperature": -1}), 400,
     "temperature", "temperature >= 1e-06"),
    ("top-p-over-1", "/v1/generate", j({"prompt": "a", "do_sample": True, "top_p": 2}), 400, "top_p", "top_p <= 1"),
    ("seed-huge", "/v1/generate", j({"prompt": "a", "do_sample": True, "seed": 2**80}), 400, "seed", "out of range"),
    ("early-stopping-bad", "/v1/generate", j({"prompt": "a", "early_stopping": "sometimes"}), 400, "early_stopping",
     "never"),
    ("stream-not-bool", "/v1/generate", j({"prompt": "a", "stream": 1}), 400, "stream", "true or false"),
    ("stream-two-prompts", "/v1/generate", j({"prompt": ["a", "b"], "stream": True}), 400, "prompt",
     "exactly one prompt"),
    ("oversized-body", "/v1/generate", j({"prompt": "a", "pad": "x" * 70000}), 413, None, "limit of 65536"),
    ("completions-unknown", "/v1/completions", j({"prompt": "a", "max_tokenz": 3}), 400, "max_tokenz", "unknown field"),
    ("completions-unsupported", "/v1/completions", j({"prompt": "a", "echo": True}), 400, "echo", "not supported"),
    ("completions-n-over-best-of", "/v1/completions", j({"prompt": "a", "n": 3, "best_of": 2}), 400, "n",
     "at most best_of=2"),
    ("completions-max-tokens-negative", "/v1/completions", j({"prompt": "a", "max_tokens": -1}), 400,
     "max_tokens", ">= 1"),
]


@pytest.mark.parametrize("path, body, status, param, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_a_clear_4xx_and_the_server_keeps_serving(real_server, path, body, status, param, words):
    with httpx.Client(base_url=real_server.url, timeout=30) as client:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert words in error["message"], error
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert r.headers["x-request-id"]
        assert client.post("/v1/generate", json=GOOD).status_code == 200


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/generate", 405), ("POST", "/nowhere", 404),
                                                  ("DELETE", "/health", 405)])
def test_wrong_route_or_method_is_a_json_4xx(real_server, method, path, status):
    r = httpx.request(method, real_server.url + path, timeout=30)
    assert r.status_code == status and r.json()["error"]["message"]


def test_lying_content_length_and_garbage_request_line(real_server):
    """Raw sockets: a body shorter than announced (then hang-up), and a request line that is not HTTP."""
    url = urlparse(real_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        s.shutdown(socket.SHUT_WR)
        s.recv(4096)  # whatever the server answers (or nothing), it must not wedge
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 definitely not http\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert httpx.post(real_server.url + "/v1/generate", json=GOOD, timeout=30).status_code == 200
