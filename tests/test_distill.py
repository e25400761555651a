"""Distillation: the loss is the documented KD + CE mix, students start from every other teacher layer,
short runs lower the KD loss and save students that load and generate, bad input is one line, exit 2."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.models.checkpoint import build_model, load_checkpoint
from deploylm.models.config import make_config
from deploylm.models.source import resolve_source
from deploylm.training import distill_setup
from deploylm.training.distill import DistillConfig, distill, distillation_loss, plan_layers, remap_layers, select_layers
from tests.helpers.tiny_hf import CORPUS
from tests.helpers.tiny_seed import build_tiny_seed

FAST = dict(batch_size=16, lr=3e-3, eval_examples=8, progress=False)


@pytest.fixture(scope="module")
def seed_teacher(tmp_path_factory):
    return build_tiny_seed(tmp_path_factory.mktemp("distill") / "teacher", layers=4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(CORPUS * 3) + "\n")
    return path


def kd_fell(losses, factor=0.8):
    first = sum(step["kd"] for step in losses[:5]) / 5
    last = sum(step["kd"] for step in losses[-5:]) / 5
    return last < factor * first


def test_loss_is_temperature_scaled_kl_plus_hard_ce():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)   # [B, T, V]
    labels = torch.tensor([[1, 2, -100], [0, -100, 6]])
    total, kd, ce = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)
    keep = labels != -100
    p_t = (teacher[keep] / 2).softmax(-1)
    log_p_s = (student[keep] / 2).log_softmax(-1)
    expected_kd = 4 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(kd, expected_kd)
    torch.testing.assert_close(ce, F.cross_entropy(student[keep], labels[keep]))
    torch.testing.assert_close(total, 0.3 * expected_kd + 0.7 * ce)
    _, same, _ = distillation_loss(teacher, teacher, labels, 2.0, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_layer_choice():
    assert select_layers(12, 6) == [0, 2, 4, 7, 9, 11]          # DistilBERT's choice
    assert select_layers(4, 2) == [0, 3] and select_layers(3, 1) == [0] and select_layers(5, 5) == list(range(5))
    assert plan_layers({"enc": 6, "dec": 3}, None, False) == {"enc": [0, 2, 5], "dec": [0, 2]}
    assert plan_layers({"enc": 6, "dec": 3}, 2, False) == {"enc": [0, 5], "dec": [0, 2]}


def test_remap_copies_every_other_layer_and_the_rest():
    config = make_config("tiny", 50, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=4, n_decoder_layers=4)
    teacher = build_model(config)
    kept = {"encoder_layers": [0, 3], "decoder_layers": [0, 3]}
    student = build_model(make_config("tiny", 50, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=2, n_decoder_layers=2))
    student.load_state_dict(remap_layers(teacher.state_dict(), kept), strict=True)
    for stack in ("encoder_layers", "decoder_layers"):
        for j, i in enumerate(kept[stack]):
            for (name, a), (_, b) in zip(getattr(student, stack)[j].state_dict().items(),
                                         getattr(teacher, stack)[i].state_dict().items()):
                assert torch.equal(a, b), f"{stack}.{j}.{name}"
    assert torch.equal(student.src_embed.weight, teacher.src_embed.weight)
    assert torch.equal(student.decoder_norm.weight, teacher.decoder_norm.weight)


def test_hf_student_starts_from_teacher_layers(tiny_gpt2_dir, text_file, tmp_path):
    setup = distill_setup.build(DistillConfig(teacher=tiny_gpt2_dir, out=tmp_path / "s", data=text_file, **FAST))
    assert setup.kept == {"transformer.h": [0]} and setup.student.config.n_layer == 1
    t_state, s_state = setup.teacher.state_dict(), setup.student.state_dict()
    assert set(s_state) == {k for k in t_state if not k.startswith("transformer.h.1.")}
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key


def test_seq2seq_run_lowers_kd_and_saves_a_checkpoint_that_generates(seed_teacher, tmp_path):
    out = tmp_path / "student"
    result = distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=40, alpha=0.9, **FAST))
    assert kd_fell(result.losses)
    assert result.kept_layers == {"encoder_layers": [0, 3], "decoder_layers": [0, 3]} and result.init == "teacher"
    assert result.parameters["student"] < result.parameters["teacher"]
    assert set(result.student) >= {"exact_match", "bleu", "loss", "eval_s"}
    model, config = load_checkpoint(out)
    assert (config.n_encoder_layers, config.n_decoder_layers) == (2, 2)
    src = torch.tensor([[5, 6, 2]])
    assert model(src, torch.ones_like(src), torch.tensor([[1, 5]])).shape == (1, 2, config.vocab_size)
    import deploylm

    res = deploylm.load(out).generate("red fox blue", num_beams=2, max_new_tokens=4)
    assert len(res[0].sequences[0].token_ids) <= 4
    report = json.loads((out / "distill.json").read_text())
    assert report["settings"]["temperature"] == 2.0 and report["settings"]["teacher"] == str(seed_teacher)
    assert report["settings"]["warmup"] == min(DistillConfig.warmup, 40 // 10)      # what ran: capped at steps/10
    assert report["kept_layers"] == result.kept_layers and report["teacher"] == pytest.approx(result.teacher)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]          # no temporary folders left
    from deploylm.export.calibration import text_sets

    assert report["task"] == "reverse"      # so that quantizing the student calibrates and judges it on its task
    calib, held = text_sets(resolve_source(out), None, 8, seq2seq=True)
    assert calib.origin == held.origin == "task:reverse" and len(calib.inputs) == 8
    assert all(t.split() == s.split()[::-1] for s, t in zip(calib.inputs, calib.targets))


def test_the_student_trains_with_decay_on_matrices_clipping_and_a_cosine_to_zero(seed_teacher, tmp_path, monkeypatch):
    """docs/distillation.md: AdamW without decay on biases and LayerNorm weights, gradient clipping,
    linear warmup (min(100, steps/10)) then cosine decay: the optimizer after the run says so."""
    from deploylm.training import schedule

    made = {}
    real_optimizer, real_scheduler = schedule.make_optimizer, schedule.make_scheduler
    monkeypatch.setattr(schedule, "make_optimizer", lambda *a, **k: made.setdefault("opt", real_optimizer(*a, **k)))
    monkeypatch.setattr(schedule, "make_scheduler", lambda *a, **k: made.setdefault("sched", real_scheduler(*a, **k)))
    distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", steps=1, clip_norm=1e-4,
                          weight_decay=0.03, **{**FAST, "eval_examples": 2}))
    decay, no_decay = made["opt"].param_groups
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    # Adam's first moment after one step is 0.1 * the clipped gradient, whose norm is clip_norm
    moments = [state["exp_avg"] for state in made["opt"].state.values()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments]))
    assert float(norm) == pytest.approx(0.1 * 1e-4, rel=1e-3)
    # one step: no warmup (capped at steps // 10 = 0), and the cosine has reached 0 after its only step
    assert made["sched"].last_epoch == 1 and decay["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("teacher_kind", ["hf", "seed-decoder"])
def test_causal_run_on_text(teacher_kind, tiny_gpt2_dir, text_file, tmp_path):
    teacher = tiny_gpt2_dir if teacher_kind == "hf" else build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)
    out = tmp_path / "student"
    result = distill(DistillConfig(teacher=teacher, out=out, data=text_file, steps=25, alpha=1.0, block_size=16, **FAST))
    assert kd_fell(result.losses)
    assert result.student["held_out_tokens"] > 0 and result.student["perplexity"] > 1
    ids = torch.tensor([[5, 6, 7]])
    if teacher_kind == "hf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        assert resolve_source(out).kind == "hf"
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.n_layer == 1 and AutoTokenizer.from_pretrained(out)("fox")["input_ids"]
        logits = model(input_ids=ids).logits
        # export judges the student on the tail of --data that distill held out, not on built-in English
        from deploylm.export.calibration import describe, text_sets

        record = json.loads((out / "distill.json").read_text())
        assert record["data"] == str(text_file.resolve()) and record["arch"] == "lines", record
        lines = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        calib, held = text_sets(resolve_source(out), None, 8, seq2seq=False)
        assert held.origin == f"data:{text_file.resolve()}" and describe(held.origin).startswith("the test split of")
        assert held.scored == tuple(lines[-(len(lines) // 10):][:len(held.scored)]) and held.scored
        assert set(calib.inputs) <= set(lines[:-(len(lines) // 10)])
    else:
        model, config = load_checkpoint(out)
        assert config.arch == "decoder" and config.n_decoder_layers == 1
        logits = model(ids)[0]
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_other_width_is_random_init(seed_teacher, tmp_path):
    result = distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", steps=2, d_model=16, **FAST))
    _, config = load_checkpoint(tmp_path / "s")
    assert result.init == "random" and (config.d_model, config.d_ff, config.n_decoder_layers) == (16, 32, 2)


def test_cli_run(seed_teacher, tmp_path):
    out = tmp_path / "cli-student"
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), "--task", "reverse",
                                   "--steps", "3", "--layers", "1", "--batch-size", "8", "--eval-examples", "4"])
    assert res.exit_code == 0, res.output
    assert "student:" in res.output and "kd " in res.output
    assert load_checkpoint(out)[1].n_encoder_layers == 1


def test_help():
    res = CliRunner().invoke(cli, ["distill", "--help"])
    assert res.exit_code == 0 and "--temperature" in res.output and "--alpha" in res.output
    # --task is not for encoder-decoder teachers only: a deploylm decoder-only teacher takes stories
    help_text = " ".join(res.output.split())
    assert "digits2words or reverse (encoder-decoder teachers), stories (deploylm decoder-only teachers)" in help_text
    # a causal LM's evaluation scores every held-out block whatever --eval-examples says
    assert "Encoder-decoder teachers: test examples decoded by teacher and student (causal LMs: every held-out " \
           "block)" in help_text


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{tmp}/nope"], "does not exist: expected a deploylm checkpoint folder or a Hugging Face causal LM "
                                  "folder"),        # not .gguf files or artifacts, which distill refuses
    (["--teacher", "{seed}", "--layers", "4"], "--layers 4: expected fewer than the teacher's 4 layers"),
    (["--teacher", "{seed}", "--layers", "7"], "--layers 7"),
    (["--teacher", "{seed}", "--layers", "0"], "--layers 0"),
    (["--teacher", "{seed}", "--temperature", "0"], "--temperature 0"),
    (["--teacher", "{seed}", "--temperature", "-1"], "--temperature -1"),
    (["--teacher", "{seed}", "--alpha", "1.5"], "--alpha 1.5: expected a number in [0, 1]"),
    (["--teacher", "{seed}", "--alpha", "-0.1"], "--alpha -0.1"),
    (["--teacher", "{seed}", "--alpha", "x"], "--alpha 'x'"),
    (["--teacher", "{seed}", "--d-model", "33"], "multiple of the teacher's n_heads"),
    (["--teacher", "{seed}", "--d-model", "128"], "--d-model 128: the student would have"),     # teacher: d_model 32
    (["--teacher", "{seed}", "--task", "nope"], "unknown task 'nope'"),
    (["--teacher", "{seed}", "--task", "stories"], "unknown task 'stories' for an encoder-decoder teacher: expected "
                                                   "one of digits2words, reverse (a decoder-only teacher is distilled on text: "
                                                   "--data FILE.txt, or --task stories for a deploylm one)"),
    (["--teacher", "{seed}", "--steps", "0"], "--steps 0"),
    (["--teacher", "{seed}", "--task", "reverse", "--block-size", "16"], "--block-size 16 applies to causal LM teachers"),
    (["--teacher", "{seed}", "--task", "reverse", "--seed", "-1"], "--seed -1: expected an integer from 0 to"),
    (["--teacher", "{gpt2}", "--task", "reverse"], "--task applies to encoder-decoder"),
    (["--teacher", "{gpt2}"], "--data FILE.txt is required"),
    (["--teacher", "{gpt2}", "--data", "{tmp}/missing.txt"], "does not exist"),
    (["--teacher", "{gpt2}", "--data", "{tmp}/lines.jsonl"], "a Hugging Face teacher reads plain text line by line"),
    (["--teacher", "{gpt2}", "--data", "{text}", "--layers", "2"], "--layers 2"),
    (["--teacher", "{gpt2}", "--data", "{text}", "--d-model", "64"], "keeps the teacher's width"),
])
def test_bad_input_is_one_line_exit_2(args, message, seed_teacher, tiny_gpt2_dir, text_file, tmp_path):
    values = {"tmp": tmp_path, "seed": seed_teacher, "gpt2": tiny_gpt2_dir, "text": text_file}
    out = tmp_path / "out"
    argv = ["distill", *[a.format(**values) for a in args], "--out", str(out)]
    res = CliRunner().invoke(cli, argv if "--steps" in args else [*argv, "--steps", "1"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_is_refused(seed_teacher, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), "--task", "reverse"])
    assert res.exit_code == 2 and "exists" in res.output
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), "--task", "reverse", "--force"])
    assert res.exit_code == 2 and "refusing to replace" in res.output
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_second_distill_into_the_same_out_is_refused_while_the_first_runs(seed_teacher, tmp_path):
    """Both used to pass the --out check, train, and report success; the second silently replaced the first's
    student, without --force."""
    from deploylm.errors import UsageError
    from deploylm.fsutil import exclusive_writer

    out = tmp_path / "student"
    with exclusive_writer(out):                 # what the first command holds while it runs
        with pytest.raises(UsageError, match="is being written by another deploylm command"):
            distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=1, **FAST))
    assert not out.exists()


def test_force_refuses_a_student_folder_that_holds_the_data(seed_teacher, tmp_path):
    """--force replaces the old student folder: it used to take the --data file kept in it along, while
    distill.json recorded that path for export's calibration."""
    out = tmp_path / "student"
    distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=1, **FAST))
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": f"a {i}", "target": f"b {i}"}) + "\n" for i in range(9)))
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), "--data", str(data),
                                   "--force", "--steps", "1"])
    assert res.exit_code == 2 and "is inside --out" in res.output and "which --force replaces" in res.output, res.output
    assert data.is_file()


