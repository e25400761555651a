"""The demo's report: held-out exact match and the numbers below 1000 (which the held-out split lacks)."""
from pathlib import Path
from types import SimpleNamespace

import deploylm
from deploylm import demo
from deploylm.training.config import TrainResult
from deploylm.training.numbers import number_to_words


class ThreeDigitReader:
    """Reads 1- and 2-digit numbers as three digits, as the demo model did before short numbers got a share."""

    def generate(self, sources, num_beams, max_new_tokens):
        assert num_beams == 1
        words = [number_to_words(int(s) if len(s) == 3 else int(s[0] * 3)) for s in sources]
        return [SimpleNamespace(sequences=[SimpleNamespace(text=w)]) for w in words]


def test_short_number_check_counts_every_number_below_1000(monkeypatch):
    seen = []
    monkeypatch.setattr(deploylm, "load", lambda model, backend: seen.append((model, backend)) or ThreeDigitReader())
    right, wrong = demo.short_number_check(Path("runs/x"))
    assert seen == [(Path("runs/x"), "torch")]
    assert right == 900 + 1                      # 100..999, and "0" read as 000
    assert len(wrong) == 99 and wrong[0] == ("1", "one hundred eleven")
    assert ("12", "one hundred eleven") in wrong and ("5", "five hundred fifty-five") in wrong


def test_report_prints_held_out_and_short_numbers(monkeypatch, capsys):
    monkeypatch.setattr(deploylm, "load", lambda model, backend: ThreeDigitReader())
    state = demo.DemoState(out=Path("runs/x"))
    state.train = TrainResult(Path("runs/x"), 1000, {"exact_match": 1.0, "bleu": 100.0},
                              [("4096", "four thousand ninety-six", "four thousand ninety-six")], [0.1] * 1000)
    demo.stage_report(state)
    out = capsys.readouterr().out
    assert "held-out test exact match (4-6 digit numbers): 100.0%" in out
    assert ("numbers below 1000 (all in training), greedy: 901/1000 exact; 1 -> one hundred eleven; "
            "2 -> two hundred twenty-two; 3 -> three hundred thirty-three\n") in out
    assert "[ok ]    4096 -> four thousand ninety-six" in out
