"""The training loop: the loss falls, checkpoints are complete HF-like folders, --resume continues
exactly where a killed run stopped."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from deploylm.errors import UsageError
from deploylm.models.checkpoint import load_checkpoint, load_training_state
from deploylm.models.source import resolve_source
from deploylm.training.config import TrainConfig
from deploylm.training.tasks import SplitSizes, task_splits
from deploylm.training.trainer import train

CHECKPOINT_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "training_state.pt", "metrics.json",
                    "cleaning.json"}   # --data runs record what cleaning dropped


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """Settings for short runs on a 400-line reverse-words .jsonl (340 train, 20 validation, 40 test)."""
    path = tmp_path_factory.mktemp("data") / "reverse.jsonl"
    examples = task_splits("reverse", 0, SplitSizes(train=400, validation=0, test=0)).train
    path.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples))
    return dict(data=path, batch_size=16, eval_every=10, checkpoint_every=5, progress=False)


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def stop_at(when, exc):
    """An on_step callback that raises `exc` at step `when` (Killed: the process killed; KeyboardInterrupt: Ctrl-C)."""
    def on_step(step, loss):
        if step == when:
            raise exc
    return on_step


def test_loss_falls_and_checkpoint_is_complete(tmp_path, fast):
    out = tmp_path / "run"
    result = train(TrainConfig(out=out, steps=30, lr=3e-3, warmup=5, **fast))
    assert result.steps == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    assert {p.name for p in out.iterdir()} == CHECKPOINT_FILES
    assert [v["step"] for v in result.validation] == [10, 20, 30]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 30 and set(metrics["test"]) == {"loss", "perplexity", "exact_match", "bleu"}
    assert metrics["test"] == pytest.approx(result.test) and len(metrics["examples"]) == 5
    assert metrics["final_train_loss"] == pytest.approx(result.losses[-1]) and metrics["world_size"] == 1
    model, config = load_checkpoint(out)
    assert resolve_source(out).kind == "checkpoint" and config.vocab_size == model.src_embed.num_embeddings
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == config.pad_token_id and tok.eos_token_id == config.eos_token_id
    assert len(tok) == config.vocab_size
    state = load_training_state(out)
    assert state["step"] == 30 and state["data_position"] == {"epoch": 1, "offset": 140}


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, fast):
    whole = train(TrainConfig(out=tmp_path / "whole", steps=20, **fast))

    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "part", steps=20, **fast), on_step=stop_at(12, Killed))
    assert load_training_state(tmp_path / "part")["step"] == 10        # last checkpoint before the kill
    resumed = train(TrainConfig(out=tmp_path / "part", steps=20, resume=True, **fast))
    assert resumed.steps == whole.steps == 20
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert resumed.test == pytest.approx(whole.test, rel=1e-4)
    a, _ = load_checkpoint(tmp_path / "whole")
    b, _ = load_checkpoint(tmp_path / "part")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)


def test_an_extension_stopped_midway_leaves_no_stale_metrics(tmp_path, fast):
    """A finished 5-step run resumed to 20 and stopped at 12: its folder holds the step-10 checkpoint, and
    not the 5-step run's metrics.json beside it (they would describe other weights)."""
    train(TrainConfig(out=tmp_path / "run", steps=5, **fast))
    assert (tmp_path / "run" / "metrics.json").is_file()

    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "run", steps=20, resume=True, **fast), on_step=stop_at(12, Killed))
    assert load_training_state(tmp_path / "run")["step"] == 10 and not (tmp_path / "run" / "metrics.json").exists()
    train(TrainConfig(out=tmp_path / "run", steps=20, resume=True, **fast))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 20


def test_resume_refuses_other_data_at_the_same_path(tmp_path, fast):
    import shutil

    data = shutil.copy(fast["data"], tmp_path / "pairs.jsonl")
    settings = {**fast, "data": Path(data)}
    train(TrainConfig(out=tmp_path / "run", steps=2, **settings))
    lines = Path(data).read_text().splitlines()
    Path(data).write_text("\n".join(reversed(lines)) + "\n")          # the same path, other contents
    with pytest.raises(UsageError, match=r"was trained with other --data contents \(data_sha256 [0-9a-f]{12}\.\.\., "
                                         r"now [0-9a-f]{12}\.\.\.: the file changed\): use the same settings"):
        train(TrainConfig(out=tmp_path / "run", steps=4, resume=True, **settings))


