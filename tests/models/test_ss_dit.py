"""SS-DiT: shapes on varlen batches, AdaLN-Zero start, per-item independence, token-order
equivariance, the rectified-flow algebra, and the structure <-> patch-token round trip."""

import pytest
import torch
from torch import nn

from meshforge.config import ConfigError, from_dict
from meshforge.models.conditioning import Cond
from meshforge.models.ss_dit import (
    LatentFlow,
    LatentFlowConfig,
    SSDiT,
    SSDiTConfig,
    flow_loss_terms,
    interpolate,
    logit_normal_timesteps,
    occupancy_patches,
    occupied_voxels,
    velocity_target,
)
from meshforge.sparse.tensor import SparseTensor
from tests.sparse.test_tensor import random_tensor

MODES = ["full", "window", "ssa"]  # SSA runs its PyTorch reference on the CPU


def tiny(attention: str, cond_dim: int = 0, channels: int = 3) -> SSDiT:
    cfg = SSDiTConfig(dim=32, depth=2, heads=4, kv_heads=2, attention=attention, window=4,
                      ssa_block_cmp=2, ssa_block_slc=4, ssa_topk=2)
    model = SSDiT(cfg, channels, cond_dim).double()
    # Leave AdaLN-Zero's identity start: random modulation and head make every path visible.
    for name, p in model.named_parameters():
        if "modulation" in name or name.startswith("head"):
            nn.init.normal_(p, std=0.2)
    return model


def batch(seed: int = 0, sizes=(40, 25, 12), grid=(8, 8, 8), channels: int = 3) -> SparseTensor:
    return random_tensor(seed, sizes=sizes, grid=grid, channels=channels).to(torch.float64)


def cond_of(batch_size: int, lengths: list[int], dim: int = 16, seed: int = 0) -> Cond:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, max(lengths), dim, generator=g, dtype=torch.float64)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return Cond(tokens, mask, torch.randn(batch_size, dim, generator=g, dtype=torch.float64))


def sorted_within_items(x: SparseTensor) -> SparseTensor:
    """Rows in key order (window attention's grouping is by key, so any order must work)."""
    order = torch.argsort(x.keys)
    return SparseTensor(x.feats[order], x.coords[order], x.spatial_shape, x.batch_size)


@pytest.mark.parametrize("attention", MODES)
def test_forward_shapes_on_a_varlen_batch_with_an_empty_item(attention):
    x = batch(sizes=(40, 0, 17))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    out = tiny(attention, cond_dim=16)(x, t, cond_of(3, [3, 1, 5]))
    assert out.feats.shape == x.feats.shape and torch.equal(out.coords, x.coords)
    assert torch.isfinite(out.feats).all()


@pytest.mark.parametrize("attention", MODES)
def test_untrained_model_predicts_zero_velocity(attention):
    cfg = SSDiTConfig(dim=32, depth=2, heads=4, kv_heads=2, attention=attention, window=4)
    model = SSDiT(cfg, 3, 16).double()
    x = batch()
    out = model(x, torch.rand(3, dtype=torch.float64), cond_of(3, [2, 2, 2]))
    assert torch.equal(out.feats, torch.zeros_like(x.feats))


@pytest.mark.parametrize("attention", MODES)
def test_items_do_not_see_each_other(attention):
    """Changing item 1's features, condition and time leaves items 0 and 2 unchanged."""
    model = tiny(attention, cond_dim=16)
    x = batch()
    t = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    cond = cond_of(3, [2, 4, 1])
    other = x.feats.clone()
    rows = x.coords[:, 0] == 1
    other[rows] = torch.randn(int(rows.sum()), 3, dtype=torch.float64)
    cond2 = Cond(cond.tokens.clone(), cond.mask, cond.vector.clone())
    cond2.tokens[1] += 1.0
    cond2.vector[1] -= 1.0
    t2 = t.clone()
    t2[1] = 0.9
    a = model(x, t, cond).feats
    b = model(x.replace(other), t2, cond2).feats
    torch.testing.assert_close(a[~rows], b[~rows], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[rows], b[rows])


