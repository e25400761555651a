"""Prompts over the model's window (seed §9.2): refused by default, truncated left/right, or decoded
in overlapping windows (encoder-decoder), through the library and `deploylm generate`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.errors import UsageError
from deploylm.generator import Generator, load
from deploylm.long_inputs import join_outputs, join_parts, join_texts, shared_run
from tests.helpers.scripted_backend import WindowedBackend
from tests.helpers.tiny_seed import TEXTS, build_tiny_seed

LONG = " ".join(TEXTS[:3])  # ~160 tokens for the seed tokenizer (window 64)
LONG_EN = " ".join(["the quick brown fox jumps over the lazy dog"] * 16)  # ~150 tokens for tiny GPT-2 (window 128)
EOS = 2  # the seed tokenizer's </s>


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    return build_tiny_seed(tmp_path_factory.mktemp("seed") / "seed")  # encoder-decoder, window 64


@pytest.fixture(scope="module")
def seed(seed_dir) -> Generator:
    return load(seed_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir) -> Generator:
    return load(tiny_gpt2_dir)  # decoder-only, window 128


def spy_prefill(monkeypatch, gen: Generator) -> list[list[list[int]]]:
    """Record the unpadded token ids of every row the backend's prefill receives, per call."""
    seen: list[list[list[int]]] = []
    real = gen.backend.prefill

    def prefill(batch):
        seen.append([[t for t, m in zip(ids, mask) if m]
                     for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist())])
        return real(batch)

    monkeypatch.setattr(gen.backend, "prefill", prefill)
    return seen


