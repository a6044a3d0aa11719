"""The fused decoding-step kernels against their PyTorch references.

On a CPU-only machine the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py) at small sizes; the GPU test runs them compiled at the
reference model's decoding size in bf16. Tolerances: float32 agrees to the order of float32 sums
(1e-5). In bf16 both forms round at the same places, but fused multiply-adds can put a value on
the other side of a rounding boundary, and the interpreter's float32 -> bf16 conversion truncates
instead of rounding to nearest: one bf16 ulp (2^-7 relative) per rounding. A linear block's
output is RMS-normalised (values of order 1) after three roundings: 2^-5 absolute.
"""

import pytest
import torch
from meshforge.kernels.decode_step import (
    advance_position,
    advance_position_reference,
    linear_decode_step,
    linear_decode_step_reference,
    rotary_kv_append,
    rotary_kv_append_reference,
)
from meshforge.kernels.decode_step.fused import linear_decode_step_triton, rotary_kv_append_triton
from meshforge.kernels.decode_step.positions import advance_position_triton
from meshforge.kernels.linear_attention import decay_slopes, linear_attention_naive
from meshforge.kernels.rotary import apply_rotary

from meshforge.models.layers import Rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def step_inputs(batch, heads, dim, seed, dtype=torch.float32, max_len=64, position=5):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3, heads, dim, generator=g).to(DEVICE, dtype)
    cos, sin = Rotary(dim, max_len, 10000.0).to(DEVICE).tables(torch.tensor([position], device=DEVICE), 1)
    state = torch.randn(batch, heads, dim, dim, generator=g).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(DEVICE)
    decay = torch.exp(-decay_slopes(heads)).to(DEVICE)
    return qkv, cos, sin, decay, state, weight


def test_a_steps_positions_are_the_levels_indices_lengths_and_rotary_rows():
    """Level j writes at ``position // 3^j``; its K/V holds one more; its tables are that row of the
    full ones; the position then advances. The reference is the model's former per-level ops."""
    rope = Rotary(8, 64, 10000.0).to(DEVICE)
    position = torch.tensor([40], device=DEVICE)
    index, length, cos, sin = advance_position_reference(position, rope.cos, rope.sin, 3, 3)
    assert index.tolist() == [40, 13, 4] and length.tolist() == [41, 14, 5] and position.item() == 41
    for j, row in enumerate((40, 13, 4)):
        want_cos, want_sin = rope.tables(torch.tensor([row], device=DEVICE), 1)
        assert torch.equal(cos[j : j + 1], want_cos) and torch.equal(sin[j : j + 1], want_sin)


@pytest.mark.parametrize("start", [0, 8, 26, 61])  # the first position, a vertex's last, a face's last, up to the table's end
def test_the_position_kernel_is_the_reference_and_advances_like_it(start):
    rope = Rotary(12, 64, 10000.0).to(DEVICE)  # a width off a power of two: the masked row
    got_position, want_position = (torch.tensor([start], device=DEVICE) for _ in range(2))
    for _ in range(2):
        got = advance_position_triton(got_position, rope.cos, rope.sin, 3, 3)
        want = advance_position_reference(want_position, rope.cos, rope.sin, 3, 3)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)
        assert torch.equal(got_position, want_position)
    assert advance_position(got_position, rope.cos, rope.sin, 3, 3, backend="reference")[0][0].item() == start + 2
    with pytest.raises(ValueError, match="position must be"):
        advance_position_triton(got_position.int(), rope.cos, rope.sin, 3, 3)