def test_a_run_moved_with_its_data_resumes(tmp_path, fast):
    """The run folder and its --data file copied to another folder (or machine): the same bytes at another path
    are the same data, and the run continues (it was refused as "trained with data '/old/path'", leaving only
    --force); other contents at the new path are still refused."""
    import shutil

    train(TrainConfig(out=tmp_path / "run", steps=4, **fast))
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "run", moved / "run")
    data = shutil.copy(fast["data"], moved / "pairs.jsonl")
    settings = {**fast, "data": data}
    assert train(TrainConfig(out=moved / "run", steps=6, resume=True, **settings)).steps == 6
    Path(data).write_text(Path(data).read_text() + '{"source": "one more", "target": "more one"}\n')
    with pytest.raises(UsageError, match="data_sha256"):
        train(TrainConfig(out=moved / "run", steps=8, resume=True, **settings))


def test_a_cosine_run_resumes_to_its_own_end_only(tmp_path, fast):
    """The cosine schedule decays to 0 at `steps`: extending a cosine run with --resume --steps N' made the
    learning rate jump back up mid-run. Resuming to the same end works; another end is refused by name."""
    settings = {**fast, "schedule": "cosine"}

    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "run", steps=4, **{**settings, "checkpoint_every": 2}), on_step=stop_at(3, Killed))
    with pytest.raises(UsageError, match=r"cosine_steps 4 \(now 8\)"):
        train(TrainConfig(out=tmp_path / "run", steps=8, resume=True, **settings))
    assert train(TrainConfig(out=tmp_path / "run", steps=4, resume=True, **settings)).steps == 4


def test_resume_refuses_other_settings(tmp_path, fast):
    train(TrainConfig(out=tmp_path / "run", steps=2, **fast))
    with pytest.raises(UsageError, match="seed 0"):
        train(TrainConfig(out=tmp_path / "run", steps=4, resume=True, **fast, seed=1))
    with pytest.raises(UsageError, match=r"lr 0.001 \(now 0.05\)"):      # it was ignored, yet recorded as used
        train(TrainConfig(out=tmp_path / "run", steps=4, resume=True, **fast, lr=0.05))
    # the schedule's other settings: a changed warmup silently reshaped the learning rate of the rest
    for change, message in ((dict(warmup=50), r"warmup 200 \(now 50\)"), (dict(schedule="cosine"), "schedule"),
                            (dict(weight_decay=0.1), "weight_decay"), (dict(label_smoothing=0.0), "label_smoothing"),
                            (dict(clip_norm=5.0), "clip_norm")):
        with pytest.raises(UsageError, match=message):
            train(TrainConfig(out=tmp_path / "run", steps=4, resume=True, **{**fast, **change}))
    resumed = train(TrainConfig(out=tmp_path / "run", steps=3, resume=True, **fast, dropout=0.1,
                                label_smoothing=0.1))                    # the preset's dropout, seq2seq's smoothing
    assert resumed.steps == 3


def test_resume_past_the_end_only_evaluates(tmp_path, fast):
    first = train(TrainConfig(out=tmp_path / "run", steps=5, **fast))
    again = train(TrainConfig(out=tmp_path / "run", steps=5, resume=True, **fast))
    assert again.losses == first.losses and again.test == pytest.approx(first.test)
    assert first.tokens_per_s > 0 and again.tokens_per_s is None        # no step ran: no throughput, not 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["tokens_per_s"] is None


