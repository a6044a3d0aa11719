"""iFlame: strict causality, cached decoding == full forward, cache layout, attention dispatch."""

import math
import subprocess
import sys

import pytest
import torch
from meshforge.kernels.attention import causal_attention
from torch.nn import functional as F

from meshforge.models.iflame import IFlame, IFlameConfig, KVCache, StateCache
from meshforge.runtime import compile_model

SMALL = {"dim": 64, "n_heads": 4, "max_seq_len": 90}
CONFIGS = {
    "interleaved": IFlameConfig(**SMALL, blocks=(1, 1, 2, 1, 1)),
    "full": IFlameConfig(**SMALL, blocks=(1, 1, 2, 1, 1), attention="full"),
    "linear": IFlameConfig(**SMALL, blocks=(1, 1, 2, 1, 1), attention="linear"),
    # Every stage holds one linear and one full block.
    "both-per-level": IFlameConfig(**SMALL, blocks=(2, 2, 2, 2, 2), full_every=2),
    # Stages without blocks: no GEMM to carry a decoder's skip add or a stage's write into the cache.
    "empty-vertex-stages": IFlameConfig(**SMALL, blocks=(1, 0, 1, 0, 1)),
}
LENGTH = 81  # 27 vertices, 9 faces; more than one 64-token chunk at the token level


def model(name: str) -> IFlame:
    torch.manual_seed(0)
    m = IFlame(CONFIGS[name]).eval()
    # Random skip weights so that a miswired level cannot hide behind w = 1.
    with torch.no_grad():
        m.vertex_skip.fill_(0.7)
        m.token_skip.fill_(1.3)
    return m


