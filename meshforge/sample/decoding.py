"""Stepping an iFlame model through a generation: eagerly, or by replaying CUDA graphs.

Eager decoding launches every kernel of a step from Python (76 per token on average for the reference
model, :meth:`IFlame.step`), so the GPU spends most of a step waiting for the host (about 5 ms a step
on an H200 at batch 1-16 with the unfused step's 195 launches; replayed: 0.5 ms at batch 1).
:class:`GraphDecoder` captures :meth:`IFlame.step` once per position
within a face and replays the graph of each step's phase instead: one launch per token. Nine graphs
suffice because a step's kernels depend on the position modulo 9 only (which levels run, which
group slots are written); the positions themselves, the K/V lengths included, are read from the
cache's device tensor (:meth:`IFlameCache.seek`).

On CUDA both decoders step a copy of the model whose matmul and embedding weights are cast to
bf16 once (:func:`bf16_weights`), rather than under autocast, which would launch a cast of every
weight again at every step. Norms, rotary tables and decay rates stay float32, and
so does everything on the CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from meshforge.data.tokens import TOKENS_PER_FACE
from meshforge.models.iflame import IFlame, IFlameCache


def bf16_weights(model: IFlame) -> IFlame:
    """An eval copy of ``model`` with its Linear and Embedding weights in bf16 (the residual stream,
    K/V caches and logits follow); RMSNorm gains, rotary tables and decay rates keep float32."""
    decoding = copy.deepcopy(model).eval()
    for module in decoding.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.to(torch.bfloat16)
    return decoding


class EagerDecoder:
    """``step(tokens [B]) -> logits [B, vocab]``: one :meth:`IFlame.step` per call, launched from Python."""

    def __init__(self, model: IFlame, batch_size: int, max_len: int, device: torch.device) -> None:
        self.model = bf16_weights(model) if device.type == "cuda" else model
        self.cache: IFlameCache = self.model.init_cache(batch_size, max_len, device)

    def step(self, tokens: Tensor) -> Tensor:
        return self.model.step(tokens, self.cache)

    def prefill(self, tokens: Tensor) -> Tensor:
        """Feed a prompt ``tokens [B, P]`` to the empty cache in one forward pass (:meth:`IFlame.prefill`);
        the logits of its last token ``[B, vocab]``. Steps continue at position ``P``."""
        return self.model.prefill(tokens, self.cache)


class GraphDecoder(EagerDecoder):
    """The same steps replayed from CUDA graphs, one per phase (position modulo 9).

    Capturing runs each phase once on a side stream first (Triton compiles its kernels, cuBLAS
    sets up its workspaces), then records it; both touch the cache, which is reset afterwards. The
    returned logits are the graph's output buffer: read them before the next step of the same phase.
    A prompt is prefilled eagerly (one forward pass, :meth:`EagerDecoder.prefill`) into the same
    buffers the graphs read, and sets the cache's host and device positions, so the replays then
    continue at the graph of the prompt's phase.
    """

    def __init__(self, model: IFlame, batch_size: int, max_len: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        super().__init__(model, batch_size, max_len, device)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        phases = range(min(TOKENS_PER_FACE, max_len))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for phase in phases:
                self.cache.seek(phase)
                super().step(self.tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: list[Tensor] = []
        for phase in phases:
            self.cache.seek(phase)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graphs[0].pool() if self.graphs else None):
                self.logits.append(super().step(self.tokens))
            self.graphs.append(graph)
        self.cache.reset()

    def step(self, tokens: Tensor) -> Tensor:
        cache = self.cache
        if cache.position >= cache.max_len:
            raise ValueError(f"cache is full ({cache.max_len} positions)")
        phase = cache.position % TOKENS_PER_FACE
        self.tokens.copy_(tokens)
        self.graphs[phase].replay()  # advances cache.device_position on the device
        cache.position += 1
        return self.logits[phase]


def make_decoder(
    model: IFlame, batch_size: int, max_len: int, device: torch.device, cuda_graphs: bool = True
) -> EagerDecoder:
    """A decoder with a fresh cache of ``max_len`` positions: graphs on CUDA unless ``cuda_graphs`` is off."""
    if cuda_graphs and device.type == "cuda":
        return GraphDecoder(model, batch_size, max_len, device)
    return EagerDecoder(model, batch_size, max_len, device)


__all__ = ["EagerDecoder", "GraphDecoder", "make_decoder"]
