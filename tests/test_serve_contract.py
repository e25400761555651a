"""What docs/serving.md promises HTTP clients, pinned where no other test did (found by hand mutation testing
of deploylm/serving/app.py, schemas.py and server.py): response fields, error types and params, headers."""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from starlette.testclient import TestClient

from deploylm.errors import DeployLMError, NumericalOverflow
from deploylm.serving import ServeConfig, create_app
from tests.reliability.fakes import FakeGenerator

CONFIG = ServeConfig(model_name="fake", max_prompt_tokens=8, max_new_tokens=32, max_body_bytes=1000,
                     max_prompts=4, max_beams=8)


def sse_events(text):
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture()
def client():
    with TestClient(create_app(FakeGenerator(), CONFIG)) as c:
        yield c


def test_models_entry_has_the_openai_fields_and_another_id_is_a_404_naming_the_model_param(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    entry = models["data"][0]
    assert (entry["object"], entry["owned_by"]) == ("model", "deploylm")
    other = client.get("/v1/models/gpt-4").json()["error"]
    assert other["param"] == "model" and other["type"] == "not_found_error"


def test_health_counts_queued_and_decoding_requests_apart():
    fake = FakeGenerator(delay=1.0)
    config = ServeConfig(model_name="fake", max_batch_size=1, max_wait_ms=0)
    with TestClient(create_app(fake, config)) as c:
        def post(prompt):
            c.post("/v1/generate", json={"prompt": prompt})

        threads = [threading.Thread(target=post, args=(p,)) for p in ("first", "second", "third")]
        threads[0].start()
        deadline = time.monotonic() + 5
        while c.get("/health").json()["decoding"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        for t in threads[1:]:
            t.start()
        while c.get("/health").json()["queued"] != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = c.get("/health").json()
        for t in threads:
            t.join(10)
    assert (health["decoding"], health["queued"], health["in_flight"]) == (1, 2, 3), health


def test_a_stream_is_sent_uncached(client):
    r = client.post("/v1/generate", json={"prompt": "x y", "max_new_tokens": 2, "stream": True})
    assert r.headers["cache-control"] == "no-cache"


def test_a_deploylm_error_from_the_backend_is_a_500_server_error():
    class Failing(FakeGenerator):
        def generate(self, prompts, *, stop=None, **options):
            raise DeployLMError("the backend's session is gone")

    with TestClient(create_app(Failing(), CONFIG)) as c:
        r = c.post("/v1/generate", json={"prompt": "a b"})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "session is gone" in r.json()["error"]["message"]



def test_a_request_whose_logits_overflow_is_logged_once_with_its_request_id(caplog):
    """The batcher and the endpoint both logged a request's overflow ("request r1: ..." then "r1 request failed:
    ..."): every overflow reached the operator's log twice. It is one warning, with the request id."""
    overflow = NumericalOverflow("the model's logits at generated token 1 are NaN or infinite")

    class Overflowing(FakeGenerator):
        def generate(self, prompts, *, stop=None, **options):
            raise overflow

    with caplog.at_level(logging.INFO, logger="deploylm.serve"):
        with TestClient(create_app(Overflowing(), CONFIG)) as c:
            r = c.post("/v1/generate", json={"prompt": "a b"}, headers={"X-Request-Id": "r1"})
    assert r.status_code == 500, r.text
    logged = [rec.getMessage() for rec in caplog.records if str(overflow) in rec.getMessage()]
    assert len(logged) == 1 and "r1" in logged[0], logged

def failing_midway(failure: BaseException) -> FakeGenerator:
    """A generator whose streams send one piece, then raise `failure` (the headers have gone out)."""
    from deploylm.generator import TextStream

    class Failing(FakeGenerator):
        def stream(self, prompt, *, stop=None, **options):
            def pieces():
                yield " a"
                raise failure
            return TextStream(pieces())

    return Failing()


@pytest.mark.parametrize("failure, says", [
    (NumericalOverflow("the model's logits at generated token 2 are NaN or infinite"), "the model's logits at "),
    (RuntimeError("scripted"), "internal error: RuntimeError: scripted"),
])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/generate"])
def test_a_stream_that_fails_midway_ends_with_the_error_then_done_on_completions(endpoint, failure, says, caplog):
    """After the headers went out, a failure is the last event; a completions stream then ends with [DONE] as
    every completions stream does (vLLM's too): a client reading to [DONE] is not left waiting. A deploylm error
    (the model's logits overflowed) is its own line, as the same request without streaming answers, not an
    "internal error" with the class name; both reach the server's log."""
    field = "max_tokens" if endpoint == "/v1/completions" else "max_new_tokens"
    with TestClient(create_app(failing_midway(failure), CONFIG)) as c:
        r = c.post(endpoint, json={"prompt": "a b", field: 3, "stream": True})
    events = sse_events(r.text)
    last_json = json.loads(events[-2] if endpoint == "/v1/completions" else events[-1])
    assert last_json["error"]["type"] == "server_error" and last_json["error"]["message"].startswith(says), events
    assert (events[-1] == "[DONE]") == (endpoint == "/v1/completions"), events
    assert str(failure) in caplog.text


@pytest.mark.parametrize("failure", [NumericalOverflow("the model's logits at generated token 2 are NaN or infinite"),
                                     RuntimeError("scripted")])
def test_a_stream_that_fails_midway_is_logged_with_its_request_id(failure, caplog):
    """docs/serving.md: a 500's traceback is in the server log with the request id. A stream that failed after its
    headers went out was logged as a bare "stream failed": the operator could not tell which request it was."""
    with caplog.at_level(logging.INFO, logger="deploylm.serve"):
        with TestClient(create_app(failing_midway(failure), CONFIG)) as c:
            c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3, "stream": True},
                   headers={"X-Request-Id": "req-42"})
    failed = [r for r in caplog.records if str(failure) in r.getMessage() or r.exc_info and r.exc_info[1] is failure]
    assert failed and all("req-42" in r.getMessage() for r in failed), [r.getMessage() for r in caplog.records]