def test_force_replaces_only_a_model_folder(seed_teacher, tmp_path):
    out = tmp_path / "service"
    (out / "src").mkdir(parents=True)
    (out / "config.json").write_text('{"port": 8080}')      # a config.json, but no model weights beside it
    (out / "src" / "main.py").write_text("serve()")
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), "--task", "reverse",
                                   "--force"])
    assert res.exit_code == 2 and "holds no model (no config.json beside model.safetensors" in res.output, res.output
    assert (out / "src" / "main.py").read_text() == "serve()"


def test_an_unwritable_output_is_refused(seed_teacher):
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", "/proc/deploylm-student",
                                   "--task", "reverse"])
    assert res.exit_code == 2 and "--out '/proc/deploylm-student': cannot write in '/proc'" in res.output, res.output


def test_force_refuses_the_current_folder(seed_teacher, tmp_path, monkeypatch):
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text("{}")                    # looks like a model, but is where we stand
    monkeypatch.chdir(out)
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", ".", "--task", "reverse", "--force"])
    assert res.exit_code == 2 and "--out '.' is the current folder or holds it" in res.output, res.output
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_student_exports_and_generates_from_the_artifact(seed_teacher, tmp_path):
    import deploylm
    from deploylm.export.pipeline import export_model

    distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", steps=3, **FAST))
    export_model(tmp_path / "s", "fp32", tmp_path / "artifact")
    torch_out = deploylm.load(tmp_path / "s").generate("red fox", num_beams=2, max_new_tokens=4)
    onnx_out = deploylm.load(tmp_path / "artifact").generate("red fox", num_beams=2, max_new_tokens=4)
    assert onnx_out[0].sequences[0].token_ids == torch_out[0].sequences[0].token_ids


