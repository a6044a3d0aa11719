"""Decayed linear attention: the chunked and parallel forms, the fused parallel kernel (under Triton's
interpreter on a CPU) and fla-core's kernels against the recurrence."""

import pytest
import torch
from meshforge.kernels.linear_attention import (
    PARALLEL_MAX_LEN,
    cuda_form,
    decay_slopes,
    linear_attention,
    linear_attention_chunked,
    linear_attention_naive,
    linear_attention_parallel,
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


@pytest.mark.parametrize("T", [1, 63, 150])
def test_parallel_form_equals_recurrence_with_initial_and_final_state(T):
    # One chunk of T: the same sums as the recurrence in another order, each output a sum of <= T
    # float32 terms (relative rounding ~sqrt(T) 2^-24, far inside 2e-6 of the largest output).
    q, k, v, state = inputs(T, seed=7)
    slopes = torch.tensor([6.0, 1.0, 0.1, 0.0])  # e^-6 per step underflows the far weights to 0
    want, want_final = linear_attention_naive(q, k, v, slopes, state, True, scale=0.3)
    got, got_final = linear_attention_parallel(q, k, v, slopes, state, True, scale=0.3)
    assert torch.isfinite(got).all() and got.dtype == q.dtype
    assert_close_rel(got, want, 2e-6)
    assert_close_rel(got_final, want_final, 2e-6)


def test_parallel_gradients_equal_the_chunked_forms():
    q, k, v, state = (x.double().requires_grad_() for x in inputs(100, seed=8))
    slopes = decay_slopes(H)
    grads = []
    for fn, kw in ((linear_attention_chunked, {"chunk_size": 16}), (linear_attention_parallel, {})):
        out, final = fn(q, k, v, slopes, state, True, **kw)
        grads.append(torch.autograd.grad(out.square().sum() + final.sum(), (q, k, v, state)))
    for chunked, parallel in zip(*grads):
        assert_close_rel(parallel, chunked, 2e-6)


def test_cuda_form_is_parallel_for_short_stateless_sequences_only():
    assert cuda_form(1, stateful=False) == cuda_form(PARALLEL_MAX_LEN, stateful=False) == "parallel"
    assert cuda_form(PARALLEL_MAX_LEN + 1, stateful=False) == "chunked"
    assert cuda_form(9, stateful=True) == "chunked"  # prefill hands its state on: fla's kernels


def parallel_triton_inputs(T: int, head_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, T, 4, head_dim, generator=g, requires_grad=True) for _ in range(3)]


# Under the interpreter tl.dot is a float32 matmul: outputs and gradients are sums of <= T (<= 300)
# float32 products in another order than the reference's, relative rounding ~sqrt(T) 2^-24 each.
@pytest.mark.parametrize("T, head_dim", [(1, 16), (70, 24), (300, 16)])
def test_fused_parallel_kernel_matches_the_parallel_form_and_its_gradients(T, head_dim):
    from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

    # Head 0 reaches back only 14 positions above float32 underflow: at T 300 its far key blocks are
    # skipped; heads 1 and 2 weigh off-diagonal tiles between 1 and 2^-26 (the factorised decay);
    # slope 0 (no decay) makes the last head see everything.
    slopes = torch.tensor([6.0, 2.0**-4, 0.01, 0.0])
    q, k, v = parallel_triton_inputs(T, head_dim, seed=T)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    got = linear_attention_parallel_triton(q, k, v, slopes, 0.25)
    want = linear_attention_parallel(qr, kr, vr, slopes, scale=0.25)[0]
    assert got.shape == want.shape and got.dtype == q.dtype
    assert_close_rel(got, want, 1e-5)
    assert_close_rel(got, linear_attention_naive(q, k, v, slopes, scale=0.25)[0], 1e-5)
    grad_out = torch.randn_like(got)
    got.backward(grad_out)
    want.backward(grad_out)
    for fused, ref in ((q, qr), (k, kr), (v, vr)):
        assert_close_rel(fused.grad, ref.grad, 1e-5)


