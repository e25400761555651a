"""deploylm.load / Generator: backend choice, option precedence, results, streaming, threads, errors."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

import deploylm
from deploylm.backends import _REGISTRY
from deploylm.errors import UsageError
from deploylm.generator import Generator, Result, Sequence, load

PROMPTS = ["the quick brown fox", "hello", "one two three four five"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir) -> Generator:
    return load(tiny_llama_dir)


@pytest.fixture(scope="module")
def t5(tiny_t5_dir) -> Generator:
    return load(tiny_t5_dir)


def test_public_api_is_lazy_and_complete():
    assert deploylm.load is load and deploylm.Generator is Generator
    assert set(deploylm.__all__) <= set(dir(deploylm))   # the lazy names are listed (IPython's completion, help())


def test_generate_returns_one_result_per_prompt(llama):
    results = llama.generate(PROMPTS, num_beams=4, num_return_sequences=2, max_new_tokens=5)
    assert [r.prompt for r in results] == PROMPTS
    for result in results:
        assert isinstance(result, Result) and len(result.sequences) == 2
        best, second = result.sequences
        assert isinstance(best, Sequence) and best.score >= second.score
        assert 1 <= len(best.token_ids) <= 5
        assert best.text == llama.tokenizer.decode(list(best.token_ids), skip_special_tokens=True)


def test_a_single_string_is_one_prompt(t5):
    [result] = t5.generate("hello world", num_beams=2, max_new_tokens=4)
    assert result.prompt == "hello world" and len(result.sequences) == 1


def test_padding_side_follows_the_architecture(llama, t5):
    left = llama.encode(["hello", "the quick brown fox"])
    right = t5.encode(["hello", "the quick brown fox"])
    assert left.attention_mask[0, 0] == 0 and left.attention_mask[0, -1] == 1
    assert right.attention_mask[0, 0] == 1 and right.attention_mask[0, -1] == 0


def test_options_precedence_call_over_model_over_library(tiny_llama_dir, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_beams": 2, "max_new_tokens": 3}))
    gen = load(folder)
    assert (gen.options().num_beams, gen.options().max_new_tokens, gen.options().length_penalty) == (2, 3, 1.0)
    assert gen.options(num_beams=5).num_beams == 5
    [result] = gen.generate(["hello"])
    assert len(result.sequences[0].token_ids) <= 3


def test_a_model_max_time_is_its_default_as_in_transformers(tiny_llama_dir, tmp_path):
    # generation_config's max_time stops transformers.generate; --max-time's help says "Default: the model's"
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_time": 1e-9}))
    gen = load(folder)
    assert gen.options().max_time == 1e-9 and gen.options(max_time=30).max_time == 30.0
    [result] = gen.generate(["hello"], num_beams=1, max_new_tokens=5)
    assert len(result.sequences[0].token_ids) == 1                     # time was up after the first token


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts given"), ("", "prompt 1 is empty"), (["hello", ""], "prompt 2 is empty"),
    ([3], "prompt 1 is an int"), (None, "prompts must be a string or a list"),
    (["hello", " \n\t"], "prompt 2 is only whitespace"),
    ("\ud800 star", r"prompt 1 is not valid Unicode text: '\\ud800' at character 0"),
    (["ok", "star \udcff"], "prompt 2 is not valid Unicode text"),          # argv bytes that were not UTF-8
])
def test_bad_prompts_are_usage_errors(llama, prompts, message):
    with pytest.raises(UsageError, match=message):
        llama.generate(prompts, max_new_tokens=2)


def test_invalid_option_is_a_usage_error(llama):
    with pytest.raises(UsageError, match="num_return_sequences"):
        llama.generate("hello", num_beams=2, num_return_sequences=3)
    with pytest.raises(UsageError, match="unknown decoding option"):
        llama.generate("hello", beams=2)


def test_prompt_that_cannot_fit_the_window_is_a_usage_error(llama):
    long = " ".join(["the quick brown fox"] * 40)
    with pytest.raises(UsageError, match="window of 128"):
        llama.generate(long, max_new_tokens=64)



def test_check_refuses_what_generate_refuses_without_decoding(llama, t5, monkeypatch):
    long = " ".join(["the quick brown fox"] * 40)
    outside = llama.info.vocab_size + 3
    cases = [((["hello", ""],), {}, "prompt 2 is empty"), ((long,), dict(max_new_tokens=64), "window of 128"),
             (("hello",), dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
             (("hello",), dict(sequence_bias=[[[outside], 1.0]]), str(outside)),
             (("hello",), dict(truncation="sliding-window"), "decoder-only")]
    for args, options, message in cases:      # each as generate refuses it
        with pytest.raises(UsageError, match=message):
            llama.generate(*args, **{"max_new_tokens": 2, **options})
    monkeypatch.setattr(llama.backend, "prefill", lambda *a, **k: pytest.fail("check() decoded"))
    for args, options, message in cases:
        with pytest.raises(UsageError, match=message):
            llama.check(*args, **{"max_new_tokens": 2, **options})
    llama.check(["hello", long], max_new_tokens=4, truncation="left")     # fits once cut: nothing to refuse
    t5.check(" ".join(["word"] * 600), truncation="sliding-window", max_new_tokens=4)
    with pytest.raises(UsageError, match="prompt 2 is empty"):
        t5.check(["a", ""], truncation="sliding-window")

@pytest.mark.parametrize("options", [dict(num_beams=4), dict(num_beams=1)], ids=["beam4", "greedy"])
def test_stream_pieces_join_to_the_generated_text(llama, options):
    prompt = "the quick brown fox"
    stream = llama.stream(prompt, max_new_tokens=8, **options)
    assert stream.finish_reason is None
    pieces = list(stream)
    [result] = llama.generate(prompt, max_new_tokens=8, **options)
    assert "".join(pieces) == result.sequences[0].text
    assert stream.finish_reason == llama.finish_reason(result.sequences[0].token_ids, 8)
    if options["num_beams"] == 1:
        assert len(pieces) > 1  # greedy: every token is final at once


def test_finish_reason_is_stop_at_an_end_token_or_short_of_the_limit(llama):
    [eos] = llama.info.special.eos_token_ids[:1]
    assert llama.finish_reason((5, 6, 7, 8), 4) == "length"
    assert llama.finish_reason((5, 6, 7, eos), 4) == "stop"
    assert llama.finish_reason((5, 6), 4) == "stop" and llama.finish_reason((), 4) == "stop"


def test_finish_reason_is_length_where_a_forced_eos_ends_the_output_at_the_limit(tiny_t5_dir, tmp_path):
    """A generation_config forced_eos_token_id (Marian, mBART, BART) puts the end token at max_new_tokens:
    an output cut there ran out of tokens ("length"), it did not stop on its own."""
    folder = shutil.copytree(tiny_t5_dir, tmp_path / "t5")
    gen_file = folder / "generation_config.json"
    eos = json.loads(gen_file.read_text())["eos_token_id"]
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "forced_eos_token_id": eos}))
    t5 = load(folder, backend="torch")
    [result] = t5.generate("the quick brown fox", num_beams=1, max_new_tokens=4)
    ids = result.sequences[0].token_ids
    assert len(ids) == 4 and ids[-1] == eos and eos not in ids[:-1]       # the end token is the forced one
    assert t5.finish_reason(ids, 4) == "length"
    stream = t5.stream("the quick brown fox", num_beams=1, max_new_tokens=4)
    list(stream)
    assert stream.finish_reason == "length"
    assert t5.finish_reason((5, eos), 4) == "stop"                           # an end token before the limit


def test_stream_of_several_sequences_is_refused(llama):
    """A stream gives one text: num_return_sequences=2 would decode two and stream one (the server refuses it
    too), so it is a UsageError naming the option."""
    with pytest.raises(UsageError, match="stream returns one sequence, the best: num_return_sequences=2 must be 1"):
        llama.stream("the quick brown fox", num_beams=2, num_return_sequences=2)
    assert "".join(llama.stream("the quick brown fox", num_beams=2, num_return_sequences=1, max_new_tokens=3))


def test_stream_encoder_decoder(t5):
    pieces = list(t5.stream("translate english to french: the house", num_beams=3, max_new_tokens=6))
    [result] = t5.generate("translate english to french: the house", num_beams=3, max_new_tokens=6)
    assert "".join(pieces) == result.sequences[0].text


def test_a_call_from_the_reading_thread_waits_for_the_stream_and_an_open_stream_does_not_hold_the_model(llama):
    """A stream decodes on a thread of its own: a call from the thread reading it waits for that decode (it was
    a UsageError, "would wait for itself"), and a stream left open half-read holds the model only while it
    decodes (another thread's call used to wait until it was closed)."""
    expected = llama.generate("hello", max_new_tokens=3)
    full = "".join(llama.stream("the quick brown fox", max_new_tokens=20, min_new_tokens=20))
    with llama.stream("the quick brown fox", max_new_tokens=20, min_new_tokens=20) as stream:
        first = next(stream)
        assert llama.generate("hello", max_new_tokens=3) == expected
        assert first + "".join(stream) == full and stream.finish_reason == "length"   # kept for the reader
    stream = llama.stream("the quick brown fox", max_new_tokens=20, min_new_tokens=20)
    assert next(stream)                                       # read once, then left open
    done: list = []
    other = threading.Thread(target=lambda: done.append(llama.generate("hello", max_new_tokens=3)))
    other.start()
    other.join(timeout=60)
    assert done == [expected]
    stream.close()


def test_concurrent_calls_run_one_at_a_time_and_agree(llama):
    expected = llama.generate(PROMPTS, num_beams=3, max_new_tokens=4)
    active, peak, lock = [0], [0], threading.Lock()
    backend = llama.backend
    original = backend.prefill

    def counting_prefill(batch):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(batch)
        finally:
            with lock:
                active[0] -= 1

    backend.prefill = counting_prefill
    try:
        outputs: list = [None] * 4

        def work(i):
            outputs[i] = llama.generate(PROMPTS, num_beams=3, max_new_tokens=4)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del backend.prefill
    assert outputs == [expected] * 4 and peak[0] == 1


def test_default_backend_is_onnx_for_an_artifact(tmp_path, tiny_llama_dir, monkeypatch):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    (tmp_path / "manifest.json").write_text("{}")
    opened = []

    class FakeOnnx:
        @classmethod
        def from_source(cls, source, **options):
            opened.append((source.kind, options))
            raise UsageError("fake onnx backend opened")

    monkeypatch.setitem(_REGISTRY, "onnx", f"{__name__}:FakeOnnx")
    monkeypatch.setitem(globals(), "FakeOnnx", FakeOnnx)
    with pytest.raises(UsageError, match="fake onnx backend opened"):
        load(tmp_path)
    assert opened == [("artifact", {})]
    with pytest.raises(UsageError, match=r'use the onnx \(or trt\) backend: --backend onnx, or backend="onnx" in deploylm.load'):
        load(tmp_path, backend="torch")


def test_unknown_backend_lists_the_known_ones(tiny_llama_dir):
    with pytest.raises(UsageError, match="unknown backend 'tensorflow': expected one of torch, onnx, trt"):
        load(tiny_llama_dir, backend="tensorflow")


@pytest.mark.parametrize("src", [None, 3, "", "  "])
def test_a_model_that_is_no_path_is_a_usage_error(src):
    with pytest.raises(UsageError, match=r"model .*: expected the path of a checkpoint folder"):
        load(src)


def test_options_a_backend_does_not_take_are_refused_not_dropped(tiny_llama_dir, tmp_path):
    with pytest.raises(UsageError, match=r"backend 'torch' takes no option 'devce': expected any of device, dtype, threads"):
        load(tiny_llama_dir, devce="cpu")
    with pytest.raises(UsageError, match=r"backend 'torch' takes no option 'providers'"):
        load(tiny_llama_dir, providers=["CPUExecutionProvider"])             # an onnx backend option
    assert load(tiny_llama_dir, spin=False).info is not None             # the CLI passes spin=False to any backend


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("spin", ["no", 1, None])
def test_spin_must_be_true_or_false(tiny_llama_dir, backend, spin):
    with pytest.raises(UsageError, match=r"spin=.*: expected True or False"):   # "no" is truthy: it would spin
        load(tiny_llama_dir, backend=backend, spin=spin)


@pytest.mark.parametrize("threads", ["2", -1, 0, True])
def test_onnx_threads_must_be_a_count(threads, tmp_path):
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.models.source import Source

    with pytest.raises(UsageError, match=r"threads=.*: expected a whole number of threads >= 1"):
        OnnxBackend.from_source(Source("artifact", tmp_path), threads=threads)


@pytest.mark.parametrize("providers", ["CPUExecutionProvider", ["Foo"], [], "CPU"])
def test_onnx_providers_must_be_a_list_of_provider_names(providers, tmp_path):
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.models.source import Source

    with pytest.raises(UsageError, match=r"providers=.*: expected a list of ONNX Runtime execution providers"):
        OnnxBackend.from_source(Source("artifact", tmp_path), providers=providers)


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                                 "memory: you tried to allocate 196608000000 bytes"), MemoryError()])
def test_a_call_too_large_for_memory_says_what_to_lower(llama, monkeypatch, error):
    def out_of_memory(batch):
        raise error

    monkeypatch.setattr(llama.backend, "prefill", out_of_memory)
    with pytest.raises(UsageError, match=r"not enough memory for 2 prompt\(s\) x 5 row\(s\) each \(num_beams=5, "
                                         r"num_return_sequences=1\) of up to max_new_tokens=2 tokens: lower num_beams"):
        llama.generate(["a", "b"], num_beams=5, max_new_tokens=2)
    with pytest.raises(UsageError, match=r"1 row\(s\) each \(num_beams=1, num_return_sequences=1\) of up to "
                                         r"max_new_tokens=100 tokens: lower num_beams, num_return_sequences or "
                                         r"max_new_tokens,"):   # one row: the length is what to lower
        llama.generate(["a"], num_beams=1, max_new_tokens=100)
    with pytest.raises(UsageError, match=r"not enough memory for 1 prompt\(s\) x 3 row\(s\) each"):   # streams too
        "".join(llama.stream("a", num_beams=3, max_new_tokens=2))
    monkeypatch.setattr(llama.backend, "prefill", lambda batch: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):                 # other errors are not hidden
        llama.generate(["a", "b"], num_beams=5, max_new_tokens=2)