def test_a_finished_stream_gives_its_slot_back(client):
    for _ in range(2):
        r = client.post("/v1/generate", json={"prompt": "x y", "max_new_tokens": 2, "stream": True})
        assert r.status_code == 200 and json.loads(sse_events(r.text)[-1])["done"] is True
        assert client.get("/health").json()["active_streams"] == 0


def test_a_stream_stopped_by_the_end_of_the_drain_ends_with_a_503_event():
    app = create_app(FakeGenerator(), CONFIG)
    with TestClient(app) as c:
        app.state.stop_decoding.set()                  # the drain is over: streams stop after their step
        r = c.post("/v1/generate", json={"prompt": "x y z", "max_new_tokens": 3, "stream": True})
    last = json.loads(sse_events(r.text)[-1])
    assert last["error"]["type"] == "unavailable" and "was not finished" in last["error"]["message"], last


def test_completion_chunks_carry_the_id_object_and_model_of_the_completion(client):
    r = client.post("/v1/completions", json={"prompt": "x y", "max_tokens": 2, "stream": True},
                    headers={"X-Request-Id": "req-1"})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks and all((c["id"], c["object"], c["model"]) == ("cmpl-req-1", "text_completion", "fake")
                          for c in chunks), chunks
    assert all(isinstance(c["created"], int) for c in chunks)


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_a_413(client):
    body = json.dumps({"prompt": "a b", "max_new_tokens": 2})
    body += " " * (CONFIG.max_body_bytes - len(body))
    r = client.post("/v1/generate", content=body.encode())
    assert r.status_code == 200, r.text
    r = client.post("/v1/generate", content=(body + " ").encode())
    assert r.status_code == 413 and "limit of 1000" in r.json()["error"]["message"], r.text


def test_a_body_without_content_length_is_cut_at_the_limit(client):
    def chunks():                                      # chunked transfer: no Content-Length to check first
        yield b'{"prompt": "a b", "x": "'
        for _ in range(20):
            yield b"y" * 100
        yield b'"}'

    r = client.post("/v1/generate", content=chunks())
    assert r.status_code == 413 and "over this server's limit of 1000 bytes" in r.json()["error"]["message"], r.text


