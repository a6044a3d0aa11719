"""The fused decoding GEMM (norm -> linear -> SwiGLU or residual add) against its PyTorch reference.

On a CPU-only machine the Triton kernel runs under the interpreter (tests/conftest.py) at small
sizes; the GPU test runs it compiled at the reference model's sizes in bf16.

Tolerances come from the roundings on each path, element by element. Both forms round the same
float32 values at the same places, so they differ by one ulp of a rounded value where a different
summation order, or the interpreter's float32 -> bf16 conversion (it truncates instead of rounding
to nearest), puts it on the other side of a rounding boundary: ``u = 2^-7`` relative in bf16. A
normed input off by ``u |x_k|`` moves output ``n`` by at most ``u sum_k |x_k w_nk|``; the rounding of
the output itself adds ``u |out|``. SwiGLU carries the gate's and up's bounds ``B_g, B_u`` through
``silu(g) up`` (``|silu'| <= 1.1``) and rounds twice more; a residual add rounds once more. The
float32 sums may run in another order: ``K 2^-24 sum_k |x_k w_nk|`` at worst, all there is in float32.
"""

import pytest
import torch
from meshforge.kernels.decode_step import fused_linear, fused_linear_reference
from meshforge.kernels.decode_step.linear import LinearConfig, fused_linear_triton
from torch.nn import functional as F

from meshforge.models.layers import RMSNorm, SwiGLU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = {
    "plain": {},
    "norm": {"norm": True},  # the qkv projection, the head
    "norm-swiglu": {"norm": True, "swiglu": True},  # gate_up
    "residual": {"residual": True},  # proj, down
}


