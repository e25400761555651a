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
    assert "held-out test exact match (4-6 digit numbers): 100.0%  (BLEU 100.0, 1000 steps, checkpoint in runs/x)\n" in out
    assert ("numbers below 1000 (all in training), greedy: 901/1000 exact; 1 -> one hundred eleven; "
            "2 -> two hundred twenty-two; 3 -> three hundred thirty-three\n") in out
    assert "[ok ]    4096 -> four thousand ninety-six" in out


class Beams:
    """A backend's answers: each source's best hypothesis (token ids, text, score), as `generate` returns them."""

    def __init__(self, tokens, calls):
        self.tokens, self.calls = tokens, calls

    def generate(self, sources, num_beams, max_new_tokens):
        self.calls.append((list(sources), num_beams, max_new_tokens))
        return [SimpleNamespace(prompt=s, sequences=[SimpleNamespace(token_ids=self.tokens(s), text=f"words {s}",
                                                                     score=-0.25)]) for s in sources]


def test_onnx_stage_counts_the_inputs_whose_beam_4_tokens_match_torch(monkeypatch, capsys):
    """The parity line is what was measured: ONNX Runtime's artifact against PyTorch's checkpoint, both with
    4 beams, token ids compared input by input (here the last one differs)."""
    calls = {"onnx": [], "torch": []}
    loaded = []

    def load(model, backend):
        loaded.append((model, backend))
        differs = backend == "onnx"
        return Beams(lambda s: [1, 2, 3] + ([4] if differs and s == "1000000" else []), calls[backend])

    monkeypatch.setattr(deploylm, "load", load)
    state = demo.DemoState(out=Path("runs/x"), artifact=Path("export/x"))
    state.train = TrainResult(Path("runs/x"), 10, {}, [("12", "twelve", "twelve"), ("7", "seven", "seven")], [0.1])
    demo.stage_onnx(state)
    out = capsys.readouterr().out
    assert sorted(loaded) == [(Path("export/x"), "onnx"), (Path("runs/x"), "torch")]
    sources = ["12", "7", "4096", "1000000"]
    assert calls == {"onnx": [(sources, 4, 24)], "torch": [(sources, 4, 24)]}
    assert "  onnx     4096 -> words 4096   (score -0.250)" in out
    assert "parity: onnx beam-4 tokens identical to torch on 3/4 inputs" in out


def test_next_commands_name_this_python_s_deploylm(tmp_path):
    """The closing hints said `.venv/bin/deploylm` wherever the demo ran; from a `pip install deploylm` venv outside
    the working folder that path does not exist."""
    bin_dir = tmp_path / "project" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "deploylm").write_text("#!/bin/sh\n")
    python = str(bin_dir / "python")
    assert demo.deploylm_command(python, str(tmp_path / "project")) == ".venv/bin/deploylm"   # make demo
    assert demo.deploylm_command(python, str(tmp_path / "elsewhere")) == str(bin_dir / "deploylm")
    assert demo.deploylm_command(str(tmp_path / "python3"), str(tmp_path)) == f"{tmp_path / 'python3'} -m deploylm"