def test_teacher_splits_follow_its_recorded_cleaning(tmp_path):
    """A teacher trained on cleaned jsonl is distilled on the same (cleaned) splits, never its test split."""
    from deploylm.models.checkpoint import load_checkpoint, save_checkpoint
    from deploylm.training.clean import CleanOptions
    from deploylm.training.data import jsonl_splits

    data = tmp_path / "pairs.jsonl"
    rows = [{"source": f"item  {i % 40}", "target": f"out {i % 40}"} for i in range(120)]  # duplicates + spaces
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model, config = load_checkpoint(build_tiny_seed(tmp_path / "base", layers=2))
    clean = CleanOptions(enabled=True, min_length=1, max_length=None, unit="chars")
    identity = {"data": str(data), "seed": 3, "arch": "seq2seq", "clean": clean.as_json()}
    teacher = save_checkpoint(tmp_path / "teacher", model, config, training_state={"identity": identity}) or tmp_path / "teacher"
    splits, record = distill_setup._seq2seq_splits(DistillConfig(teacher=teacher, out=tmp_path / "s"), teacher)
    expected = jsonl_splits(data, 3, clean)
    assert [e.source for e in splits.test] == [e.source for e in expected.test]
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 40  # the 80 duplicates were dropped
    # distill.json records the data as export's calibration finds it again: not a task, the same splits
    assert "task" not in record and record["data"] == str(data.resolve()) and record["seed"] == 3
    assert record["clean"] == clean.as_json() and record["arch"] == "seq2seq" and len(record["data_sha256"]) == 64


def test_data_for_a_teacher_without_recorded_cleaning_is_cleaned_as_train_does(tmp_path, seed_teacher):
    """--data for a teacher that records no cleaning (a task teacher, a bare checkpoint) is cleaned with the
    defaults of `train --data`, and distill.json says so: export's calibration draws the same splits again,
    so the student's "held-out" examples are not ones it trained on."""
    from deploylm.export.calibration import text_sets
    from deploylm.training.clean import CleanOptions
    from deploylm.training.data import jsonl_splits

    data = tmp_path / "pairs.jsonl"
    rows = [{"source": f"item {'  ' if i % 2 else ' '}{i}", "target": f"out {i}"} for i in range(60)]  # double spaces
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits, record = distill_setup._seq2seq_splits(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", data=data),
                                                   seed_teacher)
    expected = jsonl_splits(data, 0, CleanOptions())
    assert [e.source for e in splits.train] == [e.source for e in expected.train]
    assert record["clean"] == CleanOptions().as_json()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "distill.json").write_text(json.dumps(record))
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "s" / name).write_bytes((seed_teacher / name).read_bytes())
    _, held = text_sets(resolve_source(tmp_path / "s"), None, 8, seq2seq=True)
    assert list(held.inputs) == [e.source for e in splits.test]