def test_linear_reference_is_a_rotated_recurrence_step_then_rmsnorm():
    qkv, cos, sin, decay, state, weight = step_inputs(2, 3, 8, seed=0)
    slopes = decay_slopes(3)
    q, k = apply_rotary(qkv[:, None, :2], cos, sin)[:, 0].unbind(1)
    want, want_state = linear_attention_naive(q[:, None], k[:, None], qkv[:, None, 2], slopes, state, True)
    want = want[:, 0]
    want = want * torch.rsqrt(want.square().mean(-1, keepdim=True) + 1e-6) * weight
    got = linear_decode_step_reference(qkv, cos, sin, decay, state, weight, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)  # advanced in place


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_triton_matches_the_reference(dim, dtype):
    qkv, cos, sin, decay, state, weight = step_inputs(2, 3, dim, seed=dim, dtype=dtype)
    state_ref = state.clone()
    want = linear_decode_step_reference(qkv, cos, sin, decay, state_ref, weight, 1e-6)
    got = linear_decode_step_triton(qkv, cos, sin, decay, state, weight, 1e-6)
    assert got.dtype == dtype and got.shape == (2, 3, dim)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-5}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    # The state adds k^T v of the rounded k: one ulp of |k| |v| (up to ~10 here) in bf16.
    state_tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-4}
    torch.testing.assert_close(state, state_ref, **state_tol)


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_append_triton_matches_the_reference(dim, dtype):
    qkv, cos, sin, *_ = step_inputs(2, 3, dim, seed=dim + 1, dtype=dtype)
    caches = [torch.randn(2, 3, 20, dim).to(DEVICE, dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    index = torch.tensor([11], device=DEVICE)
    want = rotary_kv_append_reference(qkv, cos, sin, *ref_caches, index)
    got = rotary_kv_append_triton(qkv, cos, sin, *caches, index)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-6}
    torch.testing.assert_close(got, want, **tol)
    for cache, ref in zip(caches, ref_caches):  # position 11 written, nothing else touched
        torch.testing.assert_close(cache, ref, **tol)
    assert not torch.allclose(caches[0][:, :, 11].float(), qkv[:, 1].float())  # k was rotated


def test_shapes_the_kernels_cannot_take_are_refused():
    qkv, cos, sin, decay, state, weight = step_inputs(1, 2, 8, seed=3)
    with pytest.raises(ValueError, match="float32"):
        linear_decode_step_triton(qkv, cos, sin, decay, state.double(), weight, 1e-6)
    with pytest.raises(ValueError, match="power of two"):
        odd = torch.randn(1, 3, 2, 6, device=DEVICE)
        rotary_kv_append_triton(odd, cos[:, :6].contiguous(), sin[:, :6].contiguous(), odd, odd, torch.tensor([0]))


@pytest.mark.gpu
def test_fused_steps_match_the_references_at_full_size_in_bf16():
    """The reference iFlame's decoding: batch 16, 16 heads of 32, a token-level cache of 36,009 positions."""
    qkv, cos, sin, decay, state, weight = step_inputs(16, 16, 32, seed=0, dtype=torch.bfloat16, max_len=36_009,
                                                      position=30_000)
    state_ref = state.clone()
    want = linear_decode_step_reference(qkv, cos, sin, decay, state_ref, weight, 1e-6)
    got = linear_decode_step(qkv, cos, sin, decay, state, weight, 1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-5)
    torch.testing.assert_close(state, state_ref, rtol=2**-7, atol=2**-4)

    caches = [torch.zeros(16, 16, 36_009, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    index = torch.tensor([30_000], device=DEVICE)
    want_q = rotary_kv_append_reference(qkv, cos, sin, *ref_caches, index)
    got_q = rotary_kv_append(qkv, cos, sin, *caches, index)
    torch.testing.assert_close(got_q, want_q, rtol=2**-7, atol=1e-6)
    for cache, ref in zip(caches, ref_caches):
        torch.testing.assert_close(cache, ref, rtol=2**-7, atol=1e-6)


def test_the_position_kernel_compiles_for_hopper(hopper_compile):
    """The interpreter runs the kernel as Python; compiled for sm_90, down to a cubin, its int64 position
    arithmetic and the unrolled level loop must pass Triton's compiler too."""
    hopper_compile("""
from meshforge.kernels.decode_step.positions import _advance_position_kernel
types = [("pos_ptr", "*i64"), ("cos_ptr", "*fp32"), ("sin_ptr", "*fp32"), ("index_ptr", "*i64"),
         ("length_ptr", "*i64"), ("cos_out_ptr", "*fp32"), ("sin_out_ptr", "*fp32"), ("D", "i32")]
assert compile_for_hopper(_advance_position_kernel, types, dict(POOL=3, LEVELS=3, BLOCK_D=32)).asm["cubin"]
""")


@pytest.mark.gpu
def test_the_position_kernel_at_the_reference_models_size():
    """Head width 32, a table of the 4,000-face generation's 36,009 positions, positions across it."""
    rope = Rotary(32, 36009, 10000.0).cuda()
    for start in (0, 8, 26, 17_999, 36_007):
        got_position, want_position = (torch.tensor([start], device="cuda") for _ in range(2))
        got = advance_position(got_position, rope.cos, rope.sin, 3, 3)
        want = advance_position_reference(want_position, rope.cos, rope.sin, 3, 3)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(got_position, want_position)
