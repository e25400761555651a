"""Faults: a client leaving mid-stream, a client giving up while queued, shutdown with a request in flight,
overload (queue and stream limits), a backend failure. Real uvicorn on 127.0.0.1 over the scripted
generator, so timings are exact; each test is bounded to a few seconds."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time

import httpx
import pytest

from deploylm.generator import TextStream
from deploylm.serving import ServeConfig, create_app
from tests.reliability.conftest import inproc_server
from tests.reliability.fakes import FakeGenerator

LONG = " ".join(f"w{i}" for i in range(40))


def wait_until(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def stopped_within(server, seconds: float) -> bool:
    """SIGTERM the server process; True when it exited within `seconds`."""
    started = time.monotonic()
    server.proc.terminate()
    server.proc.wait(15)
    return time.monotonic() - started < seconds


def test_client_leaving_mid_stream_stops_decoding_and_frees_the_slot():
    fake = FakeGenerator(step_delay=0.05)
    with inproc_server(fake, ServeConfig(max_new_tokens=64)) as (url, app):
        with httpx.stream("POST", url + "/v1/generate", timeout=10,
                          json={"prompt": LONG, "max_new_tokens": 40, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):]) == {"text": " w39"}
        # the client hung up after one piece of forty
        assert wait_until(lambda: fake.streams_closed == 1), "the stream's generator was never closed"
        assert fake.stream_steps < 20
        assert wait_until(lambda: app.state.active_streams == 0 and app.state.in_flight == 0)
        r = httpx.post(url + "/v1/generate", json={"prompt": "still here", "max_new_tokens": 2}, timeout=10)
        assert r.status_code == 200


class QuietStreams(FakeGenerator):
    """Streams as a beam search whose beams disagree until the end: every step decodes, and the one piece
    comes after the last step."""

    def _stream(self, best, max_new_tokens, stop=None):
        inner, pieces = super()._stream(best, max_new_tokens, stop), []
        while True:
            try:
                pieces.append(next(inner))
            except StopIteration as end:
                reason = end.value
                break
        yield "".join(pieces)
        return reason


def test_client_leaving_a_stream_before_its_first_piece_stops_decoding_after_the_step():
    """The stream's thread used to learn of the disconnect only at its next piece: a beam search with no
    agreed text held the model to its last step for nobody."""
    fake = QuietStreams(step_delay=0.05)
    with inproc_server(fake, ServeConfig(max_new_tokens=64)) as (url, app):
        with httpx.stream("POST", url + "/v1/generate", timeout=10,
                          json={"prompt": LONG, "max_new_tokens": 40, "stream": True}) as r:
            assert r.status_code == 200
            assert wait_until(lambda: fake.stream_steps >= 2)
        # the client hung up after two steps of forty, with no piece sent yet
        assert wait_until(lambda: fake.streams_closed == 1), "the stream's generator was never closed"
        assert fake.stream_steps < 20
        assert wait_until(lambda: app.state.active_streams == 0 and app.state.in_flight == 0)
        r = httpx.post(url + "/v1/generate", json={"prompt": "still here", "max_new_tokens": 2}, timeout=10)
        assert r.status_code == 200


def test_streams_dropped_while_the_model_is_busy_keep_their_slots_until_their_threads_end():
    """A dropped stream freed its slot when its response ended, while its thread still waited for the model:
    streams opened and dropped during a long decode piled up threads past max_streams (400 such streams
    against a busy `deploylm serve --max-streams 4`: 274 threads)."""
    fake = FakeGenerator(delay=1.5)

    def stream_threads():
        return sum(t.name.startswith("deploylm-stream") for t in threading.enumerate())

    with inproc_server(fake, ServeConfig(max_streams=2, max_new_tokens=64)) as (url, app):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(httpx.post, url + "/v1/generate", json={"prompt": "busy"}, timeout=10)
            assert wait_until(lambda: len(fake.calls) == 1)      # the model is busy for 1.5 s
            answers = []
            for _ in range(6):
                with httpx.stream("POST", url + "/v1/generate", timeout=10,
                                  json={"prompt": LONG, "max_new_tokens": 40, "stream": True}) as r:
                    answers.append(r.status_code)                 # and the client leaves at once
            assert answers == [200, 200, 503, 503, 503, 503]
            assert stream_threads() <= 2
            assert busy.result().status_code == 200
        # the dropped streams' threads end after one step each, and give their slots back
        assert wait_until(lambda: app.state.active_streams == 0 and stream_threads() == 0)
        with httpx.stream("POST", url + "/v1/generate", timeout=10,
                          json={"prompt": "one two", "max_new_tokens": 2, "stream": True}) as r:
            assert r.status_code == 200
            assert '"done": true' in r.read().decode()


class Bursts(FakeGenerator):
    """A fast model's stream: its pieces reach the event loop fifty at a time."""

    def stream(self, prompt, *, stop=None, **options):
        def pieces():
            for i in range(20_000):
                if i % 50 == 0:
                    time.sleep(0.001)
                if stop is not None and stop.is_set():
                    return "length"
                yield " x"
            return "length"

        return TextStream(pieces())