def test_a_data_students_export_is_judged_on_the_teachers_test_split(tmp_path, monkeypatch):
    """A student of a --data teacher (trained from a relative path, with cleaning options) is quality-
    checked on the teacher's own test split, from any folder, as the teacher is; a changed file is said."""
    from deploylm.export.calibration import describe, text_sets
    from deploylm.training.config import TrainConfig
    from deploylm.training.data import jsonl_splits
    from deploylm.training.trainer import train

    work = tmp_path / "work"
    work.mkdir()
    rows = [{"source": f"{i} {i + 1}", "target": f"{i + 1} {i}"} for i in range(300)] + \
           [{"source": "x " * 40, "target": "long"}]                        # dropped by --max-length 16
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.chdir(work)
    clean = dict(enabled=True, min_length=1, max_length=16, unit="words")
    from deploylm.training.clean import CleanOptions

    train(TrainConfig(out=Path("teacher"), data=Path("pairs.jsonl"), size="tiny", steps=2, batch_size=8,
                      eval_examples=4, vocab_size=300, clean=CleanOptions(**clean), progress=False))
    distill(DistillConfig(teacher=work / "teacher", out=work / "student", steps=2, layers=1, **FAST))
    monkeypatch.chdir(tmp_path)                                           # export runs elsewhere
    expected = jsonl_splits(work / "pairs.jsonl", 0, CleanOptions(**clean)).test
    for model in ("teacher", "student"):
        calib, held = text_sets(resolve_source(work / model), None, 8, seq2seq=True)
        assert held.origin == f"data:{(work / 'pairs.jsonl').resolve()}", model
        assert list(held.inputs) == [e.source for e in expected] and "x x" not in " ".join(held.inputs)
    with (work / "pairs.jsonl").open("a") as fh:
        fh.write(json.dumps({"source": "new", "target": "pair"}) + "\n")
    _, held = text_sets(resolve_source(work / "student"), None, 8, seq2seq=True)
    assert held.origin.startswith("data-changed:") and "changed since training" in describe(held.origin)


def test_learning_rate_default_depends_on_how_the_student_starts(seed_teacher, tmp_path):
    from deploylm.training.distill import LR_FROM_SCRATCH, LR_FROM_TEACHER

    fast = {k: v for k, v in FAST.items() if k != "lr"}
    same = distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "a", task="reverse", steps=2, **fast))
    other = distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "b", task="reverse", steps=2, d_model=16, **fast))
    assert (same.init, other.init) == ("teacher", "random")
    settings = [json.loads((tmp_path / n / "distill.json").read_text())["settings"] for n in ("a", "b")]
    assert [s["lr"] for s in settings] == [LR_FROM_TEACHER, LR_FROM_SCRATCH]
    given = distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "c", task="reverse", steps=2, d_model=16,
                                  lr=2e-4, **fast))
    assert given.init == "random" and json.loads((tmp_path / "c" / "distill.json").read_text())["settings"]["lr"] == 2e-4


def test_decoder_teacher_reads_text_as_it_was_trained(tmp_path):
    """A deploylm decoder-only teacher sees the text as its training did: the same cleaning (hard-wrapped
    lines joined, duplicate paragraphs dropped), the same split seed, its train split as <s> doc </s>
    in blocks of its recorded --block-size, and its test split held out (not the last tenth of all)."""
    from deploylm.training.clean import CleanOptions

    teacher = build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)
    distinct = [f"paragraph {i}: " + " ".join(CORPUS[i:i + 3]) for i in range(0, 30)]
    wrapped = ["\n".join(p.split(" ", 4)[:4] + [p.split(" ", 4)[4]]) for p in distinct]   # hard-wrapped
    data = tmp_path / "paragraphs.txt"
    data.write_text("\n\n".join(wrapped * 2) + "\n")                     # every paragraph twice
    identity = {"arch": "decoder", "block_size": 12, "data": str(data.resolve()), "seed": 5,
                "clean": CleanOptions().as_json()}
    torch.save({"identity": identity}, teacher / "training_state.pt")
    config = load_checkpoint(teacher)[1]
    setup = distill_setup.build(DistillConfig(teacher=teacher, out=tmp_path / "s", data=data, **FAST))
    assert setup.block_size == 12
    inputs, labels = setup.batch(0)
    assert inputs["input_ids"].shape == labels.shape == (16, 12)
    # the streams `train --arch decoder` builds from this file (deploylm.training.text), independently of distill
    train_stream, test_stream, docs = training_streams(teacher, data, seed=5)
    assert len(docs) == 30 and not any("\n" in d for d in docs)          # duplicates dropped, lines joined
    windows = [train_stream[s:s + 13] for s in range(0, len(train_stream) - 12, 12)]
    rows = torch.cat([inputs["input_ids"], labels[:, -1:]], dim=1).tolist()          # [16, 13]
    assert all(row in windows for row in rows) and windows[0][0] == config.bos_token_id
    assert setup.data_record["seed"] == 5 and setup.data_record["clean"] == CleanOptions().as_json()

    result = distill(DistillConfig(teacher=teacher, out=tmp_path / "student", data=data, steps=2, **FAST))
    held = len(test_stream) - 1 if len(test_stream) <= 13 else (len(test_stream) - 1) // 12 * 12
    assert 0 < result.student["held_out_tokens"] <= len(test_stream) and result.student["held_out_tokens"] >= held - 12
    assert json.loads((tmp_path / "student" / "distill.json").read_text())["settings"]["block_size"] == 12
    override = distill_setup.build(DistillConfig(teacher=teacher, out=tmp_path / "s2", data=data, block_size=20, **FAST))
    assert override.batch(0)[0]["input_ids"].shape[1] == 20
    # without --data: the text file it records, as a seq2seq teacher's recorded --data file is
    default = distill_setup.build(DistillConfig(teacher=teacher, out=tmp_path / "s3", **FAST))
    assert default.data_record == setup.data_record and torch.equal(default.batch(0)[1], labels)


def test_a_changed_teacher_data_file_is_refused(tmp_path):
    """The teacher's data file grew since training: drawing its splits anew would train the student on
    the teacher's test examples, so distillation refuses (both kinds of teacher)."""
    from deploylm.training.config import file_sha256

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"source": f"a {i}", "target": f"b {i}"}) for i in range(60)) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + " ".join(CORPUS[i:i + 3]) for i in range(30)) + "\n")
    seq2seq = build_tiny_seed(tmp_path / "t1", layers=2)
    lm = build_tiny_seed(tmp_path / "t2", arch="decoder", layers=2)
    for teacher, path, arch in ((seq2seq, data, "seq2seq"), (lm, text, "decoder")):
        identity = {"arch": arch, "data": str(path.resolve()), "seed": 0, "data_sha256": file_sha256(path)}
        torch.save({"identity": identity}, teacher / "training_state.pt")
    distill_setup.build(DistillConfig(teacher=seq2seq, out=tmp_path / "s", **FAST))             # unchanged: fine
    with data.open("a") as fh:
        fh.write(json.dumps({"source": "new", "target": "pair"}) + "\n")
    with text.open("a") as fh:
        fh.write("\na new paragraph\n")
    for args in (["--teacher", str(seq2seq)], ["--teacher", str(seq2seq), "--data", str(data)],
                 ["--teacher", str(lm), "--data", str(text)]):
        res = CliRunner().invoke(cli, ["distill", *args, "--out", str(tmp_path / "student"), "--steps", "1"])
        assert res.exit_code == 2 and "changed since teacher" in res.output, res.output
        assert "the teacher's test examples would train the student" in res.output
    assert not (tmp_path / "student").exists()