def test_an_interrupted_run_says_what_it_saved_and_how_to_go_on(tmp_path, fast, capsys):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM (SystemExit) mid-run: one line naming the last checkpoint and
    the next command; before the first checkpoint, --resume and a plain re-run both point at --force."""
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=tmp_path / "a", steps=20, **fast), on_step=stop_at(7, KeyboardInterrupt))
    assert ("interrupted at step 7: " + repr(str(tmp_path / "a")) + " holds the checkpoint of step 5 or earlier; "
            "continue it with the same command and --resume") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(TrainConfig(out=tmp_path / "b", steps=20, **fast), on_step=stop_at(3, SystemExit(143)))
    assert ("interrupted at step 3: no checkpoint saved yet (every 5 steps, --checkpoint-every); start again "
            "with --force") in capsys.readouterr().err
    with pytest.raises(UsageError, match="stopped before its first checkpoint .*start it again with --force"):
        train(TrainConfig(out=tmp_path / "b", steps=20, resume=True, **fast))
    with pytest.raises(UsageError, match="it holds no checkpoint yet .*use --force to start over"):
        train(TrainConfig(out=tmp_path / "b", steps=20, **fast))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit(143)])
def test_a_run_stopped_during_its_final_evaluation_keeps_what_it_knows_and_says_how_to_evaluate(tmp_path, fast,
                                                                                                 capsys, monkeypatch,
                                                                                                 exc):
    """Ctrl-C or SIGTERM during the test-split evaluation after the last step left the saved model without any
    metrics.json (an export then did not find the run's data for calibration) and without a word on what was saved:
    now metrics.json holds the run's settings and history with `test` null and `final_evaluation: "interrupted"`,
    one line says so, and --resume only evaluates and writes the whole metrics.json."""
    from deploylm.training.workloads import Seq2SeqWork

    def stopped(self, model, device):
        raise exc

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Seq2SeqWork, "test", stopped)
        with pytest.raises(exc if isinstance(exc, type) else type(exc)):
            train(TrainConfig(out=out, steps=5, **fast))
    assert ("interrupted during the final evaluation: " + repr(str(out)) + " holds the trained model (the checkpoint "
            "of step 5) and a metrics.json without test metrics; evaluate it with the same command and --resume") \
        in capsys.readouterr().err
    assert load_training_state(out)["step"] == 5
    kept = json.loads((out / "metrics.json").read_text())
    assert kept["test"] is None and kept["final_evaluation"] == "interrupted" and kept["examples"] == []
    assert kept["steps"] == 5 and kept["tokens_per_s"] > 0 and [v["step"] for v in kept["validation"]] == [5]
    assert kept["data"] == str(fast["data"].resolve())
    again = train(TrainConfig(out=out, steps=5, resume=True, **fast))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"loss", "perplexity", "exact_match", "bleu"} and "final_evaluation" not in metrics
    assert again.steps == 5 and metrics["test"] == pytest.approx(again.test)


def test_a_stopped_extension_names_the_checkpoint_it_resumed_from(tmp_path, fast, capsys, monkeypatch):
    """A finished 7-step run (checkpoints at 5 and 7) extended to 20 and stopped at step 9 (or diverging there)
    still holds its step-7 checkpoint: the line said "step 5 or earlier" (a multiple of --checkpoint-every, not
    the step saved), and with --checkpoint-every above the resumed step "step 0" or "no checkpoint was saved"."""
    from deploylm.errors import TrainingDiverged
    from deploylm.training import trainer

    train(TrainConfig(out=tmp_path / "run", steps=7, **fast))

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=tmp_path / "run", steps=20, resume=True, **fast), on_step=stop_at(9, KeyboardInterrupt))
    assert "interrupted at step 9: " + repr(str(tmp_path / "run")) + " holds the checkpoint of step 7 or earlier" \
        in capsys.readouterr().err
    assert load_training_state(tmp_path / "run")["step"] == 7
    step = trainer._train_step
    monkeypatch.setattr(trainer, "_train_step", lambda run, *a: (float("nan"), 1) if run.step == 8 else step(run, *a))
    with pytest.raises(TrainingDiverged, match=r"at step 9 .*the last checkpoint in '.*run' \(step 7\) is kept"):
        train(TrainConfig(out=tmp_path / "run", steps=20, resume=True, **{**fast, "checkpoint_every": 50}))


def test_a_second_training_into_the_same_out_is_refused_while_the_first_runs(tmp_path, fast):
    """Two commands on one --out used to both run and leave one's weights beside the other's metrics."""
    from deploylm.fsutil import exclusive_writer

    out = tmp_path / "run"
    with exclusive_writer(out):                                   # another `deploylm train --out run` holds it
        with pytest.raises(UsageError, match=r"--out '.*run' is being written by another deploylm command "
                                             r"\(it holds \.run\.lock\): wait for it to finish"):
            train(TrainConfig(out=out, steps=2, **fast))
    assert not out.exists()
    train(TrainConfig(out=out, steps=2, **fast))                  # once it is done, the folder is free
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # and no lock file stays behind


def test_resume_into_a_folder_it_cannot_write_is_one_error(tmp_path, fast, monkeypatch):
    """A read-only run folder (simulated: root ignores the mode bits) is refused before training, not a
    traceback at the first checkpoint."""
    from deploylm import fsutil

    out = tmp_path / "run"
    train(TrainConfig(out=out, steps=5, **fast))
    real = fsutil.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and fsutil.Path(dir) == out.absolute():
            raise PermissionError(13, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fsutil.tempfile, "TemporaryFile", read_only)
    with pytest.raises(UsageError, match=r"--resume '.*run': cannot write in '.*run' \(Read-only file system\)"):
        train(TrainConfig(out=out, steps=10, resume=True, **fast))
    assert load_training_state(out)["step"] == 5


@pytest.mark.parametrize("name", ["metrics.json", "tokenizer_config.json"])
def test_a_full_disk_for_the_runs_small_files_is_one_line_and_leaves_no_temporary_file(tmp_path, fast, monkeypatch, name):
    """metrics.json (and the tokenizer's side files) are written beside the checkpoint: a full disk there was a
    traceback from pathlib and left `.<name>.tmp-<pid>` in the run folder (carried over by every later save)."""
    from deploylm.errors import CheckpointWriteFailed

    out = tmp_path / "run"
    train(TrainConfig(out=out, steps=5, **fast))
    (out / name).unlink()
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(f".{name}.tmp-"):
            write_text(self, "{")                  # the part that fit
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CheckpointWriteFailed) as err:
        train(TrainConfig(out=out, steps=10, resume=True, **fast))
    assert str(err.value) == (f"could not write {str(out / name)!r}: No space left on device; free space or choose "
                              "another folder") and err.value.exit_code == 1
    assert not any(p.name.startswith(".") for p in out.iterdir()) and not (out / name).exists()
    monkeypatch.undo()
    assert load_training_state(out)["step"] in (5, 10)


def test_a_resumed_run_keeps_the_validation_history(tmp_path, fast):
    """training_state.pt carries the validation history: after --resume, the result and metrics.json list
    every validation of the run, not only those since the resume."""
    settings = {**fast, "eval_every": 5, "checkpoint_every": 5}
    train(TrainConfig(out=tmp_path / "run", steps=10, **settings))
    resumed = train(TrainConfig(out=tmp_path / "run", steps=15, resume=True, **settings))
    assert [v["step"] for v in resumed.validation] == [5, 10, 15]
    assert [v["step"] for v in json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]] == [5, 10, 15]


def test_validation_uses_the_validation_split_and_the_final_report_the_test_split(tmp_path, fast, monkeypatch):
    """Validation during training decodes the first eval_examples validation examples, the final metrics
    the whole test split: never training examples (they would flatter the numbers)."""
    from deploylm.training import workloads
    from deploylm.training.clean import CleanOptions
    from deploylm.training.data import jsonl_splits

    seen, real = [], workloads.evaluate
    monkeypatch.setattr(workloads, "evaluate", lambda m, t, examples, *a: seen.append(list(examples)) or real(m, t, examples, *a))
    train(TrainConfig(out=tmp_path / "run", steps=5, eval_examples=8, **{**fast, "eval_every": 5, "checkpoint_every": 5}))
    splits = jsonl_splits(fast["data"], 0, CleanOptions())
    assert seen == [splits.validation[:8], splits.test]


def test_every_step_trains_in_training_mode_also_after_validation_and_resume(tmp_path, fast, monkeypatch):
    """Validation puts the model in eval mode and a resumed checkpoint loads in eval mode: every training
    step must switch dropout back on, or it is silently off after the first validation or a --resume."""
    from deploylm.training.workloads import Seq2SeqWork

    modes, real = [], Seq2SeqWork.loss_sum
    monkeypatch.setattr(Seq2SeqWork, "loss_sum", lambda self, model, *a: modes.append(model.training) or real(self, model, *a))
    settings = {**fast, "eval_every": 2, "checkpoint_every": 2}
    train(TrainConfig(out=tmp_path / "run", steps=4, **settings))
    train(TrainConfig(out=tmp_path / "run", steps=6, resume=True, **settings))
    assert modes == [True] * 6


def test_a_run_also_validates_its_last_step_off_the_eval_cadence(tmp_path, fast):
    """Validation runs every --eval-every steps and at the end (docs/training.md): a 7-step run with
    --eval-every 5 validates at 5 and at 7, so the last validation is of the weights saved."""
    result = train(TrainConfig(out=tmp_path / "run", steps=7, **{**fast, "eval_every": 5}))
    assert [v["step"] for v in result.validation] == [5, 7]
    assert [v["step"] for v in json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]] == [5, 7]


def test_an_extension_by_one_step_stopped_at_its_end_leaves_no_stale_metrics(tmp_path, fast):
    """The boundary of the case above: a 5-step run resumed to 6 and stopped after saving step 6 (before
    its metrics.json) must not leave the 5-step run's metrics.json beside the step-6 weights."""
    train(TrainConfig(out=tmp_path / "run", steps=5, **fast))

    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "run", steps=6, resume=True, **fast), on_step=stop_at(6, Killed))
    assert load_training_state(tmp_path / "run")["step"] == 6 and not (tmp_path / "run" / "metrics.json").exists()


