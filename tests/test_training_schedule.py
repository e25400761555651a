"""The training recipe of docs/training.md, against hand-computed numbers: linear warmup then
inverse-sqrt or cosine decay, AdamW decaying matrices only, label smoothing with padding ignored, and
that a run really uses them (its saved optimizer and scheduler state)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from deploylm.models.checkpoint import load_training_state
from deploylm.models.config import make_config
from deploylm.models.transformer import Seq2SeqTransformer
from deploylm.training.config import TrainConfig
from deploylm.training.schedule import lr_factor, make_optimizer, make_scheduler
from deploylm.training.tasks import SplitSizes, task_splits
from deploylm.training.trainer import train
from deploylm.training.workloads import _summed_loss


def test_warmup_is_linear_from_the_first_step_and_peaks_at_the_boundary():
    # step is 0-based (the scheduler's count before the step): the first update uses 1/warmup, not 0
    assert [lr_factor(s, 4, 100, "inverse_sqrt") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(s, 4, 100, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_inverse_sqrt_decay_continues_the_warmup_at_one():
    # Noam with 1-based step n = s + 1: min(n / warmup, sqrt(warmup / n))
    for s in range(4, 50):
        assert lr_factor(s, 4, 100, "inverse_sqrt") == pytest.approx(math.sqrt(4 / (s + 1)))
    assert lr_factor(99, 4, 100, "inverse_sqrt") == pytest.approx(0.2)
    assert lr_factor(0, 0, 10, "inverse_sqrt") == 1.0                      # no warmup: the peak at once


def test_cosine_decays_from_the_peak_to_the_floor_at_the_last_step_and_stays():
    warmup, total = 10, 110
    assert lr_factor(warmup, warmup, total, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, warmup, total, "cosine") == pytest.approx(0.5)     # halfway: cos(pi/2) = 0
    assert lr_factor(35, warmup, total, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(total, warmup, total, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total + 50, warmup, total, "cosine") == pytest.approx(0.0, abs=1e-12)   # never back up
    assert lr_factor(total, warmup, total, "cosine", min_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(60, warmup, total, "cosine", min_factor=0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_scheduler_sets_the_optimizer_rate_of_each_step():
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    scheduler = make_scheduler(optimizer, 4, 20, "cosine")
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert seen[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_adamw_decays_matrices_only_with_the_documented_betas():
    model = Seq2SeqTransformer(make_config("tiny", 20, d_model=16, n_heads=2, d_ff=32,
                                           n_encoder_layers=1, n_decoder_layers=1, tie_embeddings=False))
    optimizer = make_optimizer(model, 1e-3, 0.01)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.98) and decay["eps"] == 1e-9
    matrices = {id(p) for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n}
    assert {id(p) for p in decay["params"]} == matrices                     # linear and embedding weights
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_label_smoothing_spreads_its_mass_over_the_vocabulary_and_ignores_padding():
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0], [9.0, -9.0, 3.0, 1.0]]])   # [1, 3, V=4]
    labels = torch.tensor([[0, 1, -100]])                                   # the last position is padding
    logp = logits[0, :2].log_softmax(-1)
    eps = 0.1
    # (1 - eps) on the gold class plus eps / V on every class (the gold one too), as in Szegedy et al.
    want = sum(-(1 - eps) * logp[i, y] - eps / 4 * logp[i].sum() for i, y in enumerate([0, 1]))
    assert float(_summed_loss(logits, labels, eps)) == pytest.approx(float(want), rel=1e-6)
    assert float(_summed_loss(logits, labels, 0.0)) == pytest.approx(float(-(logp[0, 0] + logp[1, 1])), rel=1e-6)


def test_smoothing_default_is_per_architecture_and_a_given_value_is_kept(tmp_path):
    assert TrainConfig(out=tmp_path / "a", task="reverse").smoothing == 0.1
    assert TrainConfig(out=tmp_path / "b", task="stories", arch="decoder").smoothing == 0.0
    assert TrainConfig(out=tmp_path / "c", task="reverse", label_smoothing=0.0).smoothing == 0.0
    assert TrainConfig(out=tmp_path / "d", task="stories", arch="decoder", label_smoothing=0.2).smoothing == 0.2


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reverse.jsonl"
    examples = task_splits("reverse", 0, SplitSizes(train=100, validation=0, test=0)).train
    path.write_text("".join(json.dumps({"source": e.source, "target": e.target}) + "\n" for e in examples))
    return path


def short_run(out, pairs, **overrides):
    settings = dict(data=pairs, batch_size=8, steps=3, warmup=2, lr=1e-2, eval_every=100, checkpoint_every=100,
                    progress=False, vocab_size=120)
    return train(TrainConfig(out=out, **{**settings, **overrides}))


def test_a_run_saves_the_decay_and_clipping_it_used(tmp_path, pairs):
    short_run(tmp_path / "run", pairs, steps=1, clip_norm=1e-4, weight_decay=0.05)
    state = load_training_state(tmp_path / "run")
    assert state["scheduler"]["last_epoch"] == 1                             # one scheduler step per optimizer step
    decay, no_decay = state["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # Adam's first moment after one step is (1 - beta1) * the clipped gradient: its norm is 0.1 * clip_norm
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments]))
    assert float(norm) == pytest.approx(0.1 * 1e-4, rel=1e-3)


@pytest.mark.parametrize("schedule, factor", [("inverse_sqrt", math.sqrt(2 / 6)), ("cosine", 0.0)])
def test_a_run_steps_the_schedule_it_was_given(tmp_path, pairs, schedule, factor):
    short_run(tmp_path / "run", pairs, steps=5, warmup=2, schedule=schedule)
    state = load_training_state(tmp_path / "run")
    # the rate left in the optimizer is the one a 6th step (a resumed run) would use: warmup 2, then
    # sqrt(2 / 6), or the cosine's end (0) for a run of 5 steps
    assert state["scheduler"]["last_epoch"] == 5
    decay, _ = state["optimizer"]["param_groups"]
    assert decay["lr"] == pytest.approx(1e-2 * factor, abs=1e-12)


def test_label_smoothing_reaches_the_training_loss(tmp_path, pairs):
    plain = short_run(tmp_path / "plain", pairs, steps=1, label_smoothing=0.0).losses[0]
    smoothed = short_run(tmp_path / "smooth", pairs, steps=1, label_smoothing=0.5).losses[0]
    assert smoothed != pytest.approx(plain, rel=1e-4)


def test_cross_entropy_helper_matches_torch_on_a_flat_batch():
    logits, labels = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([[1, 2, -100], [4, -100, -100]])
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert float(_summed_loss(logits, labels, 0.0)) == pytest.approx(float(want))


def test_the_loss_is_a_mean_over_real_target_tokens_not_padding():
    from deploylm.training.data import Batch
    from deploylm.training.tasks import Splits
    from deploylm.training.workloads import Seq2SeqWork

    torch.manual_seed(0)
    model = Seq2SeqTransformer(make_config("tiny", 20, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                                           n_decoder_layers=1, dropout=0.0))
    batch = Batch(torch.tensor([[5, 6, 2], [7, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                  torch.tensor([[1, 8, 9, 10], [1, 11, 0, 0]]), torch.tensor([[8, 9, 10, 2], [11, 2, -100, -100]]))
    loss_sum, n_tokens = Seq2SeqWork(Splits([], [], []), 1).loss_sum(model, batch, 0.0)
    assert n_tokens == 6                                                    # the trainer divides by this
    with torch.no_grad():
        logp = model(batch.src_ids, batch.src_mask, batch.tgt_in).log_softmax(-1)
    want = -sum(float(logp[b, i, y]) for b in range(2) for i, y in enumerate(batch.labels[b].tolist()) if y != -100)
    assert float(loss_sum.detach()) == pytest.approx(want, rel=1e-5)


def test_each_optimizer_step_uses_the_rate_of_its_own_step(tmp_path, pairs):
    """The scheduler steps after the optimizer: the first update uses 1/warmup of the peak, the
    warmup-th the peak, then the decay (a schedule stepped first would skip the first warmup rate)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    used = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        short_run(tmp_path / "run", pairs, steps=4, warmup=2, lr=1e-2)
    finally:
        handle.remove()
    assert used == pytest.approx([5e-3, 1e-2, 1e-2 * math.sqrt(2 / 3), 1e-2 * math.sqrt(2 / 4)])


def test_the_gradient_is_that_of_the_mean_loss_over_target_tokens(tmp_path, monkeypatch):
    """The step minimises the mean over target tokens: with one training example, a batch of 8 copies
    has the gradient of a batch of 4 (a summed loss would double it, and clipping at --clip-norm would
    then act on another scale than documented)."""
    data = tmp_path / "three.jsonl"            # 3 distinct sources: 1 test, 1 validation, 1 train
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                            for s, t in [("red fox sun", "sun fox red"), ("blue owl", "owl blue"), ("tree", "tree")]))
    norms, real = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(float(real(params, max_norm))))
    for batch_size in (4, 8):
        train(TrainConfig(out=tmp_path / f"b{batch_size}", data=data, batch_size=batch_size, steps=1, dropout=0.0,
                          eval_every=100, checkpoint_every=100, progress=False, vocab_size=120))
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-4)