def test_a_content_length_that_is_no_number_is_a_400():
    import asyncio

    from starlette.requests import Request

    from deploylm.serving.app import _read_body
    from deploylm.serving.schemas import ApiError

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/generate",
                       "headers": [(b"content-length", b"12abc")]}, receive)
    with pytest.raises(ApiError) as error:
        asyncio.run(_read_body(request, 1000))
    assert error.value.status == 400 and "Content-Length '12abc' is not a number" in error.value.message


def test_shutdown_waits_for_the_thread_of_a_stream_whose_client_left(monkeypatch):
    from deploylm.serving import app as app_module

    monkeypatch.setattr(app_module, "STREAM_STEP_WAIT_S", 5.0)
    app = create_app(FakeGenerator(), CONFIG)
    with TestClient(app):
        app.state.active_streams = 1                   # a stream thread still in its step
        ends = threading.Timer(0.3, lambda: setattr(app.state, "active_streams", 0))
        ends.start()
        started = time.monotonic()
    waited = time.monotonic() - started
    ends.join()
    assert 0.25 < waited < 4, waited


@pytest.mark.parametrize("name", ["max_batch_size", "max_queue", "max_streams", "max_prompt_tokens", "max_new_tokens",
                                  "max_beams", "max_prompts", "max_body_bytes"])
def test_a_limit_of_zero_is_refused(name):
    from deploylm.errors import UsageError

    with pytest.raises(UsageError, match=f"serve option {name}=0 is invalid: use a value >= 1"):
        ServeConfig(**{name: 0})


def test_a_request_at_every_limit_is_served(client):
    r = client.post("/v1/generate", json={"prompt": ["a b c d e f g h"] * 4, "max_new_tokens": 32, "num_beams": 8,
                                          "num_return_sequences": 8})
    assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text


def test_a_model_default_over_the_servers_max_new_tokens_is_capped():
    from deploylm.decoding.options import DecodingOptions

    class LongDefault(FakeGenerator):
        defaults = DecodingOptions.from_mapping({"max_new_tokens": CONFIG.max_new_tokens + 1})

    fake = LongDefault()
    with TestClient(create_app(fake, CONFIG)) as c:
        assert c.post("/v1/generate", json={"prompt": "a b"}).status_code == 200
    assert fake.calls[-1][1] == {"max_new_tokens": CONFIG.max_new_tokens}


def test_num_return_sequences_over_the_beam_limit_is_refused_when_sampling(client):
    r = client.post("/v1/generate", json={"prompt": "a", "do_sample": True, "num_beams": 1, "num_return_sequences": 9})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "num_return_sequences" and "num_return_sequences=9 is over this server's limit of 8" \
        in error["message"], error