def training_streams(teacher, data, seed):
    """The train and test token streams the trainer builds from `data`, and its cleaned documents."""
    from deploylm.training.clean import CleanOptions
    from deploylm.training.text import load_text, text_splits, token_stream
    from deploylm.training.tokenizer import load_tokenizer

    config = load_checkpoint(teacher)[1]
    docs, _ = load_text(data, CleanOptions())
    splits = text_splits(data, docs, seed)
    tok, bos, eos = load_tokenizer(teacher), config.bos_token_id, config.eos_token_id
    return token_stream(tok, splits.train, bos, eos), token_stream(tok, splits.test, bos, eos), docs


def test_block_size_past_the_window_is_refused(tmp_path, text_file):
    teacher = build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)        # 64 positions
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"),
                                   "--data", str(text_file), "--block-size", "65", "--steps", "1"])
    assert res.exit_code == 2 and "--block-size 65: expected at most the teacher's 64 positions" in res.output, res.output


@pytest.mark.parametrize("kind, args, message", [
    ("gpt2", ["--data", "{tmp}/missing.txt"], "does not exist: expected a plain text file"),
    ("gpt2", ["--data", "{text}", "--block-size", "100000"], "--block-size 100000: expected at most the teacher's"),
    ("lm", ["--data", "{text}", "--block-size", "65"], "--block-size 65: expected at most the teacher's 64 positions"),
    ("lm", ["--data", "{tmp}/empty.txt"], "no text"),
])
def test_text_checks_run_before_the_teachers_weights_load(kind, args, message, tiny_gpt2_dir, text_file, tmp_path,
                                                          monkeypatch):
    """docs/distillation.md: "Every check runs before the teacher's weights load" (a missing --data file
    or a --block-size past the window used to be found only after a Hugging Face teacher had loaded)."""
    import deploylm.models.checkpoint as checkpoint
    import deploylm.models.hf as hf

    def loaded(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded before the checks")

    teacher = tiny_gpt2_dir if kind == "gpt2" else build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)
    (tmp_path / "empty.txt").write_text("\n\n")
    monkeypatch.setattr(hf, "load_hf_model", loaded)
    monkeypatch.setattr(checkpoint, "load_checkpoint", loaded)
    argv = [a.format(tmp=tmp_path, text=text_file) for a in args]
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), *argv,
                                   "--steps", "1"])
    assert res.exit_code == 2 and message in res.output, res.output


def test_an_artifact_teacher_is_refused_in_plain_words(tmp_path):
    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(artifact), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "is an exported artifact: expected a deploylm checkpoint" in res.output, res.output


def test_a_stories_teacher_is_distilled_on_its_own_task(tmp_path):
    """A decoder-only teacher trained with --task stories: distill reads the same generated text and
    split (its seed), without --data; --task stories also works for any deploylm decoder teacher."""
    from deploylm.training.stories import stories
    from deploylm.training.text import text_splits, token_stream
    from deploylm.training.tokenizer import load_tokenizer

    teacher = build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)
    torch.save({"identity": {"arch": "decoder", "task": "stories", "seed": 2, "block_size": 12}},
               teacher / "training_state.pt")
    setup = distill_setup.build(DistillConfig(teacher=teacher, out=tmp_path / "s", **FAST))
    assert setup.data_record == {"task": "stories", "seed": 2} and setup.block_size == 12
    config = load_checkpoint(teacher)[1]
    splits = text_splits("task stories", stories(2), 2)
    stream = token_stream(load_tokenizer(teacher), splits.train, config.bos_token_id, config.eos_token_id)
    windows = {tuple(stream[s:s + 13]) for s in range(0, len(stream) - 12, 12)}
    inputs, labels = setup.batch(0)
    rows = torch.cat([inputs["input_ids"], labels[:, -1:]], dim=1).tolist()
    assert all(tuple(row) in windows for row in rows)
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s2"),
                                   "--task", "reverse", "--steps", "1"])
    assert res.exit_code == 2 and "unknown task 'reverse' for a decoder-only teacher: expected one of stories" in res.output


def test_a_decoder_teacher_without_recorded_text_needs_data(tmp_path):
    teacher = build_tiny_seed(tmp_path / "lm", arch="decoder", layers=2)
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s"), "--steps", "1"])
    assert res.exit_code == 2 and "does not record its training text: give --data FILE.txt (or --task stories)" \
        in res.output, res.output


def test_a_diverging_distillation_stops_before_saving(seed_teacher, tmp_path):
    from deploylm.errors import TrainingDiverged

    out = tmp_path / "student"
    with pytest.raises(TrainingDiverged, match=r"the training loss became nan at step 1 with lr"):
        distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=3, temperature=float("1e-45"),
                              **FAST))
    assert not out.exists()


