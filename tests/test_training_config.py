"""TrainConfig's bounds, checked at the value just inside and just outside each (the CLI tests check
far-off values), and the settings a resumed run must share (identity)."""
import pytest

from deploylm.errors import UsageError
from deploylm.models.config import PRESETS
from deploylm.training.config import TrainConfig

WINDOW = PRESETS["tiny"].max_positions


def test_each_bound_itself_is_accepted(tmp_path):
    TrainConfig(out=tmp_path / "a", task="reverse", seed=2 ** 32 - 1, warmup=0, label_smoothing=0.0, weight_decay=0.0)
    TrainConfig(out=tmp_path / "b", task="stories", arch="decoder", block_size=WINDOW, stride=WINDOW)
    TrainConfig(out=tmp_path / "c", task="reverse", label_smoothing=0.999)


@pytest.mark.parametrize("settings, words", [
    (dict(seed=2 ** 32), "--seed 4294967296: expected an integer from 0 to 4294967295"),
    (dict(warmup=-1), "--warmup -1: expected an integer >= 0"),
    (dict(label_smoothing=1.0), "label_smoothing 1.0"),
    (dict(weight_decay=-0.01), "weight_decay -0.01"),
    (dict(task="stories", arch="decoder", block_size=8, stride=9), "--stride 9: expected at most --block-size 8"),
    (dict(task="stories", arch="decoder", block_size=WINDOW + 1), f"--block-size {WINDOW + 1}: expected at most"),
    (dict(resume=True, force=True), "--resume and --force contradict"),
])
def test_one_past_each_bound_is_refused(tmp_path, settings, words):
    with pytest.raises(UsageError, match=words):
        TrainConfig(out=tmp_path / "run", **{"task": "reverse", **settings})


def test_a_decoder_run_is_identified_by_its_stride(tmp_path):
    """--resume compares the identity: a run with --stride 4 is another run than one with the default
    (the block size)."""
    given = TrainConfig(out=tmp_path / "a", task="stories", arch="decoder", block_size=8, stride=4).identity()
    default = TrainConfig(out=tmp_path / "b", task="stories", arch="decoder", block_size=8).identity()
    assert (given["block_size"], given["stride"]) == (8, 4) and default["stride"] == 8
