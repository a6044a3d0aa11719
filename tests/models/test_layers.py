"""Shared transformer layers: rotary embeddings."""

import torch
from meshforge.kernels.rotary import apply_rotary

from meshforge.models.layers import Rotary


def test_rotary_rotates_each_half_pair_by_its_angle():
    """Dims i and i + D/2 form a pair rotated by position * base^(-2i/D) (the rotate-half convention),
    for positions given as an int or as a device tensor, with any head axes after the position axis."""
    dim, base = 8, 100.0
    rope = Rotary(dim, 64, base)
    x = torch.randn(2, 5, 2, 3, dim, generator=torch.Generator().manual_seed(0))  # [B, T, 2, H, D]
    start = 7
    positions = torch.arange(start, start + 5, dtype=torch.float64)
    angles = positions[:, None] * base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # [T, D/2]
    pairs = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2 :].double())
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, None]
    want = torch.cat((turned.real, turned.imag), dim=-1).float()
    torch.testing.assert_close(apply_rotary(x, *rope.tables(start, 5)), want, rtol=1e-5, atol=1e-5)
    one = apply_rotary(x[:, 2:3], *rope.tables(torch.tensor([start + 2]), 1))
    torch.testing.assert_close(one, want[:, 2:3], rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_on_the_distance_only():
    rope = Rotary(16, 128, 10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 1, 16, generator=g) for _ in range(2))
    def rotated(x, position):
        return apply_rotary(x, *rope.tables(position, 1))

    score = [(rotated(q, a) * rotated(k, b)).sum().item() for a, b in ((3, 0), (50, 47), (120, 117))]
    assert max(score) - min(score) < 1e-4
