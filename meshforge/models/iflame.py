"""iFlame: an hourglass transformer over face tokens that interleaves full and linear attention.

The input is a face-token sequence (:mod:`meshforge.data.tokens`), length a multiple of 9.
Five stages of pre-norm blocks (RMSNorm, attention with RoPE, SwiGLU) run at three resolutions::

    tokens   [L]    token_enc ----------------------------------------------+ skip
    vertices [L/3]     '-> mean of 3 -> vertex_enc ----------------+ skip    |
    faces    [L/9]                        '-> mean of 3 -> face    |         |
    vertices [L/3]                   vertex_dec <- up(face) + w * skip       |
    tokens   [L]    token_dec <- up(vertex) + w * skip ----------------------'
                    -> RMSNorm -> head -> logits [L, vocab]

``up`` repeats each coarse position 3 times and shifts the result right by 2, so fine position t
receives the coarse group that *ended* at or before t (group ``floor((t-2)/3)``): nothing leaks from
the future, and the model stays strictly causal. ``w`` is a learned scalar per skip.

Attention kind per block (global index i over all stages, in the order above): ``interleaved``
makes block i full softmax attention iff ``(i + 1) % full_every == 0`` and decayed linear attention
(:mod:`meshforge.kernels.linear_attention`) otherwise; ``full`` and ``linear`` use one kind
everywhere, so the full-attention baseline is this same code with one field changed.

Linear attention here is iFlame's: identity feature map, ``q`` scaled by ``d**-0.5``, RoPE on
``q`` and ``k``, per-head constant decay ``exp(-2^(-8(h+1)/H))``. Its output has no softmax
denominator, so its magnitude depends on the decay window; a per-head RMSNorm on the output
(as in RetNet / TransNormer and fla's layers) keeps the residual stream well scaled. Its eps is
1e-3, not the usual 1e-6: an early position's output is one term ``(q . k) v`` whose ``q . k`` can
sit near 0, and normalising a near-zero vector multiplies its gradient by ``1 / rms``. With 1e-6
the reference model's gradient norm averaged 6,789 over its first 5 steps on an H200, with 1e-3
24 (``benchmarks/results/iflame_ddp_runs``, before and after the change).

Decoding (:meth:`IFlame.step`) runs one token at a time against an :class:`IFlameCache`: full
blocks keep static K/V buffers, linear blocks a ``d x d`` state per head, and the vertex / face
stages advance only when a vertex (3 tokens) / face (9 tokens) completes. Positions are read from a
device tensor, so a step's launches depend only on the position modulo 9: nine CUDA graphs replay
every step of a generation (:mod:`meshforge.sample.decoding`). A prompt is fed in one forward pass
instead (:meth:`IFlame.prefill`), which leaves every level's cache as stepping through it would.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab
from meshforge.kernels.attention import causal_attention
from meshforge.kernels.decode_attention import decode_attention
from meshforge.kernels.decode_step import advance_position, fused_linear, linear_decode_step, rotary_kv_append
from meshforge.kernels.linear_attention import LinearBackend, decay_slopes, guard_cuda_forms, linear_attention
from meshforge.kernels.rotary import rotate_qk
from meshforge.kernels.utils import Backend
from meshforge.models.layers import RMSNorm, Rotary, SwiGLU, swiglu_hidden
from meshforge.models.registry import ModelSpec, register_model

POOL = 3  # tokens per vertex, vertices per face
LEVELS = 3  # token, vertex, face: the hourglass's sequence levels
SHIFT = POOL - 1  # the causal right-shift after upsampling

AttentionKind = Literal["interleaved", "full", "linear"]


@dataclass
class IFlameConfig:
    vocab_size: int = Vocab(7).size
    dim: int = 512
    n_heads: int = 16
    # blocks per stage: token, vertex, face (bottleneck), vertex, token
    blocks: tuple[int, ...] = (4, 4, 8, 4, 4)
    attention: AttentionKind = "interleaved"
    full_every: int = 4  # interleaved: every full_every-th block is full attention
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = ratio * dim, rounded up to a multiple of 64
    rope_base: float = 10000.0
    max_seq_len: int = TOKENS_PER_FACE * 4001  # 4,000 faces + END
    dropout: float = 0.0
    # eps of the per-head RMSNorm on linear-attention outputs (see the module docstring), chosen at
    # width 512; the quickstart's width-96 model trains better with 1e-6
    linear_norm_eps: float = 1e-3
    # Recompute each block's activations in the backward pass: about a third more compute, but only
    # each block's input is kept instead of all its intermediates (long sequences at large batch).
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if len(self.blocks) != 5 or min(self.blocks) < 0 or sum(self.blocks) == 0:
            raise ValueError(f"blocks must be 5 non-negative counts (token, vertex, face, vertex, token), got {self.blocks}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even width")
        if self.attention not in ("interleaved", "full", "linear"):
            raise ValueError(f"attention must be interleaved, full or linear, got {self.attention!r}")
        if self.full_every < 1:
            raise ValueError(f"full_every must be at least 1, got {self.full_every}")
        if self.max_seq_len < TOKENS_PER_FACE or self.max_seq_len % TOKENS_PER_FACE:
            raise ValueError(f"max_seq_len must be a positive multiple of 9, got {self.max_seq_len}")
        if self.vocab_size < 1 or self.mlp_ratio <= 0 or self.rope_base <= 1 or not 0 <= self.dropout < 1:
            raise ValueError("vocab_size and mlp_ratio must be positive, rope_base > 1, dropout in [0, 1)")
        if self.linear_norm_eps <= 0:
            raise ValueError(f"linear_norm_eps must be positive, got {self.linear_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_full(self, index: int) -> bool:
        """Whether block ``index`` (global, 0-based) uses full softmax attention."""
        if self.attention == "interleaved":
            return (index + 1) % self.full_every == 0
        return self.attention == "full"


# ----------------------------------------------------------------------------- decoding caches


@dataclass
class KVCache:
    """Static K/V buffers ``[B, H, max_len, D]`` of one full-attention block."""

    k: Tensor
    v: Tensor

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class StateCache:
    """The float32 recurrent state ``[B, H, D, D]`` of one linear-attention block."""

    state: Tensor
    decay: Tensor  # exp(-slopes) [H], float32 whatever the model's dtype

    def nbytes(self) -> int:
        return self.state.nbytes


BlockCache = KVCache | StateCache


@dataclass
class StepPosition:
    """Where one decoding step writes at one level, on the device: the position ``index`` (``[1]``
    int64), the K/V ``length`` after it (``index + 1``) and its rotary tables. Made once per level
    and step, shared by the level's blocks."""

    index: Tensor
    length: Tensor
    cos: Tensor
    sin: Tensor


