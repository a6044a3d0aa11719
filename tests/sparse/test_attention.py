import math

import pytest
import torch

from meshforge.sparse.attention import SparseWindowAttention, sinusoidal_position_encoding
from meshforge.sparse.tensor import SparseTensor
from tests.sparse.test_tensor import random_tensor


def naive_module_output(attn: SparseWindowAttention, x: SparseTensor) -> torch.Tensor:
    """The module's definition without windows machinery: every voxel attends to the voxels of the
    same batch item whose shifted window cell equals its own."""
    n, dim = x.feats.shape
    heads, d = attn.heads, dim // attn.heads
    q, k, v = attn.qkv(x.feats).view(n, 3, heads, d).unbind(1)
    cells = torch.cat([x.coords[:, :1], torch.div(x.coords[:, 1:] + attn.shift, attn.window, rounding_mode="floor")], 1)
    out = torch.empty(n, heads, d, dtype=x.dtype)
    for i in range(n):
        mates = (cells == cells[i]).all(1)
        scores = torch.einsum("hd,mhd->hm", q[i], k[mates]) / math.sqrt(d)
        out[i] = torch.einsum("hm,mhd->hd", scores.softmax(-1), v[mates])
    return attn.proj(out.reshape(n, dim))


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_module_matches_naive_definition(shifted):
    torch.manual_seed(0)
    x = random_tensor(0, sizes=(150, 60), grid=(12, 10, 9), channels=8).to(torch.float64)
    attn = SparseWindowAttention(8, heads=2, window=4, shifted=shifted).double()
    torch.testing.assert_close(attn(x).feats, naive_module_output(attn, x), rtol=1e-10, atol=1e-10)


def test_windows_are_independent():
    """Changing the voxels of one window leaves every other window's output unchanged."""
    torch.manual_seed(1)
    x = random_tensor(2, sizes=(120,), grid=(8, 8, 8), channels=8)
    attn = SparseWindowAttention(8, heads=2, window=4)
    cell = torch.div(x.coords[:, 1:], 4, rounding_mode="floor")
    inside = (cell == cell[0]).all(1)
    y = x.replace(torch.where(inside[:, None], torch.randn_like(x.feats), x.feats))
    with torch.no_grad():
        a, b = attn(x).feats, attn(y).feats
    torch.testing.assert_close(a[~inside], b[~inside])
    assert not torch.allclose(a[inside], b[inside])


def test_position_encoding_is_a_per_axis_sinusoid():
    xyz = torch.tensor([[0, 0, 0], [3, 1, 7]])
    enc = sinusoidal_position_encoding(xyz, 20)  # 3 axes x 6 channels + 2 zero channels
    assert enc.shape == (2, 20)
    assert torch.equal(enc[:, 18:], torch.zeros(2, 2))
    torch.testing.assert_close(enc[0, :18], torch.tensor([0.0, 0, 0, 1, 1, 1] * 3))
    # Channel 0 of axis y is sin(y * 1), channel 3 of axis z is cos(z * 1).
    torch.testing.assert_close(enc[1, 6], torch.sin(torch.tensor(1.0)))
    torch.testing.assert_close(enc[1, 15], torch.cos(torch.tensor(7.0)))
    # Different positions get different codes.
    many = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert len(torch.unique(sinusoidal_position_encoding(many, 24), dim=0)) == len(many)