def inputs(rows, k, n, mode, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(2 * n if mode.get("swiglu") else n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    kwargs = {"swiglu": mode.get("swiglu", False)}
    if mode.get("norm"):
        kwargs |= {"norm_weight": (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE), "eps": 1e-6}
    if mode.get("residual"):
        kwargs["residual"] = torch.randn(rows, n, generator=g).to(DEVICE, dtype)
    return x, weight, kwargs


def error_bound(x, weight, kwargs, want):
    """Elementwise bound on |fused - reference| (module docstring)."""
    u = 2.0**-7 if x.dtype == torch.bfloat16 else 0.0  # one rounding to the activations' dtype
    order = x.shape[1] * 2.0**-24  # a K-term float32 sum in another order
    normed = "norm_weight" in kwargs
    if normed:
        x = F.rms_norm(x.float(), (x.shape[1],), kwargs["norm_weight"].float(), kwargs["eps"]).to(x.dtype)
    acc = x.float() @ weight.float().T
    bound = ((u if normed else 0.0) + order) * (x.float().abs() @ weight.float().abs().T) + u * acc.abs()
    if kwargs["swiglu"]:
        (gate, up), (b_gate, b_up) = acc.chunk(2, dim=-1), bound.chunk(2, dim=-1)
        bound = 1.1 * b_gate * (up.abs() + b_up) + F.silu(gate).abs() * b_up + 2 * u * want.float().abs()
    return bound + u * want.float().abs() + order * want.float().abs()


def check(x, weight, kwargs, got):
    want = fused_linear_reference(x, weight, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    excess = (got.float() - want.float()).abs() - error_bound(x, weight, kwargs, want)
    assert excess.max().item() <= 0, f"off the rounding bound by {excess.max().item():.3g}"


def test_reference_is_the_training_blocks_own_ops():
    """norm -> gate_up -> SwiGLU, then down + residual: exactly the training forward's
    ``x + SwiGLU(RMSNorm(x))``."""
    torch.manual_seed(0)
    norm, mlp = RMSNorm(32), SwiGLU(32, 64).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, 32)
        hidden = fused_linear_reference(x, mlp.gate_up.weight, norm.weight, norm.eps, swiglu=True)
        got = fused_linear_reference(hidden, mlp.down.weight, residual=x)
        torch.testing.assert_close(got, x + mlp(norm(x)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(1, 64, 48), (3, 600, 40), (70, 200, 20)],  # one row; K over one slice, ragged; rows over one tile too
)
def test_triton_matches_the_reference(mode, dtype, rows, k, n):
    x, weight, kwargs = inputs(rows, k, n, MODES[mode], dtype, seed=rows + k)
    check(x, weight, kwargs, fused_linear_triton(x, weight, **kwargs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "config",
    [
        LinearConfig(dot=True, block_m=16, block_n=16, block_k=128),  # one row padded to a tensor-core tile
        LinearConfig(dot=False, block_m=4, block_n=8, block_k=128),  # ragged columns and K, padded rows
        LinearConfig(dot=False, block_m=4, block_n=1, block_k=256, num_warps=2),
    ],
    ids=["dot", "gemv-8", "gemv-1"],
)
def test_either_tile_product_matches_the_reference_at_any_tiling(mode, config):
    """The two forms of the tile product (LinearConfig) are interchangeable: each tiling gives the
    reference within the same rounding bound, on rows, columns and K that fill no tile evenly."""
    x, weight, kwargs = inputs(3, 600, 20, MODES[mode], torch.bfloat16, seed=7)
    check(x, weight, kwargs, fused_linear_triton(x, weight, **kwargs, config=config))


def test_default_tilings_spread_a_decoding_projection_over_the_gpu():
    """A GEMV for a few rows, as many programs as GEMV_PROGRAMS asks for without tiles over 8 columns;
    tensor cores from GEMV_MAX_ROWS + 1 rows on, with the row tile's K slice inside MAX_TILE."""
    from meshforge.kernels.decode_step.linear import GEMV_MAX_ROWS, GEMV_PROGRAMS, MAX_TILE

    assert LinearConfig.for_shape(1, 512, 1408) == LinearConfig(dot=False, block_m=1, block_n=2, block_k=512)
    assert LinearConfig.for_shape(1, 1536, 512).block_n == 4
    assert LinearConfig.for_shape(1, 20000, 512).block_n == 8
    assert LinearConfig.for_shape(1, 135, 512).block_n == 1
    for rows, n in [(1, 512), (1, 1536), (3, 1408), (GEMV_MAX_ROWS, 135)]:
        config = LinearConfig.for_shape(rows, n, 512)
        assert not config.dot and config.block_m >= rows
        assert -(-n // config.block_n) >= GEMV_PROGRAMS or config.block_n == 1
        assert config.block_m * config.block_n * config.block_k <= MAX_TILE
    config = LinearConfig.for_shape(GEMV_MAX_ROWS + 1, 512, 1408)
    assert config.dot and config.block_m == 16 and config.block_m * config.block_k <= MAX_TILE


@pytest.mark.parametrize("config", [None, LinearConfig(dot=True, block_m=16, block_n=16, block_k=128)], ids=["gemv", "dot"])
def test_a_skip_input_and_an_out_buffer_take_the_references_values(config):
    """``x + scale * other`` before the norm (the hourglass's skip, as the first decoder block's
    ``qkv`` GEMM takes it), its sum written for the residual stream, the result into a strided view.
    In float32 the sum is the reference's bit for bit (the same two float32 operations); the GEMM
    then holds the rounding bound above, taken at the summed input."""
    x, weight, kwargs = inputs(3, 600, 20, MODES["norm"], torch.float32, seed=11)
    other = torch.randn(3, 600, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    scale = torch.tensor(0.7, device=DEVICE)
    want_sum = torch.empty_like(x)
    want = fused_linear_reference(x, weight, **kwargs, skip=(scale, other), skip_sum=want_sum)
    got_sum = torch.full_like(x, float("nan"))
    rows = torch.full((3, 2, 20), float("nan"), device=DEVICE)
    got = fused_linear_triton(x, weight, **kwargs, skip=(scale, other), skip_sum=got_sum, out=rows[:, 1], config=config)
    assert got.data_ptr() == rows[:, 1].data_ptr() and torch.isnan(rows[:, 0]).all()
    assert torch.equal(got_sum, want_sum) and torch.equal(want_sum, x + scale * other)
    check(want_sum, weight, kwargs, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_skip_needs_the_buffer_for_its_sum_and_rows_like_x():
    x, weight, _ = inputs(2, 16, 16, {}, torch.float32, seed=0)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="skip_sum"):
        fused_linear(x, weight, skip=(scale, x))
    with pytest.raises(ValueError, match="skip must be"):
        fused_linear_triton(x, weight, skip=(scale, x[:, :8]), skip_sum=torch.empty_like(x))
    with pytest.raises(ValueError, match="out must be"):
        fused_linear_triton(x, weight, out=torch.empty(2, 8, device=DEVICE))


def test_rows_may_be_a_strided_view():
    x, weight, kwargs = inputs(4, 32, 16, MODES["norm"], torch.float32, seed=5)
    wide = torch.zeros(4, 3, 32, device=DEVICE)
    wide[:, 1] = x
    check(x, weight, kwargs, fused_linear_triton(wide[:, 1], weight, **kwargs))


def test_shapes_the_kernel_cannot_take_are_refused():
    x, weight, _ = inputs(2, 16, 16, {}, torch.float32, seed=0)
    with pytest.raises(ValueError, match="even"):
        fused_linear_triton(x, weight[:15].contiguous(), swiglu=True)
    with pytest.raises(ValueError, match="residual"):
        fused_linear_triton(x, weight, residual=torch.zeros(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="does not take"):
        fused_linear_triton(x, weight[:, :8].contiguous())


HOPPER_COMPILE = """
from meshforge.kernels.decode_step.linear import _fused_linear_kernel
names = ["x_ptr", "norm_ptr", "w_ptr", "res_ptr", "out_ptr", "skip_ptr", "scale_ptr", "sum_ptr", "M", "N", "K",
         "stride_xm", "stride_wn", "stride_rm", "stride_om", "stride_km", "stride_sm", "eps"]
types = ["*bf16", "*fp32", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 9 + ["fp32"]
flags = dict(HAS_NORM=True, SWIGLU=True, HAS_RESIDUAL=True, HAS_SKIP=True, PRECISION="tf32", DOT_DTYPE=tl.bfloat16)
dot = compile_for_hopper(_fused_linear_kernel, zip(names, types),
                         flags | dict(DOT=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=512))
assert "mma.sync" in dot.asm["ptx"] and dot.asm["cubin"]
gemv = compile_for_hopper(_fused_linear_kernel, zip(names, types),
                          flags | dict(DOT=False, BLOCK_M=1, BLOCK_N=2, BLOCK_K=512))
assert "mma" not in gemv.asm["ptx"] and gemv.asm["cubin"]
"""


def test_kernel_compiles_for_hopper(hopper_compile):
    """Every branch compiled for sm_90, down to a cubin: with tensor-core MMAs, and as a GEMV without."""
    hopper_compile(HOPPER_COMPILE)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16, 64])  # 64: the benchmark's largest, a wider row tile
def test_fused_linears_match_the_references_at_full_size_in_bf16(batch, monkeypatch):
    """The reference iFlame's four projections and its head: 512 wide, SwiGLU hidden 1408, in bf16.
    cuBLAS may otherwise reduce split-K partial sums in bf16: the reference accumulates in float32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    for k, n, mode in [(512, 1536, "norm"), (512, 512, "residual"), (512, 1408, "norm-swiglu"),
                       (1408, 512, "residual"), (512, 135, "norm")]:
        x, weight, kwargs = inputs(batch, k, n, MODES[mode], torch.bfloat16, seed=k + n)
        check(x, weight, kwargs, fused_linear(x, weight, **kwargs))
    # The skip input in bf16: compiled, the kernel rounds its product and sum to nearest as PyTorch's
    # two ops do, so the summed rows are PyTorch's exactly.
    x, weight, kwargs = inputs(batch, 512, 1536, MODES["norm"], torch.bfloat16, seed=3)
    other, scale = torch.randn_like(x), torch.tensor(0.8, device=DEVICE, dtype=torch.bfloat16)
    summed = torch.empty_like(x)
    got = fused_linear(x, weight, **kwargs, skip=(scale, other), skip_sum=summed)
    assert torch.equal(summed, x + scale * other)
    check(summed, weight, kwargs, got)


def test_a_model_step_through_the_triton_kernels_follows_the_reference_step(monkeypatch):
    """Every fused op of :meth:`IFlame.step` in its Triton form (as on CUDA, here under the
    interpreter): the shapes and strides the model hands the kernels are ones they take, and the
    9 steps of a face (every level; a full and a linear block on each) give the reference logits
    in float32."""
    from meshforge.kernels.decode_attention.split_k import decode_attention_triton
    from meshforge.kernels.decode_step.fused import linear_decode_step_triton, rotary_kv_append_triton
    from meshforge.kernels.decode_step.positions import advance_position_triton

    from meshforge.models import iflame
    from meshforge.models.iflame import IFlame, IFlameConfig

    torch.manual_seed(0)
    config = IFlameConfig(dim=32, n_heads=2, blocks=(2, 1, 1, 1, 1), full_every=2, max_seq_len=9)
    model = IFlame(config).eval()
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.init_cache(2, 9)
        want = [model.step(tokens[:, t], cache) for t in range(9)]
        triton_forms = {
            "fused_linear": fused_linear_triton,
            "linear_decode_step": linear_decode_step_triton,
            "rotary_kv_append": rotary_kv_append_triton,
            "advance_position": advance_position_triton,
            "decode_attention": decode_attention_triton,
        }
        for name, triton_form in triton_forms.items():
            monkeypatch.setattr(iflame, name, triton_form)
        cache = model.init_cache(2, 9)
        got = [model.step(tokens[:, t], cache) for t in range(9)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-5)
