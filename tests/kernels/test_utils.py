"""What every kernel folder shares (meshforge.kernels.utils)."""

import importlib.util

import torch
import torch._dynamo
from meshforge.kernels import utils


def test_the_flash_attn_probe_is_a_constant_to_torch_compile(monkeypatch):
    """torch 2.11's dynamo refused to call ``importlib.util.find_spec`` and broke the graph there, in
    every full-attention block on an H200; a ``find_spec`` that breaks the graph plays that refusal
    here (the locally installed torch traces the real one). The probe must be evaluated, not traced."""
    real = importlib.util.find_spec

    def refused_by_dynamo(name):
        torch._dynamo.graph_break()
        return real(name)

    monkeypatch.setattr(importlib.util, "find_spec", refused_by_dynamo)
    utils.has_flash_attn.cache_clear()

    def attention_like(x):
        y = x.sin()
        return (2 * y if utils.has_flash_attn() else y).cos()

    try:
        explained = torch._dynamo.explain(attention_like)(torch.ones(3))
    finally:
        utils.has_flash_attn.cache_clear()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
