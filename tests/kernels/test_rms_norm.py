"""The fused RMSNorm kernels against the reference (PyTorch's rms_norm in float32).

On CPU the kernels run under the Triton interpreter (tests/conftest.py) at small sizes; the GPU test
runs them compiled at iFlame's sizes. Tolerances: in float32 the two forms differ only in the order
of float32 sums (a sum of D or N terms: relative 1e-5 with margin). In bf16 both round the same
float32 value once, to the output's dtype, but the interpreter's float32 -> bf16 conversion truncates
where PyTorch rounds to nearest: one bf16 ulp, 2^-7 relative. The gain's gradient stays float32.
"""

import pytest
import torch
from meshforge.kernels.rms_norm import rms_norm, rms_norm_reference
from meshforge.kernels.rms_norm.fused import rms_norm_triton

from meshforge.models.layers import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ULP = 2.0**-7


def inputs(shape, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device).requires_grad_()
    grad = torch.randn(shape, generator=g).to(device, dtype)
    return x, weight, grad


def forward_backward(norm, x, weight, grad, eps):
    x.grad = weight.grad = None
    y = norm(x, weight, eps)
    y.backward(grad)
    return y.detach(), x.grad.clone(), weight.grad.clone()


def gain_gradient_close(dw, dw_ref, x, grad):
    """The gain's gradient sums N products ``g * x_hat``: both forms sum in blocks, then the blocks'
    sums (a tree at most ~20 deep at N ~ 10^6), so float32 puts each within ~20 * 2^-24 of the sum of
    the terms' magnitudes; 1e-5 of it leaves a margin of eight."""
    x_hat = rms_norm_reference(x.detach().float(), torch.ones(x.shape[-1], device=x.device), 1e-3)
    magnitude = (grad.float() * x_hat).abs().reshape(-1, x.shape[-1]).sum(0)
    return bool(((dw - dw_ref).abs() <= 1e-5 * magnitude).all())


def close(actual, expected, rtol, scale_atol):
    """|actual - expected| <= rtol |expected| + scale_atol * max |expected|."""
    bound = rtol * expected.float().abs() + scale_atol * expected.float().abs().max()
    return bool(((actual.float() - expected.float()).abs() <= bound).all())


# Rows of 32 (iFlame's heads: 128 rows a program, the last one partial), of a width that is not a
# power of two (masked columns), and of a model width (8 rows a program).
SHAPES = [(2, 37, 3, 32), (5, 7, 96), (3, 11, 512)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_the_reference(shape, dtype):
    x, weight, grad = inputs(shape, dtype)
    eps = 1e-3
    y, dx, dw = forward_backward(rms_norm_triton, x, weight, grad, eps)
    y_ref, dx_ref, dw_ref = forward_backward(rms_norm_reference, x, weight, grad, eps)
    assert y.dtype == y_ref.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    ulp = BF16_ULP if dtype == torch.bfloat16 else 0.0
    assert close(y, y_ref, ulp + 1e-5, 1e-6)
    # dx = rstd (g w - x_hat mean(x_hat g w)): a difference, so float32 error scales with its terms
    assert close(dx, dx_ref, ulp + 1e-5, 1e-5)
    assert gain_gradient_close(dw, dw_ref, x, grad)


def test_a_zero_row_keeps_its_zeros_and_eps_bounds_the_scale():
    x = torch.zeros(3, 32, device=DEVICE)
    x[1] = 1e-4
    weight = torch.ones(32, device=DEVICE)
    y = rms_norm_triton(x, weight, 1e-3)
    assert torch.equal(y[0], torch.zeros(32, device=DEVICE))
    torch.testing.assert_close(y[1], x[1] / (1e-8 + 1e-3) ** 0.5)


def test_an_empty_input_and_a_wrong_gain_shape():
    weight = torch.ones(32, device=DEVICE)
    assert rms_norm_triton(torch.empty(0, 4, 32, device=DEVICE), weight, 1e-6).shape == (0, 4, 32)
    with pytest.raises(ValueError, match="weight of shape \\(16,\\) for rows of 32"):
        rms_norm_triton(torch.ones(2, 32, device=DEVICE), torch.ones(16, device=DEVICE), 1e-6)


def test_cpu_and_compiled_code_run_the_reference():
    x, weight, _ = inputs((4, 32), torch.float32, device="cpu")
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    norm = RMSNorm(32, eps=1e-3)
    compiled = torch.compile(norm, backend="aot_eager", fullgraph=True)  # no custom op, no graph break
    torch.testing.assert_close(compiled(x), rms_norm_reference(x, norm.weight, 1e-3))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 1107, 16, 32), (32, 1107, 512)])  # iFlame's per-head and block norms
def test_fused_rms_norm_on_cuda_at_iflame_sizes(shape):
    x, weight, grad = inputs(shape, torch.bfloat16)
    norm = RMSNorm(shape[-1], eps=1e-3).cuda()
    norm.backend = "triton"
    with torch.no_grad():
        norm.weight.copy_(weight)
    y = norm(x)
    y.backward(grad)
    dx = x.grad.clone()
    y_ref, dx_ref, dw_ref = forward_backward(rms_norm_reference, x, weight, grad, 1e-3)
    # compiled, the kernels round to nearest as PyTorch does: at most one ulp apart where fused
    # multiply-adds move a value across a rounding boundary
    assert close(y.detach(), y_ref, BF16_ULP + 1e-5, 1e-6)
    assert close(dx, dx_ref, BF16_ULP + 1e-5, 1e-5)
    assert gain_gradient_close(norm.weight.grad, dw_ref, x, grad)


def test_a_modules_backend_picks_its_form():
    """What benchmarks/launch_overhead.py relies on to time both forms in one process."""
    x, _, _ = inputs((3, 5, 32), torch.float32)
    norm = RMSNorm(32, eps=1e-3).to(DEVICE)
    norm.backend = "triton"
    assert torch.equal(norm(x), rms_norm_triton(x, norm.weight, 1e-3))
    norm.backend = "torch"
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-3))


def test_kernels_compile_for_hopper(hopper_compile):
    hopper_compile("""
from meshforge.kernels.rms_norm.fused import _backward_kernel, _forward_kernel
sizes = [("n_rows", "i32"), ("dim", "i32")]
forward = [("x_ptr", "*bf16"), ("w_ptr", "*fp32"), ("y_ptr", "*bf16"), ("rstd_ptr", "*fp32")] + sizes + [("eps", "fp32")]
backward = [("grad_ptr", "*bf16"), ("x_ptr", "*bf16"), ("w_ptr", "*fp32"), ("rstd_ptr", "*fp32"), ("dx_ptr", "*bf16"),
            ("dw_partial_ptr", "*fp32")] + sizes
for rows, block_d in ((128, 32), (8, 512)):  # iFlame's per-head and block norms
    for kernel, types in ((_forward_kernel, forward), (_backward_kernel, backward)):
        assert compile_for_hopper(kernel, types, dict(ROWS=rows, BLOCK_D=block_d)).asm["cubin"]
""")
