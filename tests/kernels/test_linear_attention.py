"""Decayed linear attention: the chunked CPU path and fla-core's kernels against the recurrence."""

import pytest
import torch
from meshforge.kernels.linear_attention import (
    decay_slopes,
    linear_attention,
    linear_attention_chunked,
    linear_attention_naive,
    linear_attention_step,
)

B, H, D = 2, 4, 16


def inputs(T: int, seed: int = 0, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device, dtype) for _ in range(3))
    state = torch.randn(B, H, D, D, generator=g).to(device)
    return q, k, v, state


def assert_close_rel(actual, expected, rel):
    """Max error relative to the largest reference magnitude (outputs grow with the decay window)."""
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * expected.abs().max().item(), err


def test_slopes_are_iflames_alibi_powers_of_two():
    assert decay_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert decay_slopes(16)[1].item() == 0.5 and decay_slopes(16)[-1].item() == 2.0**-8


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # fla on a CPU-only machine
def test_recurrence_is_flas_simple_gla_with_log_decay_minus_slope():
    """What the CUDA path relies on: fla's ``g_gamma`` is the per-step log decay, i.e. ``-s``."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    q, k, v, state = inputs(30, seed=6)
    slopes = decay_slopes(H)
    g = (-slopes).expand(B, 30, H)
    want, want_final = naive_recurrent_simple_gla(q, k, v, g, initial_state=state, output_final_state=True)
    got, got_final = linear_attention_naive(q, k, v, slopes, state, output_final_state=True)
    assert_close_rel(got, want, 1e-6)
    assert_close_rel(got_final, want_final, 1e-6)


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 150])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_equals_recurrence_with_initial_and_final_state(T, chunk_size):
    q, k, v, state = inputs(T)
    slopes = decay_slopes(H)
    want, want_final = linear_attention_naive(q, k, v, slopes, state, output_final_state=True)
    got, got_final = linear_attention_chunked(q, k, v, slopes, state, output_final_state=True, chunk_size=chunk_size)
    assert got.shape == (B, T, H, D) and got.dtype == q.dtype
    assert_close_rel(got, want, 2e-6)
    assert_close_rel(got_final, want_final, 2e-6)


def test_chunked_gradients_equal_the_recurrences():
    q, k, v, state = (x.requires_grad_() for x in inputs(70, seed=5))
    slopes = decay_slopes(H)
    grads = []
    for fn, kw in ((linear_attention_naive, {}), (linear_attention_chunked, {"chunk_size": 32})):
        out, final = fn(q, k, v, slopes, state, True, **kw)
        grads.append(torch.autograd.grad(out.square().sum() + final.sum(), (q, k, v, state)))
    for naive, chunked in zip(*grads):
        assert_close_rel(chunked, naive, 2e-6)


def test_fast_decay_and_custom_scale_stay_exact():
    # Slopes far above iFlame's (per-step factor e^-6): decay tables underflow to 0, never overflow.
    q, k, v, state = inputs(100, seed=1)
    slopes = torch.tensor([6.0, 1.0, 0.1, 0.0])
    want, want_final = linear_attention_naive(q, k, v, slopes, state, True, scale=0.3)
    got, got_final = linear_attention_chunked(q, k, v, slopes, state, True, scale=0.3, chunk_size=32)
    assert torch.isfinite(got).all()
    assert_close_rel(got, want, 2e-6)
    assert_close_rel(got_final, want_final, 2e-6)


def test_state_passing_splits_a_sequence_anywhere():
    q, k, v, _ = inputs(90, seed=2)
    slopes = decay_slopes(H)
    whole, whole_final = linear_attention(q, k, v, slopes, output_final_state=True)
    head, mid = linear_attention(q[:, :37], k[:, :37], v[:, :37], slopes, output_final_state=True)
    tail, final = linear_attention(q[:, 37:], k[:, 37:], v[:, 37:], slopes, mid, output_final_state=True)
    assert_close_rel(torch.cat([head, tail], 1), whole, 2e-6)
    assert_close_rel(final, whole_final, 2e-6)


def test_step_advances_the_state_in_place_like_the_recurrence():
    q, k, v, state = inputs(20, seed=3)
    slopes = decay_slopes(H)
    want, want_final = linear_attention_naive(q, k, v, slopes, state, True)
    cache = state.clone()
    decay = torch.exp(-slopes)
    got = torch.stack([linear_attention_step(q[:, t], k[:, t], v[:, t], decay, cache) for t in range(20)], 1)
    assert_close_rel(got, want, 2e-6)
    assert_close_rel(cache, want_final, 2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
def test_fla_kernels_match_the_reference_on_cuda(dtype, rel):
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    q, k, v, state = inputs(300, seed=4, device="cuda", dtype=dtype)
    slopes = decay_slopes(H).cuda()
    want, want_final = linear_attention_naive(q, k, v, slopes, state, True)
    got, got_final = linear_attention(q, k, v, slopes, state, output_final_state=True)
    assert got.dtype == dtype
    assert_close_rel(got, want, rel)
    assert_close_rel(got_final, want_final, rel)
    rec, rec_final = fused_recurrent_simple_gla(q, k, v, g_gamma=-slopes, initial_state=state, output_final_state=True)
    assert_close_rel(rec, want, rel)
    assert_close_rel(rec_final, want_final, rel)
    # Gradients of the Triton path against autograd through the chunked reference (fla may use TF32).
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q32, k32, v32))
    linear_attention(q32, k32, v32, slopes)[0].square().sum().backward()
    linear_attention_chunked(qc, kc, vc, slopes)[0].square().sum().backward()
    for fast, ref in ((q32, qc), (k32, kc), (v32, vc)):
        assert_close_rel(fast.grad, ref.grad, 5e-3)