def test_fused_parallel_kernel_in_half_precision_rounds_like_flash_attention():
    """P (and dS) go to the input dtype before their matmul: errors of a few fp16 roundings (2^-11).

    fp16 stands in for training's bf16 here: the interpreter gets bf16 tiles wrong in Triton 3.9
    (one loaded, doubled and stored is off by up to 8); the bf16 path is checked on CUDA below.
    """
    from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

    slopes = decay_slopes(H)
    # Strided views of one projection, as the model passes them.
    qkv = torch.stack(parallel_triton_inputs(150, 32, seed=11), 2).half().detach().requires_grad_()
    q, k, v = qkv.unbind(2)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    got = linear_attention_parallel_triton(q, k, v, slopes, 32**-0.5)
    want = linear_attention_parallel(qr, kr, vr, slopes)[0]
    assert got.dtype == torch.float16
    assert_close_rel(got, want, 2e-3)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(12)).half()
    got.backward(grad_out)
    want.backward(grad_out.float())
    for fused, ref in zip(qkv.grad.unbind(2), (qr.grad, kr.grad, vr.grad)):
        assert_close_rel(fused, ref, 2e-3)


def test_fused_parallel_kernel_compiles_into_one_graph_with_eager_values_and_gradients():
    """A custom op: torch.compile keeps it as one node (no graph break, nothing traced inside). The
    compiled graph runs the same kernels on the same inputs, so values and gradients are identical."""
    slopes = decay_slopes(H)
    q, k, v = parallel_triton_inputs(80, 16, seed=5)

    def loss(q, k, v):
        out, _ = linear_attention(q * 2, k, v, slopes, backend="parallel_triton")
        return out.square().sum()

    explained = torch._dynamo.explain(loss)(q, k, v)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_under_compile_flas_kernel_and_its_loader_run_eagerly(monkeypatch):
    """Dynamo must not trace the loader: on its first call it imports fla, which torch 2.11's dynamo
    could not run (an H200's train-iflame --compile stopped there). A stand-in loader records whether
    it ran under the trace."""
    import meshforge.kernels.linear_attention as linear

    traced = []

    def loader():
        traced.append(torch.compiler.is_compiling())
        return lambda q, k, v, g_gamma, scale, initial_state, output_final_state: (q * scale, None)

    monkeypatch.setattr(linear, "_fla_chunk_simple_gla", loader)
    q, k, v, _ = inputs(8)

    def attend(q):
        return linear_attention(q + 1, k, v, decay_slopes(H), backend="chunk_triton")[0] * 2

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="eager")(q)
    assert torch.equal(compiled, attend(q))
    assert traced and not any(traced)


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
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

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
    # Gradients of fla's chunked kernels (what training runs above PARALLEL_MAX_LEN) against autograd
    # through the chunked reference (fla may use TF32).
    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q32, k32, v32))
    chunk_simple_gla(q32, k32, v32, g_gamma=-slopes)[0].square().sum().backward()
    linear_attention_chunked(qc, kc, vc, slopes)[0].square().sum().backward()
    for fast, ref in ((q32, qc), (k32, kc), (v32, vc)):
        assert_close_rel(fast.grad, ref.grad, 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
def test_fused_parallel_kernel_matches_the_reference_on_cuda(dtype, rel):
    """What training runs at short lengths: bf16 P before P V (and TF32 dots in float32), as FlashAttention."""
    from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

    q, k, v, _ = inputs(700, seed=9, device="cuda", dtype=dtype)
    slopes = decay_slopes(H).cuda()
    assert cuda_form(700, stateful=False) == "parallel"
    assert_close_rel(linear_attention(q, k, v, slopes)[0], linear_attention_naive(q, k, v, slopes)[0], rel)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = linear_attention_parallel_triton(q, k, v, slopes, D**-0.5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    linear_attention_parallel(qr, kr, vr, slopes)[0].backward(grad_out.float())
    for fast, ref in ((q, qr), (k, kr), (v, vr)):
        assert_close_rel(fast.grad, ref.grad, rel)


def test_backend_names_each_form_of_the_one_signature():
    """``backend`` picks a form: ``reference`` the recurrence, ``torch`` the chunked form, ``parallel_triton``
    the fused kernel (interpreted here); all agree, and the stateless kernel refuses states."""
    q, k, v, state = inputs(40, seed=5)
    slopes = decay_slopes(H)
    want = linear_attention_naive(q, k, v, slopes)[0]
    for backend in ("auto", "torch", "reference", "parallel_triton"):
        out, final = linear_attention(q, k, v, slopes, backend=backend)
        assert final is None
        assert_close_rel(out, want, 1e-5)
    with pytest.raises(ValueError, match="takes and returns no state"):
        linear_attention(q, k, v, slopes, initial_state=state, backend="parallel_triton")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        linear_attention(q, k, v, slopes, backend="fast")