def test_count_tokens(llama):
    assert llama.count_tokens("the quick brown fox") == len(llama.tokenizer("the quick brown fox")["input_ids"])


def test_loading_models_from_several_threads_at_once(tiny_llama_dir, tiny_gpt2_dir, tiny_t5_dir, tmp_path):
    """A fresh process (transformers not imported yet), several deploylm.load calls in threads at once:
    transformers' lazy imports used to fail one of them ("cannot import name 'AutoConfig'")."""
    import subprocess
    import sys

    script = tmp_path / "loads.py"
    script.write_text(
        "import sys, deploylm\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def load(src):\n"
        "    try:\n"
        "        deploylm.load(src)\n"
        "        return 'ok'\n"
        "    except Exception as exc:\n"
        "        return f'{type(exc).__name__}: {exc}'\n"
        "with ThreadPoolExecutor(len(sys.argv) - 1) as pool:\n"
        "    print(list(pool.map(load, sys.argv[1:])))\n")
    sources = [str(tiny_llama_dir), str(tiny_gpt2_dir), str(tiny_t5_dir)] * 2
    run = subprocess.run([sys.executable, str(script), *sources], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(["ok"] * len(sources))


def test_a_stopped_stream_ends_after_its_step_and_frees_the_model(llama):
    from deploylm.errors import Interrupted

    stop = threading.Event()
    stream = llama.stream("the quick brown fox", num_beams=1, max_new_tokens=20, min_new_tokens=20, stop=stop)
    first = next(stream)
    stop.set()
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        list(stream)
    assert first and llama.generate("hello", max_new_tokens=3)            # the model is free again


def test_a_model_max_length_that_is_not_applied_is_named_in_the_warning(tiny_llama_dir, tmp_path, caplog):
    # transformers.generate stops at generation_config's max_length (prompt included); deploylm counts
    # max_new_tokens only, so the setting is one of those it does not apply, and says so
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    plain = json.loads(path.read_text())
    path.write_text(json.dumps({**plain, "max_length": 12}))
    with caplog.at_level("WARNING", logger="deploylm"):
        gen = load(folder)
    warned = [r.getMessage() for r in caplog.records if r.name == "deploylm"]
    assert len(warned) == 1 and "max_length=12" in warned[0] and "does not apply" in warned[0], warned
    assert gen.options().max_new_tokens == 64
    caplog.clear()
    path.write_text(json.dumps({**plain, "max_length": 12, "max_new_tokens": 3}))   # transformers ignores it then
    with caplog.at_level("WARNING", logger="deploylm"):
        assert load(folder).options().max_new_tokens == 3
    assert not [r for r in caplog.records if r.name == "deploylm"]



def test_a_sampling_model_with_several_return_sequences_loads_and_samples(tiny_llama_dir, tmp_path):
    # generation_config of a sampling model: num_beams 1, num_return_sequences 2 (transformers.generate samples
    # two); deploylm does not apply the model's do_sample, so a call samples with do_sample=True, and a call
    # without it is the UsageError (as transformers', whose greedy search returns one sequence)
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True, "num_beams": 1,
                                "num_return_sequences": 2, "temperature": 0.7}))
    gen = load(folder)
    [result] = gen.generate(["hello"], do_sample=True, seed=1, max_new_tokens=3)
    assert len(result.sequences) == 2
    with pytest.raises(UsageError, match=r"num_return_sequences=2 is invalid: greedy decoding returns one sequence"):
        gen.generate(["hello"], max_new_tokens=3)
    assert len(gen.generate(["hello"], num_return_sequences=1, max_new_tokens=3)[0].sequences) == 1