@pytest.mark.parametrize("attention", MODES)
def test_equivariant_to_token_order_within_items(attention):
    """Tokens are a set with positions: reordering rows inside each item reorders the output."""
    model = tiny(attention, cond_dim=16)
    x = sorted_within_items(batch(seed=1))
    t = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    cond = cond_of(3, [2, 3, 4])
    g = torch.Generator().manual_seed(2)
    perm = torch.cat([a + torch.randperm(b - a, generator=g) for a, b in zip(x.batch_offsets[:-1].tolist(), x.batch_offsets[1:].tolist())])
    shuffled = SparseTensor(x.feats[perm], x.coords[perm], x.spatial_shape, x.batch_size)
    # SSA's reference accumulates in float32; each item here is a single query tile, so the top-k
    # blocks are shared by all its tokens and do not depend on the order either.
    tol = 1e-5 if attention == "ssa" else 1e-10
    torch.testing.assert_close(model(shuffled, t, cond).feats, model(x, t, cond).feats[perm], rtol=tol, atol=tol)


def test_masked_condition_tokens_are_ignored():
    model = tiny("full", cond_dim=16)
    x = batch()
    t = torch.full((3,), 0.5, dtype=torch.float64)
    cond = cond_of(3, [2, 4, 1])
    changed = Cond(cond.tokens.clone(), cond.mask, cond.vector)
    changed.tokens[~cond.mask] = 100.0
    torch.testing.assert_close(model(x, t, changed).feats, model(x, t, cond).feats, rtol=0, atol=0)
    changed.tokens[0, 0] += 1.0  # a valid token does matter
    assert not torch.allclose(model(x, t, changed).feats, model(x, t, cond).feats)


def test_window_attention_is_local():
    """With one block, a token sees only its own 4^3 window: changing a voxel in another window does nothing."""
    cfg = SSDiTConfig(dim=32, depth=1, heads=4, kv_heads=2, attention="window", window=4)
    model = SSDiT(cfg, 3, 0).double()
    for name, p in model.named_parameters():
        if "modulation" in name or name.startswith("head"):
            nn.init.normal_(p, std=0.2)
    coords = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 3, 1], [5, 5, 5], [6, 4, 7]])
    x = SparseTensor.from_items([coords], [torch.randn(5, 3, dtype=torch.float64)], (8, 8, 8))
    t = torch.tensor([0.5], dtype=torch.float64)
    moved = x.feats.clone()
    moved[3] += 1.0
    a, b = model(x, t).feats, model(x.replace(moved), t).feats
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=0)
    assert not torch.allclose(a[4], b[4])


def test_flow_interpolation_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(6, dtype=torch.float64)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(6, dtype=torch.float64)), eps)
    t, h = torch.rand(6, generator=g, dtype=torch.float64), 1e-6
    derivative = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t)) / h
    torch.testing.assert_close(derivative, velocity_target(x0, eps), rtol=1e-6, atol=1e-6)


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = logit_normal_timesteps(20000, mean=0.5, std=1.0, generator=g)
    assert (t > 0).all() and (t < 1).all()
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.01)
    logit = torch.log(t / (1 - t))
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)


def test_flow_loss_vanishes_for_the_true_velocity():
    class Oracle(nn.Module):
        """Knows x0 (the only data point): the exact velocity (x_t - x0) / t of a point mass."""

        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x, t, cond):
            per_row = t[x.coords[:, 0].long()][:, None]
            return x.replace((x.feats - self.x0) / per_row)

    x = batch()
    total, count = flow_loss_terms(Oracle(x.feats), x, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), None)
    assert count.item() == x.feats.numel() and total.item() == pytest.approx(0.0, abs=1e-18)


