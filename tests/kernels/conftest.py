"""The kernel tests run Triton kernels under the interpreter on a CPU-only machine: ``TRITON_INTERPRET``
must be set before any kernel module is imported (the ops import them lazily), i.e. here, before the
test modules are collected."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