def test_a_model_min_new_tokens_over_the_default_max_loads_and_a_call_raises_the_max(tiny_llama_dir, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "min_new_tokens": 70}))
    gen = load(folder)
    assert gen.options(max_new_tokens=72).min_new_tokens == 70
    with pytest.raises(UsageError, match=r"^the model's default min_new_tokens=70 is above the default "
                                         r"max_new_tokens=64 \(the model's generation_config, else deploylm's\)"):
        gen.options()   # not "max_new_tokens=64 is invalid": the call gave no max_new_tokens


def _doc_backend_class():
    """The HFBackend of docs/serving.md, "A backend of your own" (its code block up to `gen = ...`)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    section = text[text.index("### A backend of your own"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("\ngen = ")]
    scope: dict = {}
    exec(compile(code, "docs/serving.md", "exec"), scope)
    return scope["HFBackend"]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")   # the example's keyword, renamed in transformers 5.24
def test_a_backend_of_your_own_runs_the_shared_decoder(tiny_gpt2_dir, llama):
    from transformers import AutoTokenizer

    backend = _doc_backend_class()(tiny_gpt2_dir)
    mine, ours = Generator(backend, AutoTokenizer.from_pretrained(tiny_gpt2_dir)), load(tiny_gpt2_dir)
    for options in ({"num_beams": 3, "max_new_tokens": 6}, {"num_beams": 1, "max_new_tokens": 6}):
        got, want = mine.generate(PROMPTS[:2], **options), ours.generate(PROMPTS[:2], **options)
        assert [s.token_ids for r in got for s in r.sequences] == [s.token_ids for r in want for s in r.sequences]
        assert "".join(mine.stream(PROMPTS[0], **options)) == got[0].sequences[0].text

    class NoInfo:   # DESIGN.md §4's attributes only: the decoder also needs `info`
        name, device = backend.name, backend.device
        prefill, decode, reorder = backend.prefill, backend.decode, backend.reorder

    with pytest.raises(UsageError, match=r"NoInfo is not a deploylm Backend \(no info\).*ModelInfo"):
        Generator(NoInfo(), llama.tokenizer)


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize("stop", [["\n"], "\n", True])
def test_stop_is_an_event_not_stop_strings(llama, call, stop):
    """An OpenAI-style stop=["\\n"] was an AttributeError ('list' object has no attribute 'is_set')."""
    run = (lambda: llama.generate(["hello"], stop=stop, max_new_tokens=2)) if call == "generate" else \
        (lambda: list(llama.stream("hello", stop=stop, max_new_tokens=2)))
    with pytest.raises(UsageError, match=r"stop=.*: expected a threading.Event .*no stop strings"):
        run()
    with pytest.raises(UsageError, match=r"stats=\{\}: expected a deploylm.decoding.search.SearchStats"):
        llama.generate(["hello"], stats={}, max_new_tokens=2)
    assert llama.generate(["hello"], stop=threading.Event(), max_new_tokens=2)[0].sequences


def test_a_prompt_token_id_equal_to_the_vocabulary_size_is_refused(llama):
    """The embedding has rows 0 .. vocab_size - 1: an id of vocab_size is already outside it."""
    from tests.helpers.scripted_backend import ScriptedBackend

    top = max(llama.tokenizer("the quick brown fox")["input_ids"])
    for vocab, ok in ((top, False), (top + 1, True)):
        backend = ScriptedBackend(lambda prompt, generated, v=vocab: [1.0 / v] * v, vocab_size=vocab,
                                  eos_token_ids=(1,))
        gen = Generator(backend, llama.tokenizer, defaults={})
        if ok:
            assert gen.generate("the quick brown fox", num_beams=1, max_new_tokens=1)[0].sequences
        else:
            with pytest.raises(UsageError, match=rf"prompt 1 has token id {top} .*vocabulary of {vocab} ids"):
                gen.generate("the quick brown fox", num_beams=1, max_new_tokens=1)


def test_a_tokenizer_without_a_pad_token_pads_with_the_models_pad_id(tiny_llama_dir):
    """GPT-2's tokenizer has no pad token: the Generator pads with the model's pad id (as transformers), so a
    batch of prompts of different lengths decodes as each prompt alone."""
    from transformers import AutoTokenizer

    from deploylm.models.source import resolve_source
    from deploylm.backends import backend_class

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = None
    backend = backend_class("torch").from_source(resolve_source(tiny_llama_dir))
    gen = Generator(backend, tokenizer)
    assert tokenizer.pad_token_id == backend.info.special.pad_token_id
    batched = gen.generate(["hello", "the quick brown fox"], num_beams=2, max_new_tokens=3)
    assert [r.sequences[0].token_ids for r in batched] == \
        [gen.generate(p, num_beams=2, max_new_tokens=3)[0].sequences[0].token_ids for p in ["hello", "the quick brown fox"]]


def test_a_finished_streams_reason_survives_reading_it_again(llama):
    stream = llama.stream("hello", num_beams=1, max_new_tokens=3)
    pieces = list(stream)
    reason = stream.finish_reason
    assert pieces and reason in ("stop", "length")
    assert list(stream) == [] and next(stream, None) is None and stream.finish_reason == reason


@pytest.mark.parametrize("defaults, option", [({"max_new_tokens": "x"}, "max_new_tokens"),
                                              ({"num_beams": 2.5}, "num_beams"),
                                              ({"min_new_tokens": "3", "max_new_tokens": 4}, "min_new_tokens"),
                                              ({"num_return_sequences": "2", "num_beams": 1}, "num_return_sequences")])
def test_a_model_default_of_the_wrong_type_is_a_usage_error_naming_it(defaults, option):
    """An artifact's manifest `generation` (or a generation_config.json) with a count that is no integer: the
    tolerant path for call-dependent defaults compared it with ints and raised a TypeError traceback."""
    from deploylm.generator import _model_defaults

    with pytest.raises(UsageError, match=rf"{option}="):
        _model_defaults(defaults)


def test_torch_threads_apply_to_the_loading_thread_and_threads_that_start_later(seed_lm_dir):
    """load(..., threads=N) on torch is torch.set_num_threads (docs/serving.md, --threads): the loading thread and
    every thread that first runs PyTorch later get N; a thread that ran PyTorch before keeps its count."""
    import concurrent.futures

    import torch

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(1) as started:
        assert started.submit(torch.get_num_threads).result(30) == before
        try:
            load(seed_lm_dir, backend="torch", threads=other)
            with concurrent.futures.ThreadPoolExecutor(1) as later:
                assert (torch.get_num_threads(), later.submit(torch.get_num_threads).result(30)) == (other, other)
            assert started.submit(torch.get_num_threads).result(30) == before
        finally:
            torch.set_num_threads(before)


def test_loading_a_model_leaves_the_host_processs_random_numbers_alone(seed_lm_dir, seed_seq2seq_dir):
    """A service that seeds torch for its own work draws the same numbers whether or not it loaded a model
    (a checkpoint's model is built with random weights before its own are loaded)."""
    import torch

    for folder in (seed_lm_dir, seed_seq2seq_dir):
        torch.manual_seed(1234)
        want = torch.rand(4)
        torch.manual_seed(1234)
        load(folder, backend="torch")
        assert torch.equal(torch.rand(4), want), folder


def _blocking_scripted(llama):
    """(backend, entered, release, decodes): a scripted backend over llama's prompt ids whose decode waits for
    `release` after setting `entered`; `decodes` counts its decode calls."""
    from tests.helpers.scripted_backend import ScriptedBackend

    vocab = max(llama.tokenizer("the quick brown fox")["input_ids"]) + 1
    backend = ScriptedBackend(lambda prompt, generated: [0.0, 0.0] + [1.0 / (vocab - 2)] * (vocab - 2),
                              vocab_size=vocab)
    entered, release, decode, decodes = threading.Event(), threading.Event(), backend.decode, [0]

    def blocking_decode(*args):
        decodes[0] += 1
        entered.set()
        assert release.wait(30)
        return decode(*args)

    backend.decode = blocking_decode
    return backend, entered, release, decodes


def test_closing_a_stream_from_another_thread_ends_its_decode_after_the_step(llama):
    """close() while another thread is inside the stream's next() (a service's cancel handler) raised Python's
    "generator already executing" and stopped nothing; it now ends the decode after its current step, the
    reader's loop ends, and the model is free when close() returns."""
    backend, entered, release, decodes = _blocking_scripted(llama)
    gen = Generator(backend, llama.tokenizer, defaults={})
    stream = gen.stream("the quick brown fox", num_beams=1, max_new_tokens=20)
    read: list = []
    errors: list = []

    def read_all():
        try:
            read.extend(stream)
        except Exception as exc:  # noqa: BLE001 - the reader's loop must end quietly, not raise
            errors.append(exc)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        assert entered.wait(30)                                  # the decode is inside its first step
        closer = threading.Thread(target=stream.close)
        closer.start()
        deadline = time.monotonic() + 30                         # the close is under way before the step ends
        while not stream._closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        release.set()
    closer.join(30)
    reader.join(30)
    assert not closer.is_alive() and not reader.is_alive() and not errors, errors
    assert decodes[0] <= 2 and stream.finish_reason is None      # 19 decode steps were left
    assert gen._lock._lock.acquire(timeout=1)                    # the model is free
    gen._lock._lock.release()


def test_a_stream_read_by_a_thread_pool_leaves_other_calls_on_its_workers_waiting_not_refused(llama):
    """Starlette's StreamingResponse(generator.stream(...)) reads each piece on whichever pool worker is free;
    another request's call on the worker that read the first piece was refused ("this thread is still reading a
    stream") instead of waiting."""
    from concurrent.futures import ThreadPoolExecutor

    expected = llama.generate("hello", max_new_tokens=3)
    full = "".join(llama.stream("the quick brown fox", max_new_tokens=12, min_new_tokens=12))
    stream = llama.stream("the quick brown fox", max_new_tokens=12, min_new_tokens=12)
    with ThreadPoolExecutor(max_workers=1) as pool:              # one worker: every call lands on the reader's
        first = pool.submit(next, stream).result(timeout=60)
        assert pool.submit(llama.generate, "hello", max_new_tokens=3).result(timeout=60) == expected
        rest = pool.submit(lambda: "".join(stream)).result(timeout=60)
    assert first + rest == full


def test_a_script_that_exits_with_a_stream_still_decoding_stops_it_after_its_step(tiny_llama_dir, tmp_path):
    """The decode thread is a daemon: a script that ends while a stream it left open half-read is decoding must
    neither wait for all of max_new_tokens nor have the decode frozen mid-step (or run on) in the interpreter's
    teardown. At exit it is stopped after its current step, which is waited for: every step begun has ended."""
    import subprocess
    import sys

    steps = tmp_path / "steps.txt"
    script = f"""
import time
from transformers import AutoTokenizer
from deploylm.generator import Generator
from tests.helpers.scripted_backend import ScriptedBackend

tok = AutoTokenizer.from_pretrained({str(tiny_llama_dir)!r})
ids = tok("the quick brown fox")["input_ids"]
fox, vocab = ids[-1], max(ids) + 1                         # fox: a token with text, so the first piece comes at once
backend = ScriptedBackend(lambda prompt, generated: [float(t == fox) for t in range(vocab)], vocab_size=vocab)
decode = backend.decode

def slow_decode(*args):
    with open({str(steps)!r}, "a") as f:
        f.write("begin\\n")
    time.sleep(1.0)
    with open({str(steps)!r}, "a") as f:
        f.write("end\\n")
    return decode(*args)

backend.decode = slow_decode
stream = Generator(backend, tok, defaults={{}}).stream("the quick brown fox", num_beams=1, max_new_tokens=200)
print(repr(next(stream)), flush=True)
time.sleep(0.1)                                             # inside the next step's sleep
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=180)      # 200 steps of 1 s would take 200 s; a loaded machine's
    # imports take seconds, never minutes: the bound tells "stopped after its step" from "decoded to the end" at any load
    assert run.returncode == 0 and "Fatal" not in run.stderr and run.stdout.strip(), run.stderr[-2000:]
    lines = steps.read_text().splitlines()
    assert 0 < lines.count("end") < 20 and lines.count("begin") == lines.count("end"), lines


def test_a_backend_calling_back_into_its_generator_is_refused_not_left_waiting_for_itself(llama):
    """The model lock knows its holder: a call made from inside a call of the same Generator (here, a backend's
    prefill) would wait for itself forever; it is a UsageError instead."""
    backend, _, release, _ = _blocking_scripted(llama)
    release.set()
    gen = Generator(backend, llama.tokenizer, defaults={})
    prefill, inner = backend.prefill, []

    def calling_back(batch):
        try:
            gen.generate("the quick brown fox", num_beams=1, max_new_tokens=1)
        except UsageError as exc:
            inner.append(str(exc))
        return prefill(batch)

    backend.prefill = calling_back
    done: list = []
    caller = threading.Thread(target=lambda: done.append(gen.generate("the quick brown fox", num_beams=1,
                                                                      max_new_tokens=2)), daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert done and not caller.is_alive()
    assert inner and "already inside a call of this model" in inner[0], inner


def test_closing_a_stream_over_an_iterator_that_ignores_the_event_ends_it_at_its_next_piece():
    """TextStream over any piece iterator (a backend of one's own, the server's fakes): close() ends the decode at
    the iterator's next piece even when the iterator does not watch the closed event; it ran the iterator to its
    end while close() waited."""
    from deploylm.generator import TextStream

    gate, produced = threading.Event(), [0]

    def pieces():
        yield "first"
        assert gate.wait(30)                                    # the decode thread waits here until close() began
        for _ in range(1000):
            produced[0] += 1
            yield "x"

    stream = TextStream(pieces())
    assert next(stream) == "first"
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    assert stream._closed.wait(30)                              # close() has set the event and waits for the thread
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and produced[0] <= 1, produced
    assert next(stream, None) is None


def test_a_stop_set_after_a_stream_ended_does_not_turn_its_end_into_an_interruption(llama):
    """A server sets the stop event of requests at shutdown: a stream already read to its end stays ended
    (StopIteration, its finish_reason kept), it does not raise Interrupted on a later read."""
    stop = threading.Event()
    stream = llama.stream("hello", num_beams=1, max_new_tokens=3, stop=stop)
    pieces = list(stream)
    reason = stream.finish_reason
    stop.set()
    assert pieces and next(stream, None) is None and list(stream) == [] and stream.finish_reason == reason


def test_close_returns_once_the_decode_has_let_the_model_go_even_with_no_reader_waiting():
    """close() from another thread while the stream's decode is mid-step and nobody reads it (a client gone
    between two pieces): close() waits for that step, so the model is free when it returns."""
    from deploylm.generator import TextStream

    model, entered, release, free = threading.Lock(), threading.Event(), threading.Event(), []

    def pieces():
        with model:                                             # what _stream_text holds: the model
            yield "first"
            entered.set()
            assert release.wait(30)                             # one decode step, ended by the test
            for _ in range(1000):
                yield "x"

    stream = TextStream(pieces())
    assert next(stream) == "first" and entered.wait(30)
    closer = threading.Thread(target=lambda: (stream.close(), free.append(not model.locked())), daemon=True)
    closer.start()
    closer.join(1)                                              # close() cannot return before the step ends
    release.set()
    closer.join(30)
    assert not closer.is_alive() and free == [True], free


def test_a_stop_set_during_generate_ends_its_decode_after_the_step(llama):
    """stop= is watched at every step of generate's decode, not only before it starts: set during the first
    step, generate raises Interrupted and decodes no further (it ran all of max_new_tokens)."""
    from deploylm.errors import Interrupted

    backend, _, release, decodes = _blocking_scripted(llama)
    release.set()
    stop, decode = threading.Event(), backend.decode

    def stopping_decode(*args):
        stop.set()
        return decode(*args)

    backend.decode = stopping_decode
    gen = Generator(backend, llama.tokenizer, defaults={})
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        gen.generate("the quick brown fox", num_beams=1, max_new_tokens=20, stop=stop)
    assert decodes[0] == 1, decodes


def test_a_stop_set_while_pieces_wait_in_the_queue_makes_the_next_read_raise():
    """The decode runs ahead of the reader: once stop is set, the next read raises Interrupted, it does not
    hand out the pieces decoded before (a server shutting down sends no more text)."""
    from deploylm.errors import Interrupted
    from deploylm.generator import TextStream

    stop, queued, gate = threading.Event(), threading.Event(), threading.Event()

    def pieces():
        yield "first"
        yield "second"
        queued.set()                                            # "second" is in the queue
        assert gate.wait(30)
        yield "third"

    stream = TextStream(pieces(), stop=stop)
    assert next(stream) == "first" and queued.wait(30)
    stop.set()
    gate.set()
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        next(stream)


def test_two_threads_reading_one_stream_at_once_both_end():
    """Two threads inside next() of one stream at the same time (two workers of a pool handed the same
    iterator): the decode's end went to one of them and the other waited on the queue forever, a thread hung
    for good; both now end."""
    import sys
    import time

    from deploylm.generator import TextStream

    gate = threading.Event()

    def pieces():
        assert gate.wait(30)
        return "stop"
        yield  # a generator without pieces

    stream = TextStream(pieces())
    readers = [threading.Thread(target=lambda: list(stream), daemon=True) for _ in range(2)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:                           # both readers inside next(), waiting for the decode
        frames = sys._current_frames()
        if all(r.ident in frames and frames[r.ident].f_code.co_name == "__next__" for r in readers):
            break
        time.sleep(0.01)
    time.sleep(0.1)
    gate.set()
    for reader in readers:
        reader.join(10)
    assert not any(r.is_alive() for r in readers)
    assert stream.finish_reason == "stop" and next(stream, None) is None


def test_check_takes_the_keywords_generate_takes(llama, monkeypatch):
    """check() is "the UsageError generate would raise": a service passing one set of keywords to both (a stop
    event to bound the request's time) got "unknown decoding option(s) 'stop'" from check, which generate accepts;
    a stop that is no Event is refused by both."""
    from deploylm.decoding.search import SearchStats

    monkeypatch.setattr(llama.backend, "prefill", lambda *a, **k: pytest.fail("check() decoded"))
    llama.check("hello", stop=threading.Event(), stats=SearchStats(), max_new_tokens=2)
    with pytest.raises(UsageError, match=r"stop=.*: expected a threading.Event"):
        llama.check("hello", stop=["\n"], max_new_tokens=2)


def test_numpy_option_values_decode_as_their_python_values(llama):
    """Options computed with NumPy (np.int64 beams, np.float32 penalties) were refused ("expected an integer")."""
    import numpy as np

    given = dict(num_beams=np.int64(2), max_new_tokens=np.int32(4), length_penalty=np.float32(0.5),
                 repetition_penalty=np.float64(1.25), num_return_sequences=np.int64(2))
    plain = {name: value.item() for name, value in given.items()}
    assert llama.generate(PROMPTS, **given) == llama.generate(PROMPTS, **plain)
    sampled = dict(num_beams=1, do_sample=True, seed=np.uint32(3), temperature=np.float32(0.7), top_k=np.int64(5))
    assert llama.generate(PROMPTS, **sampled) == llama.generate(
        PROMPTS, **{k: v.item() if isinstance(v, np.generic) else v for k, v in sampled.items()})
    assert "".join(llama.stream(PROMPTS[0], **given | {"num_return_sequences": 1})) == "".join(
        llama.stream(PROMPTS[0], **plain | {"num_return_sequences": 1}))


def _sampling_warnings(call):
    """The 'applies only when sampling' UserWarnings `call()` issues (every one, not once per place)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, UserWarning) and "only when sampling" in str(w.message)]


