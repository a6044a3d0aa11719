"""One worker of the 2-process data-parallel tests: ``python -m tests.train.ddp_worker OUT OPTIMIZER [STEPS]``."""

import sys
from pathlib import Path

import torch

from meshforge.train.trainer import train
from tests.train.toy import ToyTask, toy_config

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, optimizer = Path(sys.argv[1]), sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    train(ToyTask(batch_size=8), toy_config(steps=steps, optimizer=optimizer, ema_decay=0.9), out, device="cpu")