def test_a_run_stopped_during_its_first_save_says_no_checkpoint_was_saved(tmp_path, fast, capsys, monkeypatch):
    """Ctrl-C while the first checkpoint is being written: the step-5 save was begun, not finished, so the line
    points at --force (not at --resume, which would refuse a folder without training state)."""
    from deploylm.training import trainer

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=tmp_path / "run", steps=20, **fast))
    assert ("interrupted at step 5: no checkpoint saved yet (every 5 steps, --checkpoint-every); start again "
            "with --force") in capsys.readouterr().err


def test_the_checkpoint_decodes_as_long_as_validation_did(tmp_path, fast):
    """generation_config.json's max_new_tokens is the trainer's own limit (2 x the longest training target
    in tokens + 8, docs/training.md), not the library default of 64: `deploylm generate` on the checkpoint
    stops where validation stopped."""
    from tokenizers import Tokenizer

    from deploylm.training.clean import CleanOptions
    from deploylm.training.data import jsonl_splits

    out = tmp_path / "run"
    train(TrainConfig(out=out, steps=1, **fast))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    longest = max(len(tok.encode(e.target, add_special_tokens=False).ids)
                  for e in jsonl_splits(fast["data"], 0, CleanOptions()).train)
    window = json.loads((out / "config.json").read_text())["max_positions"]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == min(window - 1, 2 * longest + 8)


def test_a_run_saved_before_a_setting_was_recorded_still_resumes(tmp_path, fast):
    """Settings an older version did not record in the identity (here clip_norm) are not compared: such a
    run resumes, rather than being refused as trained with clip_norm None."""
    out = tmp_path / "run"
    train(TrainConfig(out=out, steps=2, **fast))
    state = load_training_state(out)
    del state["identity"]["clip_norm"]
    torch.save(state, out / "training_state.pt")
    assert train(TrainConfig(out=out, steps=3, resume=True, **fast)).steps == 3


def test_a_metrics_json_of_another_tool_does_not_make_a_folder_a_run(tmp_path):
    """A metrics.json or cleaning.json is deploylm's only with all of its keys: another tool's metrics.json
    with a "test" entry must not let --force empty that folder."""
    from deploylm.training.outdir import is_training_run

    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.9}, "steps": 10}))
    (tmp_path / "cleaning.json").write_text(json.dumps({"kept": 3}))
    assert not is_training_run(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"arch": "seq2seq", "seed": 0, "steps": 10, "test": {}}))
    assert is_training_run(tmp_path)
