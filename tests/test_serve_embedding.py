"""Embedding: a Generator shared by many threads, the web-framework example, and the server over a real
tiny model answering exactly what the Generator answers."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import random
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import deploylm
from deploylm.serving import ServeConfig, create_app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_starlette.py"
PROMPTS = ["the quick brown fox", "hello world", "beam search keeps the best partial sentences", "one two"]
OPTIONS = [{"num_beams": 1, "max_new_tokens": 5}, {"num_beams": 3, "max_new_tokens": 4, "num_return_sequences": 2},
           {"do_sample": True, "seed": 7, "top_k": 20, "max_new_tokens": 4}]


@pytest.fixture(scope="module")
def generator(tiny_gpt2_dir):
    return deploylm.load(tiny_gpt2_dir, backend="torch")


def calls():
    """(prompt list, options) pairs: single prompts and whole batches, beam, greedy and seeded sampling."""
    return [([p], o) for p in PROMPTS for o in OPTIONS] + [(PROMPTS, o) for o in OPTIONS]


def test_many_threads_on_one_generator_get_the_sequential_results(generator):
    work = calls()
    sequential = [generator.generate(p, **o) for p, o in work]
    streamed = [list(generator.stream(p, max_new_tokens=6)) for p in PROMPTS]
    jobs = [("generate", i) for i in range(len(work))] * 2 + [("stream", i) for i in range(len(PROMPTS))] * 2
    random.Random(0).shuffle(jobs)

    def run(job):
        kind, i = job
        if kind == "generate":
            return generator.generate(work[i][0], **work[i][1])
        return list(generator.stream(PROMPTS[i], max_new_tokens=6))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(run, jobs))
    for (kind, i), got in zip(jobs, outcomes):
        assert got == (sequential[i] if kind == "generate" else streamed[i]), (kind, i)


def test_embedding_example_answers_like_the_generator(tiny_gpt2_dir, generator):
    spec = importlib.util.spec_from_file_location("embed_starlette", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with TestClient(example.build_app(str(tiny_gpt2_dir), "torch")) as client:
        r = client.post("/complete", json={"text": "the quick brown fox", "max_new_tokens": 5})
        bad = {"missing text": client.post("/complete", json={"txt": "no"}),
               "malformed JSON": client.post("/complete", content=b'{bad'),
               "text not a string": client.post("/complete", json={"text": 12}),
               "fractional max_new_tokens": client.post("/complete", content=b'{"text": "a", "max_new_tokens": 2.7}'),
               "infinite max_new_tokens": client.post("/complete", content=b'{"text": "a", "max_new_tokens": 1e999}'),
               "boolean max_new_tokens": client.post("/complete", json={"text": "a", "max_new_tokens": True}),
               "a body that is not an object": client.post("/complete", json=["the quick brown fox"])}
    want = generator.generate(["the quick brown fox"], num_beams=4, max_new_tokens=5)[0].sequences[0]
    assert r.status_code == 200 and r.json() == {"text": want.text, "score": want.score}
    for case, response in bad.items():       # a client's mistake is a 400 with a message, never a 500
        assert response.status_code == 400 and response.json()["error"].startswith("bad request: "), (case, response.text)


def test_server_over_a_real_model_answers_what_the_generator_answers(generator):
    with TestClient(create_app(generator, ServeConfig(max_new_tokens=8))) as client:
        r = client.post("/v1/generate", json={"prompt": PROMPTS[:2], "num_beams": 3, "max_new_tokens": 4,
                                              "num_return_sequences": 2})
        c = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 4, "best_of": 2})
        default = client.post("/v1/generate", json={"prompt": PROMPTS[3]})
    want = generator.generate(PROMPTS[:2], num_beams=3, max_new_tokens=4, num_return_sequences=2)
    assert r.json()["results"] == [
        {"prompt": res.prompt, "outputs": [{"text": s.text, "token_ids": list(s.token_ids), "score": s.score}
                                           for s in res.sequences]} for res in want]
    best = generator.generate(PROMPTS[2], num_beams=2, max_new_tokens=4)[0].sequences[0]
    assert c.json()["choices"][0]["text"] == best.text
    assert c.json()["usage"]["prompt_tokens"] == generator.count_tokens(PROMPTS[2])
    capped = generator.generate(PROMPTS[3], max_new_tokens=8)[0].sequences[0]  # the server caps the default 64
    assert default.json()["results"][0]["outputs"][0]["token_ids"] == list(capped.token_ids)


def test_an_app_made_without_a_description_describes_its_generator(generator):
    """create_app(generator) mounted in a user's service: /v1/models and /health name the generator's model and
    backend (they said "model" and {}); a model_name the caller chose is kept."""
    with TestClient(create_app(generator)) as client:
        models, health = client.get("/v1/models").json(), client.get("/health").json()
    described = models["data"][0]
    assert described["id"] == generator.info.name and health["model"] == generator.info.name
    assert described["deploylm"] == {"name": generator.info.name, "backend": "torch",
                                     "is_encoder_decoder": False, "vocab_size": generator.info.vocab_size,
                                     "max_positions": generator.info.max_positions}
    with TestClient(create_app(generator, ServeConfig(model_name="llm"))) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "llm"
        assert client.get("/v1/models/llm").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_an_option_the_model_refuses_is_a_400_naming_it_streamed_or_not(generator, stream):
    """A sequence_bias token past the vocabulary: refused before any 200 (a stream's too), param named."""
    outside = generator.info.vocab_size + 5
    with TestClient(create_app(generator, ServeConfig(max_new_tokens=8))) as client:
        r = client.post("/v1/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3, "stream": stream,
                                              "sequence_bias": [[[outside], 1.0]]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "sequence_bias" and str(outside) in r.json()["error"]["message"]
        assert client.post("/v1/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2,
                                                 "stream": stream}).status_code == 200


def test_a_prompt_over_the_window_is_named_by_its_place_in_the_request_with_advice_that_applies(generator):
    """The 10th prompt of a request is prompt[9] (its JSON path), not its place in a chunk of max_batch_size prompts; the
    HTTP API has no truncation option to advise; completions name the field the client sent (max_tokens)."""
    long = "the quick brown fox " * 8 + "jumps over"   # fits tiny GPT-2's window of 128, not with 8 new tokens
    assert 121 < generator.count_tokens(long) <= 128
    with TestClient(create_app(generator, ServeConfig(max_new_tokens=8, max_batch_size=8))) as client:
        r = client.post("/v1/generate", json={"prompt": ["hello"] * 9 + [long], "max_new_tokens": 8, "num_beams": 1})
        c = client.post("/v1/completions", json={"prompt": long, "max_tokens": 8})
        alone = client.post("/v1/completions", json={"prompt": long * 2, "max_tokens": 8})   # over it by itself
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    message = r.json()["error"]["message"]
    assert message.startswith("prompt[9] has ") and "lower max_new_tokens" in message and "truncation" not in message
    assert c.status_code == 400 and "max_tokens=8" in c.json()["error"]["message"], c.text
    assert c.json()["error"]["message"].startswith("prompt has "), c.text        # a string: no index
    assert "max_new_tokens" not in c.json()["error"]["message"] and "truncation" not in c.json()["error"]["message"]
    assert alone.status_code == 400 and alone.json()["error"]["message"].endswith(
        "over the model's window of 128 before any new token: shorten it"), alone.text


def test_a_stream_read_on_its_own_thread_lets_calls_from_the_thread_pool_wait_for_it(generator):
    """docs/serving.md: in an async framework a stream is read with stream_pieces (its own thread), and other
    requests' generate calls on the framework's thread pool wait for it and get what they get alone (read
    through the pool instead, one that lands on the thread that read the first piece is refused)."""
    import asyncio

    from starlette.concurrency import run_in_threadpool

    from deploylm.serving.streaming import stream_pieces

    want_text = "".join(generator.stream(PROMPTS[2], num_beams=1, max_new_tokens=8))
    want = generator.generate([PROMPTS[1]], max_new_tokens=4)

    async def service():
        pieces = stream_pieces(lambda stop: generator.stream(PROMPTS[2], num_beams=1, max_new_tokens=8, stop=stop))
        first = await asyncio.wait_for(pieces.__anext__(), 60)
        others = [asyncio.ensure_future(run_in_threadpool(generator.generate, [PROMPTS[1]], max_new_tokens=4))
                  for _ in range(4)]
        rest = [piece async for piece in pieces]
        return first + "".join(rest), await asyncio.wait_for(asyncio.gather(*others), 60)

    text, results = asyncio.run(service())
    assert text == want_text and results == [want] * 4


def test_a_max_tokens_over_the_window_names_the_field_the_client_sent(generator):
    """max_tokens alone over the window (no truncation could help): param is max_tokens, as for every other
    error about it, not null because the message was rewritten before the option was looked up."""
    with TestClient(create_app(generator, ServeConfig(max_new_tokens=256))) as client:
        c = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 200})
        g = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 200})
    assert c.status_code == 400 and c.json()["error"]["param"] == "max_tokens", c.text
    assert c.json()["error"]["message"].startswith("max_tokens=200 leaves no room"), c.text
    assert g.status_code == 400 and g.json()["error"]["param"] == "max_new_tokens", g.text


