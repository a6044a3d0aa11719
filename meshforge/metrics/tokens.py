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
from meshforge.data.tokens import TOKENS_PER_FACE, collate_tokens
from meshforge.errors import MeshforgeError
from meshforge.models.iflame import IFlame, checkpoint_max_faces
from meshforge.models.registry import load_model
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


def evaluate_checkpoint(cfg: Any, device: torch.device, seed: int) -> dict[str, Any]:
    """``meshforge eval --metric face-acc|perplexity``: :func:`token_metrics` of an iFlame checkpoint
    (``cfg.checkpoint``) on a token dataset split, over each mesh's first ``cfg.max_faces`` faces
    (default: what the checkpoint was trained on). ``seed`` is unused: teacher forcing draws nothing."""
    kind, model, meta = load_model(cfg.checkpoint, device, ema=cfg.ema, expect=IFlame)
    dataset = TokenDataset(cfg.data, cfg.split)
    if len(dataset) == 0:
        raise MeshforgeError(f"{cfg.data}: the {cfg.split} split is empty")
    if dataset.vocab.size != model.config.vocab_size:
        raise MeshforgeError(
            f"{cfg.data} holds {dataset.vocab.bits}-bit tokens (vocabulary {dataset.vocab.size}) but checkpoint "
            f"{meta['path']} was trained on a vocabulary of {model.config.vocab_size}: tokenize with its --bits"
        )
    capacity = model.config.max_seq_len // TOKENS_PER_FACE - 1
    if cfg.max_faces is not None and cfg.max_faces > capacity:
        raise MeshforgeError(
            f"--max-faces {cfg.max_faces} is more than checkpoint {meta['path']} handles "
            f"({capacity} faces in max_seq_len {model.config.max_seq_len})"
        )
    max_faces = cfg.max_faces or checkpoint_max_faces(meta)
    amp = torch.bfloat16 if device.type == "cuda" else None
    max_len = TOKENS_PER_FACE * (max_faces + 1)
    result = token_metrics(model, dataset, batch_size=cfg.batch_size, max_meshes=cfg.n, max_len=max_len, autocast=amp)
    return {**result, "kind": kind, "step": meta.get("step"), "checkpoint": meta["path"], "max_faces": max_faces,
            "weights": meta["weights"]}