def content_ids(gen: Generator, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


# -- refusal -------------------------------------------------------------------------------------
def test_decoder_only_refusal_names_the_lengths_and_the_options(gpt2):
    n = gpt2.count_tokens(LONG_EN)
    assert n > 128
    with pytest.raises(UsageError) as err:
        gpt2.generate(LONG_EN, max_new_tokens=8)
    message = str(err.value)
    assert message.startswith(f"prompt 1 has {n} tokens, over the model's window of 128 before any new token: "
                              "shorten it, or pass truncation='left' or 'right'")
    assert "--truncation left|right" in message and "sliding-window" not in message
    assert "max_new_tokens" not in message             # the prompt alone is over: fewer new tokens would not help


def test_encoder_decoder_refusal_offers_the_sliding_window(seed):
    n = seed.count_tokens(LONG)
    with pytest.raises(UsageError, match=f"prompt 2 has {n} tokens, over the model's window of 64: .*sliding-window"):
        seed.generate(["red fox", LONG], max_new_tokens=4)


def test_a_prompt_that_fits_exactly_is_not_refused(gpt2, monkeypatch):
    ids = gpt2.tokenizer(LONG_EN, verbose=False)["input_ids"][:121]  # 121 + 8 - 1 = 128 positions
    text = gpt2.tokenizer.decode(ids)
    assert gpt2.count_tokens(text) == 121
    gpt2.generate(text, max_new_tokens=8, num_beams=1)
    with pytest.raises(UsageError, match="needs 129 positions, over the model's window of 128: shorten the prompt, "
                                         "lower max_new_tokens, or pass truncation="):
        gpt2.generate(text, max_new_tokens=9, num_beams=1)
    ids = gpt2.tokenizer(LONG_EN, verbose=False)["input_ids"][:129]                      # alone over the window
    with pytest.raises(UsageError, match="^prompt 1 has 129 tokens, over the model's window of 128 before any new"):
        gpt2.generate(gpt2.tokenizer.decode(ids), max_new_tokens=1, num_beams=1)


@pytest.mark.parametrize("truncation", [None, "left", "right"])
def test_max_new_tokens_over_the_window_cannot_be_truncated_away(gpt2, seed, truncation):
    with pytest.raises(UsageError, match="max_new_tokens=129 leaves no room .* window of 128"):
        gpt2.generate("hello", max_new_tokens=129, truncation=truncation)
    with pytest.raises(UsageError, match="max_new_tokens=65 is over the model's window of 64"):
        seed.generate("red fox", max_new_tokens=65, truncation=truncation)


def test_check_refuses_a_sliding_window_call_as_generate_does_without_decoding(seed, monkeypatch):
    """Generator.check (what `generate` and the server run before any output goes out) on a sliding-window
    call: the window's limits refuse there too, not only once the decode starts."""
    cases = [(dict(max_new_tokens=65), "max_new_tokens=65 is over the model's window of 64"),
             (dict(window_overlap=63), "window_overlap=63 must be smaller than the 63 prompt tokens")]
    for options, message in cases:
        with pytest.raises(UsageError, match=message):
            seed.generate(LONG, truncation="sliding-window", **options)
    monkeypatch.setattr(seed.backend, "prefill", lambda *a, **k: pytest.fail("check() decoded"))
    for options, message in cases:
        with pytest.raises(UsageError, match=message):
            seed.check(LONG, truncation="sliding-window", **options)
    seed.check(LONG, truncation="sliding-window", max_new_tokens=4)   # fits once split: nothing to refuse
    outside = [[[seed.info.vocab_size + 5], 1.0]]                      # refused by the processors generate builds
    with pytest.raises(UsageError, match="sequence_bias has token"):
        seed.check(LONG, truncation="sliding-window", max_new_tokens=4, sequence_bias=outside)


@pytest.mark.parametrize("kwargs, message", [
    (dict(truncation="middle"), "truncation 'middle': expected one of left, right, sliding-window"),
    (dict(window_overlap=4), "window_overlap=4 applies only with truncation='sliding-window'"),
    (dict(truncation="left", window_overlap=4), "window_overlap=4 applies only"),
    (dict(truncation="sliding-window", window_overlap=-1), "window_overlap -1: expected an integer >= 0"),
    (dict(truncation="sliding-window", window_overlap=63), "window_overlap=63 must be smaller than the 63 prompt tokens"),
])
def test_bad_long_input_options_are_usage_errors(seed, kwargs, message):
    with pytest.raises(UsageError, match=message):
        seed.generate(LONG, max_new_tokens=4, **kwargs)


def test_sliding_window_on_a_decoder_only_model_is_refused(gpt2):
    with pytest.raises(UsageError, match="'sliding-window' splits the source of an encoder-decoder model; "
                                         "'tiny-gpt2.*' is decoder-only: use truncation='left' or 'right'"):
        gpt2.generate(LONG_EN, truncation="sliding-window", max_new_tokens=4)
    with pytest.raises(UsageError, match="is decoder-only"):
        list(gpt2.stream(LONG_EN, truncation="sliding-window", max_new_tokens=4))


# -- truncation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_only_truncation_keeps_the_tokens_of_the_other_side(gpt2, monkeypatch, side):
    full = gpt2.tokenizer(LONG_EN, verbose=False)["input_ids"]
    budget = 128 - 8 + 1
    seen = spy_prefill(monkeypatch, gpt2)
    [long, short] = gpt2.generate([LONG_EN, "hello"], truncation=side, max_new_tokens=8, num_beams=2)
    expected = full[-budget:] if side == "left" else full[:budget]
    assert seen == [[expected, gpt2.tokenizer("hello")["input_ids"]]]  # the short prompt is untouched
    assert long.prompt == LONG_EN and len(long.sequences[0].token_ids) == 8


@pytest.mark.parametrize("side", ["left", "right"])
def test_encoder_decoder_truncation_keeps_the_special_tokens(seed, monkeypatch, side):
    content = content_ids(seed, LONG)
    seen = spy_prefill(monkeypatch, seed)
    seed.generate(LONG, truncation=side, max_new_tokens=4, num_beams=2)
    kept = content[-63:] if side == "left" else content[:63]
    assert seen == [[kept + [EOS]]]  # 63 tokens of the text + </s> = the window of 64


def test_truncated_stream_matches_truncated_generate(gpt2):
    pieces = list(gpt2.stream(LONG_EN, truncation="left", max_new_tokens=6, num_beams=2))
    [result] = gpt2.generate(LONG_EN, truncation="left", max_new_tokens=6, num_beams=2)
    assert "".join(pieces) == result.sequences[0].text


# -- sliding window ------------------------------------------------------------------------------
def expected_chunks(content: list[int], room: int, overlap: int) -> list[list[int]]:
    """The windows by hand: `room` tokens each, starting every room - overlap tokens, until the end."""
    chunks, start = [], 0
    while True:
        chunks.append(content[start:start + room] + [EOS])
        if start + room >= len(content):
            return chunks
        start += room - overlap


@pytest.mark.parametrize("overlap", [0, 8])
def test_sliding_window_chunks_and_joins_on_a_seed_checkpoint(seed, monkeypatch, overlap):
    content = content_ids(seed, LONG)
    chunks = expected_chunks(content, 63, overlap)
    assert len(content) == 162 and len(chunks) == 3  # starts 0, 63, 126 (overlap 0) or 0, 55, 110 (overlap 8)
    options = dict(max_new_tokens=6, num_beams=2, num_return_sequences=2)
    encoded_before = seed.backend.encoder_calls
    seen = spy_prefill(monkeypatch, seed)
    [short, long] = seed.generate(["red fox", LONG], truncation="sliding-window", window_overlap=overlap, **options)
    assert seen == [[seed.tokenizer("red fox")["input_ids"], *chunks]]  # one batch: every chunk of every prompt
    assert seed.backend.encoder_calls - encoded_before == 1 + len(chunks)  # each chunk encoded once
    opts = seed.options(**options)
    per_chunk = [_decode_alone(seed, chunk, opts) for chunk in chunks]
    assert long.prompt == LONG and len(long.sequences) == 2
    for rank, sequence in enumerate(long.sequences):
        hyps = [outputs[rank] for outputs in per_chunk]
        assert sequence.token_ids == join_outputs([h.token_ids for h in hyps], overlap, (EOS,))
        assert sequence.score == pytest.approx(sum(h.score for h in hyps))
        parts = join_parts([h.token_ids for h in hyps], overlap, (EOS,))
        assert sequence.text == join_texts([seed.decode(p) for p, _ in parts], [not shared for _, shared in parts])
    alone = seed.generate("red fox", **options)[0].sequences  # one chunk: as without windows
    assert [s.token_ids for s in short.sequences] == [s.token_ids for s in alone]
    assert [s.score for s in short.sequences] == pytest.approx([s.score for s in alone])


def _decode_alone(gen: Generator, chunk: list[int], opts: DecodingOptions):
    import torch

    from deploylm.backends import EncodedBatch

    batch = EncodedBatch(torch.tensor([chunk]), torch.ones((1, len(chunk)), dtype=torch.long))
    return generate_ids(gen.backend, batch, opts)[0]


CopyBackend = WindowedBackend   # with copy_script: an encoder-decoder that outputs its source (without </s>), then EOS


def copy_script(prompt, generated):
    source = [t for t in prompt if t != EOS]
    target = source[len(generated)] if len(generated) < len(source) else EOS
    return [1.0 if t == target else 0.0 for t in range(300)]


@pytest.fixture()
def copier(seed) -> Generator:
    backend = CopyBackend(copy_script, vocab_size=300, eos_token_ids=(EOS,), is_encoder_decoder=True,
                          decoder_start_token_id=1)
    return Generator(backend, seed.tokenizer, defaults={})


@pytest.mark.parametrize("text", [LONG, " ".join(["red"] * 100)], ids=["words", "repetitive"])
@pytest.mark.parametrize("overlap", [0, 1, 8, 30])
def test_sliding_window_over_a_copier_gives_back_the_whole_source(copier, text, overlap):
    """Joined in order with each overlap's duplicate kept once, the windows' copies are the source."""
    content = content_ids(copier, text)
    assert len(content) > 64
    [result] = copier.generate(text, truncation="sliding-window", window_overlap=overlap, max_new_tokens=64, num_beams=1)
    assert list(result.sequences[0].token_ids) == content + [EOS]
    if overlap:                 # each window's copy continues the last through the shared run: the source's text
        assert result.sequences[0].text == copier.decode(content)
    else:                       # windows that meet without one are texts of their own, joined as words
        copies = [copier.decode(chunk[:-1]) for chunk in expected_chunks(content, 63, 0)]
        assert result.sequences[0].text == join_texts(copies, [False] + [True] * (len(copies) - 1))
    stream = copier.stream(text, truncation="sliding-window", window_overlap=overlap, max_new_tokens=64, num_beams=1)
    pieces = list(stream)
    assert len(pieces) == len(expected_chunks(content, 63, overlap)) and "".join(pieces) == result.sequences[0].text
    assert stream.finish_reason == "stop"                    # the last chunk's copy ends with the end token


LANG = 7   # a target-language code that the model's generation_config forces first (mBART's forced_bos_token_id)


@dataclass
class ForcedBOSCopyBackend(CopyBackend):
    """The copier of a model whose generation_config sets forced_bos_token_id: LANG, then the source, then EOS."""

    @property
    def info(self):
        return dataclasses.replace(super().info, generation={"forced_bos_token_id": LANG})


def lang_copy_script(prompt, generated):
    return copy_script(prompt, generated[1:]) if generated else [1.0 if t == LANG else 0.0 for t in range(300)]


@pytest.mark.parametrize("overlap", [0, 8])
def test_sliding_window_keeps_a_forced_bos_once_at_the_start(seed, overlap):
    """Every window's output starts with the forced BOS; the join keeps the first window's only, as it keeps
    only the last window's EOS, so the overlap's duplicate is found and the source comes back whole."""
    backend = ForcedBOSCopyBackend(lang_copy_script, vocab_size=300, eos_token_ids=(EOS,), is_encoder_decoder=True,
                                   decoder_start_token_id=1)
    gen = Generator(backend, seed.tokenizer, defaults={})
    content = content_ids(gen, LONG)
    [result] = gen.generate(LONG, truncation="sliding-window", window_overlap=overlap, max_new_tokens=64, num_beams=1)
    assert list(result.sequences[0].token_ids) == [LANG] + content + [EOS]
    stream = gen.stream(LONG, truncation="sliding-window", window_overlap=overlap, max_new_tokens=64, num_beams=1)
    assert "".join(stream) == result.sequences[0].text
    assert join_outputs([(LANG, 5, 6, EOS), (LANG, 6, 8, EOS)], 1, (EOS,), LANG) == (LANG, 5, 6, 8, EOS)


def test_an_unbounded_encoder_takes_the_whole_source_as_one_window(tiny_t5_dir):
    t5 = load(tiny_t5_dir)  # relative positions: no window
    assert t5.info.max_positions is None
    plain = t5.generate(LONG, max_new_tokens=4, num_beams=2)
    assert t5.generate(LONG, truncation="sliding-window", max_new_tokens=4, num_beams=2) == plain


def test_join_outputs_keeps_each_overlap_once_and_only_the_last_eos():
    assert join_outputs([(5, 6, 7, 9), (6, 7, 8, 9), (8, 4, 9)], 2, (9,)) == (5, 6, 7, 8, 4, 9)
    assert join_outputs([(5, 6, 7, 9), (6, 7, 8, 9)], 0, (9,)) == (5, 6, 7, 6, 7, 8, 9)  # no overlap: concatenated
    assert join_outputs([(3, 3, 3, 3), (3, 3, 3, 3)], 2, ()) == (3,) * 6  # bounded by the overlap
    assert shared_run([1, 2, 3], [2, 3, 4], 5) == 2 and shared_run([1, 2, 3], [4, 2], 5) == 0


# -- the command line ----------------------------------------------------------------------------
def run(*args: str):
    return CliRunner().invoke(cli, ["generate", *args])


def error_line(out) -> str:
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_cli_refuses_an_over_long_prompt_by_default(tiny_gpt2_dir):
    line = error_line(run("--model", str(tiny_gpt2_dir), "--max-new-tokens", "8", LONG_EN))
    assert "over the model's window of 128" in line and "--truncation left|right" in line


@pytest.mark.parametrize("side", ["left", "right"])
def test_cli_truncation_matches_the_library(tiny_gpt2_dir, gpt2, side):
    out = run("--model", str(tiny_gpt2_dir), "--json", "--truncation", side, "--max-new-tokens", "5",
              "--num-beams", "2", LONG_EN)
    assert out.exit_code == 0, out.output
    [line] = [json.loads(text) for text in out.stdout.splitlines()]
    [expected] = gpt2.generate(LONG_EN, truncation=side, max_new_tokens=5, num_beams=2)
    assert line["prompt"] == LONG_EN
    assert line["outputs"][0]["token_ids"] == list(expected.sequences[0].token_ids)


def test_cli_sliding_window_matches_the_library(seed_dir, seed):
    out = run("--model", str(seed_dir), "--json", "--truncation", "sliding-window", "--window-overlap", "8",
              "--max-new-tokens", "5", "--num-beams", "2", LONG, "red fox")
    assert out.exit_code == 0, out.output
    lines = [json.loads(text) for text in out.stdout.splitlines()]
    expected = seed.generate([LONG, "red fox"], truncation="sliding-window", window_overlap=8, max_new_tokens=5,
                             num_beams=2)
    assert [line["prompt"] for line in lines] == [LONG, "red fox"]
    assert [line["outputs"][0]["token_ids"] for line in lines] == [list(r.sequences[0].token_ids) for r in expected]


@pytest.mark.parametrize("args, message", [
    (["--truncation", "sliding-window"], "is decoder-only: use --truncation 'left' or 'right'"),
    (["--truncation", "middle"], "error: --truncation 'middle': expected one of left, right, sliding-window"),
    (["--window-overlap", "4"], "error: --window-overlap 4 applies only with --truncation 'sliding-window'"),
    (["--truncation", "sliding-window", "--window-overlap", "x"], "--window-overlap 'x': expected an integer"),
])
def test_cli_bad_long_input_options_are_one_line(tiny_gpt2_dir, args, message):
    assert message in error_line(run("--model", str(tiny_gpt2_dir), "--max-new-tokens", "4", *args, LONG_EN))


@pytest.mark.parametrize("value", ["none", "None", "error"])
def test_a_truncation_named_none_is_told_to_leave_the_option_out(gpt2, tiny_gpt2_dir, value):
    """Refusing is truncation=None (no flag), not a mode: the error must not offer "none" as the way to refuse
    to someone who typed --truncation none."""
    with pytest.raises(UsageError) as caught:
        gpt2.generate(LONG_EN, max_new_tokens=4, truncation=value)
    assert "or none" not in str(caught.value) and "leave it out, to refuse" in str(caught.value)
    line = error_line(run("--model", str(tiny_gpt2_dir), "--max-new-tokens", "4", "--truncation", value, LONG_EN))
    assert f"--truncation {value!r}: expected one of left, right, sliding-window" in line and "or none" not in line


def test_an_overlap_too_large_for_the_window_is_named_as_the_caller_gives_it(seed, seed_dir):
    """The library names the keyword (window_overlap=63, not the CLI's flag), the CLI its flag, and both say the
    largest overlap that fits."""
    with pytest.raises(UsageError) as caught:
        seed.generate(LONG, max_new_tokens=4, truncation="sliding-window", window_overlap=63)
    assert "--window-overlap" not in str(caught.value) and "lower window_overlap to at most 62" in str(caught.value)
    line = error_line(run("--model", str(seed_dir), "--max-new-tokens", "4", "--truncation", "sliding-window",
                          "--window-overlap", "63", LONG))
    assert line.startswith("error: --window-overlap 63 must be smaller than the 63 prompt tokens"), line
    assert line.endswith("lower --window-overlap to at most 62") and "window_overlap" not in line, line


def test_cli_help_lists_the_long_input_flags():
    out = run("--help")
    assert out.exit_code == 0 and "--truncation" in out.output and "--window-overlap" in out.output


def test_a_learned_position_encoder_decoder_has_a_window(tmp_path):
    """BART's max_position_embeddings bounds its source: over-long sources are refused, not crashed on."""
    from tests.helpers.tiny_hf import build_tiny_hf

    gen = load(build_tiny_hf("bart", tmp_path / "bart"), backend="torch")
    assert gen.backend.info.max_positions == 128
    with pytest.raises(UsageError, match="window"):
        gen.generate(["one two three " * 60], num_beams=2, max_new_tokens=4)
    assert gen.generate(["one two three"], num_beams=2, max_new_tokens=4)[0].sequences


def test_sliding_window_on_an_onnx_artifact_matches_the_torch_backend(seed_dir, seed, tmp_path):
    """The windows are the decoder's business, not the backend's: an exported artifact gives the same
    tokens as the checkpoint it came from, and its window comes from the artifact's model info."""
    from deploylm.export.pipeline import export_model

    artifact = tmp_path / "seed-fp32"
    export_model(seed_dir, "fp32", artifact)
    onnx = load(artifact)
    assert onnx.info.max_positions == seed.info.max_positions == 64
    options = dict(max_new_tokens=6, num_beams=2, num_return_sequences=2)
    with pytest.raises(UsageError, match="sliding-window"):
        onnx.generate(LONG, **options)                                   # refused by default, like torch
    for overlap in (0, 8):
        want = seed.generate(["red fox", LONG], truncation="sliding-window", window_overlap=overlap, **options)
        got = onnx.generate(["red fox", LONG], truncation="sliding-window", window_overlap=overlap, **options)
        assert [[s.token_ids for s in r.sequences] for r in got] == [[s.token_ids for s in r.sequences] for r in want]
        assert [s.score for r in got for s in r.sequences] == pytest.approx(
            [s.score for r in want for s in r.sequences], abs=1e-4)


def word_script(word_id):
    """An encoder-decoder that answers every window with one word token (no leading space), then EOS:
    as a translator starts each output."""
    def script(prompt, generated):
        target = word_id if not generated else EOS
        return [1.0 if t == target else 0.0 for t in range(300)]
    return script


def test_window_outputs_are_joined_as_words(seed):
    """Each window's output is a text of its own: a model answering every window with one word (no leading
    space, as outputs start) gives the words separated, "red red red", not "redredred"; the ids stay the
    model's."""
    word = next(i for i in range(300) if seed.decode([i]).isalpha() and len(seed.decode([i])) > 2)
    text = seed.decode([word])
    backend = CopyBackend(word_script(word), vocab_size=300, eos_token_ids=(EOS,), is_encoder_decoder=True,
                          decoder_start_token_id=1)
    gen = Generator(backend, seed.tokenizer, defaults={})
    chunks = expected_chunks(content_ids(gen, LONG), 63, 0)
    [result] = gen.generate(LONG, truncation="sliding-window", max_new_tokens=4, num_beams=1)
    assert result.sequences[0].text == " ".join([text] * len(chunks))
    assert list(result.sequences[0].token_ids) == [word] * len(chunks) + [EOS]
    assert "".join(gen.stream(LONG, truncation="sliding-window", max_new_tokens=4, num_beams=1)) == result.sequences[0].text
    assert join_texts(["one hundred", "ten", " twenty", "格", "子"], [False, True, True, True, True]) == \
        "one hundred ten twenty格子"
    assert join_texts(["one hun", "dred"], [False, False]) == "one hundred"        # a shared run continues


def test_tokenizer_that_cannot_encode_a_prompt_is_named():
    """A WordLevel tokenizer without an unknown token meets a word it lacks: one UsageError naming the
    prompt, not tokenizers' bare `Exception: WordLevel error: Missing [UNK] token`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deploylm.long_inputs import tokenize, tokenize_windows

    words = Tokenizer(models.WordLevel({"<pad>": 0, "the": 1, "quick": 2, "fox": 3}))   # no unk_token
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>")
    assert tokenize(tokenizer, ["the quick fox"], padding_side="left").input_ids.tolist() == [[1, 2, 3]]
    for call in (lambda: tokenize(tokenizer, ["the quick fox", "the slow fox"], padding_side="left"),
                 lambda: tokenize(tokenizer, ["the slow fox"], padding_side="left", max_length=2,
                                  truncation_side="left"),
                 lambda: tokenize_windows(tokenizer, "the slow fox", window=8, overlap=0)):
        with pytest.raises(UsageError, match=r"prompt 'the slow fox': the model's tokenizer cannot encode it "
                                             r"\(WordLevel error: Missing \[UNK\]"):
            call()
    assert tokenizer.truncation_side == "right"          # restored after the refusal


def test_a_sliding_window_stream_ends_with_its_last_windows_reason(copier):
    """The first window's copy runs out of max_new_tokens (63 tokens for 40), the last one's (36 tokens) ends
    with the end token: the stream's finish_reason is the last window's, as the joined output's end is."""
    content = content_ids(copier, LONG)
    assert [len(c) - 1 for c in expected_chunks(content, 63, 0)] == [63, 63, 36]
    stream = copier.stream(LONG, truncation="sliding-window", max_new_tokens=40, num_beams=1)
    assert len(list(stream)) == 3 and stream.finish_reason == "stop"
    [result] = copier.generate(LONG, truncation="sliding-window", max_new_tokens=40, num_beams=1)
    assert list(result.sequences[0].token_ids) == content[:40] + content[63:103] + content[126:] + [EOS]


def test_a_seeded_sampling_sliding_window_stream_joins_what_generate_returns(seed):
    """generate decodes a prompt's windows as rows of one batch, whose rows share the seed's draws; a stream that
    decoded them one at a time drew differently, so the same call streamed gave another text."""
    kwargs = dict(truncation="sliding-window", do_sample=True, seed=5, top_k=50, max_new_tokens=8, num_beams=1)
    [result] = seed.generate(LONG, **kwargs)
    stream = seed.stream(LONG, **kwargs)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == result.sequences[0].text


def test_max_time_bounds_a_sliding_window_call_not_each_batch_of_windows(copier, monkeypatch):
    """max_time stops the call's decoding (docs/decoding.md); a sliding-window call decodes its windows in batches
    of 8 rows, and each batch got the whole max_time again: 50 windows took 7 x max_time. The clock is a fake one
    that moves 0.01 s per decode step (a wall-clock bound failed on a loaded machine), so the count of decode
    steps is what max_time allowed: 20 for the call and one more per later batch, where each batch used to get 20."""
    import time

    real, clock, steps = copier.backend.decode, [1000.0], [0]

    def slow(*args):
        clock[0] += 0.01
        steps[0] += 1
        return real(*args)

    monkeypatch.setattr(copier.backend, "decode", slow)
    monkeypatch.setattr(time, "time", lambda: clock[0])
    text = " ".join(TEXTS)
    windows = len(copier._windows([text], copier.options(max_new_tokens=64), 60)[0].input_ids)
    batches = -(-windows // 8)                   # after the deadline, each batch takes one step (its first token)
    assert windows > 40
    for generating in (True, False):
        steps[0] = 0
        if generating:
            [result] = copier.generate(text, truncation="sliding-window", window_overlap=60, max_new_tokens=64,
                                       num_beams=1, max_time=0.2)
            assert result.sequences[0].token_ids
        else:
            assert "".join(copier.stream(text, truncation="sliding-window", window_overlap=60, max_new_tokens=64,
                                         num_beams=1, do_sample=True, seed=0, max_time=0.2))
        assert 20 <= steps[0] <= 25 + batches, (generating, steps[0], batches)   # each batch: 20 steps before


def test_windows_start_at_the_source_start_whatever_the_tokenizers_truncation_side(copier):
    """A tokenizer whose truncation_side is "left" (a tokenizer_config may say so) still gives the windows in
    source order: the copier's join is the source, and the tokenizer's side is left as it was."""
    content = content_ids(copier, LONG)
    copier.tokenizer.truncation_side = "left"
    try:
        [result] = copier.generate(LONG, truncation="sliding-window", window_overlap=8, max_new_tokens=64, num_beams=1)
        assert copier.tokenizer.truncation_side == "left"
    finally:
        copier.tokenizer.truncation_side = "right"
    assert list(result.sequences[0].token_ids) == content + [EOS]


def test_a_set_stop_event_stops_a_sliding_window_generate(copier):
    """stop= reaches the windows' decode too: once set, generate raises Interrupted instead of decoding on."""
    import threading

    from deploylm.errors import Interrupted

    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        copier.generate(LONG, truncation="sliding-window", max_new_tokens=8, num_beams=1, stop=stop)
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        list(copier.stream(LONG, truncation="sliding-window", max_new_tokens=8, num_beams=1, stop=stop))


@pytest.mark.parametrize("overlap", [True, False, 2.0, "8"])
def test_window_overlap_must_be_a_whole_number(seed, overlap):
    with pytest.raises(UsageError, match=f"window_overlap {overlap!r}: expected an integer >= 0"):
        seed.generate(LONG, truncation="sliding-window", window_overlap=overlap, max_new_tokens=4)


def test_join_texts_adds_no_space_where_one_side_has_whitespace():
    assert join_texts(["one ", "two", "three", "\nfour"], [False, True, True, True]) == "one two three\nfour"


def test_a_sliding_window_decode_too_large_for_memory_says_what_to_lower(seed, monkeypatch):
    """generate and stream over windows end in the same UsageError as a plain call, not the allocator's
    RuntimeError from inside torch."""
    def out_of_memory(batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(seed.backend, "prefill", out_of_memory)
    with pytest.raises(UsageError, match=r"not enough memory for 1 prompt\(s\) x 2 row\(s\) each .*: lower"):
        seed.generate([LONG], truncation="sliding-window", num_beams=2, max_new_tokens=4)
    with pytest.raises(UsageError, match=r"not enough memory for 1 prompt\(s\) x 2 row\(s\) each .*: lower"):
        "".join(seed.stream(LONG, truncation="sliding-window", num_beams=2, max_new_tokens=4))


def test_truncation_that_leaves_room_only_for_the_special_tokens_names_max_new_tokens(tiny_llama_dir, tmp_path):
    """A tokenizer that adds <s> and </s> keeps them through truncation: a max_new_tokens that leaves the prompt
    only those 2 positions of the window is refused naming max_new_tokens, the window and the largest that fits,
    not as "a window of 2 tokens" (the model's window is 128)."""
    import shutil

    from tokenizers import Tokenizer, processors

    folder = tmp_path / "llama-bos"
    shutil.copytree(tiny_llama_dir, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    specials = [(t, tok.token_to_id(t)) for t in ("<s>", "</s>")]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=specials)
    tok.save(str(folder / "tokenizer.json"))
    gen = load(folder)
    assert gen.count_tokens("a") == 3
    for side in ("left", "right"):
        with pytest.raises(UsageError, match=r"max_new_tokens=127 leaves 2 prompt positions in the model's window "
                                             r"of 128.* 2 special tokens: lower max_new_tokens to at most 126"):
            gen.generate(LONG_EN, max_new_tokens=127, truncation=side)
        out = gen.generate(LONG_EN, max_new_tokens=126, truncation=side, num_beams=1)   # <s>, one token, </s>
        assert len(out[0].sequences[0].token_ids) <= 126


def test_a_stop_set_during_a_sliding_window_stream_ends_its_decode_after_the_step(copier):
    """stop= reaches the decode of a streamed window, not only the reads: set during the first window's
    first step, the stream raises Interrupted and no further step runs (the window decoded on to its end,
    and the next one began, before the read noticed)."""
    import threading

    from deploylm.errors import Interrupted

    stop, decodes, decode = threading.Event(), [0], copier.backend.decode

    def stopping_decode(*args):
        decodes[0] += 1
        stop.set()
        return decode(*args)

    copier.backend.decode = stopping_decode
    stream = copier.stream(LONG, truncation="sliding-window", max_new_tokens=16, min_new_tokens=16, num_beams=1,
                           stop=stop)
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        list(stream)
    assert decodes[0] == 1, decodes
    assert decodes[0] == 1, decodes


def test_only_the_tokenizers_own_refusal_is_named_as_the_prompts_fault():
    """encoding() turns the `tokenizers` library's plain Exception into a UsageError naming the prompt; any
    other error (a TypeError from a broken tokenizer, a KeyboardInterrupt's kin) is not the input's fault
    and goes up as it is."""
    from deploylm.long_inputs import encoding

    def refuses(text, **kwargs):
        raise Exception("no word for it")                       # what tokenizers raises

    with pytest.raises(TypeError, match="a bug"):
        with encoding(refuses, ["hello"]):
            raise TypeError("a bug")
    with pytest.raises(UsageError, match="prompt 'hello': the model's tokenizer cannot encode it"):
        with encoding(refuses, ["hello"]):
            refuses("hello")


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_new_token_room_is_the_most_max_new_tokens_check_fits_lets_through(encoder_decoder):
    """new_token_room (the server's bound on a default max_new_tokens) is prompt_budget's inverse: the room it
    gives fits, one more token does not; a prompt alone over a decoder-only window leaves 0; no window, None."""
    from deploylm.backends.base import ModelInfo, SpecialTokens
    from deploylm.long_inputs import check_fits, new_token_room

    info = ModelInfo(is_encoder_decoder=encoder_decoder, vocab_size=10, special=SpecialTokens((1,), 0),
                     max_positions=16)
    for prompt in range(1, 17):
        room = new_token_room(info, prompt)
        check_fits([prompt], info, room)
        with pytest.raises(UsageError):
            check_fits([prompt], info, room + 1)
    assert new_token_room(info, 17) == (16 if encoder_decoder else 0)
    assert new_token_room(dataclasses.replace(info, max_positions=None), 1000) is None


def test_new_token_room_keeps_to_an_engines_shorter_window_and_longest_prompt():
    """A TensorRT engine built for 12 positions and prompts of 8 tokens, on a model of 16 (or no window): the server's
    default max_new_tokens must fit the engine, or every plain request would be refused by it."""
    from deploylm.backends.base import EngineLimits, ModelInfo, SpecialTokens
    from deploylm.long_inputs import check_fits, new_token_room

    for window in (16, None):
        info = ModelInfo(is_encoder_decoder=False, vocab_size=10, special=SpecialTokens((1,), 0),
                         max_positions=window, engine=EngineLimits(positions=12, prompt_tokens=8))
        for prompt in range(1, 9):
            room = new_token_room(info, prompt)
            assert room == 13 - prompt
            check_fits([prompt], info, room)
            with pytest.raises(UsageError, match="engine's window of 12 positions"):
                check_fits([prompt], info, room + 1)
        assert new_token_room(info, 9) == 0
        with pytest.raises(UsageError, match="over the TensorRT engine's longest prompt of 8 tokens"):
            check_fits([9], info, 1)
