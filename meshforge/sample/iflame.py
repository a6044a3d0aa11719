"""Batched autoregressive sampling of face tokens from an iFlame model (cached decoding).

A batch of sequences advances in lockstep, one token per :meth:`IFlame.step`, so the hourglass
levels complete their vertices and faces at the same steps for every sequence. Each sequence stops
at its own END: after that it is fed PAD and its samples are ignored, and the batch ends when all
have stopped or ``max_faces`` faces are written. The grammar of :func:`meshforge.data.tokens.allowed_next`
is enforced at every step (coordinates inside a face, END only at a face boundary), then
temperature, top-k and top-p shape the distribution. A seeded generator makes a run reproducible
on a given device. Steps run through :mod:`meshforge.sample.decoding`: replayed CUDA graphs on CUDA
(``cuda_graphs``), eager elsewhere.

Prompt completion (the original iFlame's test mode): each sequence may start from given faces, fed
to the cache in one forward pass (:meth:`IFlame.prefill`) before the steps continue; sequences
with prompts of equal length share batches, since a batch advances in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab, allowed_next
from meshforge.errors import MeshforgeError
from meshforge.models.iflame import IFlame
from meshforge.runtime import make_progress
from meshforge.sample.decoding import EagerDecoder, make_decoder


@dataclass(kw_only=True)
class TokenSampling:
    """How each token is drawn; the options ``meshforge sample`` exposes for iFlame checkpoints too."""

    temperature: float = field(default=1.0, metadata={"help": "iFlame: softmax temperature (0: greedy)."})
    top_k: int | None = field(
        default=None,
        metadata={"help": "iFlame: sample among the k most likely tokens (default: all)."},
    )
    top_p: float | None = field(
        default=None,
        metadata={"help": "iFlame: nucleus sampling mass (default: no truncation)."},
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "iFlame on CUDA: replay each decoding step as a CUDA graph (off: eager, for debugging)."
        },
    )

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(kw_only=True)
class SampleConfig(TokenSampling):
    n: int = 16  # sequences to sample
    batch_size: int = 16
    max_faces: int = 800
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_faces < 1:
            raise ValueError("n, batch_size and max_faces must be at least 1")
        super().__post_init__()


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to ``-inf`` every logit outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the most likely always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _forbidden(vocab: Vocab, device: torch.device) -> tuple[Tensor, Tensor]:
    """Tokens the grammar forbids inside a face and at a face boundary (after >= 1 face)."""
    inside, boundary = (~torch.from_numpy(allowed_next(t, vocab)).to(device) for t in (1, TOKENS_PER_FACE))
    return inside, boundary


def _sample_batch(
    decoder: EagerDecoder, vocab: Vocab, cfg: SampleConfig, prompt: Tensor, max_steps: int, device: torch.device,
    generator: torch.Generator, advance: Callable[[int], None],
) -> tuple[Tensor, int]:
    """``[batch, <= max_steps]`` tokens (the prompt's ``[batch, 9K]``, then sampled ones, PAD after END)
    and the number of model calls, from an empty decoder cache; ``advance(1)`` reports each completed face."""
    forbidden_inside, forbidden_boundary = _forbidden(vocab, device)
    batch, given = prompt.shape
    out = torch.full((batch, max_steps), vocab.pad, dtype=torch.long, device=device)
    out[:, :given] = prompt
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    start = torch.full((batch, 1), vocab.start, dtype=torch.long, device=device)
    # START and the prompt in one forward pass; the steps continue from its last logits.
    logits = decoder.prefill(torch.cat((start, prompt), dim=1)) if given else decoder.step(start[:, 0])
    for t in range(given, max_steps):
        logits = logits.float()
        at_boundary = t > 0 and t % TOKENS_PER_FACE == 0
        logits = logits.masked_fill(forbidden_boundary if at_boundary else forbidden_inside, float("-inf"))
        if cfg.temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        token = token.masked_fill(done, vocab.pad)
        out[:, t] = token
        if t % TOKENS_PER_FACE == TOKENS_PER_FACE - 1:
            advance(1)  # a face completed
        if at_boundary:
            # END can only appear here, so this is the one place worth a host sync.
            done |= token == vocab.end
            if bool(done.all()):
                break
        if t + 1 < max_steps:
            logits = decoder.step(token)
    return out[:, : t + 1], t + 1 - given  # the prefill and the steps after it


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal prompt length (a batch advances in lockstep), at most
    ``batch_size`` each, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def sample_tokens(
    model: IFlame, vocab: Vocab, cfg: SampleConfig, device: torch.device | str, prompts: list[np.ndarray] | None = None
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Sample ``cfg.n`` meshes as coordinate-token arrays (``9F`` tokens each, END stripped).

    ``prompts`` (one per mesh: coordinate tokens of whole faces, possibly none) are the meshes'
    first faces: prefilled in one forward pass, then completed; each returned sequence starts with
    its prompt. ``max_faces`` counts the prompt's faces too. Returns the sequences and timing stats:
    ``time_s``, ``tokens`` (coordinates and END actually produced, prompts excluded),
    ``tokens_per_s`` and ``steps`` (model calls over all batches, a prefill counting one).
    Decode a sequence with :func:`meshforge.data.tokens.decode_tokens`.
    """
    device = torch.device(device)
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"model vocabulary {model.config.vocab_size} != token vocabulary {vocab.size}")
    if TOKENS_PER_FACE * cfg.max_faces > model.config.max_seq_len:
        raise MeshforgeError(
            f"max_faces {cfg.max_faces} needs {TOKENS_PER_FACE * cfg.max_faces} positions; the model was built "
            f"for at most {model.config.max_seq_len} ({model.config.max_seq_len // TOKENS_PER_FACE - 1} faces)"
        )
    prompts = [np.zeros(0, dtype=np.int64)] * cfg.n if prompts is None else prompts
    if len(prompts) != cfg.n or any(len(p) % TOKENS_PER_FACE for p in prompts):
        raise ValueError(f"need {cfg.n} prompts of whole faces (9 tokens each)")
    longest = max(len(p) for p in prompts) // TOKENS_PER_FACE
    if longest >= cfg.max_faces:
        raise MeshforgeError(
            f"a prompt of {longest} faces leaves nothing to sample under max_faces {cfg.max_faces}; "
            f"raise --max-faces or lower --prompt-faces"
        )
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sequences: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * cfg.n
    produced = total_steps = 0
    # One decoder per batch size (the last batch may be smaller): its model copy and captured
    # graphs serve every batch of that size, its cache emptied in between.
    decoders: dict[int, EagerDecoder] = {}
    max_steps = TOKENS_PER_FACE * cfg.max_faces  # the last coordinate; END after it is implied
    batches = _batches([len(p) for p in prompts], cfg.batch_size)
    start = time.perf_counter()
    with make_progress() as progress:
        share = [cfg.max_faces - len(prompts[rows[0]]) // TOKENS_PER_FACE for rows in batches]
        bar = progress.add_task("sample iflame (faces per batch)", total=sum(share))
        for rows in batches:
            batch, given = len(rows), len(prompts[rows[0]])
            prompt = torch.as_tensor(np.stack([prompts[i] for i in rows]), dtype=torch.long).to(device)
            with torch.inference_mode():
                if batch in decoders:
                    decoders[batch].cache.reset()
                else:
                    decoders[batch] = make_decoder(model, batch, max_steps, device, cfg.cuda_graphs)
                tokens, steps = _sample_batch(
                    decoders[batch], vocab, cfg, prompt, max_steps, device, generator,
                    lambda faces: progress.advance(bar, faces),
                )
            # A batch that ended early skips the rest of its share of the bar.
            progress.advance(bar, cfg.max_faces - tokens.shape[1] // TOKENS_PER_FACE)
            total_steps += steps
            for i, row in zip(rows, tokens.cpu().numpy()):
                stop = np.flatnonzero(row >= vocab.levels)  # END, then PAD
                length = int(stop[0]) if len(stop) else len(row)
                produced += length - given + int(length < len(row))
                sequences[i] = row[:length].copy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    stats = {"time_s": elapsed, "tokens": produced, "tokens_per_s": produced / elapsed, "steps": total_steps}
    return sequences, stats
