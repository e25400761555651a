"""--data .jsonl loading and splitting, the BPE tokenizer, deterministic batches, metrics."""
import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from deploylm.errors import UsageError
from deploylm.training.data import BatchStream, SpecialIds, jsonl_splits, make_batch, read_jsonl
from deploylm.training.metrics import bleu, exact_match, perplexity
from deploylm.training.tasks import Example, Splits, SplitSizes, task_splits
from deploylm.training.tokenizer import (decode, encode_sources, encode_targets, load_tokenizer,
                                         save_tokenizer, train_tokenizer)

IDS = SpecialIds(pad=0, bos=1, eos=2)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def good_line(i):
    return json.dumps({"source": f"source {i}", "target": f"target {i}"})


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "not valid JSON"),
    ('{"source": "a"}', "missing key 'target'"),
    ('{"target": "a"}', "missing key 'source'"),
    ('{"source": 3, "target": "a"}', "'source' is int: expected a string"),
    ('{"source": "a", "target": ""}', "'target' is empty"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"source": "a \\ud83d b", "target": "a"}', "'source' holds a lone surrogate"),   # half an emoji's escape
])
def test_bad_jsonl_line_is_named(tmp_path, bad, expected):
    path = write_lines(tmp_path / "d.jsonl", [good_line(1), good_line(2), bad, good_line(4)])
    with pytest.raises(UsageError) as err:
        read_jsonl(path)
    assert f"{path}:3: " in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_a_lone_surrogate_in_a_text_line_is_named(tmp_path):
    """A \\ud83d escape without its pair reaches no tokenizer (it failed there mid-run with a traceback)."""
    from deploylm.training.text import read_documents

    path = write_lines(tmp_path / "t.jsonl", ['{"text": "one two"}', '{"text": "three \\udc00 four"}'])
    with pytest.raises(UsageError, match=r"t\.jsonl:2: 'text' holds a lone surrogate"):
        read_documents(path)


