"""Checkpoint folders: round trip, atomic writes, safe training state, errors that name the file."""
from __future__ import annotations

import json

import pytest
import torch

from deploylm.errors import CheckpointWriteFailed, UsageError
from deploylm.models import checkpoint as ckpt
from deploylm.models.checkpoint import (build_model, load_checkpoint, load_generation_config, load_training_state,
                                         save_checkpoint)
from deploylm.models.config import make_config
from deploylm.models.source import resolve_source

VOCAB = 30


def tiny_model(arch: str = "seq2seq", tied: bool = True):
    torch.manual_seed(0)
    config = make_config("tiny", VOCAB, arch=arch, tie_embeddings=tied, d_model=32, d_ff=64, dropout=0.0)
    return ckpt.build_model(config).eval(), config


def logits(model, config):
    ids = torch.arange(3, 9)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model(ids, mask, ids) if config.arch == "seq2seq" else model(ids, mask)[0]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.mark.parametrize("arch, tied", [("seq2seq", True), ("seq2seq", False), ("decoder", True)])
def test_round_trip_gives_identical_logits(tmp_path, arch, tied):
    model, config = tiny_model(arch, tied)
    out = save_checkpoint(tmp_path / "ck", model, config)
    loaded, loaded_config = load_checkpoint(out)
    assert loaded_config == config and not loaded.training
    assert torch.equal(logits(model, config), logits(loaded, loaded_config))
    assert resolve_source(out).kind == "checkpoint"
    data = json.loads((out / "config.json").read_text())
    assert data["model_type"] == ("deploylm-seq2seq" if arch == "seq2seq" else "deploylm-lm")


def test_generation_config_and_tokenizer(tmp_path):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config, word_tokenizer(), generation={"num_beams": 2})
    gen = load_generation_config(out)
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 1,
                   "num_beams": 2, "max_new_tokens": 64}
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello").ids == [4]
    copy = save_checkpoint(tmp_path / "ck2", model, config, out / "tokenizer.json")
    assert (copy / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert load_generation_config(copy)["num_beams"] == 4


def test_a_decoder_only_checkpoint_has_no_decoder_start_token(tmp_path):
    config = make_config("tiny", 50, arch="decoder", n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32)
    out = save_checkpoint(tmp_path / "lm", build_model(config), config)
    assert load_generation_config(out) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                           "num_beams": 4, "max_new_tokens": 64}


def test_training_state_round_trip_loads_weights_only(tmp_path):
    model, config = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 2, dtype=torch.long)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "python_rng": [1, 2]}
    out = save_checkpoint(tmp_path / "ck", model, config, training_state=state)
    loaded = load_training_state(out)
    assert loaded["step"] == 7 and torch.equal(loaded["rng"], state["rng"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert load_training_state(save_checkpoint(tmp_path / "none", model, config)) is None


class Arbitrary:  # an object torch.load(weights_only=True) must refuse to unpickle
    pass


def test_training_state_with_arbitrary_objects_is_refused(tmp_path):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config, training_state={"evil": Arbitrary()})
    with pytest.raises(UsageError, match="training_state.pt"):
        load_training_state(out)


def test_existing_folder_needs_overwrite_and_keeps_other_files(tmp_path):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config, word_tokenizer(), training_state={"step": 1})
    (out / "log.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists"):
        save_checkpoint(out, model, config)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(out, model, config, training_state={"step": 2}, overwrite=True)
    assert (out / "log.txt").read_text() == "keep me" and (out / "tokenizer.json").is_file()
    assert load_training_state(out)["step"] == 2
    assert torch.equal(logits(load_checkpoint(out)[0], config), logits(model, config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or old folders left


def test_failed_save_leaves_nothing(tmp_path):
    model, config = tiny_model()
    with pytest.raises(UsageError, match="nope.json"):
        save_checkpoint(tmp_path / "ck", model, config, tmp_path / "nope.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file_is_named(tmp_path, name):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config)
    (out / name).unlink()
    with pytest.raises(UsageError, match=name):
        load_checkpoint(out)


@pytest.mark.parametrize("name, content", [
    ("config.json", b"{not json"),
    ("config.json", b'{"model_type": "deploylm-seq2seq", "d_model": 32, "n_layers": 2}'),
    ("config.json", b'{"model_type": "gpt2"}'),
    ("model.safetensors", b"\x00\x01garbage"),
])
def test_corrupt_file_is_named(tmp_path, name, content):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config)
    (out / name).write_bytes(content)
    with pytest.raises(UsageError, match=name):
        load_checkpoint(out)


def test_truncated_weights_and_mismatched_config_are_named(tmp_path):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UsageError, match="model.safetensors"):
        load_checkpoint(out)
    other = save_checkpoint(tmp_path / "ck2", model, config)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "tie_embeddings": False}))
    with pytest.raises(UsageError, match="model.safetensors.*config.json"):
        load_checkpoint(other)


