"""Teacher-forced token metrics of an autoregressive mesh model: face accuracy and perplexity.

"Face accuracy" (face-acc) is iFlame's headline metric: the fraction of target tokens whose
argmax prediction, given the true prefix, is the target, over every non-PAD target of the
held-out split (the 9F coordinate tokens and END of each mesh). Perplexity is ``exp`` of the mean
cross-entropy over the same tokens.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from meshforge.data.shards import TokenDataset
from meshforge.data.tokens import collate_tokens
from meshforge.runtime import track


@torch.no_grad()
def token_metrics(
    model: nn.Module,
    dataset: TokenDataset,
    *,
    batch_size: int = 16,
    max_meshes: int | None = None,
    max_len: int | None = None,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """``face_acc``, ``perplexity``, ``loss`` (mean nats per token), ``tokens`` and ``meshes`` over
    the first ``max_meshes`` meshes of ``dataset`` (all by default), ``batch_size`` at a time.

    ``model(inputs)`` must return logits ``[B, L, vocab]``. Meshes are batched in order of length
    so that little compute goes to padding; the result does not depend on the batching.
    """
    count = len(dataset) if max_meshes is None else min(max_meshes, len(dataset))
    if count == 0:
        raise ValueError("token metrics need at least one mesh")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(count), key=lambda i: len(dataset.stored_tokens(i)))
    batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
    amp = torch.autocast(device.type, autocast) if autocast is not None else nullcontext()
    correct = nll = total = 0.0
    for batch in track(batches, "evaluate"):
        inputs, targets = collate_tokens([dataset[i] for i in batch], dataset.vocab, max_len=max_len)
        inputs, targets = inputs.to(device), targets.to(device)
        with amp:
            logits = model(inputs)
        logits = logits.float()
        keep = targets != dataset.vocab.pad
        nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == targets[keep]).sum().item()
        total += keep.sum().item()
    model.train(was_training)
    loss = nll / total
    return {"face_acc": correct / total, "perplexity": math.exp(loss), "loss": loss, "tokens": int(total),
            "meshes": count}


def face_accuracy(model: nn.Module, dataset: TokenDataset, **kwargs: Any) -> float:
    """Teacher-forced next-token accuracy over the non-PAD targets (see :func:`token_metrics`)."""
    return token_metrics(model, dataset, **kwargs)["face_acc"]


def perplexity(model: nn.Module, dataset: TokenDataset, **kwargs: Any) -> float:
    """``exp`` of the mean cross-entropy over the non-PAD targets (see :func:`token_metrics`)."""
    return token_metrics(model, dataset, **kwargs)["perplexity"]