def test_occupancy_patches_round_trip():
    g = torch.Generator().manual_seed(0)
    coords = []
    for n in (30, 5):
        c = torch.unique(torch.randint(0, 8, (n, 3), generator=g), dim=0)
        coords.append(torch.cat([torch.full((len(c), 1), len(coords)), c], 1))
    coords = torch.cat(coords).int()
    patches = occupancy_patches(coords, 2, resolution=8, patch=2)
    assert patches.feats.shape == (2 * 4**3, 8) and patches.spatial_shape == (4, 4, 4)
    assert (patches.feats == 1).sum() == len(coords) and set(patches.feats.unique().tolist()) == {-1.0, 1.0}
    back = occupied_voxels(patches, patch=2)
    keys = lambda c: ((c[:, 0].long() * 8 + c[:, 1]) * 8 + c[:, 2]) * 8 + c[:, 3]
    assert torch.equal(back, coords[torch.argsort(keys(coords))])


def test_an_empty_structure_keeps_its_most_likely_voxel():
    patches = occupancy_patches(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), 2, resolution=4, patch=2)
    feats = patches.feats.clone()
    feats[patches.coords[:, 0] == 1] = -0.5
    feats[patches.batch_offsets[1] + 5, 3] = -0.1  # item 1: nothing above 0, this is the highest
    voxels = occupied_voxels(patches.replace(feats), patch=2)
    assert voxels.tolist()[0] == [0, 1, 2, 3] and len(voxels) == 2
    assert voxels[1, 0] == 1


def test_configs_validate():
    with pytest.raises(ConfigError, match="multiple of kv_heads"):
        from_dict(SSDiTConfig, {"heads": 6, "kv_heads": 4})
    with pytest.raises(ConfigError, match="ssa_block_slc"):
        from_dict(SSDiTConfig, {"ssa_block_cmp": 4, "ssa_block_slc": 6})
    with pytest.raises(ConfigError, match="ssa_query_tile"):
        from_dict(SSDiTConfig, {"ssa_query_tile": 48})
    assert from_dict(SSDiTConfig, {"ssa_query_tile": 16}).ssa_query_tile == 16
    with pytest.raises(ConfigError, match="structure_patch"):
        from_dict(LatentFlowConfig, {"resolution": 10, "structure_patch": 4})


def test_latent_flow_normalises_with_the_data_statistics():
    cfg = LatentFlowConfig(dit=SSDiTConfig(dim=16, depth=1, heads=2, kv_heads=1, attention="full"),
                           structure=SSDiTConfig(dim=16, depth=1, heads=2, kv_heads=2, attention="full"),
                           latent_channels=2, resolution=4, latent_mean=[1.0, -2.0], latent_std=[0.5, 4.0])
    model = LatentFlow(cfg)
    feats = torch.randn(7, 2)
    torch.testing.assert_close(model.normalize(feats), (feats - torch.tensor([1.0, -2.0])) / torch.tensor([0.5, 4.0]))
    torch.testing.assert_close(model.denormalize(model.normalize(feats)), feats)


def test_ssa_trains_its_gates_and_compression_position_encoding():
    model = tiny("ssa", cond_dim=16)
    x = batch()
    model(x, torch.rand(3, dtype=torch.float64), cond_of(3, [2, 2, 2])).feats.square().sum().backward()
    attn = model.blocks[0].attn
    for p in (attn.gates.weight, attn.cmp_pe_k, attn.cmp_pe_v):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert ("ssa-layout", attn.ssa) in x.cache  # built once per coordinate set, shared by the layers


@pytest.mark.parametrize("attention", ["full", "ssa"])
def test_gradient_checkpointing_changes_neither_outputs_nor_gradients(attention):
    x = batch(seed=4)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    cond = cond_of(3, [2, 3, 1])
    model = tiny(attention, cond_dim=16)
    results = []
    for flag in (False, True):
        model.config.grad_checkpoint = flag
        model.zero_grad()
        out = model(x.replace(x.feats.clone()), t, cond).feats
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a, b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