def test_an_invalid_option_is_named_whatever_other_options_the_request_gives(client):
    r = client.post("/v1/generate", json={"prompt": "a", "num_beams": 2, "num_return_sequences": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_return_sequences", r.text


def test_a_prompt_with_a_nul_character_is_a_400(client):
    r = client.post("/v1/generate", json={"prompt": ["a", "b\x00c"]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["message"] == "prompt[1] contains a NUL character", error


def test_stream_null_does_not_stream_on_completions(client):
    r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, "stream": None})
    assert r.status_code == 200 and r.json()["object"] == "text_completion", r.text


@pytest.mark.parametrize("field, value", [("stop", []), ("suffix", ""), ("stop", None)])
def test_completions_accept_an_empty_stop_or_suffix(client, field, value):
    r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


def test_a_second_signal_stops_the_decodes_at_once_and_the_first_one_keeps_the_exit_status():
    """docs/serving.md: SIGTERM drains, a second one stops at once; the process exits with 143 (uvicorn re-raises
    the signals it captured)."""
    import signal

    from deploylm.serving.server import make_server

    fake = FakeGenerator()
    server = make_server(fake, ServeConfig(drain_timeout_s=30.0))
    app = server.config.app
    app.state.enter()                                   # a request in flight: the drain waits for it
    try:
        server.handle_exit(signal.SIGTERM, None)
        assert app.state.draining and not app.state.stop_decoding.is_set() and not server.should_exit
        assert signal.SIGTERM in server._captured_signals
        server.handle_exit(signal.SIGTERM, None)
        assert app.state.stop_decoding.is_set() and server.should_exit
    finally:
        app.state.leave()


def test_the_drain_stops_the_decodes_only_when_its_time_is_up():
    from deploylm.serving.middleware import ServerState
    from deploylm.serving.server import begin_drain

    class Server:
        should_exit = False

    state, server = ServerState(), Server()
    begin_drain(state, server, 5.0).join(5)            # nothing in flight: exits at once, decodes untouched
    assert server.should_exit and not state.stop_decoding.is_set()
    state.enter()
    server.should_exit = False
    begin_drain(state, server, 0.05).join(5)           # still in flight when the drain is over
    assert server.should_exit and state.stop_decoding.is_set()


def test_the_model_summary_of_an_artifact_has_its_manifest_and_no_path(tmp_path):
    from deploylm.artifact import FORMAT_VERSION
    from deploylm.profiles import load_profile
    from deploylm.serving.server import describe_model

    folder = tmp_path / "my-artifact"
    folder.mkdir()
    manifest = {"format_version": FORMAT_VERSION, "deploylm_version": "0.0", "created": "2026-11-30T00:00:00Z",
                "files": {}, "io": {}, "toolchain": {}, "profile": load_profile("int8").to_dict(),
                "source": {"kind": "gguf", "path": "/srv/secret/model.gguf"}, "parity": {"passed": True}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    summary = describe_model(str(folder), FakeGenerator())
    assert summary["name"] == "my-artifact" and summary["source"] == {"kind": "artifact", "name": "my-artifact"}
    assert summary["manifest"] == {"format_version": FORMAT_VERSION, "deploylm_version": "0.0",
                                   "created": "2026-11-30T00:00:00Z",
                                   "profile": {"name": "int8", "precision": "int8", "backends": ["onnx"]},  # of all it says
                                   "source": {"kind": "gguf", "path": "model.gguf"}, "parity": {"passed": True}}
    assert "/srv/secret" not in json.dumps(summary)


def test_serving_without_uvicorn_is_refused_with_the_install_hint(monkeypatch):
    import sys

    from deploylm.errors import MissingDependencyError
    from deploylm.serving.server import require_serving

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'deploylm\[serve\]'"):
        require_serving()


def test_a_port_in_use_is_refused_without_leaking_the_socket():
    import gc
    import socket
    import warnings

    from deploylm.errors import UsageError
    from deploylm.serving.server import bind_address

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(UsageError, match=f"--port {port}: already in use"):
                bind_address("127.0.0.1", port)
            gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/v1/completions"])
@pytest.mark.parametrize("model, sent", [
    ({"num_beams": 20}, {"num_beams": 8}),                                           # its beams, returning one
    ({"num_beams": 20, "num_return_sequences": 20}, {"num_beams": 8, "num_return_sequences": 8}),
])
def test_a_model_default_over_the_servers_max_beams_is_capped(endpoint, model, sent):
    """A model whose defaults name more beams (or sequences) than --max-beams: a request that sets neither is decoded
    with the server's limit, as a default max_new_tokens over --max-new-tokens is; every such request was a 400
    about a value the client never sent ("best_of=20 is over this server's limit of 8")."""
    from deploylm.decoding.options import DecodingOptions

    class WideDefault(FakeGenerator):
        defaults = DecodingOptions.from_mapping(model)

    fake = WideDefault()
    with TestClient(create_app(fake, CONFIG)) as c:
        r = c.post(endpoint, json={"prompt": "a b"})
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1] == {"max_new_tokens": CONFIG.max_new_tokens, **sent}
    used = fake.defaults.replace(**fake.calls[-1][1])      # what a real Generator decodes (the fake drops defaults)
    assert used.num_beams <= 8 and used.num_return_sequences == sent.get("num_return_sequences", 1)


def test_a_sampling_models_default_draws_over_max_beams_are_capped():
    """A model that samples 20 draws by default (num_return_sequences=20 with do_sample): a completions request
    without n gets --max-beams of them."""
    from deploylm.decoding.options import DecodingOptions

    class ManyDraws(FakeGenerator):
        defaults = DecodingOptions.from_mapping({"do_sample": True, "num_beams": 1, "num_return_sequences": 20})

    fake = ManyDraws()
    with TestClient(create_app(fake, CONFIG)) as c:
        r = c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text
    assert fake.calls[-1][1] == {"max_new_tokens": 2, "num_beams": 1, "do_sample": True, "num_return_sequences": 8}


@pytest.mark.parametrize("endpoint, body, param", [
    ("/v1/generate", {"num_beams": 9}, "num_beams"),
    ("/v1/generate", {"num_return_sequences": 9}, "num_return_sequences"),
    ("/v1/completions", {"best_of": 9}, "best_of"),
    ("/v1/completions", {"n": 9}, "n"),
])
def test_a_value_the_request_sends_over_max_beams_is_refused_whatever_the_models_defaults(endpoint, body, param):
    """Only what the request leaves out is capped: the client's own value over the limit is a 400 naming it (the
    completions field, best_of or n), over a model whose defaults are capped too."""
    from deploylm.decoding.options import DecodingOptions

    class WideDefault(FakeGenerator):
        defaults = DecodingOptions.from_mapping({"num_beams": 20})

    with TestClient(create_app(WideDefault(), CONFIG)) as c:
        error = c.post(endpoint, json={"prompt": "a", **body}).json()["error"]
    assert error["param"] == param and error["message"] == f"{param}=9 is over this server's limit of 8", error


@pytest.mark.parametrize("endpoint, field", [("/v1/generate", "num_return_sequences"), ("/v1/completions", "n")])
@pytest.mark.parametrize("model", [{"num_beams": 4, "num_return_sequences": 3},
                                   {"num_beams": 20, "num_return_sequences": 20}])    # over --max-beams too
def test_a_stream_over_a_model_that_returns_several_sequences_by_default_streams_the_best(endpoint, field, model):
    """A stream is one text: a model whose defaults return several sequences refused every stream that did not
    set them itself ("stream returns one sequence: n=3 must be 1", a field the client never sent). The default
    is lowered to 1 now; the request's own value other than 1 is still a 400 naming its field."""
    from deploylm.decoding.options import DecodingOptions

    class Several(FakeGenerator):
        defaults = DecodingOptions.from_mapping(model)

    with TestClient(create_app(Several(), CONFIG)) as c:
        r = c.post(endpoint, json={"prompt": "a b", "stream": True})
        sent = c.post(endpoint, json={"prompt": "a b", "stream": True, field: 2})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert (events[-1] == "[DONE]") if endpoint == "/v1/completions" else json.loads(events[-1])["done"], events
    assert sent.status_code == 400 and sent.json()["error"]["param"] == field, sent.text
    assert sent.json()["error"]["message"] == f"stream returns one sequence: {field}=2 must be 1", sent.text


def test_a_mounted_app_served_again_lets_the_batcher_thread_of_its_first_server_go():
    """Without its lifespan the batcher starts with the first request, and again under a later server (another
    event loop); the first one's decode thread must end then, not idle until the process exits."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    def batch_threads():
        return sum(t.name.startswith("deploylm-batch") for t in threading.enumerate())

    before = batch_threads()
    outer = Starlette(routes=[Mount("/llm", app=create_app(FakeGenerator(), CONFIG))])
    for _ in range(2):
        with TestClient(outer) as c:
            assert c.post("/llm/v1/generate", json={"prompt": "a b", "max_new_tokens": 2}).status_code == 200
    deadline = time.monotonic() + 3
    while batch_threads() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batch_threads() <= before + 1, [t.name for t in threading.enumerate()]


def test_make_server_serves_on_its_port_and_its_shutdown_stops_the_batcher():
    """The server that `deploylm serve` runs: on the port asked for, with the app's lifespan on (its shutdown
    finishes the queue, stops the batcher and waits for stream threads) and uvicorn's access log off (the app logs
    one line per request)."""
    import httpx

    from deploylm.serving.server import make_server
    from tests.reliability.conftest import free_port

    port = free_port()
    server = make_server(FakeGenerator(), CONFIG, port=port, log_level="warning")
    assert server.config.access_log is False
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a b", "max_new_tokens": 2}, timeout=10)
        assert r.status_code == 200, r.text
        api = server.config.app.app.state.api
        assert api.batcher is not None
    finally:
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive() and api.batcher is None


def test_a_conflict_with_a_lowered_default_names_only_the_lowered_values_it_is_about():
    """A min_new_tokens over the capped max_new_tokens was explained with every default the server lowered:
    "(max_new_tokens=32 (this server's limit), num_return_sequences=4 (...), num_beams=4 (...): applied because the
    request left them out)", beams the client's error has nothing to do with. The note names the value at fault."""
    from deploylm.decoding.options import DecodingOptions
    from deploylm.serving.schemas import ApiError, validate_options

    defaults = DecodingOptions(num_beams=5, num_return_sequences=5, max_new_tokens=50)
    with pytest.raises(ApiError) as caught:
        validate_options({"min_new_tokens": 40}, ServeConfig(max_beams=4, max_new_tokens=32), defaults)
    message = str(caught.value.body()["error"]["message"])
    assert message.endswith("(max_new_tokens=32 is this server's limit, applied because the request left "
                            "max_new_tokens out)"), message
    assert "num_beams" not in message and "num_return_sequences" not in message, message


