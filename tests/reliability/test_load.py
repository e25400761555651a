"""Load: 1,000 requests at concurrency 16 against `deploylm serve` (tiny GPT-2, torch) on 127.0.0.1.

Zero errors; every response equal to the same request decoded alone (batching changes nothing);
batches really formed; server RSS bounded. Bounded in count and time.
"""
from __future__ import annotations

import concurrent.futures
import math
import time

import httpx

REQUESTS = 1000
CONCURRENCY = 16
RSS_GROWTH_LIMIT = 64 << 20   # bytes the server may grow by over the whole load
# Texts and token ids must be identical; a score is a float sum whose last bits depend on the batch shape
# (BLAS reduction order over padded rows), so scores are compared to this relative precision.
SCORE_RTOL = 1e-5
TIME_LIMIT_S = 150

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "beam search keeps the best partial sentences",
    "hello world",
    "translate english to french: the house is wonderful",
    "one two three four five six seven",
    "a model that ships must say the same thing on every backend",
]
OPTION_SETS = [
    {"num_beams": 1, "max_new_tokens": 6},
    {"num_beams": 2, "max_new_tokens": 5},
    {"num_beams": 4, "max_new_tokens": 4, "num_return_sequences": 2, "length_penalty": 0.8},
]


def distinct_requests() -> list[tuple[str, dict]]:
    """Mixed endpoints, options, prompt lengths (left padding) and prompts per request."""
    reqs = [("/v1/generate", {"prompt": p, **o}) for p in PROMPTS for o in OPTION_SETS]
    reqs += [("/v1/generate", {"prompt": [PROMPTS[i], PROMPTS[i + 2]], **OPTION_SETS[i % 3]}) for i in range(3)]
    reqs += [("/v1/completions", {"prompt": p, "max_tokens": 5, "best_of": 2}) for p in PROMPTS[:3]]
    return reqs


def comparable(path: str, body: dict) -> object:
    """The part of a response that must not depend on batching (completions: not id/created)."""
    return body["results"] if path == "/v1/generate" else (body["choices"], body["usage"])


def same(got: object, want: object) -> bool:
    """Equal, except floats (scores) only to SCORE_RTOL."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=SCORE_RTOL)
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return got == want


def decode_alone(url: str, reqs: list[tuple[str, dict]]) -> list[object]:
    """Each request sent on its own, one at a time: each decoded in a batch of its own."""
    with httpx.Client(base_url=url, timeout=60) as client:
        out = []
        for path, body in reqs:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            out.append(comparable(path, r.json()))
        return out


def hammer(url: str, reqs: list[tuple[str, dict]], n: int, concurrency: int) -> list[tuple[int, int, object]]:
    """n requests (cycling through reqs) from `concurrency` keep-alive clients: (index, status, body)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, timeout=60, limits=limits) as client:
        def call(i: int) -> tuple[int, int, object]:
            path, body = reqs[i % len(reqs)]
            r = client.post(path, json=body)
            return i, r.status_code, comparable(path, r.json()) if r.status_code == 200 else r.text

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(call, range(n)))


def check_outcomes(outcomes: list[tuple[int, int, object]], alone: list[object], log_tail: str) -> None:
    errors = [(i, status, body) for i, status, body in outcomes if status != 200]
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}\n{log_tail}"
    mismatches = [i for i, _, body in outcomes if not same(body, alone[i % len(alone)])]
    assert not mismatches, f"{len(mismatches)} responses differ from decoding alone, e.g. request {mismatches[0]}"


def batches_so_far(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["batches"]


def test_thousand_requests_at_concurrency_16_equal_to_decoding_alone(real_server):
    reqs = distinct_requests()
    alone = decode_alone(real_server.url, reqs)
    batches_before, rss_before = batches_so_far(real_server.url), real_server.rss_bytes()
    started = time.monotonic()
    outcomes = hammer(real_server.url, reqs, REQUESTS, CONCURRENCY)
    elapsed = time.monotonic() - started
    batches, rss_after = batches_so_far(real_server.url) - batches_before, real_server.rss_bytes()

    check_outcomes(outcomes, alone, real_server.log_tail())
    assert batches < 0.8 * REQUESTS, f"only {REQUESTS / batches:.2f} requests per batch: batching is not happening"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"server RSS grew {(rss_after - rss_before) >> 20} MiB"
    assert elapsed < TIME_LIMIT_S
    print(f"\n{REQUESTS} requests in {elapsed:.1f}s ({REQUESTS / elapsed:.0f} req/s), {batches} batches, "
          f"RSS {rss_before >> 20} -> {rss_after >> 20} MiB")
