"""Decoder-only LM training (`deploylm train --arch decoder`) through the CLI: plain text in, a
deploylm-lm checkpoint out, perplexity on held-out text beside the n-gram baseline on the same tokens;
the checkpoint generates with the torch backend and exports."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.errors import UsageError
from deploylm.models.checkpoint import build_model, load_training_state
from deploylm.models.config import make_config
from deploylm.training.lm_eval import eval_windows, lm_nll
from deploylm.training.stories import stories

SHORT = ["--arch", "decoder", "--steps", 4, "--batch-size", 4, "--block-size", 32, "--eval-every", 2]


def run(*args, command="train"):
    return CliRunner().invoke(cli, [command, *map(str, args)])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """60 generated paragraphs, separated by blank lines."""
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n\n".join(stories(0, 60)) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("lm") / "run"
    result = run("--data", text, "--out", out, *SHORT)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_text_trains_a_deploylm_lm_with_perplexity_and_ngram_baseline(trained):
    out, stdout = trained
    assert json.loads((out / "config.json").read_text())["model_type"] == "deploylm-lm"
    metrics = json.loads((out / "metrics.json").read_text())
    test, baseline = metrics["test"], metrics["baseline"]
    assert metrics["arch"] == "decoder" and metrics["steps"] == 4
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"])) and 1 < test["perplexity"] < 1e4
    assert baseline["model"] == "3-gram Kneser-Ney" and 1 < baseline["perplexity"] < 1e4
    assert baseline["tokens"] == test["tokens"] > 100           # the same held-out tokens, each scored once
    assert [v["step"] for v in metrics["validation"]] == [2, 4]
    assert len(metrics["examples"]) == 3 and set(metrics["examples"][0]) == {"prompt", "generated", "reference"}
    assert f"test: perplexity {test['perplexity']:.2f}" in stdout
    assert f"baseline: 3-gram Kneser-Ney perplexity {baseline['perplexity']:.2f}" in stdout


def test_lm_examples_of_chinese_text_are_cut_between_characters(tmp_path):
    # each Han character is 3 bytes; rare ones stay 3 byte-level tokens, and a prompt of 8 tokens cut
    # one in half: the example showed '...\ufffd' -> ... (reference '\ufffd...')
    rng = np.random.default_rng(0)
    paragraphs = ["".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 20000, 30)) for _ in range(40)]
    path = tmp_path / "中文.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    out = tmp_path / "运行"
    result = run("--data", path, "--out", out, *SHORT)
    assert result.exit_code == 0, result.output
    examples = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["examples"]
    for ex in examples:
        assert "\ufffd" not in ex["prompt"] + ex["reference"], ex
        assert ex["prompt"] and any(p.startswith(ex["prompt"] + ex["reference"]) for p in paragraphs), ex


def test_checkpoint_generates_with_the_torch_backend(trained):
    out, _ = trained
    from deploylm.models.source import resolve_source
    from deploylm.models.tokenizer import load_tokenizer

    ids = load_tokenizer(resolve_source(out))("Anna lived")["input_ids"]
    assert ids[0] == 1 and ids[-1] != 2                        # <s> first, no </s>: a prompt, not a finished text
    result = run("--model", out, "--backend", "torch", "--json", "--num-beams", 2, "--max-new-tokens", 5,
                 "Anna lived near the", command="generate")
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout.splitlines()[0])["outputs"]
    assert 1 <= len(outputs[0]["token_ids"]) <= 5


def test_resume_continues_the_lm_run(tmp_path, text, trained):
    out = tmp_path / "part"
    assert run("--data", text, "--out", out, *SHORT[:2], *SHORT[4:], "--steps", 2).exit_code == 0
    again = run("--data", text, "--out", out, *SHORT, "--resume")
    assert again.exit_code == 0, again.output
    whole = load_training_state(trained[0])["losses"]
    assert load_training_state(out)["losses"] == pytest.approx(whole, rel=1e-5)


def test_sliding_window_scores_every_token_once():
    for n, block, stride in [(10, 4, 4), (10, 4, 2), (5, 8, 8), (33, 8, 3)]:
        scored = []
        for start, first in eval_windows(n, block, stride):
            end = min(start + block + 1, n)
            assert end - start <= block + 1 and first > start
            scored += range(first, end)
        assert scored == list(range(1, n))


def test_window_loss_is_the_plain_cross_entropy_when_one_window_fits():
    torch.manual_seed(0)
    model = build_model(make_config("tiny", 50, arch="decoder", n_encoder_layers=0, dropout=0.0)).eval()
    stream = np.random.default_rng(0).integers(4, 50, size=17)
    with torch.no_grad():
        logits, _ = model(torch.tensor(stream[None, :-1]))
        want = float(F.cross_entropy(logits[0], torch.tensor(stream[1:]), reduction="sum"))
    total, count = lm_nll(model, stream, 16, 16, torch.device("cpu"), pad_id=0)
    assert count == 16 and total == pytest.approx(want, rel=1e-5)
    total2, count2 = lm_nll(model, stream, 8, 4, torch.device("cpu"), pad_id=0)   # shorter context, same tokens
    assert count2 == 16 and total2 != pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--data", "{text}"], ["stories.txt", "--arch decoder"]),
    (["--data", "{text}", "--arch", "decoder", "--block-size", "100000"], ["--block-size 100000"]),
    (["--data", "{text}", "--arch", "decoder", "--block-size", "8", "--stride", "9"], ["--stride 9", "at most"]),
    (["--data", "{tiny}", "--arch", "decoder"], ["tiny.txt", "at least 3"]),
    (["--data", "{short}", "--arch", "decoder", "--block-size", "64"], ["training text", "--block-size"]),
    (["--data", "{pairs}", "--arch", "decoder"], ["pairs.jsonl:1", "\"text\""]),
    (["--task", "digits2words", "--arch", "decoder"], ["seq2seq task", "stories"]),
])
def test_bad_lm_input_is_one_line_and_writes_nothing(tmp_path, text, args, words):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one paragraph only\n\nand a second\n")
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"line {i}" for i in range(6)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"source": "a", "target": "b"}\n')
    args = [a.format(text=text, tiny=tiny, short=short, pairs=pairs) for a in args]
    out = tmp_path / "out"
    result = run(*args, "--out", out, "--steps", 1)     # one step at most, should a check ever miss
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


@pytest.mark.slow
def test_neural_lm_beats_the_ngram_on_the_builtin_stories(tmp_path):
    """The claim docs/training.md makes: after 150 steps the LM's perplexity is below the 3-gram's."""
    out = tmp_path / "lm"
    result = run("--task", "stories", "--arch", "decoder", "--out", out, "--steps", 150, "--batch-size", 16,
                 "--lr", 3e-3, "--warmup", 30, "--eval-every", 150)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["baseline"]["perplexity"]
    assert "the neural LM is better" in result.stdout


@pytest.mark.slow
def test_trained_lm_exports_and_onnx_generates_like_torch(tmp_path, trained):
    out, _ = trained
    art = tmp_path / "art"
    exported = run("--model", out, "--profile", "fp32", "--out", art, command="export")
    assert exported.exit_code == 0, exported.output
    texts = []
    for model, backend in ((out, "torch"), (art, "onnx")):
        result = run("--model", model, "--backend", backend, "--json", "--num-beams", 2, "--max-new-tokens", 8,
                     "Anna lived near the", command="generate")
        assert result.exit_code == 0, result.output
        texts.append(json.loads(result.stdout.splitlines()[0])["outputs"])
    assert [o["token_ids"] for o in texts[0]] == [o["token_ids"] for o in texts[1]]


def test_the_ngram_baseline_scores_each_test_token_with_its_n_minus_1_previous_tokens():
    from deploylm.training.lm_eval import ngram_baseline
    from deploylm.training.ngram import NGramLM

    train = np.array([1, 4, 5, 6, 4, 5, 7, 2, 1, 4, 6, 5, 2])
    test = np.array([1, 4, 5, 6, 5, 7, 2])
    for order in (2, 3):
        lm = NGramLM(order, 8).fit([train.tolist()])
        # the first token (<s>) is context only, as for the neural LM; every other token is scored with its
        # n-1 previous tokens (log_likelihood pads the context with start symbols)
        total, count = lm.log_likelihood([test.tolist()], score_from=1)
        got = ngram_baseline(train, test, order, 8)
        assert got["tokens"] == count == 6 and got["loss"] == pytest.approx(-total / 6, rel=1e-9)
        assert got["perplexity"] == pytest.approx(math.exp(-total / 6), rel=1e-9)


def test_greedy_continuation_with_the_cache_equals_greedy_without_it():
    from deploylm.training.lm_eval import continue_greedily

    torch.manual_seed(0)
    model = build_model(make_config("tiny", 50, arch="decoder", n_encoder_layers=0, dropout=0.0, d_model=16,
                                    n_heads=2, d_ff=32, max_positions=16)).eval()
    prompt = [1, 7, 9, 11]
    got = continue_greedily(model, prompt, 10, eos=-1, device=torch.device("cpu"))   # no eos: runs to the window
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) < 14:
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert len(continue_greedily(model, prompt, 100, eos=-1, device=torch.device("cpu"))) == 16 - len(prompt)


def test_the_lm_is_scored_on_the_held_out_paragraphs():
    """Validation perplexity is measured on the validation paragraphs (the first eval_examples), the final
    one on the test paragraphs: each split its own `<s> doc </s>` stream, never the training text."""
    from deploylm.training.text import TextSplits, token_stream
    from deploylm.training.workloads import LMWork

    splits = TextSplits([f"the fox ran to tree number {i}" for i in range(20)], ["an owl sat", "a cat slept"], ["the sun rose"])
    work = LMWork(splits, block_size=8, stride=8, ngram_order=3, eval_examples=1)
    tok = work.make_tokenizer(200)
    config = make_config("tiny", tok.get_vocab_size(), arch="decoder", n_encoder_layers=0)
    work.bind(tok, config)

    def stream(docs):
        return token_stream(tok, docs, config.bos_token_id, config.eos_token_id)

    assert work.train_stream.tolist() == stream(splits.train)
    assert work.validation_stream.tolist() == stream(["an owl sat"])
    assert work.test_stream.tolist() == stream(["the sun rose"])
    seen = []
    work._scores = lambda model, ids, device: seen.append(ids.tolist()) or {"loss": 1.0}
    work.ngram_order = 0
    work._examples = lambda model, device: []
    work.validate(None, torch.device("cpu"))
    work.test(None, torch.device("cpu"))
    assert seen == [stream(["an owl sat"]), stream(["the sun rose"])]


def test_the_lm_loss_is_a_mean_over_every_predicted_token():
    """The trainer divides the summed loss by the count loss_sum returns: for the LM, every position of every
    window predicts its next token (block_size per row), and the sum is plain cross-entropy at smoothing 0."""
    from deploylm.training.text import TextSplits
    from deploylm.training.workloads import LMWork

    splits = TextSplits([f"the fox ran to tree number {i}" for i in range(20)], ["an owl sat"], ["the sun rose"])
    work = LMWork(splits, block_size=8, stride=8, ngram_order=0, eval_examples=1)
    tok = work.make_tokenizer(200)
    config = make_config("tiny", tok.get_vocab_size(), arch="decoder", n_encoder_layers=0, dropout=0.0)
    work.bind(tok, config)
    torch.manual_seed(0)
    model = build_model(config)
    batch = work.batch(work.train_items[:3])
    loss_sum, n_tokens = work.loss_sum(model, batch, 0.0)
    assert n_tokens == 3 * 8
    with torch.no_grad():
        logits, _ = model(batch.input_ids)
    want = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum")
    assert float(loss_sum.detach()) == pytest.approx(float(want), rel=1e-5)


def test_windows_reach_the_last_token_and_a_text_of_block_size_plus_one_tokens_is_one_window():
    from deploylm.training.text import make_lm_batch, window_starts

    assert window_starts(5, 4, 1, "text") == [0]                      # exactly --block-size + 1 tokens
    assert window_starts(10, 4, 1, "text") == [0, 1, 2, 3, 4, 5]      # the last window ends at token 9
    assert window_starts(10, 4, 4, "text") == [0, 4]
    batch = make_lm_batch(np.arange(10), window_starts(10, 4, 1, "text")[-1:], 4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8]] and batch.labels.tolist() == [[6, 7, 8, 9]]
    batch = make_lm_batch(np.arange(10), [0, 5], 4)                    # one row per start
    assert batch.input_ids.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and batch.labels.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_a_text_of_block_size_tokens_is_refused_by_name():
    from deploylm.training.text import window_starts

    with pytest.raises(UsageError, match=r"the training text has 4 tokens: expected at least --block-size \+ 1 = 5"):
        window_starts(4, 4, 1, "the training text")


def test_each_document_is_wrapped_in_bos_and_eos_in_the_stream():
    """The stream is `<s> doc </s> <s> doc </s> ...` (text.py): the model learns where a paragraph ends."""
    from deploylm.training.text import token_stream
    from deploylm.training.tokenizer import train_tokenizer

    tok = train_tokenizer(["the fox ran", "an owl sat"], 120)
    ids = [tok.encode(doc, add_special_tokens=False).ids for doc in ("the fox ran", "an owl sat")]
    assert token_stream(tok, ["the fox ran", "an owl sat"], 1, 2) == [1, *ids[0], 2, 1, *ids[1], 2]


def test_the_lm_scores_are_the_mean_negative_log_likelihood_per_scored_token(monkeypatch):
    from deploylm.training import workloads
    from deploylm.training.text import TextSplits

    monkeypatch.setattr(workloads, "lm_nll", lambda *args: (10.0, 4))     # (summed NLL, tokens scored)
    work = workloads.LMWork(TextSplits([], [], []), block_size=8, stride=8, ngram_order=0, eval_examples=1)
    work.pad = 0
    scores = work._scores(None, np.zeros(4, dtype=np.int64), torch.device("cpu"))
    assert scores == {"loss": 2.5, "perplexity": pytest.approx(math.exp(2.5)), "tokens": 4}
