"""Decoding attention over a static K/V cache: the Triton split-K kernel against the SDPA reference.

On a CPU-only machine the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py) at small sizes; the GPU test runs it compiled at the
reference model's decoding size in bf16.
"""

import math

import pytest
import torch
from meshforge.kernels.decode_attention import decode_attention, decode_attention_reference
from meshforge.kernels.decode_attention.split_k import BLOCK_N, decode_attention_triton, split_size

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_cache(batch, heads, max_len, dim, seed, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g)
    k, v = (torch.randn(batch, heads, max_len, dim, generator=g) for _ in range(2))
    return (t.to(device, dtype) for t in (q, k, v))


def test_reference_is_the_last_row_of_causal_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    want = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v
    cache_k, cache_v = torch.zeros(2, 3, 16, 8), torch.zeros(2, 3, 16, 8)
    cache_k[:, :, :7], cache_v[:, :, :7] = k[:, :, :7], v[:, :, :7]
    got = decode_attention_reference(q[:, :, 6], cache_k, cache_v, torch.tensor([7]))
    torch.testing.assert_close(got, want[:, :, 6], rtol=1e-5, atol=1e-6)


def test_split_size_bounds_the_number_of_slices():
    for max_len in (1, 100, 256, 4096, 36_009, 300_000):
        split = split_size(max_len)
        assert split % BLOCK_N == 0 and split >= 256 and -(-max_len // split) <= 128


# Lengths inside the first slice, at a slice boundary, across several slices and the whole cache;
# a head width that is not a power of two exercises the masked lanes.
@pytest.mark.parametrize("length", [1, 7, 256, 257, 700, 800])
@pytest.mark.parametrize("dim", [16, 24])
def test_triton_matches_the_reference(length, dim):
    q, k, v = random_cache(2, 3, 800, dim, seed=length + dim)
    n = torch.tensor([length], device=DEVICE)
    got = decode_attention_triton(q, k, v, n)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, n), rtol=1e-5, atol=1e-5)


def test_positions_past_the_length_are_never_read():
    q, k, v = random_cache(1, 2, 300, 16, seed=1)
    n = torch.tensor([100], device=DEVICE)
    before = decode_attention_triton(q, k, v, n)
    k[:, :, 100:], v[:, :, 100:] = float("nan"), float("nan")
    torch.testing.assert_close(decode_attention_triton(q, k, v, n), before, rtol=0, atol=0)


@pytest.mark.gpu
def test_triton_matches_the_reference_at_full_size_in_bf16():
    """The reference iFlame's token level: 36,009 positions, 16 heads of 32, batch 16."""
    q, k, v = random_cache(16, 16, 36_009, 32, seed=0, dtype=torch.bfloat16)
    for length in (1, 5_000, 36_009):
        n = torch.tensor([length], device=DEVICE)
        got, want = decode_attention(q, k, v, n), decode_attention_reference(q, k, v, n)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_backend_forces_a_form():
    q, k, v = random_cache(2, 3, 40, 16, seed=9)
    length = torch.tensor([29], device=q.device)
    want = decode_attention_reference(q, k, v, length)
    # The split-K kernel (interpreted on a CPU) reorders float32 sums of <= 40 products.
    torch.testing.assert_close(decode_attention(q, k, v, length, backend="triton"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_attention(q, k, v, length, backend="reference"), want)
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        decode_attention(q, k, v, length, backend="torch")