def test_jsonl_with_raw_line_separators_and_a_bom_reads_as_json_does(tmp_path):
    """json.dumps(..., ensure_ascii=False) leaves U+2028 and U+0085 raw inside strings: not line breaks of
    a JSON-lines file; and a byte-order mark is not part of the first record."""
    path = tmp_path / "pairs.jsonl"
    records = [{"source": "one\u2028two", "target": "x\u0085y"}, {"source": "three", "target": "z"}]
    path.write_text("\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                    encoding="utf-8")
    assert [(e.source, e.target) for e in read_jsonl(path)] == [(r["source"], r["target"]) for r in records]


def test_missing_and_empty_jsonl(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="is not a file"):
        read_jsonl(tmp_path)
    with pytest.raises(UsageError, match="no examples"):
        read_jsonl(write_lines(tmp_path / "e.jsonl", ["", "  "]))


def test_jsonl_splits_are_deterministic_and_disjoint(tmp_path):
    lines = [good_line(i) for i in range(100)] + ["", good_line(5)]   # blank line skipped, duplicate source
    path = write_lines(tmp_path / "d.jsonl", lines)
    splits = jsonl_splits(path, seed=0)
    assert splits == jsonl_splits(path, seed=0) and splits != jsonl_splits(path, seed=1)
    assert (len(splits.validation), len(splits.test)) == (5, 10)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 101
    parts = [{ex.source for ex in part} for part in splits.__dict__.values()]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 100


def test_jsonl_needs_three_sources(tmp_path):
    with pytest.raises(UsageError, match="at least 3"):
        jsonl_splits(write_lines(tmp_path / "d.jsonl", [good_line(1), good_line(2)]), seed=0)


@pytest.fixture(scope="module")
def d2w_tokenizer():
    splits = task_splits("digits2words", 0, SplitSizes(train=2000, validation=10, test=10))
    return train_tokenizer([t for ex in splits.train for t in (ex.source, ex.target)], vocab_size=400)


def test_tokenizer_round_trip_and_special_ids(d2w_tokenizer, tmp_path):
    tok = d2w_tokenizer
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    texts = ["four thousand ninety-six", "4096", "héllo,  wörld! 12", "one million"]
    assert decode(tok, encode_targets(tok, texts)) == texts
    assert tok.encode("4096").tokens == ["4", "0", "9", "6", "</s>"]        # digits one by one, </s> appended
    assert encode_sources(tok, ["12"])[0][-1] == 2 and 2 not in encode_targets(tok, ["12"])[0]
    save_tokenizer(tok, tmp_path, model_max_length=512)
    assert load_tokenizer(tmp_path).encode("4096").ids == tok.encode("4096").ids
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf("4096").input_ids == tok.encode("4096").ids
    assert hf.decode(hf("ninety-six").input_ids, skip_special_tokens=True) == "ninety-six"
    plain = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert plain("4096").input_ids == tok.encode("4096").ids


def test_batches_are_padded_and_shifted(d2w_tokenizer):
    batch = make_batch(d2w_tokenizer, [Example("7", "seven"), Example("4096", "four thousand ninety-six")], IDS, 64)
    assert batch.src_ids.shape[0] == 2 and batch.src_ids[0, 1] == 2 and batch.src_mask[0, 2] == 0
    assert batch.tgt_in[:, 0].tolist() == [1, 1]
    for tgt_in, labels in zip(batch.tgt_in.tolist(), batch.labels.tolist()):
        real = [t for t in labels if t != -100]
        assert real[-1] == 2 and tgt_in[:len(real)] == [1] + real[:-1]     # labels = inputs shifted left
        assert tgt_in[len(real):] == [0] * (len(tgt_in) - len(real))


def test_batch_stream_is_a_function_of_the_step():
    examples = [Example(str(i), str(i)) for i in range(10)]
    stream = BatchStream(examples, batch_size=4, seed=0)
    epoch0 = [ex.source for step in (0, 1) for ex in stream.examples_at(step)]
    assert BatchStream(examples, 4, 0).examples_at(1) == stream.examples_at(1)
    assert sorted(epoch0 + [ex.source for ex in stream.examples_at(2)][:2]) == sorted(str(i) for i in range(10))
    assert stream.position(3) == {"epoch": 1, "offset": 2}


def test_metrics():
    assert exact_match(["a b", "c "], ["a b", "c d"]) == 0.5
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["dog"], ["the cat sat on the mat"]) < 10
    assert perplexity(0.0) == 1.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_bleu_on_chinese_counts_characters_not_whole_sentences():
    # with 13a (space/punctuation) tokenization each Chinese sentence is one token: BLEU was 0 for an
    # output that differs in one character, and 0 for a test split with half of it exactly right
    refs = ["九百七十五个苹果", "一百二十四个人", "五百四十九本书"]
    assert bleu(["九百八十五个苹果", "一百二十四个人", "五百四十九本书"], refs) > 50
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["今天天气很好"], ["九百七十五"]) < 10
    assert bleu(["four hundred and twenty one", "Beijing"], ["four hundred and twenty one", "Beijing"]) == pytest.approx(100.0)


def test_bleu_is_corpus_bleu_not_a_mean_of_sentence_bleus():
    # n-gram matches pooled over the corpus: 1-grams 4/5, 2-grams 3/3, 3-grams 2/2, 4-grams 1/1, lengths
    # equal (no brevity penalty): 100 * (0.8 * 1 * 1 * 1) ** (1/4) = 94.57; the mean of the two sentence
    # BLEUs (100 and about 0) would be near 50
    assert bleu(["a b c d", "x"], ["a b c d", "y"]) == pytest.approx(100 * 0.8 ** 0.25, abs=1e-6)