def test_text_blocks_are_length_plus_one_tokens_and_the_last_tenth_is_held_out():
    """Blocks start every `length` tokens and hold length + 1 (inputs and next-token labels); a stream no
    longer than one block is one block; the last tenth of the blocks is held out (fewer than ten: all)."""
    blocks = distill_setup._text_blocks
    assert blocks(list(range(10)), "f", 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert blocks(list(range(9)), "f", 3) == [[0, 1, 2, 3], [3, 4, 5, 6]]          # never a short last block
    assert blocks([0, 1, 2], "f", 3) == [[0, 1, 2]] and blocks([0, 1, 2, 3], "f", 3) == [[0, 1, 2, 3]]
    rows = [[i] for i in range(20)]
    assert distill_setup._split_blocks(rows) == (rows[:18], rows[18:])
    assert distill_setup._split_blocks(rows[:9]) == (rows[:9], rows[:9])


def test_block_size_defaults_and_the_window(tmp_path):
    """--block-size up to the window (inclusive); else the teacher's trained block size, else 128, both
    cut to the window."""
    size = distill_setup._block_size
    config = DistillConfig(teacher=tmp_path / "t", out=tmp_path / "s")
    assert size(config, None, None) == distill_setup.DEFAULT_BLOCK_SIZE == 128 and size(config, None, 64) == 64
    assert size(config, 12, 64) == 12 and size(config, 100, 64) == 64
    assert size(DistillConfig(teacher=tmp_path / "t", out=tmp_path / "s", block_size=64), None, 64) == 64


def test_hugging_face_text_is_its_non_blank_lines_without_special_tokens(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from deploylm.training.tokenizer import for_language_model, train_tokenizer

    data = tmp_path / "lines.txt"
    data.write_text("red fox\n\n   \nblue owl\n")
    assert distill_setup.read_data_lines(data) == ["red fox\n", "blue owl\n"]
    tok = PreTrainedTokenizerFast(tokenizer_object=for_language_model(train_tokenizer(CORPUS, 300)), bos_token="<s>")
    assert tok("red")["input_ids"][0] == tok.bos_token_id                # this tokenizer adds <s> by default
    stream = distill_setup._line_stream(["red fox\n", "blue owl\n"], tok)
    assert tok.bos_token_id not in stream and tok.decode(stream) == "red fox\nblue owl\n"


def test_decoder_teacher_on_another_file_uses_the_given_seed_and_default_cleaning(tmp_path):
    """The teacher's recorded seed and cleaning belong to ITS file: another --data file is cleaned with the
    defaults and split with --seed; a recorded task does not override --data; two paragraphs are too few
    to split (all train)."""
    from deploylm.training.clean import CleanOptions

    teacher = tmp_path / "lm"
    teacher.mkdir()
    trained, other = tmp_path / "trained.txt", tmp_path / "other.txt"
    trained.write_text("\n\n".join(f"paragraph {i}: the fox" for i in range(30)) + "\n")
    other.write_text("\n\n".join(f"another {i}: the owl" for i in range(30)) + "\n")
    clean = CleanOptions(min_length=3, max_length=500)
    torch.save({"identity": {"arch": "decoder", "data": str(trained.resolve()), "seed": 5, "clean": clean.as_json(),
                             "task": "stories"}}, teacher / "training_state.pt")
    own = distill_setup._teacher_text(DistillConfig(teacher=teacher, out=tmp_path / "s", data=trained, seed=1), teacher)
    assert own.record["seed"] == 5 and own.record["clean"] == clean.as_json()
    text = distill_setup._teacher_text(DistillConfig(teacher=teacher, out=tmp_path / "s", data=other, seed=1), teacher)
    assert text.where == str(other) and text.record["seed"] == 1 and text.record["clean"] == CleanOptions().as_json()
    two = tmp_path / "two.txt"
    two.write_text("first paragraph\n\nsecond paragraph\n")
    few = distill_setup._teacher_text(DistillConfig(teacher=teacher, out=tmp_path / "s", data=two), teacher)
    assert few.splits.train == ["first paragraph", "second paragraph"] and few.splits.test == []


def test_a_decoder_teacher_moved_with_its_text_keeps_its_seed_and_cleaning(tmp_path):
    """The teacher and its text copied to another folder (or machine): the file at its new path is the one the
    teacher trained on (same sha256), so it is cleaned and split as training did; it was taken for another
    file (seed --seed, default cleaning), which put the teacher's test paragraphs in the student's training."""
    import shutil

    from deploylm.training.clean import CleanOptions
    from deploylm.training.config import file_sha256

    teacher = tmp_path / "lm"
    teacher.mkdir()
    trained = tmp_path / "then" / "trained.txt"
    trained.parent.mkdir()
    trained.write_text("\n\n".join(f"paragraph {i}: the fox" for i in range(30)) + "\n")
    clean = CleanOptions(min_length=3, max_length=500)
    torch.save({"identity": {"arch": "decoder", "data": str(trained.resolve()), "seed": 5, "clean": clean.as_json(),
                             "data_sha256": file_sha256(trained)}}, teacher / "training_state.pt")
    moved = shutil.copy(trained, tmp_path / "trained.txt")
    trained.unlink()
    text = distill_setup._teacher_text(DistillConfig(teacher=teacher, out=tmp_path / "s", data=moved, seed=1), teacher)
    assert text.record["seed"] == 5 and text.record["clean"] == clean.as_json()


def test_a_moved_teachers_text_is_hashed_once(tmp_path, monkeypatch):
    """Telling the teacher's file by its sha256 hashed it up to four times (is it the teacher's, has it changed,
    again for the cleaning, again for distill.json): a corpus of gigabytes paid each time."""
    import shutil

    from deploylm.training import config as training_config
    from deploylm.training.config import file_sha256

    teacher = tmp_path / "lm"
    teacher.mkdir()
    trained = tmp_path / "then" / "trained.txt"
    trained.parent.mkdir()
    trained.write_text("\n\n".join(f"paragraph {i}: the fox" for i in range(30)) + "\n")
    torch.save({"identity": {"arch": "decoder", "data": str(trained.resolve()), "seed": 5,
                             "data_sha256": file_sha256(trained)}}, teacher / "training_state.pt")
    moved = shutil.copy(trained, tmp_path / "trained.txt")
    trained.unlink()
    hashed = []
    monkeypatch.setattr(training_config, "file_sha256", lambda path: (hashed.append(path), file_sha256(path))[1])
    text = distill_setup._teacher_text(DistillConfig(teacher=teacher, out=tmp_path / "s", data=moved, seed=1), teacher)
    assert text.record["seed"] == 5 and text.record["data_sha256"] == file_sha256(moved) and len(hashed) == 1


@pytest.mark.parametrize("arch, name", [("decoder", "trained.txt"), ("seq2seq", "pairs.jsonl")])
def test_a_teachers_recorded_data_that_is_gone_is_named_as_the_teachers_with_data_as_the_way_out(tmp_path, arch,
                                                                                               name):
    """A teacher moved to another machine without its data: the error named the recorded path as if the user had
    given it ("--data '/old/machine/trained.txt' does not exist") and said nothing of --data."""
    from deploylm.errors import UsageError

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    gone = tmp_path / "then" / name
    torch.save({"identity": {"arch": arch, "data": str(gone), "seed": 5}}, teacher / "training_state.pt")
    setup = distill_setup._teacher_text if arch == "decoder" else distill_setup._seq2seq_splits
    with pytest.raises(UsageError) as info:
        setup(DistillConfig(teacher=teacher, out=tmp_path / "s"), teacher)
    assert str(info.value) == (f"teacher {str(teacher)!r} was trained on {str(gone)!r}, which is not there any more: "
                               "give --data FILE (that file, moved or copied, keeps the teacher's splits)")


def test_the_teacher_runs_in_eval_mode_without_gradients(seed_teacher, tmp_path, monkeypatch):
    """docs/distillation.md: the teacher runs in eval mode (its soft targets are its own distribution, not
    dropout noise) and without gradients; the student trains with dropout."""
    real_build, seen = distill_setup.build, []

    def build(config):
        setup = real_build(config)
        forward = setup.logits

        def logits(model, inputs):
            seen.append((model is setup.teacher, model.training, torch.is_grad_enabled()))
            return forward(model, inputs)

        setup.logits = logits
        return setup

    monkeypatch.setattr(distill_setup, "build", build)
    distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", steps=2, **{**FAST, "eval_examples": 2}))
    assert [s for s in seen if s[0]] == [(True, False, False)] * 2          # teacher: eval mode, no gradients
    assert [s for s in seen if not s[0]] == [(False, True, True)] * 2       # student: training, with gradients


@pytest.mark.parametrize("d_model", [None, 16])
def test_the_same_seed_gives_the_same_student(seed_teacher, tmp_path, d_model):
    """--seed fixes the run: dropout masks and (for another --d-model) the random init, whatever ran before
    in the process; another seed gives another run."""
    def run(name, seed):
        torch.manual_seed(1000 + len(name))      # a different global RNG state before each call
        return distill(DistillConfig(teacher=seed_teacher, out=tmp_path / name, task="reverse", steps=3, d_model=d_model,
                                     seed=seed, **{**FAST, "eval_examples": 2}))

    first, again, other = run("a", 0), run("bb", 0), run("ccc", 1)
    assert [step["total"] for step in first.losses] == [step["total"] for step in again.losses]
    assert [step["total"] for step in first.losses] != [step["total"] for step in other.losses]
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "bb")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("arch", ["seq2seq", "decoder"])
def test_a_deploylm_student_starts_from_the_teachers_kept_layers(arch, seed_teacher, text_file, tmp_path):
    """Same width: the student is the teacher's embeddings, norms, output layer and kept layers ([0, 3] of 4),
    not a random model of the student's shape."""
    if arch == "seq2seq":
        teacher, data = seed_teacher, {"task": "reverse"}
    else:
        teacher, data = build_tiny_seed(tmp_path / "lm", arch="decoder", layers=4), {"data": text_file, "block_size": 16}
    setup = distill_setup.build(DistillConfig(teacher=teacher, out=tmp_path / "s", **data, **FAST))
    assert setup.init == "teacher" and all(kept == [0, 3] for kept in setup.kept.values())
    want, got = remap_layers(setup.teacher.state_dict(), setup.kept), setup.student.state_dict()
    assert set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


def test_a_seq2seq_student_trains_on_the_train_split_and_is_judged_on_the_test_split(seed_teacher, tmp_path, monkeypatch):
    """docs/distillation.md: batches come from the teacher's training split (never its test split), and
    the held-out evaluation is the first --eval-examples test examples."""
    from deploylm.training import data, evaluate
    from deploylm.training.tasks import task_splits

    batched, judged = [], []
    real_batch, real_eval = data.make_batch, evaluate.evaluate
    monkeypatch.setattr(data, "make_batch", lambda tok, examples, *a: batched.extend(examples) or real_batch(tok, examples, *a))
    monkeypatch.setattr(evaluate, "evaluate", lambda m, t, examples, *a: judged.extend(examples) or real_eval(m, t, examples, *a))
    setup = distill_setup.build(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", seed=3,
                                              **{**FAST, "eval_examples": 4}))
    for step in range(3):
        setup.batch(step)
    setup.evaluate(setup.student, None)
    splits = task_splits("reverse", 3)
    assert len(batched) == 3 * FAST["batch_size"] and set(batched) <= set(splits.train)
    assert judged == splits.test[:4]


