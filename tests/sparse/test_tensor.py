import itertools

import pytest
import torch

from meshforge.sparse.tensor import (
    SparseTensor,
    children,
    coarsen,
    coord_keys,
    keys_to_coords,
    lookup,
    window_partition,
)


def random_tensor(seed: int, sizes=(40, 0, 25), grid=(9, 7, 11), channels=3) -> SparseTensor:
    """A batch with unsorted voxels inside each item, and an empty item."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for n in sizes:
        c = torch.stack([torch.randint(0, s, (n,), generator=g) for s in grid], 1)
        c = torch.unique(c, dim=0)
        coords.append(c[torch.randperm(len(c), generator=g)])
    feats = [torch.randn(len(c), channels, generator=g) for c in coords]
    return SparseTensor.from_items(coords, feats, grid)


def test_keys_round_trip_and_order_by_batch_first():
    x = random_tensor(0)
    assert torch.equal(keys_to_coords(x.keys, x.spatial_shape), x.coords)
    order = torch.argsort(x.keys)
    assert (x.coords[order][:, 0].diff() >= 0).all()
    assert len(torch.unique(x.keys)) == len(x)


def test_batch_offsets_and_items():
    x = random_tensor(1)
    offsets = x.batch_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == len(x) and len(offsets) == x.batch_size + 1
    assert offsets[1] - offsets[0] > 0 and offsets[2] == offsets[1]  # item 1 is empty
    for b, (coords, feats) in enumerate(x.items()):
        a, e = offsets[b], offsets[b + 1]
        assert torch.equal(coords, x.coords[a:e, 1:]) and torch.equal(feats, x.feats[a:e])
        assert (x.coords[a:e, 0] == b).all()


def test_lookup_finds_present_keys_and_flags_absent_ones():
    table = torch.tensor([50, 3, 17, 8])
    assert lookup(table, torch.tensor([17, 4, 50, 3, 100, -1])).tolist() == [2, -1, 0, 1, -1, -1]
    assert lookup(table[:0], torch.tensor([1])).tolist() == [-1]


def test_coarsen_groups_children_under_their_parent():
    x = random_tensor(2)
    coarse, parent = coarsen(x.coords, x.spatial_shape, 2)
    expected = x.coords.clone()
    expected[:, 1:] //= 2
    assert torch.equal(coarse[parent], expected)
    assert len(torch.unique(coarse, dim=0)) == len(coarse)
    shape = tuple(-(-s // 2) for s in x.spatial_shape)
    assert (coord_keys(coarse, shape).diff() > 0).all()  # sorted, hence grouped by batch


def test_children_are_parent_major_and_cover_the_block():
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    kids = children(coords, 2)
    assert kids.shape == (16, 4)
    assert (kids[:8, 0] == 0).all() and (kids[8:, 0] == 1).all()
    back = kids.clone()
    back[:, 1:] //= 2
    assert torch.equal(back, coords.repeat_interleave(8, 0))
    assert len(torch.unique(kids, dim=0)) == 16


@pytest.mark.parametrize("shift", [0, 2])
def test_window_partition(shift):
    x = random_tensor(3, sizes=(60, 30), grid=(10, 10, 10))
    win = window_partition(x.coords, x.spatial_shape, window=4, shift=shift)
    assert torch.equal(torch.sort(win.perm).values, torch.arange(len(x)))
    cu = win.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == len(x) and win.max_len == max(b - a for a, b in itertools.pairwise(cu))
    cells = x.coords[win.perm].clone()
    cells[:, 1:] = torch.div(cells[:, 1:] + shift, 4, rounding_mode="floor")
    seen = set()
    for w, (a, b) in enumerate(itertools.pairwise(cu)):
        cell = cells[a:b]
        assert (cell == cell[0]).all(), "a window holds voxels of one cell of one batch item"
        assert tuple(cell[0].tolist()) not in seen
        seen.add(tuple(cell[0].tolist()))
        assert (win.window_ids[a:b] == w).all()


def test_replace_shares_the_cache_and_to_keeps_int_coords():
    x = random_tensor(4)
    _ = x.keys
    y = x.replace(x.feats * 2)
    assert y.cache is x.cache and torch.equal(y.coords, x.coords)
    z = x.to(torch.float64)
    assert z.dtype == torch.float64 and z.coords.dtype == torch.int32
    with pytest.raises(ValueError):
        x.replace(x.feats[:-1])
    with pytest.raises(ValueError):
        SparseTensor(x.feats, x.coords[:, :3], x.spatial_shape, x.batch_size)


def test_per_row_is_indexing_by_item_forward_and_backward():
    """per_row's GEMM backward sums each item's rows: the gradient of ``values[item]`` (in float64
    both sum the same numbers; only the order differs, far below the tolerance)."""
    x = random_tensor(3, sizes=(40, 0, 25), channels=3).to(torch.float64)
    g = torch.Generator().manual_seed(3)
    values = torch.randn(x.batch_size, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(len(x), 5, 2, generator=g, dtype=torch.float64)
    rows = x.per_row(values)
    reference = values[x.coords[:, 0].long()]
    assert torch.equal(rows, reference)
    (grad,) = torch.autograd.grad((rows * weights).sum(), values)
    (expected,) = torch.autograd.grad((reference * weights).sum(), values)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[1], torch.zeros(5, 2, dtype=torch.float64))  # the empty item