def test_bleu_tokenizes_characters_when_any_reference_is_chinese():
    from deploylm.training.metrics import bleu_tokenize

    assert bleu_tokenize(["four hundred", "九百七十五"]) == "zh" and bleu_tokenize(["four hundred"]) == "13a"
    assert bleu_tokenize(["\U00020000", "one"]) == "zh" and bleu_tokenize(["\uf900"]) == "zh"   # Ext. B, compatibility
    # a mixed test split: the Chinese sentence that is one character off still scores its n-grams
    assert bleu(["九百七十四个苹果", "four hundred"], ["九百七十五个苹果", "four hundred"]) > 50


def test_metrics_of_an_empty_split_and_a_huge_loss():
    import math

    assert bleu([], []) == 0.0 and exact_match([], []) == 0.0          # sacrebleu itself raises on no sentences
    assert perplexity(1e4) == math.exp(50.0)                           # capped: still a finite JSON number


def test_text_data_drops_a_byte_order_mark(tmp_path):
    from deploylm.training.clean import CleanOptions
    from deploylm.training.text import load_text

    path = tmp_path / "story.txt"
    path.write_text("\ufeffOnce upon a time.\n\nThe end.\n", encoding="utf-8")
    docs, _ = load_text(path, CleanOptions())
    assert docs == ["Once upon a time.", "The end."]


def test_a_blank_line_holding_spaces_or_tabs_separates_paragraphs(tmp_path):
    """A line that looks empty in an editor (trailing spaces, a tab) ends a paragraph like an empty one."""
    from deploylm.training.text import read_documents

    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\n  \t\nThe end.\r\n \r\nReally.\n", encoding="utf-8")
    assert read_documents(path) == ["Once upon a time.", "The end.", "Really."]


def test_blank_texts_of_a_jsonl_file_are_skipped(tmp_path):
    from deploylm.training.text import read_documents

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "Once upon a time."}\n{"text": " \\n\\t "}\n{"text": "The end."}\n', encoding="utf-8")
    assert read_documents(path) == ["Once upon a time.", "The end."]


def test_the_cut_notice_counts_among_the_2000_longest_and_says_so():
    """bind counts cut pairs among the 2000 longest of each side: 2000 of them means "at least 2000"."""
    from deploylm.training.workloads import cut_notice

    assert cut_notice(0, 0, 5000, 64) is None
    assert "of 5000 training pairs, 2000+ sources and 3 targets are longer than the model's window of 64" \
        in cut_notice(2000, 3, 5000, 64)
    assert "1999 sources and 0 targets" in cut_notice(1999, 0, 5000, 64)


def test_the_tokenizer_is_learnt_from_the_training_split_only():
    """Held-out text never shapes the vocabulary (it would flatter the held-out loss)."""
    from deploylm.training.workloads import Seq2SeqWork

    train = [Example("red fox", "fox red")] * 20
    held_out = [Example("zebra quagga", "quagga zebra")] * 20
    vocab = Seq2SeqWork(Splits(train, held_out, held_out), 1).make_tokenizer(300).get_vocab()
    assert not [token for token in vocab if "zeb" in token or "quag" in token]
    assert any("fox" in token for token in vocab)


def test_the_decode_limit_sees_long_targets_anywhere_in_the_data():
    """max_new_tokens = 2 x the longest training target + 8, also when 3000 short targets come first."""
    from deploylm.models.config import make_config
    from deploylm.training.workloads import Seq2SeqWork

    long_target = " ".join(["word"] * 50)
    train = [Example(f"s{i}", "a") for i in range(3000)] + [Example(f"t{i}", long_target) for i in range(10)]
    work = Seq2SeqWork(Splits(train, [], []), eval_examples=0)
    tok = work.make_tokenizer(200)
    work.bind(tok, make_config("tiny", vocab_size=tok.get_vocab_size()))
    longest = len(tok.encode(long_target, add_special_tokens=False).ids)
    assert longest >= 50 and work.max_new_tokens == min(2 * longest + 8, make_config("tiny", 200).max_positions - 1)