def tokens(batch: int, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 131, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_interleaving_puts_full_attention_on_every_fourth_block():
    m = IFlame(IFlameConfig(dim=32, n_heads=2))
    kinds = [block.attn.full for stage in m.stages for block in stage]
    assert [len(s) for s in m.stages] == [4, 4, 8, 4, 4]
    assert [i for i, full in enumerate(kinds) if full] == [3, 7, 11, 15, 19, 23]
    both = IFlame(CONFIGS["both-per-level"])
    assert all({b.attn.full for b in stage} == {True, False} for stage in both.stages)


@pytest.mark.parametrize("name", CONFIGS)
def test_strictly_causal(name):
    """Perturbing input token t changes no logit before t (and does change logit t)."""
    m = model(name)
    base = tokens(1)
    # Every position within a face (0..8) and within a vertex, at the sequence start and further in.
    positions = torch.tensor([0, 1, 2, 3, *range(36, 54), LENGTH - 1])
    perturbed = base.repeat(len(positions), 1)
    rows = torch.arange(len(positions))
    perturbed[rows, positions] = (perturbed[rows, positions] + 1 + positions % 7) % 131
    with torch.no_grad():
        ref = m(base)[0]
        out = m(perturbed)
    for row, t in enumerate(positions.tolist()):
        torch.testing.assert_close(out[row, :t], ref[:t], rtol=0, atol=1e-5)
        assert (out[row, t] - ref[t]).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_equals_the_full_forward(name):
    m = model(name)
    x = tokens(2)
    with torch.no_grad():
        ref = m(x)
        cache = m.init_cache(2, LENGTH)
        steps = torch.stack([m.step(x[:, t], cache) for t in range(LENGTH)], dim=1)
    assert cache.position == LENGTH and cache.device_position.item() == LENGTH
    torch.testing.assert_close(steps, ref, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="full"):
        m.step(x[:, 0], cache)


# Prompt lengths at every phase of a vertex and a face: before the first vertex / face completes,
# exactly at completions, just after, and past the linear attention's 64-token chunk.
PROMPTS = [1, 2, 3, 4, 8, 9, 10, 26, 27, 28, 70]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_prefilled_cache_continues_like_stepping_through_the_prompt(name):
    """One forward pass over a prompt of P tokens leaves the cache as P steps do: the last logits
    agree, and so do the steps after it (which read every level's K/V, states, group slots and
    last vertex / face). float32 on CPU; prefill and steps differ only in summation order (chunked
    vs recurrent linear attention, batched vs per-position matmuls), ~1e-6 relative here; the
    tolerance is the decoding-equals-forward test's."""
    m = model(name)
    x = tokens(2)
    after = 9  # a whole face of steps past the prompt: every coarse level advances once more
    with torch.no_grad():
        stepped = m.init_cache(2, LENGTH)
        want = torch.stack([m.step(x[:, t], stepped) for t in range(LENGTH)], dim=1)
        for length in PROMPTS:
            cache = m.init_cache(2, LENGTH)
            got = [m.prefill(x[:, :length], cache)]
            assert cache.position == cache.device_position.item() == length
            got += [m.step(x[:, t], cache) for t in range(length, min(length + after, LENGTH))]
            torch.testing.assert_close(
                torch.stack(got, dim=1), want[:, length - 1 : length + after], rtol=1e-5, atol=2e-5,
                msg=lambda text, length=length: f"prompt of {length} tokens: {text}",
            )


def test_prefill_needs_an_empty_cache_and_a_prompt_that_fits():
    m = model("interleaved")
    x = tokens(1)
    with torch.no_grad():
        cache = m.init_cache(1, 18)
        with pytest.raises(ValueError, match="does not fit"):
            m.prefill(x[:, :19], cache)
        m.prefill(x[:, :18], cache)  # a full cache is fine: nothing further to step
        with pytest.raises(ValueError, match="empty cache"):
            m.prefill(x[:, :4], cache)
        with pytest.raises(ValueError, match="full"):
            m.step(x[:, 0], cache)


def test_a_reset_cache_decodes_like_a_fresh_one():
    """reset() empties the cache in place (what lets captured CUDA graphs reuse its buffers)."""
    m = model("both-per-level")
    x = tokens(2)
    with torch.no_grad():
        cache = m.init_cache(2, LENGTH)
        buffers = [c.k.data_ptr() if isinstance(c, KVCache) else c.state.data_ptr() for s in cache.blocks for c in s]
        first = torch.stack([m.step(x[:, t], cache) for t in range(20)], dim=1)
        cache.reset()
        again = torch.stack([m.step(x[:, t], cache) for t in range(20)], dim=1)
    assert buffers == [c.k.data_ptr() if isinstance(c, KVCache) else c.state.data_ptr() for s in cache.blocks for c in s]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):
        cache.seek(LENGTH)


