"""The fused qkv split + rotation against the reference (:func:`rotate_qk_reference`).

On CPU the kernel runs under the Triton interpreter (tests/conftest.py) at small sizes; the GPU test
runs it compiled at iFlame's training size. Tolerances: in float32 each output is two products and a
sum in both forms, so they agree to float32 rounding (the kernel may fuse the multiply-add), a few
2^-24 of the products: 1e-6 of the largest output. In bf16 both round the same float32 value once, but the interpreter's float32 ->
bf16 conversion truncates where PyTorch rounds to nearest: one bf16 ulp, 2^-7 relative. ``v`` and its
gradient are copies: exact in every dtype.
"""

import pytest
import torch
from meshforge.kernels.rotary import rotate_qk, rotate_qk_reference
from meshforge.kernels.rotary.fused import rotate_qk_triton

from meshforge.models.layers import Rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ULP = 2.0**-7


def inputs(shape, dtype, seed=0, device=DEVICE, start=0, random_tables=False):
    """``random_tables``: tables whose halves differ (Rotary's repeat theirs), so that a kernel mixing
    up the halves' tables in either direction is caught."""
    batch, seq_len, heads, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    cos, sin = Rotary(head_dim, start + seq_len, 10000.0).to(device).tables(start, seq_len)
    if random_tables:
        cos, sin = (torch.randn(seq_len, head_dim, generator=g).to(device) for _ in range(2))
    grads = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]
    return qkv, cos, sin, grads


def forward_backward(rotate, qkv, cos, sin, grads):
    qkv.grad = None
    outputs = rotate(qkv, cos, sin)
    torch.autograd.backward(outputs, grads)
    return [o.detach() for o in outputs], qkv.grad.clone()


def close(actual, expected, ulp):
    """|actual - expected| <= ulp |expected| + 1e-6 max |expected|: the rounding to the output's dtype
    (``ulp``: 0 in float32) plus float32's own, which is relative to the products summed (of order
    max |expected|: an output near zero is a difference of two of them), not to their sum."""
    bound = ulp * expected.float().abs() + 1e-6 * expected.float().abs().max()
    return bool(((actual.float() - expected.float()).abs() <= bound).all())


# iFlame's heads of 32; a head count and width that are not powers of two (masked tiles); one position.
SHAPES = [(2, 37, 4, 32), (1, 5, 3, 12), (3, 1, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("random_tables", [False, True])
def test_fused_rotation_matches_the_reference(shape, dtype, random_tables):
    qkv, cos, sin, grads = inputs(shape, dtype, start=3, random_tables=random_tables)
    outputs, dqkv = forward_backward(rotate_qk_triton, qkv, cos, sin, grads)
    expected, dqkv_ref = forward_backward(rotate_qk_reference, qkv, cos, sin, grads)
    ulp = BF16_ULP if dtype == torch.bfloat16 else 0.0
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape and out.dtype == ref.dtype == dtype and out.is_contiguous()
    assert close(outputs[0], expected[0], ulp) and close(outputs[1], expected[1], ulp)
    assert torch.equal(outputs[2], expected[2])  # v: a copy
    assert dqkv.dtype == dtype
    assert close(dqkv[:, :, :2], dqkv_ref[:, :, :2], ulp)
    assert torch.equal(dqkv[:, :, 2], dqkv_ref[:, :, 2])  # dv: a copy


def test_a_gradient_that_does_not_reach_an_output_counts_as_zero():
    qkv, cos, sin, _ = inputs((1, 6, 2, 8), torch.float32)
    q, _, _ = rotate_qk_triton(qkv, cos, sin)
    q.sum().backward()  # k and v unused: their gradients are None in the backward
    reference = qkv.detach().clone().requires_grad_()
    rotate_qk_reference(reference, cos, sin)[0].sum().backward()
    assert close(qkv.grad, reference.grad, 0.0)
    assert torch.equal(qkv.grad[:, :, 1:], torch.zeros_like(qkv.grad[:, :, 1:]))


def test_bad_shapes_are_named():
    qkv = torch.zeros(1, 4, 3, 2, 8, device=DEVICE)
    cos, sin = Rotary(8, 4, 10000.0).to(DEVICE).tables(0, 4)
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, 3, H, D\]"):
        rotate_qk_triton(qkv[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="tables of"):
        rotate_qk_triton(qkv, cos[:3], sin[:3])


def test_cpu_and_compiled_code_run_the_reference_and_a_backend_forces_a_form():
    qkv, cos, sin, _ = inputs((1, 4, 2, 8), torch.float32, device="cpu")
    for got, want in zip(rotate_qk(qkv, cos, sin), rotate_qk_reference(qkv, cos, sin)):
        assert torch.equal(got, want)
    for got, want in zip(rotate_qk(qkv, cos, sin, backend="triton"), rotate_qk_triton(qkv, cos, sin)):
        assert torch.equal(got, want)
    compiled = torch.compile(lambda t: rotate_qk(t, cos, sin)[0], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(qkv), rotate_qk_reference(qkv, cos, sin)[0])


@pytest.mark.gpu
def test_fused_rotation_on_cuda_at_iflame_training_size():
    qkv, cos, sin, grads = inputs((32, 1107, 16, 32), torch.bfloat16)
    outputs, dqkv = forward_backward(rotate_qk, qkv, cos, sin, grads)  # eager on CUDA: the kernel
    expected, dqkv_ref = forward_backward(rotate_qk_reference, qkv, cos, sin, grads)
    # compiled, the kernel rounds to nearest as PyTorch does: at most one ulp apart where a fused
    # multiply-add moves a value across a rounding boundary
    assert all(close(o, e, BF16_ULP) for o, e in zip(outputs[:2], expected[:2]))
    assert torch.equal(outputs[2], expected[2]) and torch.equal(dqkv[:, :, 2], dqkv_ref[:, :, 2])
    assert close(dqkv[:, :, :2], dqkv_ref[:, :, :2], BF16_ULP)


def test_kernel_compiles_for_hopper_both_ways(hopper_compile):
    hopper_compile("""
from meshforge.kernels.rotary.fused import _rotary_kernel
types = [(name, "*bf16") for name in ("src_q", "src_k", "src_v", "dst_q", "dst_k", "dst_v")]
types += [("cos_ptr", "*fp32"), ("sin_ptr", "*fp32")] + [(n, "i32") for n in ("n_tokens", "seq_len", "src_stride", "dst_stride")]
for transpose in (False, True):
    constants = dict(HEADS=16, HEAD_DIM=32, ROWS=8, BLOCK_H=16, BLOCK_HALF=16, TRANSPOSE=transpose)
    assert compile_for_hopper(_rotary_kernel, types, constants).asm["cubin"]
""")
