"""The HTTP API (in-process, Starlette's TestClient) over a scripted generator: shapes, errors, ids."""
from __future__ import annotations

import json
import logging

import pytest
from starlette.testclient import TestClient

from deploylm.decoding.options import DecodingOptions
from deploylm.errors import UsageError
from deploylm.generator import TextStream
from deploylm.serving import ServeConfig, create_app
from tests.reliability.fakes import FakeGenerator

CONFIG = ServeConfig(model_name="fake", max_prompt_tokens=8, max_new_tokens=32, max_body_bytes=400_000,
                     max_prompts=4, max_beams=8, model_summary={"profile": "fp32"})


@pytest.fixture()
def fake():
    return FakeGenerator()


@pytest.fixture()
def client(fake):
    with TestClient(create_app(fake, CONFIG)) as c:
        yield c


def alone(fake, prompt, **options):
    return FakeGenerator().generate([prompt], **options)[0]


def as_json(result):
    return {"prompt": result.prompt, "outputs": [
        {"text": s.text, "token_ids": s.token_ids, "score": s.score} for s in result.sequences]}


def sse_events(text):
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_generate_answers_each_prompt_as_decoded_alone(client, fake):
    r = client.post("/v1/generate", json={"prompt": ["one two three", "four five"], "num_beams": 2,
                                          "max_new_tokens": 5, "num_return_sequences": 2})
    assert r.status_code == 200, r.text
    expected = [as_json(alone(fake, p, num_beams=2, max_new_tokens=5, num_return_sequences=2))
                for p in ["one two three", "four five"]]
    assert r.json() == {"results": expected}
    assert fake.calls[-1][1] == {"num_beams": 2, "max_new_tokens": 5, "num_return_sequences": 2}


def test_generate_single_string_prompt(client, fake):
    r = client.post("/v1/generate", json={"prompt": "hello there", "max_new_tokens": 3})
    assert r.json()["results"] == [as_json(alone(fake, "hello there", max_new_tokens=3))]


def test_completions_openai_shape_and_option_mapping(client, fake):
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "a b c", "max_tokens": 3,
                                             "n": 2, "best_of": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert fake.calls[-1][1] == {"max_new_tokens": 3, "num_return_sequences": 2, "num_beams": 4}
    assert body["object"] == "text_completion" and body["model"] == "fake"
    assert body["id"] == "cmpl-" + r.headers["x-request-id"]
    want = alone(fake, "a b c", max_new_tokens=3, num_return_sequences=2, num_beams=4)
    assert [c["text"] for c in body["choices"]] == [s.text for s in want.sequences]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