def test_a_damaged_tokenizer_file_is_named(tmp_path):
    from deploylm.training.tokenizer import TOKENIZER_FILE

    (tmp_path / TOKENIZER_FILE).write_text('{"version": "1.0"}')
    with pytest.raises(UsageError, match=r"tokenizer.json: not a readable tokenizer"):
        load_tokenizer(tmp_path)


def test_pairs_longer_than_the_window_are_reported_once():
    """A target past the model's window is cut (the model then learns to stop mid-text): the run says so."""
    from deploylm.models.config import make_config
    from deploylm.training.tokenizer import train_tokenizer
    from deploylm.training.workloads import Seq2SeqWork

    short = [Example(f"{i} {i + 1}", f"{i + 1} {i}") for i in range(30)]
    long = [Example("a b", " ".join(["word"] * 600)), Example(" ".join(["x"] * 700), "y")]
    tok = train_tokenizer([t for ex in short + long for t in (ex.source, ex.target)], 300)
    config = make_config("tiny", tok.get_vocab_size())
    work = Seq2SeqWork(Splits(short + long, short[:2], short[:2]), 4)
    work.bind(tok, config)
    assert work.notice == (f"warning: of 32 training pairs, 1 sources and 1 targets are longer than the model's window "
                           f"of {config.max_positions} tokens and are cut to it; drop them with --max-length "
                           "(cleaning) or split them")
    fine = Seq2SeqWork(Splits(short, short[:2], short[:2]), 4)
    fine.bind(tok, config)
    assert fine.notice is None


def test_a_jsonl_suffix_in_capitals_is_still_jsonl(tmp_path):
    from deploylm.training.config import TrainConfig
    from deploylm.training.text import read_documents

    data = tmp_path / "DATA.JSONL"
    data.write_text('{"text": "first paragraph"}\n{"text": "second one"}\n')
    assert read_documents(data) == ["first paragraph", "second one"]        # not the raw JSON as text
    assert TrainConfig(out=tmp_path / "o", data=data).arch == "seq2seq"     # accepted as pairs for seq2seq


def test_exact_match_ignores_outer_whitespace_only():
    assert exact_match([" a b\n", "a  b"], ["a b", "a b"]) == 0.5


def test_held_out_loss_is_the_mean_over_tokens_and_perplexity_its_exp(d2w_tokenizer):
    """Loss = summed token cross-entropy (no smoothing) / label tokens over the whole split, whatever the
    batching; perplexity = exp of it, not a mean of per-sentence perplexities."""
    import math

    import torch

    from deploylm.models.config import make_config
    from deploylm.models.transformer import Seq2SeqTransformer
    from deploylm.training.evaluate import evaluate

    torch.manual_seed(0)
    config = make_config("tiny", d2w_tokenizer.get_vocab_size(), d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                         n_decoder_layers=1, dropout=0.0)
    model = Seq2SeqTransformer(config)
    examples = [Example("7", "seven"), Example("4096", "four thousand ninety-six"), Example("12", "twelve")]
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            one = make_batch(d2w_tokenizer, [ex], IDS, 64)
            logp = model(one.src_ids, one.src_mask, one.tgt_in)[0].log_softmax(-1)
            nll -= sum(float(logp[i, y]) for i, y in enumerate(one.labels[0].tolist()))
            count += one.labels.shape[1]
    for batch_size in (1, 2, 3):
        res = evaluate(model, d2w_tokenizer, examples, IDS, torch.device("cpu"), 64, 4, batch_size=batch_size)
        assert res.loss == pytest.approx(nll / count, rel=1e-5)
        assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_each_epoch_has_its_own_order():
    examples = [Example(str(i), str(i)) for i in range(10)]
    stream = BatchStream(examples, batch_size=10, seed=0)
    epochs = [[ex.source for ex in stream.examples_at(step)] for step in range(3)]
    assert all(sorted(e) == sorted(str(i) for i in range(10)) for e in epochs)   # each epoch visits every example once
    assert epochs[0] != epochs[1] != epochs[2]                                  # in a new order each time
    assert epochs != [[ex.source for ex in BatchStream(examples, 10, 1).examples_at(s)] for s in range(3)]


