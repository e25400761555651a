"""Data cleaning for `deploylm train --data` (on by default): NFKC, whitespace collapse, exact
deduplication after normalisation, length filtering, and the summary of what was dropped and why."""
import json

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.training.clean import CleanOptions, clean_records, normalize_text

QUICK = ["--steps", 1, "--batch-size", 4, "--eval-every", 1]


def run(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


@pytest.fixture
def pairs(tmp_path):
    """30 good pairs, 2 duplicates (one only after NFKC + whitespace), 1 too short, 1 too long."""
    rows = [(f"word {i}", f"target {i}") for i in range(30)]
    rows += [("word 3", "target 3"), ("ｗｏｒｄ   4\n", " target\t4"), ("w", "x"), ("word " * 20, "long")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in rows))
    return path


def test_normalize_text():
    assert normalize_text("  ﬁne\u00a0day\n\n２０２４\tok ") == "fine day 2024 ok"


def test_clean_records_keeps_the_first_of_duplicates_in_order():
    records = [("b",), ("a",), ("B",), ("  b ",), ("a\u0301",), ("á",)]
    kept, report = clean_records(records, CleanOptions())
    assert kept == [("b",), ("a",), ("B",), ("á",)]               # NFKC composes a + U+0301 into á
    assert report.dropped["duplicate"] == 2 and report.normalized == 1 and report.kept == 4


def test_pairs_are_cleaned_and_the_summary_says_why(tmp_path, pairs):
    out = tmp_path / "run"
    result = run("--data", pairs, "--out", out, "--min-length", 2, "--max-length", 40, *QUICK)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "cleaning.json").read_text())
    assert report["records_in"] == 34 and report["kept"] == 30
    assert report["dropped"] == {"empty": 0, "too_short": 1, "too_long": 1, "duplicate": 2}
    assert report["options"] == {"enabled": True, "min_length": 2, "max_length": 40, "unit": "chars"}
    assert json.loads((out / "metrics.json").read_text())["cleaning"] == report
    assert ("cleaning: 34 records in, 30 kept; dropped 1 shorter than 2 chars, 1 longer than 40 chars, "
            "2 exact duplicates") in result.stdout


def test_no_clean_keeps_every_record(tmp_path, pairs):
    out = tmp_path / "run"
    result = run("--data", pairs, "--out", out, "--no-clean", *QUICK)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "cleaning.json").read_text())
    assert report["kept"] == report["records_in"] == 34 and not report["options"]["enabled"]
    assert "cleaning: off (--no-clean): 34 records used as read" in result.stdout


def test_text_paragraphs_are_cleaned_with_word_lengths(tmp_path):
    paragraphs = [f"Paragraph {i} has\nsome   words in it." for i in range(12)]
    paragraphs += ["Paragraph 0 has some words in it.", "Too short.", " ".join(["long"] * 50)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    out = tmp_path / "lm"
    result = run("--data", path, "--arch", "decoder", "--block-size", 16, "--out", out, "--length-unit", "words",
                 "--min-length", 3, "--max-length", 20, *QUICK)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "cleaning.json").read_text())
    assert report["dropped"] == {"empty": 0, "too_short": 1, "too_long": 1, "duplicate": 1}
    assert report["kept"] == 12 and report["normalized"] == 12      # every kept paragraph had a newline or double space


def test_resume_refuses_other_cleaning(tmp_path, pairs):
    out = tmp_path / "run"
    assert run("--data", pairs, "--out", out, *QUICK).exit_code == 0
    result = run("--data", pairs, "--out", out, *QUICK, "--resume", "--no-clean")
    assert result.exit_code == 2 and "clean" in result.stderr


@pytest.mark.parametrize("args, words", [
    (["--max-length", "0"], ["--max-length 0"]),
    (["--min-length", "-1"], ["--min-length -1"]),
    (["--min-length", "10", "--max-length", "5"], ["--max-length 5", "--min-length (10)"]),
    (["--min-length", "1000"], ["0 distinct sources", "at least 3"]),
])
def test_bad_cleaning_options_are_one_line(tmp_path, pairs, args, words):
    out = tmp_path / "out"
    result = run("--data", pairs, "--out", out, *args, *QUICK)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


def test_data_emptied_by_cleaning_says_what_cleaning_dropped(tmp_path):
    # unsegmented Chinese is one whitespace "word": --length-unit words --min-length 2 dropped every
    # pair and the error only said "0 distinct sources (after cleaning)"
    data = tmp_path / "中英.jsonl"
    data.write_text("".join(json.dumps({"source": f"第{i}个句子", "target": f"sentence number {i}"},
                                       ensure_ascii=False) + "\n" for i in range(10)), encoding="utf-8")
    out = tmp_path / "out"
    result = run("--data", data, "--out", out, "--length-unit", "words", "--min-length", "2", *QUICK)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    assert "0 distinct sources" in line and "10 records in, 0 kept; dropped 10 shorter than 2 words" in line, line
    assert not out.exists()


def test_length_limits_are_inclusive_and_judge_every_field():
    """--min-length/--max-length keep a field of exactly that length; a record is dropped when ANY field
    (the target too, not only the source) is empty, too short or too long."""
    options = CleanOptions(min_length=2, max_length=4)
    records = [("ab", "abcd"), ("abcd", "ab"), ("abc", ""), ("abc", "a"), ("abc", "abcde"), ("abcde", "abc")]
    kept, report = clean_records(records, options)
    assert kept == [("ab", "abcd"), ("abcd", "ab")]
    assert report.dropped == {"empty": 1, "too_short": 1, "too_long": 2, "duplicate": 0}
    words = CleanOptions(min_length=2, max_length=3, unit="words")
    kept, _ = clean_records([("a b", "c d e"), ("a b", "c"), ("a b c d", "e f")], words)
    assert kept == [("a b", "c d e")]


def test_a_report_shows_at_most_three_dropped_records_per_reason():
    kept, report = clean_records([("x",)] * 6, CleanOptions())
    assert kept == [("x",)] and report.dropped["duplicate"] == 5 and report.examples == {"duplicate": ["x"] * 3}