@pytest.mark.parametrize("endpoint, field", [("/v1/completions", "max_tokens"), ("/v1/generate", "max_new_tokens")])
def test_a_refusal_mid_stream_is_the_error_the_request_gets_without_streaming(endpoint, field):
    """docs/serving.md: a failure after the stream started carries the message the request would get without
    streaming. A refusal the generator raises mid-decode (every token banned while sampling) did not: the stream's
    event kept the generator's wording ("lower max_new_tokens" on completions, whose client sends max_tokens) and
    had no param, where the same request without streaming named max_tokens."""
    from deploylm.errors import UsageError
    from deploylm.generator import TextStream

    refusal = UsageError("nothing left to sample at generated token 2 of prompt 1: the options ban every token "
                         "(no_repeat_ngram_size, min_new_tokens, bad_words_ids, suppress_tokens or sequence_bias); "
                         "relax them or lower max_new_tokens")

    class Refusing(FakeGenerator):
        def generate(self, prompts, *, stop=None, **options):
            raise refusal

        def stream(self, prompt, *, stop=None, **options):
            def pieces():
                yield " a"
                raise refusal
            return TextStream(pieces())

    with TestClient(create_app(Refusing(), CONFIG)) as c:
        plain = c.post(endpoint, json={"prompt": "a b", field: 3})
        streamed = c.post(endpoint, json={"prompt": "a b", field: 3, "stream": True})
    events = [json.loads(e) for e in sse_events(streamed.text) if e != "[DONE]"]
    assert plain.status_code == 400 and events[-1] == plain.json(), (events[-1], plain.json())


def test_the_default_max_new_tokens_room_knows_an_engines_window_without_a_model_window():
    """A TensorRT artifact whose model config names no window still has its engine's: the server's bound on a default
    max_new_tokens (window_room) must come from it, or every plain request would be refused by the engine's check."""
    import dataclasses
    from types import SimpleNamespace

    from deploylm.backends.base import EngineLimits, ModelInfo, SpecialTokens
    from deploylm.serving.app import window_room

    info = ModelInfo(is_encoder_decoder=False, vocab_size=10, special=SpecialTokens((1,), 0), max_positions=None,
                     engine=EngineLimits(positions=12, prompt_tokens=8))
    room = window_room(SimpleNamespace(info=info))
    assert room is not None and room(5) == 8 and room(9) == 0
    assert window_room(SimpleNamespace(info=dataclasses.replace(info, engine=None))) is None