@pytest.mark.parametrize("body, param, words", [
    ({"n": 100}, "n", "n=100 is over this server's limit of 8"),
    ({"n": 2, "best_of": 100}, "best_of", "best_of=100 is over this server's limit of 8"),
    ({"max_tokens": 100}, "max_tokens", "max_tokens=100 is over this server's limit of 32"),
])
def test_completions_errors_name_the_field_the_client_sent(client, body, param, words):
    r = client.post("/v1/completions", json={"prompt": "a", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error



def test_completions_accept_a_seed_in_a_request_that_does_not_sample(client, fake):
    """OpenAI clients send a seed with every request: accepted (and unused) where /v1/generate refuses it."""
    r = client.post("/v1/completions", json={"prompt": "a b", "seed": 3, "temperature": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1].get("do_sample") is not True
    assert "seed" not in fake.calls[-1][1]      # not passed on: the generator would be told of an option it ignores
    r = client.post("/v1/generate", json={"prompt": "a b", "seed": 3, "max_new_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text

def test_completions_temperature_turns_sampling_on(client, fake):
    """Sampling draws n independent samples (num_beams 1, OpenAI's meaning), whatever beams the model's
    defaults name; best_of still asks for beam sampling."""
    r = client.post("/v1/completions", json={"prompt": "a b", "temperature": 0.7, "seed": 3, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1] == {"temperature": 0.7, "seed": 3, "max_new_tokens": 2, "num_beams": 1, "do_sample": True}
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/completions", json={"prompt": "a b", "temperature": 0.7, "n": 8, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8, r.text
    assert fake.calls[-1][1]["num_beams"] == 1 and fake.calls[-1][1]["num_return_sequences"] == 8
    r = client.post("/v1/completions", json={"prompt": "a b", "top_p": 0.5, "n": 2, "best_of": 3, "max_tokens": 2})
    assert r.status_code == 200 and fake.calls[-1][1]["num_beams"] == 3, r.text


def test_completions_accept_the_off_values_clients_send(client, fake):
    """OpenAI client libraries send null / false / 0 for features they do not use; only a real use of an
    unsupported feature is refused."""
    off = {"stop": None, "logprobs": None, "echo": False, "presence_penalty": 0, "frequency_penalty": 0.0,
           "suffix": None, "logit_bias": {}, "stream": None}
    r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, **off})
    assert r.status_code == 200 and r.json()["object"] == "text_completion", r.text    # stream null: not streamed
    # objects of off values are off too: {"include_usage": false} was refused although it asks for nothing
    for field, value in (("stream_options", {"include_usage": False}), ("logit_bias", {"5": 0})):
        r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, "stream": True, field: value})
        assert r.status_code == 200, (field, r.text)
    for field, value in (("stop", ["\n"]), ("echo", True), ("presence_penalty", 0.5), ("logit_bias", {"5": 1}),
                         ("stream_options", {"include_usage": True})):
        r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_stream_sends_pieces_then_a_final_event(client, fake):
    r = client.post("/v1/generate", json={"prompt": "x y z", "max_new_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e) for e in sse_events(r.text)]
    want = alone(fake, "x y z", max_new_tokens=3).sequences[0].text
    assert [e["text"] for e in events[:-1]] == [" z", " y", " x"]
    assert events[-1] == {"done": True, "prompt": "x y z", "text": want, "finish_reason": "length"}
    r = client.post("/v1/generate", json={"prompt": "x EOS", "max_new_tokens": 3, "stream": True})
    assert json.loads(sse_events(r.text)[-1]) == {"done": True, "prompt": "x EOS", "text": " EOS", "finish_reason": "stop"}


@pytest.mark.parametrize("prompt, text, reason", [("x y", " y x", "length"), ("x EOS", " EOS", "stop")])
def test_completions_stream_ends_with_the_reason_it_ended_then_done(client, prompt, text, reason):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [reason]
    whole = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
    assert whole["choices"][0]["finish_reason"] == reason       # the same as without streaming


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"\xff\xfe{}", 400, None, "UTF-8"),
    (b"[1, 2]", 400, None, "JSON object"),
    (b"", 400, None, "empty"),
    (b'{"prompt": "a", "num_beams": NaN}', 400, None, "NaN"),
    (json.dumps({"max_new_tokens": 4}).encode(), 400, "prompt", "missing field 'prompt'"),
    (json.dumps({"prompt": 7}).encode(), 400, "prompt", "string or a list of strings"),
    (json.dumps({"prompt": ["a", 3]}).encode(), 400, "prompt", "string or a list of strings"),
    (json.dumps({"prompt": []}).encode(), 400, "prompt", "empty list"),
    (json.dumps({"prompt": "   "}).encode(), 400, "prompt", "only whitespace"),
    (json.dumps({"prompt": "a " * 9}).encode(), 400, "prompt", "9 tokens, over this server's limit of 8"),
    (b'{"prompt": "\\ud800 star"}', 400, "prompt", "prompt is not valid Unicode text: a lone surrogate at character 0"),
    (b"[" * 100000 + b"]" * 100000, 400, None, "nested too deeply"),
    (json.dumps({"prompt": ["a"] * 5}).encode(), 400, "prompt", "limit of 4 per request"),
    (json.dumps({"prompt": "a", "beams": 2}).encode(), 400, "beams", "unknown decoding option"),
    (json.dumps({"prompt": "a", "num_beams": "4"}).encode(), 400, "num_beams", "expected an integer"),
    (json.dumps({"prompt": "a", "num_beams": -1}).encode(), 400, "num_beams", "num_beams >= 1"),
    (json.dumps({"prompt": "a", "max_new_tokens": 10**12}).encode(), 400, "max_new_tokens", "limit of 32"),
    (json.dumps({"prompt": "a", "num_beams": 10**6}).encode(), 400, "num_beams", "limit of 8"),
    (json.dumps({"prompt": "a", "seed": 2**70, "do_sample": True}).encode(), 400, "seed", "out of range"),
    (json.dumps({"prompt": "a", "min_new_tokens": 40}).encode(), 400, "min_new_tokens",
     "(max_new_tokens=32 is this server's limit, applied because the request left max_new_tokens out)"),
    (json.dumps({"prompt": "a", "stream": "yes"}).encode(), 400, "stream", "true or false"),
    (json.dumps({"prompt": "a", "temperature": 0.7}).encode(), 400, "temperature", "add \"do_sample\": true"),
    (json.dumps({"prompt": "a", "top_k": 5, "seed": 1}).encode(), 400, "top_k", "top_k, seed apply only when sampling"),
    (json.dumps({"prompt": ["a", "b"], "stream": True}).encode(), 400, "prompt", "exactly one prompt"),
    (json.dumps({"prompt": "a", "x": "y" * 500_000}).encode(), 413, None, "limit of 400000"),
])
def test_bad_requests_get_a_json_4xx_naming_the_problem(client, body, status, param, words):
    r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"]
    assert client.post("/v1/generate", json={"prompt": "still serving"}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "logprobs": 3}, "logprobs"),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "a", "best_of": 2, "n": 3}, "n"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "n": 0}, "n"),                          # n also sets the beams: still n's fault
    ({"prompt": "a", "stream": True, "n": 2}, "n"),
])
def test_completions_errors_name_the_openai_field(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    if "n" in body:
        assert f"n={body['n']}" in r.json()["error"]["message"], r.text     # the value the client sent
    message = r.json()["error"]["message"]                                 # advice in the client's terms too
    assert not any(f"{option}" in message for option, field in (("max_new_tokens", "max_tokens"),
               ("num_return_sequences", "n"), ("num_beams", "best_of")) if field in body), message


@pytest.mark.parametrize("body, param, words", [
    ({"n": 2, "best_of": 1}, "n", "use best_of >= n or a temperature > 0 (sampling)"),
    ({"n": 2, "best_of": 1, "temperature": 0}, "n", "use best_of >= n or a temperature > 0 (sampling)"),
    ({"temperature": -1}, "temperature", "(or temperature 0 for greedy decoding)"),
    ({"temperature": 1e-9}, "temperature", "(or temperature 0 for greedy decoding)"),
])
def test_completions_advice_names_no_do_sample(client, body, param, words):
    """/v1/completions refuses a do_sample field (sampling is a temperature > 0): its advice must not ask for one."""
    r = client.post("/v1/completions", json={"prompt": "a", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and "do_sample" not in error["message"], error


def test_long_prompts_are_judged_by_tokens_not_characters(client):
    """Whitespace runs and rules of "=" are few tokens for many characters (SmolLM2: 9,000 spaces are 143
    tokens): only a prompt beyond CHARS_PER_TOKEN_CAP characters per allowed token is refused untokenized."""
    from deploylm.serving.schemas import CHARS_PER_TOKEN_CAP

    sparse = "one" + " " * 1000 + "two"                      # 2 tokens here, 1006 characters (125 per token allowed)
    assert client.post("/v1/generate", json={"prompt": sparse, "max_new_tokens": 2}).status_code == 200
    r = client.post("/v1/generate", json={"prompt": "x" * (CHARS_PER_TOKEN_CAP * 8 + 1)})
    assert r.status_code == 400 and "far over this server's limit of 8 tokens" in r.json()["error"]["message"]


def test_generator_usage_error_is_a_400_and_failure_a_500(client):
    r = client.post("/v1/generate", json={"prompt": "BAD one"})
    assert r.status_code == 400 and "scripted refusal" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"prompt": "BOOM"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert client.post("/v1/generate", json={"prompt": "fine"}).status_code == 200


@pytest.mark.parametrize("path, key", [("/v1/generate", "max_new_tokens"), ("/v1/completions", "max_tokens")])
def test_errors_name_a_prompt_by_its_json_path_whoever_refuses_it(client, path, key):
    """The server's own checks say prompt[1] (the JSON index) and the generator's said "prompt 2" (1-based,
    as the CLI counts): one endpoint answered in two styles. Both are now the JSON path, "prompt" alone for
    a string."""
    def message(prompt):
        r = client.post(path, json={"prompt": prompt, key: 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        return r.json()["error"]["message"]

    assert message(["fine", "  "]).startswith("prompt[1] is only whitespace: expected some text")  # the server's
    assert message("").startswith("prompt is empty: expected some text")                            # own check
    assert message(["fine", "BAD one"]).startswith("prompt[1] contains BAD")        # the generator's
    assert message("BAD one").startswith("prompt contains BAD")
    assert message(["fine", "ok", "BAD one", "BAD two"]).startswith("prompt[2] contains BAD")


@pytest.mark.parametrize("prompt, words", [("a b", "of prompt: "), (["a b"], "of prompt[0]: ")])
def test_a_refusal_during_a_stream_names_the_prompt_by_its_json_path(prompt, words):
    class Refusing(FakeGenerator):
        def stream(self, prompt, *, stop=None, **options):
            def pieces():
                yield " a"
                raise UsageError("nothing left to sample at generated token 2 of prompt 1: scripted")
            return TextStream(pieces())

    with TestClient(create_app(Refusing(), CONFIG)) as c:
        r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 3, "stream": True})
    last = json.loads(sse_events(r.text)[-1])
    assert words in last["error"]["message"], last


def test_request_ids_are_echoed_generated_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="deploylm.serve"):
        r = client.post("/v1/generate", json={"prompt": "a"}, headers={"X-Request-Id": "abc-123"})
        r2 = client.post("/v1/generate", json={"prompt": "a"}, headers={"X-Request-Id": "bad id\twith tab"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(r2.headers["x-request-id"]) == 32 and r2.headers["x-request-id"] != "bad id\twith tab"
    assert any("abc-123 POST /v1/generate 200" in m for m in caplog.messages)


def test_the_app_mounted_in_another_app_answers_without_its_own_lifespan(fake):
    """docs/serving.md says to mount create_app's app; Starlette runs only the outer app's lifespan, and the
    batcher that the lifespan starts was missing: every request that was not a stream was a 500
    (AssertionError)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/llm", app=create_app(fake, CONFIG))])
    with TestClient(outer) as c:
        r = c.post("/llm/v1/generate", json={"prompt": "one two", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json() == {"results": [as_json(alone(fake, "one two", max_new_tokens=2))]}
        assert c.post("/llm/v1/completions", json={"prompt": "one two", "max_tokens": 2}).status_code == 200


def test_health_models_and_unknown_routes(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0       # an idle server: /health is not counted
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake" and models["data"][0]["deploylm"] == {"profile": "fp32"}
    assert isinstance(models["data"][0]["created"], int)                   # OpenAI's Model has it
    assert client.get("/v1/models/fake").json() == models["data"][0]       # models.retrieve("fake")
    other = client.get("/v1/models/gpt-4")
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    assert "model 'gpt-4' is not served here: this server serves 'fake'" in other.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.get("/v1/generate").status_code == 405


def test_draining_server_answers_503_with_retry_after(fake):
    app = create_app(fake, CONFIG)
    with TestClient(app) as client:
        app.state.draining = True
        r = client.post("/v1/generate", json={"prompt": "a"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "shutting down" in r.json()["error"]["message"]
    assert fake.calls == []


def test_shutdown_gives_up_on_a_stream_still_decoding_after_its_wait_and_says_so(fake, monkeypatch, caplog):
    """Shutdown waits for the threads of streams whose clients left, but not forever: past the wait it logs
    how many are still decoding and returns."""
    from deploylm.serving import app as app_module

    monkeypatch.setattr(app_module, "STREAM_STEP_WAIT_S", 0.05)
    app = create_app(fake, CONFIG)
    with caplog.at_level(logging.WARNING, logger="deploylm.serve"):
        with TestClient(app):
            app.state.active_streams = 1          # a stream thread that never ends its step
    assert "1 stream(s) still decoding after 0s at shutdown" in caplog.text


def test_web_stack_is_imported_lazily_with_an_install_hint(monkeypatch, fake):
    import subprocess
    import sys

    code = "import sys, deploylm.serve, deploylm.commands.serve; print('starlette' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    from deploylm.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "starlette.applications", None)  # as if `deploylm[serve]` were absent
    with pytest.raises(MissingDependencyError, match=r"pip install 'deploylm\[serve\]'"):
        create_app(fake, CONFIG)


@pytest.mark.parametrize("body, options", [
    ({"temperature": 0, "top_p": 0.5}, {}),                                # temperature 0: deterministic
    ({"temperature": 0.0}, {}),
    ({"top_p": 0}, {}),                                                    # top_p 0 alone: no sampling
    ({"temperature": 0.7, "top_p": 0}, {"temperature": 0.7, "top_k": 1, "do_sample": True, "num_beams": 1}),
])
def test_completions_zero_temperature_or_top_p_is_deterministic_as_openai(client, fake, body, options):
    r = client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1] == {"max_new_tokens": 2, **options}


class _SamplesByDefault(FakeGenerator):
    """A model whose defaults sample with beams (a profile's `[generation]` with do_sample = true)."""

    defaults = DecodingOptions.from_mapping({"do_sample": True, "num_beams": 4, "temperature": 0.9})


@pytest.mark.parametrize("body, sample, beams, top_k", [
    ({"temperature": 0}, False, 4, 0),                 # deterministic, as the docs say, not the model's sampling
    ({"temperature": 0, "top_p": 0.5, "seed": 1}, False, 4, 0),
    ({"top_p": 0}, True, 1, 1),                        # only the most likely token
    ({"n": 2}, True, 1, 0),                            # a sampling request: n independent samples
    ({"n": 2, "best_of": 3}, True, 3, 0),
])
def test_completions_openai_meanings_hold_over_a_model_that_samples_by_default(body, sample, beams, top_k):
    """temperature 0 was sent on as "no temperature", so a model whose defaults sample sampled it anyway (five
    seeds, five texts), top_p 0 sampled the whole distribution, and n took n beams of beam sampling."""
    fake = _SamplesByDefault()
    with TestClient(create_app(fake, CONFIG)) as c:
        r = c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    used = fake.defaults.replace(**fake.calls[-1][1])
    assert (used.do_sample, used.num_beams, used.top_k) == (sample, beams, top_k), fake.calls[-1][1]


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_completions_false_is_no_zero_temperature_or_top_p(client, fake, field):
    """JSON's false is no number: `"temperature": false` was taken as temperature 0 (greedy) because False == 0 in
    Python, while `true` was refused; both are now refused as the number they are not."""
    for value in (False, True):
        r = client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (value, r.text)
        assert "expected a number" in r.json()["error"]["message"], r.text


def test_completions_n_zero_names_n_in_the_advice(client):
    r = client.post("/v1/completions", json={"prompt": "a", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "num_beams" not in r.json()["error"]["message"] and "use n >= 1" in r.json()["error"]["message"]


def test_completions_with_several_prompts_list_choices_prompt_by_prompt_and_count_every_token(client, fake):
    """OpenAI's layout: the n choices of prompt i are choices i*n .. i*n+n-1, indexed 0.. over the whole list;
    usage counts the tokens of every prompt and of every returned completion."""
    prompts = ["a b c", "d e"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 3, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    want = [s for p in prompts for s in alone(fake, p, max_new_tokens=3, num_return_sequences=2, num_beams=2).sequences]
    assert [c["text"] for c in body["choices"]] == [s.text for s in want]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 3 + 2, "completion_tokens": 4 * 3, "total_tokens": 5 + 12}


def test_a_request_may_have_as_many_prompts_as_the_limit(client):
    r = client.post("/v1/generate", json={"prompt": ["a", "b", "c", "d"], "max_new_tokens": 1})   # max_prompts=4
    assert r.status_code == 200 and len(r.json()["results"]) == 4, r.text


@pytest.mark.parametrize("body", [{"top_p": 1}, {"top_p": 1.0, "seed": None}, {"temperature": None, "n": None,
                                                                              "best_of": None, "top_p": None}])
def test_completions_top_p_one_and_null_fields_change_nothing(client, fake, body):
    """top_p 1 keeps every token (no sampling, as OpenAI); a field sent as null takes its default. A request that
    does not sample passes no sampling option on (top_p 1 changes nothing there)."""
    r = client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, **body})
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1] == {"max_new_tokens": 2}


def test_a_score_that_is_not_finite_is_null_in_the_json(fake):
    """JSON has no -Infinity: such a score (an output the processors ruled out) is answered as null, not a 500."""
    class MinusInf(FakeGenerator):
        @staticmethod
        def _answer(prompt, opts):
            result = FakeGenerator._answer(prompt, opts)
            return type(result)(prompt, [type(s)(s.text, s.token_ids, float("-inf")) for s in result.sequences])

    with TestClient(create_app(MinusInf(), CONFIG)) as c:
        r = c.post("/v1/generate", json={"prompt": "a b", "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    assert [o["score"] for o in r.json()["results"][0]["outputs"]] == [None]


def test_a_decode_stopped_by_the_end_of_the_drain_is_a_503_with_retry_after():
    """docs/serving.md: every 503 comes with Retry-After: 1, the one of a decode that the end of the drain
    stopped too (its client is told to retry on another instance)."""
    fake = FakeGenerator(delay=0.5)
    app = create_app(fake, CONFIG)
    with TestClient(app) as client:
        app.state.stop_decoding.set()              # the drain is over: decodes stop after their step
        r = client.post("/v1/generate", json={"prompt": "a b"})
    assert r.status_code == 503 and "was not finished" in r.json()["error"]["message"], r.text
    assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"


def test_requests_that_do_not_sample_share_a_batch_whatever_seed_they_carry():
    """OpenAI clients send a random seed with every request; a request that does not sample ignores it (documented)
    but the seed stayed in its batch key, so no two such requests were ever batched together."""
    from deploylm.serving.schemas import parse_completion

    keys = {parse_completion({"prompt": "a b", "max_tokens": 2, "seed": seed}, CONFIG, len, DecodingOptions())
            .batch_key() for seed in (1, 2, 3)}
    assert len(keys) == 1
    sampled = [parse_completion({"prompt": "a b", "max_tokens": 2, "seed": 1, "temperature": 0.5}, CONFIG, len,
                                DecodingOptions()).batch_key() for _ in range(2)]
    assert sampled[0] != sampled[1]                     # sampling never shares: its random stream would


def test_a_model_that_samples_by_default_never_shares_a_batch_on_v1_generate():
    """/v1/generate without do_sample on a model whose defaults sample (a profile's [generation] do_sample = true):
    the request samples, yet its key came from the explicit options only, so two such requests shared a batch and
    a seeded one's output depended on the company it got."""
    from deploylm.serving.schemas import parse_generate

    defaults = DecodingOptions.from_mapping({"do_sample": True, "num_beams": 1})
    keys = [parse_generate({"prompt": "a b", "max_new_tokens": 2, "seed": 3}, CONFIG, len, defaults).batch_key()
            for _ in range(2)]
    assert keys[0] != keys[1]


def test_a_wrong_method_is_a_405_that_says_which_methods_are_allowed(client):
    """RFC 9110: a 405 carries Allow; the JSON error handler dropped the header Starlette gave it."""
    r = client.get("/v1/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    r = client.post("/health")
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}, r.headers
