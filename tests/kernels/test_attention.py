"""Dense softmax attention: the SDPA wrapper, causal attention, attention within variable-length sequences."""

import pytest
import torch
from meshforge.kernels.attention import (
    FEW_SEQUENCES,
    causal_attention,
    causal_attention_reference,
    sdpa,
    varlen_attention,
    varlen_attention_reference,
)

from meshforge.sparse.tensor import Windows
from tests.sparse.test_tensor import random_tensor


def test_padded_sdpa_matches_per_window_loop():
    x = random_tensor(1, sizes=(200, 90), grid=(10, 10, 10))
    windows = x.windows(window=5, shift=2)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(x), 4, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(varlen_attention(q, k, v, windows.cu_seqlens, windows.max_len), varlen_attention_reference(q, k, v, windows.cu_seqlens),
                               rtol=1e-5, atol=1e-5)


def test_few_windows_run_unmasked_one_by_one_and_match_the_loop():
    """Full attention over a batch's items (few windows) takes the per-window path."""
    from meshforge.models.ss_dit import batch_windows

    x = random_tensor(3, sizes=(70, 0, 33))
    windows = batch_windows(x)
    assert 0 < windows.count <= FEW_SEQUENCES
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(len(x), 2, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(varlen_attention(q, k, v, windows.cu_seqlens, windows.max_len), varlen_attention_reference(q, k, v, windows.cu_seqlens),
                               rtol=1e-5, atol=1e-5)


def test_one_window_per_sequence_of_equal_lengths_needs_no_mask_and_matches_the_loop():
    """Equal window lengths take the unpadded, unmasked path (which SDPA's flash kernel accepts)."""
    n, count = 48, 3
    windows = Windows(perm=torch.arange(n), cu_seqlens=torch.arange(0, n + 1, n // count, dtype=torch.int32),
                      window_ids=torch.arange(n) // (n // count), max_len=n // count)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(n, 2, 8, generator=g) for _ in range(3))
    expected = varlen_attention_reference(q, k, v, windows.cu_seqlens)
    for backend in ("auto", "math"):
        torch.testing.assert_close(varlen_attention(q, k, v, windows.cu_seqlens, windows.max_len, backend), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_backends_are_named():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(sdpa(q, k, v, backend="math"), sdpa(q, k, v), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        sdpa(q, k, v, backend="fast")


@pytest.mark.parametrize("backend", ["auto", "math", "reference"])
def test_causal_attention_forms_agree(backend):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 9, 3, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v, backend), causal_attention_reference(q, k, v),
                               rtol=1e-5, atol=1e-6)


def test_unknown_dense_backend_is_refused():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        causal_attention(q, q, q, "fast")