def test_a_default_max_new_tokens_over_the_window_is_lowered_to_what_fits(tiny_llama_dir, tmp_path):
    """A model whose window (16) is below its default max_new_tokens (64): a request that leaves the field out was
    a 400 (every plain request on such a model, "lower max_tokens to at most 16 (the default: ...)"); it now
    decodes as many tokens as fit after its longest prompt, streamed or not, with finish_reason "length" where
    that cut it, as OpenAI-style servers default max_tokens to what is left of the context. A value the request
    sends over the window is still a 400 before any work, naming the field that endpoint takes."""
    import json

    gen = deploylm.load(_folder_with(tiny_llama_dir, tmp_path / "llama16", config={"max_position_embeddings": 16}),
                        backend="torch")
    assert gen.options().max_new_tokens > 16
    no_end = {"sequence_bias": [[[gen.info.special.eos_token_ids[0]], -100.0]]}   # runs to its max_new_tokens
    short, longer = "hello", "hello world again"
    fits = 16 - gen.count_tokens(longer) + 1          # the last generated token is never fed back
    assert 1 < fits < 16 - gen.count_tokens(short) + 1
    with TestClient(create_app(gen, ServeConfig())) as client:
        g = client.post("/v1/generate", json={"prompt": [short, longer], **no_end})
        s = client.post("/v1/generate", json={"prompt": longer, "stream": True, **no_end})
        c = client.post("/v1/completions", json={"prompt": longer})
        over = client.post("/v1/completions", json={"prompt": longer, "max_tokens": fits + 1})
        least = client.post("/v1/generate", json={"prompt": longer, "min_new_tokens": fits + 1})
    want = gen.generate([short, longer], max_new_tokens=fits, **no_end)   # the longest prompt bounds the request
    assert g.status_code == 200, g.text
    got = [r["outputs"][0]["token_ids"] for r in g.json()["results"]]
    assert got == [list(r.sequences[0].token_ids) for r in want]
    assert [len(r.sequences[0].token_ids) for r in want] == [fits, fits]
    last = json.loads([line for line in s.text.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    assert last["text"] == want[1].sequences[0].text and last["finish_reason"] == "length", s.text
    best = gen.generate(longer, max_new_tokens=fits)[0].sequences[0]
    assert c.status_code == 200 and c.json()["choices"][0]["text"] == best.text, c.text
    assert c.json()["usage"]["completion_tokens"] == len(best.token_ids) <= fits, c.text
    assert over.status_code == 400 and over.json()["error"]["param"] == "prompt", over.text
    assert f"with max_tokens={fits + 1} that needs 17 positions" in over.json()["error"]["message"], over.text
    assert least.status_code == 400 and least.json()["error"]["param"] == "min_new_tokens", least.text
    assert least.json()["error"]["message"].endswith(
        f"(max_new_tokens={fits} is what the model's window has room for after the prompt, applied because the "
        "request left max_new_tokens out)"), least.text


def test_a_default_max_new_tokens_over_an_encoder_decoders_window_is_lowered_to_it(seed_seq2seq_dir, tmp_path):
    """An encoder-decoder's output has the decoder's window whatever the source: a default over it is lowered to it
    (it was a 400, "max_new_tokens=100 is over the model's window of 64")."""
    gen = deploylm.load(_folder_with(seed_seq2seq_dir, tmp_path / "s2s", generation={"max_new_tokens": 100}),
                        backend="torch")
    window = gen.info.max_positions
    assert gen.info.is_encoder_decoder and gen.options().max_new_tokens == 100 > window
    with TestClient(create_app(gen, ServeConfig())) as client:
        r = client.post("/v1/generate", json={"prompt": "hello", "num_beams": 1})
    assert r.status_code == 200, r.text
    want = gen.generate("hello", num_beams=1, max_new_tokens=window)[0].sequences[0]
    assert r.json()["results"][0]["outputs"][0]["token_ids"] == list(want.token_ids)


def test_a_prompt_over_the_window_by_itself_names_no_max_tokens_sent_or_not(generator):
    """A prompt over the window before any new token is refused for itself: the message named max_tokens=8 (as if
    fewer new tokens would help, and as if the client had sent it when it was the default); now it names neither.
    A prompt that fits alone with fewer new tokens names the max_tokens the client sent (a default is lowered to
    what fits: test_a_default_max_new_tokens_over_the_window_is_lowered_to_what_fits)."""
    over = "the quick brown fox " * 30                          # 423 tokens: over tiny GPT-2's window of 128
    fits_alone = "the quick brown fox " * 8 + "jumps over"      # 122 tokens: fits, not with 8 new ones
    with TestClient(create_app(generator, ServeConfig(max_new_tokens=8))) as client:
        c = client.post("/v1/completions", json={"prompt": over, "max_tokens": None})   # null: not given
        g = client.post("/v1/generate", json={"prompt": over, "num_beams": 1})
        sent = client.post("/v1/completions", json={"prompt": fits_alone, "max_tokens": 8})
    for r in (c, g):
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert r.json()["error"]["message"] == ("prompt has 423 tokens, over the model's window of 128 before any new "
                                                "token: shorten it"), r.text
    assert sent.status_code == 400 and "with max_tokens=8 that needs 129 positions" in sent.json()["error"]["message"]
    assert "the default" not in sent.json()["error"]["message"], sent.text


def _folder_with(src, dest, *, config=None, generation=None):
    """A copy of the model folder `src` with config.json / generation_config.json entries replaced."""
    import json
    import shutil

    shutil.copytree(src, dest)
    for name, changes in (("config.json", config), ("generation_config.json", generation)):
        if changes:
            path = dest / name
            old = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**old, **changes}))
    return dest