def test_each_distillation_step_uses_the_rate_of_its_own_step(seed_teacher, tmp_path):
    """Warmup min(100, steps/10) then cosine to 0: with 20 steps the first update uses half of --lr, the
    second all of it, the last a small positive rate (a schedule stepped before the optimizer is one ahead)."""
    import math

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        distill(DistillConfig(teacher=seed_teacher, out=tmp_path / "s", task="reverse", steps=20,
                              **{**FAST, "batch_size": 4, "eval_examples": 2}))
    finally:
        handle.remove()
    lr = FAST["lr"]
    assert used == pytest.approx([lr * (s + 1) / 2 if s < 2 else lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18))
                                  for s in range(20)])


def test_a_student_save_that_fails_midway_keeps_the_previous_student(seed_teacher, tmp_path, monkeypatch):
    """The student is built in a temporary folder and renamed into place: a save that fails halfway (a
    full disk) leaves --out (here a student replaced with --force) as it was, and no temporary folder."""
    out, settings = tmp_path / "s", dict(teacher=seed_teacher, task="reverse", steps=1, **{**FAST, "eval_examples": 2})
    distill(DistillConfig(out=out, **settings))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_save(folder, *args):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    from deploylm.errors import CheckpointWriteFailed

    monkeypatch.setattr(distill_setup, "_save_seed", half_save)
    with pytest.raises(CheckpointWriteFailed, match="No space left on device; the student already there is kept"):
        distill(DistillConfig(out=out, force=True, **settings))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_student_that_cannot_be_written_is_one_line_naming_out(tmp_path, monkeypatch):
    """A full disk at publish: a Hugging Face student (save_pretrained's SafetensorError) was a traceback, and a
    deploylm student's error named the temporary folder it was written in ('.s.tmp-...') and said "nothing was
    written" over a student kept at --out."""
    import safetensors.torch
    from safetensors import SafetensorError

    from deploylm.errors import CheckpointWriteFailed
    from deploylm.models.checkpoint import save_checkpoint

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    torch.manual_seed(0)
    config = make_config("tiny", 40, arch="seq2seq", d_model=32, d_ff=64, dropout=0.0)
    model = build_model(config).eval()
    out = tmp_path / "s"
    save_checkpoint(out, model, config)                                    # a student from an earlier run
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    reason = "the write failed (Error while serializing: I/O error: No space left on device (os error 28); is the disk full?)"
    for target, save, kept in ((out, lambda folder: save_checkpoint(folder, model, config), "the student already there is kept"),
                               (tmp_path / "new", lambda folder: full_disk(), "nothing was written")):
        with pytest.raises(CheckpointWriteFailed) as err:
            distill_setup.publish(DistillConfig(teacher=tmp_path / "t", out=target, force=True), save, {})
        assert str(err.value) == (f"could not save the student in {str(target)!r}: {reason}; {kept}; free space or "
                                  "choose another --out"), str(err.value)
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_force_refuses_a_student_folder_that_holds_the_teacher(seed_teacher, tmp_path, monkeypatch):
    """A model folder with the teacher inside it (a Hugging Face Trainer's output_dir and its checkpoint-N/): --force
    replaced the folder, teacher and all, once the student was trained."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(seed_teacher, out)
    teacher = shutil.copytree(seed_teacher, out / "checkpoint-500")
    monkeypatch.setattr(distill_setup, "build", lambda config: pytest.fail("loaded the teacher before checking --out"))
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--out", str(out), "--force", "--steps", "1"])
    assert res.exit_code == 2 and res.output.startswith("error: "), res.output
    assert f"--teacher {str(teacher)!r} is inside --out {str(out)!r}, which --force replaces" in res.output, res.output
    assert (teacher / "model.safetensors").is_file()


def test_cli_requires_teacher_and_out_and_reports_first_to_last_loss_and_each_models_metrics(tmp_path, monkeypatch):
    """The summary lines come from the result: the first step's loss -> the last step's, and the teacher's and the
    student's metrics under their own names; --teacher and --out missing are one line each."""
    from types import SimpleNamespace

    import deploylm.training.distill

    result = SimpleNamespace(out=tmp_path / "s", parameters={"student": 1000, "teacher": 3000}, kept_layers=[0, 2],
                             init="teacher layers", steps=2, losses=[{"kd": 2.0, "ce": 3.0}, {"kd": 0.5, "ce": 1.25}],
                             teacher={"bleu": 50.0}, student={"bleu": 40.0})
    monkeypatch.setattr(deploylm.training.distill, "distill", lambda config: result)
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1:] == ["loss: kd 2.000 -> 0.500  ce 3.000 -> 1.250  (2 steps)",
                                           "teacher: bleu 50", "student: bleu 40"]
    for args, line in ((["--out", "x"], "error: --teacher SRC is required: a deploylm checkpoint or Hugging Face "
                                        "causal LM folder"),
                       (["--teacher", "x"], "error: --out DIR is required: the folder the student is written to")):
        res = CliRunner().invoke(cli, ["distill", *args])
        assert (res.exit_code, res.output) == (2, line + "\n")