def test_sampling_options_in_a_call_that_does_not_sample_warn_once_naming_them(llama):
    """gen.generate(p, temperature=0.7) searched greedily and dropped the temperature without a word (the CLI and
    the server refuse it). As transformers' generate, the call goes on and one UserWarning names what it ignores."""
    plain = llama.generate(PROMPTS, num_beams=1, max_new_tokens=3)
    [warning] = _sampling_warnings(lambda: llama.generate(PROMPTS, num_beams=1, max_new_tokens=3, temperature=0.7))
    assert str(warning.message) == ("temperature=0.7 applies only when sampling, and this call searches "
                                    "deterministically (greedy or beam search): it is ignored; pass do_sample=True "
                                    "to sample")
    assert warning.filename == __file__                  # it points at the caller's line
    [warning] = _sampling_warnings(lambda: llama.generate(PROMPTS, num_beams=2, max_new_tokens=3, temperature=0.5,
                                                          top_k=5, top_p=0.9, seed=1))
    assert str(warning.message).startswith("temperature=0.5, top_k=5, top_p=0.9 apply only when sampling")
    assert "they are ignored; pass do_sample=True" in str(warning.message)
    [warning] = _sampling_warnings(lambda: "".join(llama.stream(PROMPTS[0], num_beams=1, max_new_tokens=3, top_k=5)))
    assert str(warning.message).startswith("top_k=5 applies only when sampling")
    ignored = []
    _sampling_warnings(lambda: ignored.append(llama.generate(PROMPTS, num_beams=1, max_new_tokens=3, temperature=0.7)))
    assert ignored == [plain]