def test_a_client_leaving_a_fast_stream_gets_no_writes_after_it_left(caplog):
    """The server wrote each burst of pieces back to back without the event loop reading the socket, so a
    client that left mid-burst had the rest of it written to its closed connection: asyncio logged
    "socket.send() raised exception." dozens of times per dropped stream."""
    with caplog.at_level(logging.WARNING, logger="asyncio"), inproc_server(Bursts(), ServeConfig()) as (url, app):
        for _ in range(3):
            with httpx.stream("POST", url + "/v1/generate", timeout=10,
                              json={"prompt": "a b", "max_new_tokens": 8, "stream": True}) as r:
                got = 0
                for chunk in r.iter_raw():
                    got += len(chunk)
                    if got > 20_000:
                        break                            # and the client leaves in the middle of the stream
        assert wait_until(lambda: app.state.active_streams == 0)
    sent_to_closed = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert not sent_to_closed, f"{len(sent_to_closed)} writes after the client left"


def test_a_request_whose_client_gives_up_while_queued_is_never_decoded():
    fake = FakeGenerator(delay=1.0)
    with inproc_server(fake, ServeConfig(max_batch_size=1, max_wait_ms=0)) as (url, app), \
            httpx.Client(base_url=url, timeout=0.3) as impatient:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/v1/generate", json={"prompt": "first"}, timeout=10)
            assert wait_until(lambda: len(fake.calls) == 1)   # "first" is decoding (for 1 s)
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/generate", json={"prompt": "second"})  # gives up after 0.3 s
            assert first.result().status_code == 200
        r = httpx.post(url + "/v1/generate", json={"prompt": "third"}, timeout=10)
        assert r.status_code == 200
        assert [c[0] for c in fake.calls] == [["first"], ["third"]]


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(start_fake_server):
    server = start_fake_server("--delay", "1.5")
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(r=httpx.post(
        server.url + "/v1/generate", json={"prompt": "slow one", "max_new_tokens": 2}, timeout=20)))
    thread.start()
    assert wait_until(lambda: httpx.get(server.url + "/health", timeout=5).json()["decoding"] == 1)
    server.proc.terminate()                                                  # SIGTERM: start draining
    time.sleep(0.3)
    late = httpx.post(server.url + "/v1/generate", json={"prompt": "too late"}, timeout=5)
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert "shutting down" in late.json()["error"]["message"]
    thread.join(20)
    assert slow["r"].status_code == 200
    assert slow["r"].json()["results"][0]["outputs"][0]["text"] == FakeGenerator().generate(
        "slow one", max_new_tokens=2)[0].sequences[0].text
    server.proc.wait(15)                                                     # and then it exits
    log = server.log.read_text()
    # >= 1: the /health poll just answered may not have left the in-flight count yet
    assert re.search(r"draining: [1-9]\d* request\(s\) in flight", log) and "Finished server process" in log, log


def test_shutdown_is_bounded_by_the_drain_timeout(start_fake_server):
    """A decode longer than --drain-timeout: when the drain is over it stops after its current step and
    its client gets a 503, and the process exits soon after (it used to wait for the whole decode, then
    uvicorn's own graceful timeout on top)."""
    server = start_fake_server("--delay", "30", "--drain-timeout", "1")
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(r=httpx.post(
        server.url + "/v1/generate", json={"prompt": "a long decode", "max_new_tokens": 2}, timeout=40)))
    thread.start()
    assert wait_until(lambda: httpx.get(server.url + "/health", timeout=5).json()["decoding"] == 1)
    assert stopped_within(server, 8), "shutdown waited for the decode"
    thread.join(10)
    assert slow["r"].status_code == 503 and "was not finished" in slow["r"].json()["error"]["message"]


def test_a_stream_still_running_when_the_drain_is_over_ends_with_a_503_event(start_fake_server):
    """A stream longer than --drain-timeout stops after its current step with a final error event (it
    used to run on, holding the model: uvicorn then cut it mid-body and the process could abort)."""
    server = start_fake_server("--step-delay", "0.25", "--drain-timeout", "1")
    events: list = []

    def read() -> None:
        with httpx.stream("POST", server.url + "/v1/generate", timeout=40,
                          json={"prompt": LONG, "max_new_tokens": 40, "stream": True}) as r:
            events.extend(json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=read)
    thread.start()
    assert wait_until(lambda: httpx.get(server.url + "/health", timeout=5).json()["active_streams"] == 1)
    assert stopped_within(server, 8), "shutdown waited for the stream"
    thread.join(10)
    assert 0 < len(events) < 40 and "error" in events[-1], events[-3:]
    assert "was not finished" in events[-1]["error"]["message"] and events[-1]["error"]["type"] == "unavailable"
    assert "Cancel" not in server.log.read_text()       # uvicorn never had to cancel a task


def test_overload_gets_503_with_retry_after_and_nothing_else():
    fake = FakeGenerator(delay=0.2)
    config = ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=2)
    with inproc_server(fake, config) as (url, _app):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: httpx.post(url + "/v1/generate", json={"prompt": f"p{i}"}, timeout=20),
                               range(8)))
        statuses = sorted(r.status_code for r in rs)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 3
        assert all(r.headers["retry-after"] == "1" for r in rs if r.status_code == 503)
        assert httpx.post(url + "/v1/generate", json={"prompt": "after"}, timeout=10).status_code == 200


