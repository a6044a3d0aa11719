"""Settings every test module sees from its import on.

On a CPU-only machine Triton kernels run under Triton's interpreter. ``TRITON_INTERPRET`` is read
when ``triton.language`` defines its own jit functions (``tl.zeros``, ...), so it is set here,
before any test module is collected: importing ``torch._dynamo`` (``torch.compiler.disable`` at a
module's import, say) imports Triton, and a kernel module interpreted while ``triton.language`` was
not fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
"""

import os

import pytest
import torch

os.environ.setdefault("MESHFORGE_NO_PROGRESS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
