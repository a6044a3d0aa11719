import pytest
import torch

from meshforge.sparse.conv import SparseConv3d, SparseSubMConv3d, SparseUpsample, avg_pool
from meshforge.sparse.tensor import SparseTensor, children, coord_keys, lookup
from tests.sparse.test_tensor import random_tensor


def dense_subm_reference(x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Submanifold conv by brute force over voxel pairs: out[p] = b + sum_o W[o] in[p + o]."""
    k = weight.shape[1]
    out = bias.expand(len(x), -1).clone()
    for i in range(len(x)):
        for j in range(len(x)):
            d = x.coords[j] - x.coords[i]
            if d[0] == 0 and (d[1:].abs() <= k // 2).all():
                o = (d[1:] + k // 2).tolist()
                out[i] += weight[:, o[0], o[1], o[2], :] @ x.feats[j]
    return out


def pair(cls, *args, **kwargs):
    """The same layer on both backends, sharing parameters (float64 for exact comparisons)."""
    a = cls(*args, **kwargs, backend="spconv").double()
    b = cls(*args, **kwargs, backend="torch").double()
    b.load_state_dict(a.state_dict())
    return a, b


def test_torch_backend_matches_the_definition():
    x = random_tensor(0, sizes=(30, 20), grid=(5, 6, 4)).to(torch.float64)
    conv = SparseSubMConv3d(3, 2, 3, backend="torch").double()
    ref = dense_subm_reference(x, conv.weight.detach(), conv.bias.detach())
    torch.testing.assert_close(conv(x).feats, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [3, 5])
def test_spconv_submanifold_equals_torch_reference(kernel):
    x = random_tensor(1, sizes=(300, 0, 150), grid=(12, 9, 10)).to(torch.float64)
    a, b = pair(SparseSubMConv3d, 3, 4, kernel)
    ya, yb = a(x), b(x)
    assert torch.equal(ya.coords, x.coords)
    torch.testing.assert_close(ya.feats, yb.feats, rtol=1e-10, atol=1e-10)
    # Gradients agree too (spconv's backward against autograd through the gather/scatter).
    g = torch.randn_like(ya.feats)
    grads = [torch.autograd.grad((y.feats * g).sum(), (m.weight, m.bias)) for y, m in ((ya, a), (yb, b))]
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


def test_spconv_rulebook_is_reused_by_same_voxel_layers():
    x = random_tensor(2, sizes=(100,), grid=(8, 8, 8))
    first, second = SparseSubMConv3d(3, 3), SparseSubMConv3d(3, 3)
    y = second(first(x))
    assert "subm3" in y.cache["spconv_rulebooks"] and y.cache is x.cache


def test_strided_conv_backends_agree_and_order_like_coarsen():
    x = random_tensor(3, sizes=(200, 80), grid=(10, 8, 12)).to(torch.float64)
    a, b = pair(SparseConv3d, 3, 5, 2)
    ya, yb = a(x), b(x)
    coarse, _ = x.coarsen(2)
    assert torch.equal(ya.coords, coarse) and torch.equal(yb.coords, coarse)
    assert ya.spatial_shape == (5, 4, 6)
    torch.testing.assert_close(ya.feats, yb.feats, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="divisible"):
        a(random_tensor(4, grid=(9, 8, 8)).to(torch.float64))


def test_spconv_runs_in_the_weights_dtype_under_autocast():
    # Half-precision spconv would underflow the tiny per-voxel gradients of a mean loss.
    x = random_tensor(7, sizes=(120, 60), grid=(8, 8, 8))
    conv = SparseSubMConv3d(3, 4)
    low = x.replace(x.feats.bfloat16())
    with torch.autocast("cpu", torch.bfloat16):
        y = conv(low)
    assert y.feats.dtype == torch.float32
    torch.testing.assert_close(y.feats, conv(x.replace(low.feats.float())).feats)


@pytest.mark.parametrize("backend", ["spconv", "torch"])
def test_a_tensor_without_voxels_convolves_to_one_without_voxels(backend):
    # A decoder that prunes every child hands the next level an empty tensor (spconv asserts on it).
    x = SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), (8, 8, 8), 2)
    y = SparseSubMConv3d(3, 4, backend=backend)(x)
    assert y.feats.shape == (0, 4) and y.spatial_shape == (8, 8, 8)
    z = SparseConv3d(3, 5, 2, backend=backend)(x)
    assert z.feats.shape == (0, 5) and z.coords.shape == (0, 4) and z.spatial_shape == (4, 4, 4)


def test_avg_pool_is_the_mean_of_the_children():
    x = random_tensor(5, sizes=(120, 30), grid=(8, 8, 8))
    y = avg_pool(x, 2)
    assert y.spatial_shape == (4, 4, 4)
    for i in torch.randint(0, len(y), (10,)).tolist():
        parent = y.coords[i]
        members = (x.coords[:, 0] == parent[0]) & (x.coords[:, 1:] // 2 == parent[1:]).all(1)
        torch.testing.assert_close(y.feats[i], x.feats[members].mean(0))


def test_upsample_makes_the_kept_children_with_per_child_maps():
    x = random_tensor(6, sizes=(20, 10), grid=(4, 4, 4))
    up = SparseUpsample(3, 2)
    keep = torch.rand(len(x) * 8, generator=torch.Generator().manual_seed(0)) < 0.4
    y = up(x, keep)
    assert y.spatial_shape == (8, 8, 8)
    assert torch.equal(y.coords, children(x.coords)[keep])
    rows = keep.nonzero().squeeze(1)
    expected = torch.stack([x.feats[r // 8] @ up.weight[r % 8] + up.bias[r % 8] for r in rows.tolist()])
    torch.testing.assert_close(y.feats, expected)
    assert (y.coords[:, 0].diff() >= 0).all()  # still grouped by batch
    everything = up(x)
    assert len(everything) == 8 * len(x)
    assert (lookup(coord_keys(everything.coords, (8, 8, 8)), coord_keys(y.coords, (8, 8, 8))) >= 0).all()


@pytest.mark.parametrize("layer", ["subm3", "subm5", "strided"])
def test_spconv_in_slabs_equals_one_pass_forward_and_backward(layer, monkeypatch):
    """Past the int32 limit convolutions run over x slabs with halos: same outputs and gradients.

    The limit is lowered so that these few hundred voxels split into several slabs. Every output
    sums the same products in both runs, so float64 agrees to rounding.
    """
    from meshforge.sparse import conv

    x = random_tensor(5, sizes=(300, 0, 150), grid=(16, 8, 10)).to(torch.float64)
    make = {"subm3": lambda: SparseSubMConv3d(3, 4, 3), "subm5": lambda: SparseSubMConv3d(3, 4, 5),
            "strided": lambda: SparseConv3d(3, 4, 2)}[layer]
    module = make().double()
    g = torch.Generator().manual_seed(5)

    def run(feats):
        y = module(SparseTensor(feats, x.coords, x.spatial_shape, x.batch_size))
        weights = torch.randn(y.feats.shape, generator=g.manual_seed(6), dtype=torch.float64)
        grads = torch.autograd.grad((y.feats * weights).sum(), (feats, module.weight, module.bias))
        return y, grads

    whole, whole_grads = run(x.feats.clone().requires_grad_())
    monkeypatch.setattr(conv, "MAX_FEATURE_BYTES", 60 * 4 * 8)  # slabs of ~30 rows of 4 float64 channels
    slabs = conv.conv_slabs(x, 4, 8, 2 if layer == "strided" else 1)
    assert slabs is not None and len(slabs) >= 3
    sliced, sliced_grads = run(x.feats.clone().requires_grad_())
    assert torch.equal(sliced.coords, whole.coords)
    torch.testing.assert_close(sliced.feats, whole.feats, rtol=1e-12, atol=1e-12)
    for a, b in zip(sliced_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
