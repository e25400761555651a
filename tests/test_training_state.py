"""training_state.pt's resume state: restore puts every RNG back as capture saw it."""
from __future__ import annotations

import random

import numpy as np
import torch

from deploylm.models.checkpoint import build_model, load_training_state, save_checkpoint
from deploylm.models.config import make_config
from deploylm.training import state


def test_restore_puts_the_python_numpy_and_torch_rngs_back(tmp_path):
    """train seeds Python's and numpy's global RNGs too: a resumed run's own code (a data hook, an
    augmentation) draws what the uninterrupted run drew, through the weights_only round trip."""
    config = make_config("tiny", 20, arch="decoder", n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32)
    model = build_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = state.capture(optimizer, scheduler, None, 5, {})
    out = save_checkpoint(tmp_path / "ck", model, config, training_state=saved)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state.restore(load_training_state(out), optimizer, scheduler, None)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