def test_cache_holds_kv_for_full_blocks_and_a_state_for_linear_ones():
    m = model("both-per-level")
    batch, max_len, dim, heads = 3, 81, 64, 4
    cache = m.init_cache(batch, max_len)
    level_len = [81, 27, 9, 27, 81]
    expected = 0
    for stage, length, caches in zip(m.stages, level_len, cache.blocks):
        for block, c in zip(stage, caches):
            if block.attn.full:
                assert isinstance(c, KVCache) and c.k.shape == (batch, heads, length, dim // heads)
                expected += 2 * batch * length * dim * 4
            else:
                assert isinstance(c, StateCache) and c.state.shape == (batch, heads, dim // heads, dim // heads)
                expected += batch * heads * (dim // heads) ** 2 * 4
    assert cache.nbytes() == expected
    # Only full blocks grow with the sequence. With the reference layout (4/4/8/4/4 blocks, 1 in 4
    # full) interleaving keeps a quarter of the full baseline's K/V at every level.
    def kv_bytes(attention: str) -> int:
        cfg = IFlameConfig(dim=32, n_heads=2, attention=attention, max_seq_len=81)
        caches = IFlame(cfg).init_cache(1, 81).blocks
        return sum(c.nbytes() for stage in caches for c in stage if isinstance(c, KVCache))

    assert kv_bytes("interleaved") * 4 == kv_bytes("full") == 8 * (81 + 27 + 9) * 2 * 32 * 4


def test_lengths_must_be_whole_faces():
    m = model("interleaved")
    with pytest.raises(ValueError, match="multiple of 9"):
        m(tokens(1, 10))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(tokens(1, 99))
    with pytest.raises(ValueError):
        IFlameConfig(dim=60, n_heads=4, blocks=(1, 1, 1, 1, 1))  # odd head width: no RoPE
    with pytest.raises(ValueError):
        IFlameConfig(blocks=(1, 1, 1, 1))


def test_linear_attention_output_norm_takes_its_eps_from_the_config():
    cfg = IFlameConfig(dim=32, n_heads=2, blocks=(1, 1, 1, 1, 1), attention="linear", max_seq_len=81,
                       linear_norm_eps=1e-4)
    assert {block.attn.out_norm.eps for stage in IFlame(cfg).stages for block in stage} == {1e-4}
    with pytest.raises(ValueError, match="linear_norm_eps"):
        IFlameConfig(linear_norm_eps=0.0)


def test_weights_exclude_derived_buffers():
    state = model("interleaved").state_dict()
    assert not any(name.startswith("rope.") or name.endswith("slopes") for name in state)


def test_a_few_steps_fit_a_sequence():
    torch.manual_seed(0)
    m = IFlame(IFlameConfig(dim=32, n_heads=2, blocks=(1, 1, 1, 1, 1), max_seq_len=36))
    x = tokens(2, 36)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        m = IFlame(IFlameConfig(**SMALL, blocks=(2, 2, 2, 2, 2), full_every=2, grad_checkpoint=recompute))
        m(tokens(2, 36)).square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compiled_model_gives_the_same_loss_and_gradients():
    """``train-iflame --compile`` (inductor: fused norms, SwiGLU, RoPE, residual adds; 0.372 s against
    0.684 s a step at 48 x 800 faces on an H200, ``iflame_step_variants.json``) keeps the maths.
    In float32 a fused kernel rounds each elementwise op as eager code does, so only the order of
    reductions (RMSNorm's mean over 64 channels, softmax sums) may differ: ~sqrt(64) eps ~ 1e-6
    relative per reduction, through 6 blocks and their backward; 1e-4 of each gradient's largest
    entry leaves a margin of ~10x over that."""
    torch.manual_seed(0)
    m = IFlame(IFlameConfig(**SMALL, blocks=(1, 1, 2, 1, 1), full_every=2))
    x = tokens(2)

    def loss_and_grads(forward):
        m.zero_grad()
        logits = forward(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    eager_loss, eager_grads = loss_and_grads(m)
    compiled_loss, compiled_grads = loss_and_grads(compile_model(m))  # the trainer's --compile
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
        assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_the_fused_norm_rotation_and_gate_give_the_models_loss_and_gradients(monkeypatch):
    """The Triton q/k rotation (what eager CUDA training runs) with the opt-in Triton RMSNorm and SwiGLU
    gate, here under the interpreter, against the PyTorch forms, through a whole model in float32: each op agrees to float32 rounding
    (its own tests), so the loss and gradients agree as the compiled model's do (the test above's
    argument: 1e-4 of each gradient's largest entry, ~10x over the reductions' float32 error)."""
    from meshforge.models.iflame import Attention
    from meshforge.models.layers import RMSNorm, SwiGLU

    torch.manual_seed(0)
    m = IFlame(IFlameConfig(**SMALL, blocks=(1, 1, 2, 1, 1), full_every=2))
    x = tokens(2)

    def loss_and_grads():
        m.zero_grad()
        logits = m(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    reference_loss, reference_grads = loss_and_grads()
    monkeypatch.setattr(RMSNorm, "backend", "triton")
    monkeypatch.setattr(Attention, "rotary_backend", "triton")
    monkeypatch.setattr(SwiGLU, "backend", "triton")
    fused_loss, fused_grads = loss_and_grads()
    torch.testing.assert_close(fused_loss, reference_loss, rtol=1e-5, atol=0)
    for reference, fused in zip(reference_grads, fused_grads, strict=True):
        assert (fused - reference).abs().max() <= 1e-4 * reference.abs().max()


def _compile_counts(
    device: str, attention: str, faces: list[int], compile=None, dim: int = 64, heads: int = 2, batch: int = 2
) -> tuple[list[int], dict]:
    """Graphs dynamo had compiled after each training step (forward, backward) of one small iFlame at
    ``faces`` per sequence, in order, and its graph breaks. ``compile``: the model's wrapper (default
    ``torch.compile`` with ``aot_eager``: dynamo's own graphs and guards, no inductor)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = IFlameConfig(dim=dim, n_heads=heads, blocks=(1, 1, 1, 1, 1), attention=attention, max_seq_len=9 * (max(faces) + 1))
    m = IFlame(config).to(device)
    compiled = compile(m) if compile else torch.compile(m, backend="aot_eager")
    amp = torch.autocast(device, torch.bfloat16) if device == "cuda" else torch.autocast(device, enabled=False)
    graphs = []
    for count in faces:
        x = torch.randint(0, 131, (batch, 9 * count), device=device)
        with amp:
            compiled(x).float().logsumexp(-1).mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["interleaved", "full"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_compiled_model_compiles_once_for_every_bucketed_length(device, attention):
    """Training meets dozens of bucketed lengths: the sequence axis must become dynamic after the
    second one, with no recompiling per length and no graph breaks but the linear-attention forms run
    eagerly by design (fla's chunked kernel past PARALLEL_MAX_LEN positions on CUDA, the chunk loop on
    CPU). A model that recompiles per length hits dynamo's recompile limit within a few steps (the CPU
    chunk loop did); one that breaks its graph inside every block runs each block as frames of its own
    (on an H200 ~126 compiled-graph calls a step): host-bound steps either way."""
    from meshforge.kernels.linear_attention import PARALLEL_MAX_LEN

    # Lengths on both sides of the CUDA kernels' switch, so that each of its two paths has been traced.
    short, long_ = PARALLEL_MAX_LEN // 9 - 20, PARALLEL_MAX_LEN // 9 + 20
    warm = [short, short + 3, long_, long_ + 3]
    graphs, breaks = _compile_counts(device, attention, warm + [short + 7, short - 11, long_ + 9, short + 1, long_ + 1])
    assert graphs[-1] == graphs[len(warm) - 1], f"graphs after each length: {graphs} (the first {len(warm)} warm)"
    by_design = ("_fla_chunk", "linear_attention_chunked")  # fla's kernel; the CPU form's loop over chunks
    unexpected = {reason: n for reason, n in breaks.items() if not any(name in reason for name in by_design)}
    assert not unexpected, unexpected


@pytest.mark.slow
def test_short_batches_keep_their_graph_after_long_ones_broke_it(monkeypatch):
    """CUDA's structure mimicked on CPU: the linear layers in the graph up to PARALLEL_MAX_LEN positions
    (the parallel kernel's custom op there; here the masked quadratic form), behind a graph break beyond
    (fla's kernel; here the eagerly run chunked form), the model's guards on that switch evaluated as on
    CUDA. Dynamo tries a frame's newest entry first, and the entry compiled for a long batch guards only
    what was traced before the call that broke: without :func:`guard_cuda_forms` in the model's forward
    it takes the next short batch too (2 more graphs here, the run in pieces; the H200's compile-once test
    failed so)."""
    from meshforge.kernels import linear_attention as la

    from meshforge.models import iflame

    def cuda_like(q, k, v, slopes, initial_state=None, output_final_state=False, scale=None, backend="auto"):
        stateful = initial_state is not None or output_final_state
        if la.cuda_form(q.shape[1], stateful) == "parallel":
            # written out: linear_attention_parallel is the chunked form's loop with one chunk, which
            # would specialise on each length (the recompiles this test must not confuse with its own)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
            position = torch.arange(q.shape[1], dtype=torch.float32)
            distance = position[:, None] - position[None, :]
            weights = torch.exp(-slopes.float()[:, None, None] * distance.clamp(min=0)) * (distance >= 0)
            return (scale * ((qf @ kf.transpose(-1, -2)) * weights) @ vf).transpose(1, 2).to(q.dtype), None
        return la._chunked_eager(q, k, v, slopes, initial_state, output_final_state, scale)

    def guards_as_on_cuda(lengths, device):
        la.guard_cuda_forms(lengths, torch.device("cuda"))

    monkeypatch.setattr(iflame, "linear_attention", cuda_like)
    monkeypatch.setattr(iflame, "guard_cuda_forms", guards_as_on_cuda)
    short, long_ = la.PARALLEL_MAX_LEN // 9 - 20, la.PARALLEL_MAX_LEN // 9 + 20
    graphs, _ = _compile_counts("cpu", "interleaved", [short, short + 3, long_, long_ + 3, short + 7, short - 11])
    assert graphs[-1] == graphs[3], f"graphs after each length: {graphs} (the first 4 warm)"


@pytest.mark.gpu
@pytest.mark.slow
def test_inductor_fuses_the_norms_backward_without_guarding_on_the_length():
    """Inductor's mix-order reduction fuses RMSNorm's backward reductions only past size thresholds
    (torch 2.13: rows x columns >= 5 Mi, rows >= 2 columns, rows >= 4,096), each a guard on a dynamic
    length: on an H200 the whole model recompiled for 320..959 and 960..2,048 tokens at batch 32 x 512
    channels. Here, at batch 8 x 512 channels, 936 and 1,008 tokens (the length becomes dynamic) lie below
    all of them at the token level and 1,440 / 1,584 above (10,240 rows x 512 = 5 Mi at 1,280 tokens),
    all under PARALLEL_MAX_LEN: with the trainer's compile options no length may add a graph. The face
    counts are multiples of 8, so every level's length is too: inductor also guards on whether a length
    is 8-aligned (an H200 run at 100, 110, 160, 180 faces recompiled at 160, the first aligned vertex
    level, 480, with no size guard failing), which bucketed training lengths from 64 faces on all are."""
    graphs, _ = _compile_counts("cuda", "interleaved", [104, 112, 160, 176], compile_model, dim=512, heads=16, batch=8)
    assert graphs[-1] == graphs[1], f"graphs after each length: {graphs} (the first 2 warm)"


COMPILED_CUDA_STEP = """
import torch
from meshforge.models.iflame import IFlame, IFlameConfig
torch.manual_seed(0)
# 240 faces: 2,160 tokens (fla's chunked kernel at the token level), 720 and 240 (the parallel kernel)
model = torch.compile(IFlame(IFlameConfig(dim=128, n_heads=4, max_seq_len=9 * 241)).cuda())
x = torch.randint(0, 131, (2, 9 * 240), device="cuda")
with torch.autocast("cuda", torch.bfloat16):
    loss = model(x).float().logsumexp(-1).mean()
loss.backward()
assert torch.isfinite(loss), loss
"""


@pytest.mark.gpu
def test_a_compiled_model_trains_in_a_fresh_process_on_cuda():
    """The first linear-attention call inside the compiled model is where fla used to be imported."""
    subprocess.run([sys.executable, "-c", COMPILED_CUDA_STEP], check=True, timeout=900)


def test_causal_attention_matches_softmax_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 8, generator=g) for _ in range(3))
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    torch.testing.assert_close(causal_attention(q, k, v), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full", [True, False])
def test_operator_free_attention_passes_the_values_through(full):
    """The benchmarks' bound: with ``operator_free`` a block's attention output is proj(v) (plus the
    linear blocks' output norm), whatever the queries and keys."""
    from meshforge.models.iflame import Attention
    from meshforge.models.layers import Rotary

    cfg = IFlameConfig(**SMALL)
    attn = Attention(cfg, full=full).eval()
    attn.operator_free = True
    x = torch.randn(2, 7, cfg.dim, generator=torch.Generator().manual_seed(2))
    v = attn.qkv(x).unflatten(-1, (3, cfg.n_heads, cfg.head_dim))[:, :, 2]
    want = attn.proj((v if full else attn.out_norm(v)).flatten(-2))
    torch.testing.assert_close(attn(x, Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)), want)