def interrupt(monkeypatch, exc, step=None):
    """distill_setup.build wrapped so that `exc` (KeyboardInterrupt: Ctrl-C; SystemExit(143): SIGTERM, as the CLI
    raises it) lands while the batch of `step` is drawn (that many steps done), or, without `step`, in the
    teacher's timed final evaluation (after the two warm-up passes)."""
    build = distill_setup.build

    def built(config):
        setup = build(config)
        batch, evaluate, calls = setup.batch, setup.evaluate, []

        def stopped_batch(at):
            if at == step:
                raise exc
            return batch(at)

        def stopped_evaluate(model, limit):
            calls.append(limit)
            if step is None and len(calls) == 3:
                raise exc
            return evaluate(model, limit)

        setup.batch, setup.evaluate = stopped_batch, stopped_evaluate
        return setup

    monkeypatch.setattr(distill_setup, "build", built)


INTERRUPTS = [pytest.param(KeyboardInterrupt, 130, id="ctrl-c"), pytest.param(SystemExit(143), 143, id="sigterm")]
STOPPED_RUN = ["--task", "reverse", "--steps", "4", "--batch-size", "8", "--eval-examples", "4"]


@pytest.mark.parametrize("exc, status", INTERRUPTS)
def test_a_distillation_stopped_during_its_final_evaluation_keeps_the_trained_student(exc, status, seed_teacher,
                                                                                     tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM during the evaluation after the last step threw the trained student away (distill saves
    nothing before then and has no --resume) with nothing but "Aborted!": now the student is saved as at the normal
    end, with a distill.json whose metrics are null and `final_evaluation: "interrupted"`, and one line says so."""
    out = tmp_path / "s"
    with monkeypatch.context() as patch:
        interrupt(patch, exc)
        res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), *STOPPED_RUN])
    assert res.exit_code == status, res.output
    assert (f"interrupted during the final evaluation: {str(out)!r} holds the trained student (all 4 steps), but its "
            "evaluation against the teacher did not run (distill.json: metrics null, final_evaluation \"interrupted\")"
            in res.output), res.output
    report = json.loads((out / "distill.json").read_text())
    assert report["final_evaluation"] == "interrupted" and report["teacher"] is None and report["student"] is None
    assert report["steps"] == 4 and report["task"] == "reverse" and set(report["losses"]) == {"first", "last"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]          # no temporary folder, no lock
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(tmp_path / "full"),
                                   *STOPPED_RUN])
    assert res.exit_code == 0, res.output                               # the student the run would have saved
    kept, whole = load_checkpoint(out)[0].state_dict(), load_checkpoint(tmp_path / "full")[0].state_dict()
    assert kept.keys() == whole.keys() and all(torch.equal(kept[k], whole[k]) for k in kept)
    assert "final_evaluation" not in json.loads((tmp_path / "full" / "distill.json").read_text())


@pytest.mark.parametrize("exc, status", INTERRUPTS)
def test_a_distillation_stopped_while_it_trains_says_nothing_was_saved(exc, status, seed_teacher, tmp_path,
                                                                       monkeypatch):
    """Ctrl-C mid-training printed only "Aborted!" and SIGTERM nothing at all: one line now says how far it got and
    that nothing was written (no checkpoint to resume from), and --out is untouched."""
    out = tmp_path / "s"
    interrupt(monkeypatch, exc, step=2)
    res = CliRunner().invoke(cli, ["distill", "--teacher", str(seed_teacher), "--out", str(out), *STOPPED_RUN])
    assert res.exit_code == status, res.output
    assert (f"interrupted at step 2 of 4: nothing was written to {str(out)!r} (distill saves the student only after "
            "its last step and keeps no checkpoint to resume from); run the same command again to start over"
            in res.output), res.output
    assert list(tmp_path.iterdir()) == []


def test_a_student_that_cannot_be_kept_at_an_interrupt_is_named_and_the_interrupt_still_stops(seed_teacher, tmp_path,
                                                                                              monkeypatch, capsys):
    """Saving the trained student after a Ctrl-C in the final evaluation can fail too: a full disk is named in the
    line (not a traceback hiding the interrupt), a second Ctrl-C stops the save; either way the run still stops
    and no half-written folder is left."""
    def half_save(error):
        def save(folder, *args):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
            raise error
        return save

    out = tmp_path / "s"
    interrupt(monkeypatch, KeyboardInterrupt)
    monkeypatch.setattr(distill_setup, "_save_seed", half_save(OSError(28, "No space left on device")))
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=2, **FAST))
    assert (f"interrupted during the final evaluation, and the trained student was not kept: could not save the "
            f"student in {str(out)!r}: ") in capsys.readouterr().err
    monkeypatch.setattr(distill_setup, "_save_seed", half_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        distill(DistillConfig(teacher=seed_teacher, out=out, task="reverse", steps=2, **FAST))
    assert list(tmp_path.iterdir()) == []
