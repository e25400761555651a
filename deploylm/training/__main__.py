"""`python -m deploylm.training ARGS` = `deploylm train ARGS`: the entry torchrun starts on every rank.

    torchrun --standalone --nproc-per-node 2 -m deploylm.training --task reverse --out runs/rev --batch-size 64

Each process joins the process group from torchrun's environment (deploylm/training/distributed.py).
"""
from __future__ import annotations

import sys

from deploylm.cli import cli, exit_on_sigterm


def main() -> None:
    # torchrun passes a SIGTERM (`kill` on `deploylm train --nproc N`, a CI timeout) on to every worker: unwind
    # as `deploylm train` does (rank 0 names the last checkpoint), instead of dying silently mid-step
    exit_on_sigterm()
    cli.main(["train", *sys.argv[1:]], prog_name="deploylm")


if __name__ == "__main__":
    main()