def test_a_models_default_beams_over_max_beams_decode_with_the_limit(tiny_gpt2_dir, tmp_path):
    """A generation_config with num_beams=5 and num_return_sequences=5 served with --max-beams 4: a request that sets
    neither was a 400 ("num_return_sequences=5 is over this server's limit of 4"), on both endpoints; it now
    answers what the Generator answers with 4 beams and 4 sequences, and a stream streams the best of 4 beams."""
    import json

    gen = deploylm.load(_folder_with(tiny_gpt2_dir, tmp_path / "beams5",
                                     generation={"num_beams": 5, "num_return_sequences": 5}), backend="torch")
    assert (gen.defaults.num_beams, gen.defaults.num_return_sequences) == (5, 5)
    with TestClient(create_app(gen, ServeConfig(max_beams=4, max_new_tokens=4))) as client:
        g = client.post("/v1/generate", json={"prompt": PROMPTS[0]})
        c = client.post("/v1/completions", json={"prompt": PROMPTS[0]})
        s = client.post("/v1/generate", json={"prompt": PROMPTS[0], "stream": True})   # one sequence, 4 beams
    assert g.status_code == 200 and c.status_code == 200 and s.status_code == 200, (g.text, c.text, s.text)
    want = gen.generate(PROMPTS[0], num_beams=4, num_return_sequences=4, max_new_tokens=4)[0].sequences
    assert [o["token_ids"] for o in g.json()["results"][0]["outputs"]] == [list(s.token_ids) for s in want]
    assert [choice["text"] for choice in c.json()["choices"]] == [s.text for s in want]
    last = json.loads([line for line in s.text.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    streamed = "".join(gen.stream(PROMPTS[0], num_beams=4, num_return_sequences=1, max_new_tokens=4))
    assert last["done"] and last["text"] == streamed, last


def test_a_request_checked_against_the_models_lowered_defaults_not_its_raw_ones(tiny_gpt2_dir, tmp_path):
    """num_beams=5 and num_return_sequences=5 by default, served with --max-beams 4: a plain request gets 4 beams
    and 4 sequences, but one that sent num_beams=4 (best_of 4) was a 400 about num_return_sequences=5 (n=5), which
    the client never sent and the server would have lowered to 4; a stream with num_beams=2 was refused the same
    way, where a stream returns one sequence. The request is now checked against the defaults as lowered."""
    import json

    gen = deploylm.load(_folder_with(tiny_gpt2_dir, tmp_path / "beams5",
                                     generation={"num_beams": 5, "num_return_sequences": 5}), backend="torch")
    with TestClient(create_app(gen, ServeConfig(max_beams=4, max_new_tokens=4))) as client:
        g = client.post("/v1/generate", json={"prompt": PROMPTS[0], "num_beams": 4})
        c = client.post("/v1/completions", json={"prompt": PROMPTS[0], "best_of": 4})
        s = client.post("/v1/generate", json={"prompt": PROMPTS[0], "num_beams": 2, "stream": True})
        over = client.post("/v1/generate", json={"prompt": PROMPTS[0], "num_beams": 2})   # 5 > 2, not over a cap
    assert g.status_code == 200 and c.status_code == 200 and s.status_code == 200, (g.text, c.text, s.text)
    want = gen.generate(PROMPTS[0], num_beams=4, num_return_sequences=4, max_new_tokens=4)[0].sequences
    assert [o["token_ids"] for o in g.json()["results"][0]["outputs"]] == [list(s.token_ids) for s in want]
    assert [choice["text"] for choice in c.json()["choices"]] == [s.text for s in want]
    last = json.loads([line for line in s.text.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    assert last["text"] == "".join(gen.stream(PROMPTS[0], num_beams=2, num_return_sequences=1, max_new_tokens=4))
    assert over.status_code == 400 and over.json()["error"]["param"] == "num_beams", over.text   # what it sent
    assert over.json()["error"]["message"].startswith(
        "decoding option num_return_sequences=4 is invalid: beam search returns at most num_beams=2 sequences"), over.text
    assert over.json()["error"]["message"].endswith("(num_return_sequences=4 is this server's limit, applied because "
                                                    "the request left num_return_sequences out)"), over.text


def test_a_models_default_min_new_tokens_over_the_capped_max_new_tokens_is_lowered_to_it(tiny_gpt2_dir, tmp_path):
    """generation_config min_new_tokens=40 served with --max-new-tokens 32 on a real model: a request that gives
    neither decodes exactly 32 tokens (the model's minimum lowered to the cap: the end token is banned to the end, as
    transformers does with such a generation_config), streamed or not, and never fails mid-way; a min_new_tokens the
    request sends over the cap is a 400 saying where the 32 comes from. (A fake generator never applied the model's
    defaults, so only the real one shows what is decoded.)"""
    import json

    gen = deploylm.load(_folder_with(tiny_gpt2_dir, tmp_path / "min40", generation={"min_new_tokens": 40}),
                        backend="torch")
    assert gen.defaults.min_new_tokens == 40
    eos = gen.info.special.eos_token_ids[0]
    ends_at_once = {"num_beams": 1, "sequence_bias": [[[eos], 50.0]]}   # without a minimum: the end token first
    alone = gen.generate(PROMPTS[0], max_new_tokens=32, min_new_tokens=0, **ends_at_once)[0].sequences[0]
    assert len(alone.token_ids) == 1
    with TestClient(create_app(gen, ServeConfig(max_new_tokens=32))) as client:
        g = client.post("/v1/generate", json={"prompt": PROMPTS[0], **ends_at_once})
        s = client.post("/v1/generate", json={"prompt": PROMPTS[0], "stream": True, **ends_at_once})
        sent = client.post("/v1/generate", json={"prompt": PROMPTS[0], "min_new_tokens": 40, **ends_at_once})
    want = gen.generate(PROMPTS[0], max_new_tokens=32, min_new_tokens=32, **ends_at_once)[0].sequences[0]
    assert len(want.token_ids) == 32
    assert g.status_code == 200 and g.json()["results"][0]["outputs"][0]["token_ids"] == list(want.token_ids), g.text
    last = json.loads([line for line in s.text.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    assert last["text"] == want.text and last["finish_reason"] == "length", s.text
    assert sent.status_code == 400 and sent.json()["error"]["param"] == "min_new_tokens", sent.text
    assert "max_new_tokens=32 is this server's limit" in sent.json()["error"]["message"], sent.text