Skip = tuple[Tensor, Tensor]  # (scale, other): a decoder's input is ``x + scale * other`` (the hourglass's skip)


@dataclass
class IFlameCache:
    """Everything :meth:`IFlame.step` needs to continue a batch of sequences.

    ``token_group`` / ``vertex_group`` collect the encoder outputs of the vertex / face under
    construction (pooled when it completes); ``vertex_up`` / ``face_up`` hold the decoder output of
    the last completed vertex / face, which is exactly what the shifted upsampling feeds to the
    finer level (zeros before the first one completes). ``position`` is the next token index;
    ``device_position`` holds the same on the cache's device (``[1]`` int64), which is what the
    step's kernels read, so that no step waits on the host.
    """

    blocks: list[list[BlockCache]]  # per stage, per block
    token_group: Tensor  # [B, 3, dim]
    vertex_group: Tensor  # [B, 3, dim]
    vertex_up: Tensor  # [B, dim]
    face_up: Tensor  # [B, dim]
    device_position: Tensor  # [1] int64
    max_len: int
    position: int = 0

    def nbytes(self) -> int:
        """Bytes of the attention caches: K/V buffers of full blocks plus states of linear blocks."""
        return sum(c.nbytes() for stage in self.blocks for c in stage)

    def seek(self, position: int) -> None:
        """Continue at ``position`` (the states are kept: benchmarks time steps at chosen positions)."""
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} outside the cache's [0, {self.max_len})")
        self.position = position
        self.device_position.fill_(position)

    def reset(self) -> None:
        """Empty the cache in place (its buffers keep their addresses: captured graphs stay valid)."""
        for stage in self.blocks:
            for cache in stage:
                if isinstance(cache, StateCache):
                    cache.state.zero_()
        # K/V buffers are only read below the position, so stale keys are never seen.
        for stream in (self.token_group, self.vertex_group, self.vertex_up, self.face_up):
            stream.zero_()
        self.seek(0)


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    # True: the attention operator returns its values unchanged (projections, RoPE and norms still
    # run), so a timed step bounds what any cheaper operator could save (benchmarks/iflame_vs_full.py).
    operator_free: bool = False
    # The linear blocks' form (meshforge.kernels.linear_attention.FORMS); benchmarks force one CUDA kernel.
    linear_backend: LinearBackend = "auto"
    # The q/k rotation's form (meshforge.kernels.rotary.rotate_qk); benchmarks time "torch" beside the kernel.
    rotary_backend: Backend = "auto"

    def __init__(self, cfg: IFlameConfig, full: bool) -> None:
        super().__init__()
        self.full = full
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        if not full:
            self.register_buffer("slopes", decay_slopes(cfg.n_heads), persistent=False)
            self.out_norm = RMSNorm(cfg.head_dim, eps=cfg.linear_norm_eps)

    def forward(self, x: Tensor, rope: Rotary, cache: BlockCache | None = None) -> Tensor:
        """``x [B, T, dim]`` at positions ``0 .. T-1``; with an empty ``cache``, also leave in it the
        K/V (full) or state (linear) that ``T`` decoding steps would (the prefill of a prompt)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))  # [B, T, 3, H, D]
        q, k, v = rotate_qk(qkv, *rope.tables(0, x.shape[1]), backend=self.rotary_backend)
        if self.full:
            if isinstance(cache, KVCache):
                cache.k[:, :, : x.shape[1]].copy_(k.transpose(1, 2))
                cache.v[:, :, : x.shape[1]].copy_(v.transpose(1, 2))
            out = v if self.operator_free else causal_attention(q, k, v)
        else:
            if self.operator_free:
                out, state = v, None
            else:
                out, state = linear_attention(q, k, v, self.slopes, output_final_state=cache is not None,
                                              backend=self.linear_backend)
            if isinstance(cache, StateCache):
                cache.state.copy_(state)
            out = self.out_norm(out)
        return self.dropout(self.proj(out.flatten(-2)))

    def init_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> BlockCache:
        if self.full:
            shape = (batch, self.n_heads, max_len, self.head_dim)
            return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        state = torch.zeros(batch, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=torch.float32)
        return StateCache(state, torch.exp(-self.slopes.float()).to(device))

    def step(self, x: Tensor, norm: RMSNorm, at: StepPosition, cache: BlockCache, skip: Skip | None = None) -> Tensor:
        """``x + attn(norm(x))`` for the residual stream ``x [B, dim]`` at position ``at`` of the level
        (``x + scale * other`` with ``skip = (scale, other)``).

        The skip add and the norm ride in the ``qkv`` GEMM and the residual add in the output
        projection's; between the two GEMMs each kind is one fused op on CUDA
        (:mod:`meshforge.kernels.decode_step`).
        """
        if skip is None:
            qkv = fused_linear(x, self.qkv.weight, norm.weight, norm.eps)
        else:
            summed = torch.empty_like(x)
            qkv = fused_linear(x, self.qkv.weight, norm.weight, norm.eps, skip=skip, skip_sum=summed)
            x = summed
        qkv = qkv.view(x.shape[0], 3, self.n_heads, self.head_dim)
        if isinstance(cache, KVCache):
            q = rotary_kv_append(qkv, at.cos, at.sin, cache.k, cache.v, at.index)
            out = decode_attention(q, cache.k, cache.v, at.length)
        else:
            out = linear_decode_step(qkv, at.cos, at.sin, cache.decay, cache.state, self.out_norm.weight, self.out_norm.eps)
        return fused_linear(out.flatten(-2), self.proj.weight, residual=x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: IFlameConfig, full: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg, full)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, swiglu_hidden(cfg.dim, cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: Tensor, rope: Rotary, cache: BlockCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x: Tensor, at: StepPosition, cache: BlockCache, skip: Skip | None = None,
             out: Tensor | None = None) -> Tensor:  # fmt: skip
        """:meth:`forward` at one position, without dropout (decoding runs in eval), each projection
        one fused GEMM:
        ``(+ skip) norm -> qkv``, attention, ``proj -> + x``, ``norm -> gate_up -> SwiGLU``, ``down -> + x``
        (into ``out`` when given: a cache slot the result is kept in).

        5 launches for a linear block, 7 for a full one (K/V append, split-K attention and its merge);
        the unfused ops launched 15 / 17 (each RMSNorm three: to float32, norm, back; SiLU and its
        product; both residual adds)."""
        x = self.attn.step(x, self.attn_norm, at, cache, skip)
        mlp = self.mlp
        hidden = fused_linear(x, mlp.gate_up.weight, self.mlp_norm.weight, self.mlp_norm.eps, swiglu=True)
        return fused_linear(hidden, mlp.down.weight, residual=x, out=out)


def pool(x: Tensor) -> Tensor:
    """``[B, T, C] -> [B, T//3, C]``: the mean of each complete group of 3 consecutive positions."""
    groups = x.shape[1] // POOL
    return x[:, : POOL * groups].reshape(x.shape[0], groups, POOL, x.shape[2]).mean(2)


def unpool(x: Tensor, length: int | None = None) -> Tensor:
    """``[B, T, C] -> [B, length, C]`` (default ``3T``, at most ``3T + 2``): repeat each position 3
    times, then shift right by 2 (zeros in), so fine position p receives coarse group ``(p - 2) // 3``."""
    length = POOL * x.shape[1] if length is None else length
    if length > POOL * x.shape[1]:
        # A prompt's last positions read the coarse group before an incomplete one: pad it, unread.
        x = torch.cat((x, x.new_zeros(x.shape[0], 1, x.shape[2])), dim=1)
    up = x.repeat_interleave(POOL, dim=1)
    return torch.cat((up.new_zeros(up.shape[0], SHIFT, up.shape[2]), up), dim=1)[:, :length]


# ----------------------------------------------------------------------------- the model


class IFlame(nn.Module):
    def __init__(self, config: IFlameConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.rope = Rotary(config.head_dim, config.max_seq_len, config.rope_base)
        index = itertools.count()

        def stage(n_blocks: int) -> nn.ModuleList:
            return nn.ModuleList(Block(config, config.is_full(next(index))) for _ in range(n_blocks))

        self.token_enc, self.vertex_enc, self.face, self.vertex_dec, self.token_dec = map(stage, config.blocks)
        self.vertex_skip = nn.Parameter(torch.ones(()))
        self.token_skip = nn.Parameter(torch.ones(()))
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights(n_blocks=sum(config.blocks))

    @property
    def stages(self) -> tuple[nn.ModuleList, ...]:
        return self.token_enc, self.vertex_enc, self.face, self.vertex_dec, self.token_dec

    def _init_weights(self, n_blocks: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        # GPT-2: scale the projections that write into the residual stream by depth.
        for block in itertools.chain(*self.stages):
            for out_proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(out_proj.weight, std=0.02 / math.sqrt(2 * n_blocks))

    def _run(self, stage: nn.ModuleList, x: Tensor, caches: list[BlockCache] | None = None) -> Tensor:
        if x.shape[1] == 0:  # a prompt too short to complete a vertex / face: the level has not run yet
            return x
        recompute = self.config.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(stage):
            if recompute:
                x = checkpoint(block, x, self.rope, use_reentrant=False)
            else:
                x = block(x, self.rope, caches[i] if caches is not None else None)
        return x

    def _hourglass(self, tokens: Tensor, cache: IFlameCache | None = None) -> Tensor:
        """Final token features ``[B, L, dim]``. With an empty ``cache``, every level also leaves in it
        what ``L`` decoding steps would: K/V and states of its completed positions, group slots, the
        last completed vertex / face (any ``L``; the coarse levels see ``L // 3`` and ``L // 9`` positions)."""
        length = tokens.shape[1]
        blocks = cache.blocks if cache is not None else [None] * len(self.stages)
        tok = self._run(self.token_enc, self.embed(tokens), blocks[0])
        vert = self._run(self.vertex_enc, pool(tok), blocks[1])
        face = self._run(self.face, pool(vert), blocks[2])
        vert_out = self._run(self.vertex_dec, unpool(face, vert.shape[1]) + self.vertex_skip * vert, blocks[3])
        out = self._run(self.token_dec, unpool(vert_out, length) + self.token_skip * tok, blocks[4])
        if cache is not None:
            # A step writes slot t % 3 of a group at every position t, so the newest three remain.
            for t in range(max(0, length - POOL), length):
                cache.token_group[:, t % POOL] = tok[:, t]
            for v in range(max(0, vert.shape[1] - POOL), vert.shape[1]):
                cache.vertex_group[:, v % POOL] = vert[:, v]
            if face.shape[1]:
                cache.face_up.copy_(face[:, -1])
            if vert_out.shape[1]:
                cache.vertex_up.copy_(vert_out[:, -1])
            cache.position = length
            cache.device_position.fill_(length)
        return out

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, L]`` (L a multiple of 9) -> next-token logits ``[B, L, vocab]``."""
        length = tokens.shape[1]
        if length % TOKENS_PER_FACE or length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} must be a multiple of 9 and <= max_seq_len {self.config.max_seq_len}")
        if self.config.attention != "full":  # the levels' linear forms, as guards of a compiled graph
            guard_cuda_forms((length, length // POOL, length // POOL**2), tokens.device)
        return self.head(self.norm(self._hourglass(tokens)))

    # ------------------------------------------------------------------------- decoding

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> IFlameCache:
        """Empty caches for ``batch_size`` sequences of up to ``max_len`` tokens.

        ``dtype`` is the K/V buffers', by default the parameters' (bfloat16 for the CUDA decoders'
        copy, :func:`meshforge.sample.decoding.bf16_weights`). Linear-attention states are always float32. Every buffer is
        allocated here, once: decoding only writes into them.
        """
        if not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"max_len must be in [1, {self.config.max_seq_len}], got {max_len}")
        param = self.embed.weight
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        level_len = (max_len, -(-max_len // POOL), -(-max_len // POOL**2), -(-max_len // POOL), max_len)
        blocks = [
            [block.attn.init_cache(batch_size, n, device, dtype) for block in stage]
            for stage, n in zip(self.stages, level_len)
        ]

        def stream(*shape: int) -> Tensor:
            return torch.zeros(batch_size, *shape, self.config.dim, device=device, dtype=param.dtype)

        position = torch.zeros(1, device=device, dtype=torch.long)
        return IFlameCache(blocks, stream(POOL), stream(POOL), stream(), stream(), position, max_len)

    def _step(self, stage: nn.ModuleList, x: Tensor, at: StepPosition, caches: list[BlockCache],
              skip: Skip | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
        """A stage's blocks at one position: ``x`` (``+ scale * other`` with ``skip``, which the first
        block's ``qkv`` GEMM adds), the last block's output written into ``out`` when given."""
        if not stage:  # no GEMM to carry the skip add and the write
            if skip is not None:
                x = x + skip[0] * skip[1]
            return x if out is None else out.copy_(x)
        for i, (block, cache) in enumerate(zip(stage, caches)):
            x = block.step(x, at, cache, skip if i == 0 else None, out if i == len(stage) - 1 else None)
        return x

    def step(self, tokens: Tensor, cache: IFlameCache) -> Tensor:
        """Feed token ``tokens [B]`` at position ``cache.position``; returns its logits ``[B, vocab]``.

        The same computation as :meth:`forward` restricted to one new position: the vertex stages
        run when this token completes a vertex, the face stage when it completes a face. Which of
        them run, and which group slots are written, depend on ``cache.position`` modulo 9 only;
        the kernels read the positions a step derives on the device from ``cache.device_position``.

        A step at batch 1-16 is launch-bound. Around the blocks (:meth:`Block.step`) it launches the
        embedding, every level's position and rotary rows (one op), the group means and the fused
        final norm + head; the stages' outputs go straight into their cache slots and the skip adds
        ride in the decoders' first GEMMs. For the reference model (4/4/8/4/4 blocks, 1 in 4 full)
        that is 47 launches at 6 of the 9 phases, 92 when a vertex completes, 137 when a face does,
        67 a step on average (with the position's arithmetic, the copies and the skip adds as
        launches of their own: 76; unfused: 195; the full-attention baseline 84, was 212).
        """
        t = cache.position
        if t >= cache.max_len:
            raise ValueError(f"cache is full ({cache.max_len} positions)")
        enc, vert_enc, face_blocks, vert_dec, dec = cache.blocks
        # Every level's index, K/V length and rotary rows in one op, the device position advanced.
        index, length, cos, sin = advance_position(cache.device_position, self.rope.cos, self.rope.sin, POOL, LEVELS)
        token_at, vertex_at, face_at = (
            StepPosition(index[j : j + 1], length[j : j + 1], cos[j : j + 1], sin[j : j + 1]) for j in range(LEVELS)
        )
        # Each stage's last GEMM writes straight into the cache slot its output is kept in, and the
        # decoders' skip adds ride in their first GEMM: no copy or elementwise launch between stages.
        tok = self._step(self.token_enc, self.embed(tokens), token_at, enc, out=cache.token_group[:, t % POOL])
        if t % POOL == POOL - 1:
            vert = self._step(self.vertex_enc, cache.token_group.mean(1), vertex_at, vert_enc,
                              out=cache.vertex_group[:, (t // POOL) % POOL])  # fmt: skip
            if t % POOL**2 == POOL**2 - 1:
                self._step(self.face, cache.vertex_group.mean(1), face_at, face_blocks, out=cache.face_up)
            self._step(self.vertex_dec, cache.face_up, vertex_at, vert_dec, skip=(self.vertex_skip, vert),
                       out=cache.vertex_up)  # fmt: skip
        tok = self._step(self.token_dec, cache.vertex_up, token_at, dec, skip=(self.token_skip, tok))
        cache.position = t + 1
        return fused_linear(tok, self.head.weight, self.norm.weight, self.norm.eps)

    def prefill(self, tokens: Tensor, cache: IFlameCache) -> Tensor:
        """Feed ``tokens [B, P]`` (any ``P`` up to the cache's length) at positions ``0 .. P-1`` of an
        empty cache in one forward pass; returns the logits of the last ``[B, vocab]``.

        The cache is left as ``P`` calls of :meth:`step` leave it, up to summation order: full blocks'
        K/V come from the same projections, linear blocks' states from the chunked form of the
        recurrence. Its buffers are written in place, so captured decoding graphs stay valid.
        """
        length = tokens.shape[1]
        if cache.position:
            raise ValueError(f"prefill needs an empty cache (this one is at position {cache.position}; reset it)")
        if not 0 < length <= cache.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit a cache of {cache.max_len} positions")
        return self.head(self.norm(self._hourglass(tokens, cache)[:, -1]))


def checkpoint_max_faces(meta: dict[str, Any]) -> int:
    """Faces per mesh an iFlame checkpoint handles: what it was trained on (``--max-faces``), within
    its ``max_seq_len`` (which also holds the END face)."""
    capacity = int(meta["model_config"]["max_seq_len"]) // TOKENS_PER_FACE - 1
    trained = (meta.get("task_config") or {}).get("max_faces")
    return min(capacity, int(trained)) if trained else capacity


register_model(ModelSpec(
    "iflame", IFlameConfig, IFlame,
    sampler="meshforge.sample.run:sample_iflame",
    evaluator="meshforge.metrics.tokens:evaluate_checkpoint", metrics=("face-acc", "perplexity"),
))
