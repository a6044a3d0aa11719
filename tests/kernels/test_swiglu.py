"""The fused SwiGLU gate against the reference (PyTorch's silu and product).

On CPU the kernels run under the Triton interpreter (tests/conftest.py) at small sizes; the GPU test
runs them compiled at iFlame's training size. Tolerances: both forms compute each value in float32
and round at the same places, so in float32 they agree to float32 rounding (exp and the division
may differ in their last bits: 1e-6 relative with margin). In bf16 a value may land on the other
side of a rounding boundary, and the interpreter's float32 -> bf16 conversion truncates where PyTorch
rounds to nearest: one bf16 ulp (2^-7 relative) per rounding, and each output passes two, the first
one's error carried into the second (``h``: ``silu(g)``, then the product; ``du``: ``silu(g)``, then
``dh * silu(g)``; ``dg``: ``dh * u``, then its own): 2^-6.
"""

import pytest
import torch
from meshforge.kernels.swiglu import swiglu, swiglu_reference
from meshforge.kernels.swiglu.fused import swiglu_triton

from meshforge.models.layers import SwiGLU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ULP = 2.0**-7


def inputs(shape, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(shape, generator=g)).to(device, dtype).requires_grad_()
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(device, dtype)
    return gate_up, grad


def forward_backward(gate, gate_up, grad):
    gate_up.grad = None
    out = gate(gate_up)
    out.backward(grad)
    return out.detach(), gate_up.grad.clone()


def close(actual, expected, rtol):
    """|actual - expected| <= rtol |expected| + 1e-6 max |expected| (float32's own error, relative to
    the products, for values near zero)."""
    bound = rtol * expected.float().abs() + 1e-6 * expected.float().abs().max()
    return bool(((actual.float() - expected.float()).abs() <= bound).all())


# A tile's worth of rows and columns; columns that are not a multiple of the tile (masked); one row.
SHAPES = [(9, 2 * 520), (2, 3, 2 * 40), (1, 2 * 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gate_matches_the_reference(shape, dtype):
    gate_up, grad = inputs(shape, dtype)
    out, dgate_up = forward_backward(swiglu_triton, gate_up, grad)
    expected, dgate_up_ref = forward_backward(swiglu_reference, gate_up, grad)
    assert out.shape == expected.shape and out.dtype == dgate_up.dtype == dtype
    two_roundings = 2 * BF16_ULP if dtype == torch.bfloat16 else 0.0
    assert close(out, expected, two_roundings + 1e-6)
    assert close(dgate_up, dgate_up_ref, two_roundings + 1e-6)


def test_bad_and_empty_inputs():
    with pytest.raises(ValueError, match="even last axis"):
        swiglu_triton(torch.ones(2, 7, device=DEVICE))
    assert swiglu_triton(torch.ones(0, 3, 8, device=DEVICE)).shape == (0, 3, 4)


def test_cpu_and_compiled_code_run_the_reference_and_a_modules_backend_picks_its_form():
    gate_up, _ = inputs((3, 16), torch.float32, device="cpu")
    assert torch.equal(swiglu(gate_up), swiglu_reference(gate_up))
    compiled = torch.compile(lambda t: swiglu(t), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(gate_up), swiglu_reference(gate_up))
    mlp = SwiGLU(8, 16).to(DEVICE)
    x = torch.randn(2, 8, device=DEVICE)
    mlp.backend = "triton"
    fused = mlp(x)
    assert torch.equal(fused, mlp.down(swiglu_triton(mlp.gate_up(x))))
    mlp.backend = "torch"
    assert torch.equal(mlp(x), mlp.down(swiglu_reference(mlp.gate_up(x))))


def test_kernels_compile_for_hopper(hopper_compile):
    hopper_compile("""
from meshforge.kernels.swiglu.fused import BLOCK, ROWS, _backward_kernel, _forward_kernel
sizes = [("n_rows", "i32"), ("hidden", "i32")]
kernels = ((_forward_kernel, [("gate_up_ptr", "*bf16"), ("out_ptr", "*bf16")] + sizes),
           (_backward_kernel, [("gate_up_ptr", "*bf16"), ("grad_ptr", "*bf16"), ("dgate_up_ptr", "*bf16")] + sizes))
for kernel, types in kernels:
    assert compile_for_hopper(kernel, types, dict(ROWS=ROWS, BLOCK=BLOCK)).asm["cubin"]
""")


@pytest.mark.gpu
def test_fused_gate_on_cuda_at_iflame_training_size():
    gate_up, grad = inputs((32, 1107, 2 * 1408), torch.bfloat16)
    out, dgate_up = forward_backward(swiglu_triton, gate_up, grad)
    expected, dgate_up_ref = forward_backward(swiglu_reference, gate_up, grad)
    # compiled, the kernels round to nearest as PyTorch does: an ulp per rounding where float32's last
    # bits move a value across a boundary, two roundings per output
    assert close(out, expected, 2 * BF16_ULP + 1e-6)
    assert close(dgate_up, dgate_up_ref, 2 * BF16_ULP + 1e-6)