def test_a_save_killed_outright_is_cleaned_up_by_the_next_save(tmp_path, monkeypatch):
    """Temporary folders name their writer's pid: the next save removes a killed save's leftover and
    leaves one whose process still runs."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    model, config = tiny_model()
    target = tmp_path / "run"
    stale = tmp_path / f".run.tmp-0123abcd-{gone.pid}"          # SIGKILL mid-save left it
    (stale / "half").mkdir(parents=True)
    live = tmp_path / f".run.tmp-4567cdef-{os.getppid()}"       # another process still saving
    live.mkdir()
    seen = []
    write = ckpt._write_files
    monkeypatch.setattr(ckpt, "_write_files", lambda folder, *a: (seen.append(folder.name), write(folder, *a)))
    save_checkpoint(target, model, config)
    assert not stale.exists() and live.is_dir() and load_checkpoint(target)
    assert seen and seen[0].startswith(".run.tmp-") and seen[0].endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("failure, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1142976 vs 1142864"),
     "the write failed ([enforce fail at inline_container.cc:672] . unexpected pos 1142976 vs 1142864; is the disk full?)"),
])
def test_a_save_that_cannot_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure, reason):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config, training_state={"step": 1})

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteFailed) as err:
        save_checkpoint(out, model, config, training_state={"step": 2}, overwrite=True)
    message = str(err.value)
    assert message == (f"could not save the checkpoint in {str(out)!r}: {reason}; the previous checkpoint there is "
                       "kept; free space or choose another folder") and err.value.exit_code == 1
    assert load_training_state(out)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_the_weights_are_as_readable_as_the_other_files(tmp_path):
    """safetensors writes its file 0600; the checkpoint's weights get the mode of its config.json."""
    import os

    model, config = tiny_model()
    old = os.umask(0o022)
    try:
        out = save_checkpoint(tmp_path / "ck", model, config)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_weights_that_do_not_fit_on_the_disk_are_one_line_and_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError: `train` and `distill` on a full disk
    showed its traceback instead of CheckpointWriteFailed."""
    import safetensors.torch
    from safetensors import SafetensorError

    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config, training_state={"step": 1})

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointWriteFailed) as err:
        save_checkpoint(out, model, config, training_state={"step": 2}, overwrite=True)
    assert str(err.value) == (f"could not save the checkpoint in {str(out)!r}: the write failed (Error while "
                              "serializing: I/O error: No space left on device (os error 28); is the disk full?); "
                              "the previous checkpoint there is kept; free space or choose another folder")
    assert load_training_state(out)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(CheckpointWriteFailed, match="nothing was written"):
        save_checkpoint(tmp_path / "new", model, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_hugging_face_config_is_named_as_not_a_deploylm_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(UsageError, match=r"config.json: not a deploylm config \(model_type should be"):
        load_checkpoint(tmp_path)


def test_a_generation_config_that_is_not_utf8_is_named(tmp_path):
    model, config = tiny_model()
    out = save_checkpoint(tmp_path / "ck", model, config)
    (out / "generation_config.json").write_bytes(b'{"num_beams": "\xff"}')
    with pytest.raises(UsageError, match=r"generation_config.json: not valid JSON"):
        load_generation_config(out)


def test_a_seq2seq_checkpoint_keeps_its_own_decoder_start_token(tmp_path):
    """decoder_start_token_id is its own id (Marian-style models start from pad), not bos's."""
    config = make_config("tiny", VOCAB, d_model=32, d_ff=64, dropout=0.0, decoder_start_token_id=0)
    out = save_checkpoint(tmp_path / "ck", build_model(config), config)
    assert load_generation_config(out)["decoder_start_token_id"] == 0 != config.bos_token_id