def test_long_pairs_are_cut_to_the_window_keeping_the_source_end_token(d2w_tokenizer):
    long = "123456789012"                                # 12 digits, one token each, + </s>
    batch = make_batch(d2w_tokenizer, [Example(long, long)], IDS, 8)
    src = batch.src_ids[0].tolist()
    assert len(src) == 8 and src[-1] == IDS.eos and src[:7] == d2w_tokenizer.encode(long).ids[:7]
    assert batch.tgt_in.shape[1] == 8 and batch.labels.shape[1] == 8              # <s> + 7 tokens; 7 tokens + </s>
    assert batch.labels[0, -1] == IDS.eos and batch.tgt_in[0, 0] == IDS.bos


def test_greedy_decoding_of_a_padded_batch_equals_each_source_alone(d2w_tokenizer):
    """The trainer's greedy loop (exact match, BLEU) masks source padding in the encoder and the
    cross-attention: a short source decodes the same beside a long one as alone."""
    import torch

    from deploylm.models.config import make_config
    from deploylm.models.transformer import Seq2SeqTransformer
    from deploylm.training.evaluate import greedy_decode

    torch.manual_seed(1)
    model = Seq2SeqTransformer(make_config("tiny", d2w_tokenizer.get_vocab_size(), d_model=32, n_heads=2, d_ff=64,
                                           n_encoder_layers=1, n_decoder_layers=1, dropout=0.0,
                                           tie_embeddings=False)).eval()
    with torch.no_grad():     # a random model that listens to its source (else it repeats one token whatever the input)
        model.decoder_layers[0].cross_attn.out_proj.weight.mul_(20)
    examples = [Example("7", "seven"), Example("409612345678", "x"), Example("12", "twelve")]
    together = greedy_decode(model, make_batch(d2w_tokenizer, examples, IDS, 64), IDS, 6)
    alone = [greedy_decode(model, make_batch(d2w_tokenizer, [ex], IDS, 64), IDS, 6)[0] for ex in examples]
    assert together == alone and len({tuple(row) for row in alone}) == 3      # each source its own output


def test_held_out_splits_are_ten_and_five_percent_capped_at_1000(tmp_path):
    from collections import Counter

    from deploylm.training.data import split_keys

    def sizes(n):
        counts = Counter(split_keys(tmp_path / "d.jsonl", [f"s{i}" for i in range(n)], 0, "sources").values())
        return counts[0], counts[1], counts[2]

    assert sizes(100) == (85, 5, 10)
    assert sizes(3) == (1, 1, 1)                                   # each held-out split at least 1
    assert sizes(25_000) == (23_000, 1000, 1000)                   # 10% and 5% of 25,000, capped at 1000


def test_a_data_file_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    """Other data errors say FILE:LINE; a Latin-1 byte said only its byte offset in the file."""
    from deploylm.training.data import read_jsonl
    from deploylm.training.text import read_documents

    pairs, text = tmp_path / "pairs.jsonl", tmp_path / "stories.txt"
    pairs.write_bytes(b'{"source": "a", "target": "b"}\n{"source": "c", "target": "d"}\n{"source": "caf\xe9", '
                      b'"target": "e"}\n')
    text.write_bytes(b"one paragraph\n\nanother\nna\xefve\n")
    for read, path, line, byte in ((read_jsonl, pairs, 3, 77), (read_documents, text, 4, 25)):
        with pytest.raises(UsageError) as err:
            read(path)
        assert str(err.value) == (f"{path}:{line}: not UTF-8 text (invalid continuation byte at byte {byte}): "
                                  "expected a UTF-8 file (convert it, e.g. iconv -f latin1 -t utf-8)")