def test_stream_limit_gets_503_while_full_and_frees_after():
    fake = FakeGenerator(step_delay=0.05)
    with inproc_server(fake, ServeConfig(max_streams=1)) as (url, app):
        body = {"prompt": LONG, "max_new_tokens": 10, "stream": True}
        with httpx.stream("POST", url + "/v1/generate", json=body, timeout=10) as r:
            lines = r.iter_lines()  # keep it: a dropped iterator closes the response
            next(lines)
            second = httpx.post(url + "/v1/generate", json=body, timeout=10)
            assert second.status_code == 503 and "streams open" in second.json()["error"]["message"]
            events = [line for line in lines if line.startswith("data: ")]
            assert json.loads(events[-1][len("data: "):])["done"] is True
        assert wait_until(lambda: app.state.active_streams == 0)
        assert httpx.post(url + "/v1/generate", json=body, timeout=10).status_code == 200


def test_backend_failure_is_a_500_json_error_and_the_server_keeps_serving():
    fake = FakeGenerator()
    with inproc_server(fake, ServeConfig()) as (url, _app):
        r = httpx.post(url + "/v1/generate", json={"prompt": "BOOM"}, timeout=10)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "scripted backend failure" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/generate", json={"prompt": "fine"}, timeout=10).status_code == 200


def test_counting_a_long_prompt_does_not_block_the_event_loop():
    """Tokenizing a prompt (for the length limits) runs off the event loop: /health answers meanwhile."""
    counted = threading.Event()

    class SlowCounting(FakeGenerator):
        def count_tokens(self, text: str) -> int:
            if "SLOW" in text:
                time.sleep(2.0)                       # a tokenizer on a 100k-character prompt, exaggerated
                counted.set()
            return super().count_tokens(text)

    with inproc_server(SlowCounting(), ServeConfig()) as (url, _app):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, url + "/v1/generate", json={"prompt": "SLOW one", "max_new_tokens": 2},
                               timeout=10)
            time.sleep(0.2)                           # the slow request is being counted
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            # an order, not a speed: /health answered while the count was still running (1.8 s of margin)
            assert not counted.is_set(), "the event loop waited for the tokenizer"
            assert slow.result().status_code == 200


def mounted(app, lifespan=None):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    return Starlette(routes=[Mount("/llm", app=app)], lifespan=lifespan)


def test_a_mounted_app_served_again_by_a_later_server_answers():
    """Without a lifespan, a mounted app starts its batcher with its first request. A second server of the
    same app (a test client per test, a restart in one process) found that batcher bound to the first
    server's event loop, gone: every request that was not a stream waited forever."""
    fake = FakeGenerator()
    app = create_app(fake, ServeConfig())
    body = {"prompt": "one two", "max_new_tokens": 2}
    for _ in range(2):
        with inproc_server(fake, None, app=app, outer=mounted) as (url, _app):
            assert httpx.post(url + "/llm/v1/generate", json=body, timeout=3).status_code == 200
    assert len(fake.calls) == 2


@pytest.mark.parametrize("style", ["passed", "nested"])
def test_the_outer_apps_lifespan_stops_a_mounted_apps_batcher(style):
    """docs/serving.md: pass the app's lifespan on to the outer app's; its shutdown then stops the batcher
    (the thread used to stay, idle, one per mounted app)."""
    app = create_app(FakeGenerator(), ServeConfig())

    @contextlib.asynccontextmanager
    async def own(outer):
        async with app.lifespan(outer):
            yield

    def batchers() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("deploylm-batch")}

    before = batchers()       # by identity: an earlier test's batcher may still be ending while this one counts
    with inproc_server(None, None, app=app,
                       outer=lambda a: mounted(a, a.lifespan if style == "passed" else own)) as (url, _app):
        assert httpx.post(url + "/llm/v1/generate", json={"prompt": "one two", "max_new_tokens": 2},
                          timeout=3).status_code == 200
        ours = batchers() - before
        assert len(ours) == 1, ours
    (thread,) = ours
    assert wait_until(lambda: not thread.is_alive()), "the batcher's thread outlived the server"


def test_shutdown_waits_for_the_step_of_a_stream_whose_client_left():
    """A stream's thread outlives its response by up to one step after its client leaves. The server's
    shutdown counted requests only, so it returned (and `deploylm serve` exited) while that thread was still
    decoding on the model: a daemon thread inside the backend during the interpreter's exit."""
    fake = FakeGenerator(step_delay=1.0)
    with inproc_server(fake, ServeConfig(max_new_tokens=64)) as (url, app):
        with httpx.stream("POST", url + "/v1/generate", timeout=10,
                          json={"prompt": LONG, "max_new_tokens": 40, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        # the client left after one piece; the thread is in its second step (1 s) as the server stops
    assert fake.streams_closed == 1, "the server stopped while the stream's thread was still decoding"
    assert fake.stream_steps < 5                       # it stopped after that step, not at the 40th