def test_the_sampling_warning_shows_numpy_values_as_the_caller_wrote_them(llama):
    """np.float32(0.7) is 0.699999988079071 as a Python float: the warning named `temperature=0.699999988079071`,
    a value the caller never wrote. It shows the caller's number as NumPy prints it."""
    import numpy as np

    [warning] = _sampling_warnings(lambda: llama.generate(PROMPTS, num_beams=1, max_new_tokens=3,
                                                          temperature=np.float32(0.7), top_p=np.float64(0.9),
                                                          top_k=np.int64(5)))
    assert str(warning.message).startswith("temperature=0.7, top_k=5, top_p=0.9 apply only when sampling")


@pytest.mark.parametrize("options", [
    dict(seed=3),                                        # harmless without sampling; clients send one every time
    dict(temperature=1.0, top_k=0, top_p=1.0),           # values that change nothing
    dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3),
], ids=["seed", "neutral-values", "sampling"])
def test_what_changes_nothing_or_samples_does_not_warn(llama, options):
    assert _sampling_warnings(lambda: llama.generate(PROMPTS, num_beams=1, max_new_tokens=2, **options)) == []


def test_a_models_own_sampling_defaults_do_not_warn_and_its_do_sample_counts(llama, tiny_llama_dir, tmp_path):
    """A generation_config with temperature=0.6 and do_sample false (the usual chat model's) is no option of the
    call: no warning. A model whose defaults sample (a profile's [generation]) samples the call's temperature."""
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": 0.6, "top_k": 5, "top_p": 0.9,
                                "do_sample": False}))
    gen = load(folder)
    assert _sampling_warnings(lambda: gen.generate(PROMPTS, num_beams=1, max_new_tokens=2)) == []
    sampling = Generator(llama.backend, llama.tokenizer, defaults={"do_sample": True, "num_beams": 1})
    assert _sampling_warnings(lambda: sampling.generate(PROMPTS, max_new_tokens=2, temperature=0.7, seed=1)) == []
