import math

import numpy as np
import pytest
import torch

from meshforge.config import ConfigError, from_dict
from meshforge.models.ss_vae import SSVAE, ResBlock, SSVAEConfig, VAEOutput, loss_terms
from meshforge.sparse.tensor import SparseTensor, coarsen

BAND = 2.5


def shell(resolution: int, radius: float, centre=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels within BAND voxels of a sphere, with their SDF in band units."""
    g = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = ((g + 0.5) / resolution - 0.5 - torch.tensor(centre)).norm(dim=-1) - radius
    keep = d.abs() < BAND / resolution
    return g[keep], (d[keep] * resolution / BAND)[:, None]


def batch(*shapes, resolution=16) -> SparseTensor:
    coords, sdf = zip(*shapes)
    return SparseTensor.from_items(list(coords), list(sdf), (resolution,) * 3)


def tiny(**kw) -> SSVAE:
    torch.manual_seed(0)
    return SSVAE(SSVAEConfig(**{"channels": [8, 16], "latent_channels": 4, "heads": 2, "window": 4, "band": BAND, **kw}))


def test_config_validation():
    with pytest.raises(ConfigError, match="heads"):
        from_dict(SSVAEConfig, {"channels": [8, 18], "heads": 4})
    with pytest.raises(ConfigError, match="two positive"):
        from_dict(SSVAEConfig, {"channels": [8]})
    assert SSVAEConfig(channels=[8, 16, 32, 64]).factor == 8


def test_latent_lives_on_the_coarse_octree_level():
    model = tiny(channels=[4, 8, 8])
    x = batch(shell(16, 0.3), shell(16, 0.2, (0.1, 0, 0)))
    z = model.encode(x)
    assert z.spatial_shape == (4, 4, 4) and z.channels == 4
    expected, _ = coarsen(coarsen(x.coords, x.spatial_shape)[0], (8, 8, 8))
    assert torch.equal(z.coords, expected)


def test_teacher_forced_pass_keeps_every_true_voxel():
    model = tiny(channels=[4, 8, 8])
    x = batch(shell(16, 0.3), shell(16, 0.25))
    out = model(x)
    # Every input voxel is decoded; the rest are extras the decoder predicted.
    assert torch.isin(x.keys, out.sdf.keys).all()
    level1, _ = coarsen(x.coords, x.spatial_shape)
    # The existence targets mark exactly the true voxels of levels 1 and 0.
    assert int(out.exist_target.sum()) == len(level1) + len(x)
    assert out.exist_logits.shape == out.exist_target.shape
    assert out.mu.shape == (len(model.encode(x)), 4)


def test_items_of_a_batch_do_not_interact():
    model = tiny().eval()
    a, b = shell(16, 0.3), shell(16, 0.2, (0.1, -0.1, 0))
    together = model(batch(a, b), sample=False).sdf
    alone = model(batch(a), sample=False).sdf
    first = together.coords[:, 0] == 0
    assert torch.equal(together.coords[first], alone.coords)
    torch.testing.assert_close(together.feats[first], alone.feats, rtol=1e-4, atol=1e-5)


def test_backends_give_the_same_model():
    x = batch(shell(16, 0.3))
    spconv_model, torch_model = tiny().double(), tiny(conv_backend="torch").double()
    torch_model.load_state_dict(spconv_model.state_dict())
    a, b = (m(x.to(torch.float64), sample=False) for m in (spconv_model, torch_model))
    torch.testing.assert_close(a.sdf.feats, b.sdf.feats, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(a.exist_logits, b.exist_logits, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["spconv", "torch"])
def test_gradient_checkpointing_changes_no_value_or_gradient(backend, monkeypatch):
    x = batch(shell(16, 0.3), shell(16, 0.2, (0.1, 0.0, 0.0)))
    plain, recomputed = tiny(conv_backend=backend), tiny(conv_backend=backend, grad_checkpoint=True)
    with torch.no_grad():  # away from the identity start, so every residual branch carries gradient
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    recomputed.load_state_dict(plain.state_dict())
    calls, output_feats = [], ResBlock.output_feats
    monkeypatch.setattr(ResBlock, "output_feats", lambda self, h: calls.append(self) or output_feats(self, h))
    grads, counts = [], []
    for model in (plain, recomputed):
        calls.clear()
        out = model(x, sample=False)
        (out.sdf.feats.square().sum() + out.exist_logits.sum()).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        counts.append(len(calls))
    blocks = sum(isinstance(m, ResBlock) for m in plain.modules())
    assert counts == [blocks, 2 * blocks]  # checkpointed: every block runs again in backward
    # The same float32 operations in the same order on the same inputs: CPU kernels give the same bits.
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)
    assert all(grad.abs().sum() > 0 for name, grad in grads[0].items() if "conv" in name)


def test_loss_terms_targets_and_extra_voxel_sign():
    # Two input voxels in one 2x2x2 block, both inside (negative); one extra voxel in the same block.
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    x = SparseTensor(torch.tensor([[-0.5], [-0.25]]), coords, (4, 4, 4), 1)
    out_coords = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.int32)
    pred = torch.tensor([[0.0], [0.0], [-0.5]])
    out = VAEOutput(
        sdf=SparseTensor(pred, out_coords, (4, 4, 4), 1),
        exist_logits=torch.tensor([0.0, 2.0]), exist_target=torch.tensor([True, False]),
        mu=torch.zeros(1, 3), logvar=torch.zeros(1, 3),
    )
    terms = loss_terms(x, torch.tensor([True, False]), out)
    assert terms["in"][0].item() == pytest.approx(0.25**2) and terms["in"][1].item() == 2
    assert terms["extra"][0].item() == pytest.approx(1.0) and terms["extra"][1].item() == 1  # target -1
    assert terms["sharp"][0].item() == pytest.approx(0.0) and terms["sharp"][1].item() == 1
    assert terms["kl"][0].item() == pytest.approx(0.0)
    assert terms["prune"][0].item() == pytest.approx(math.log(2) + math.log(1 + math.exp(2)))


def test_overfits_one_shape_and_reconstructs_it_unguided():
    """Sixty steps on one sphere shell: the SDF error falls and pruning finds the surface."""
    model = tiny(channels=[8, 16], attn_blocks=1)
    x = batch(shell(16, 0.3))
    sharp = torch.zeros(len(x), dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        terms = loss_terms(x, sharp, model(x))
        means = {k: s / c.clamp(min=1) for k, (s, c) in terms.items()}
        loss = means["in"] + means["extra"] + means["prune"] + 1e-4 * means["kl"]
        first = first if first is not None else means["in"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert means["in"].item() < 0.1 * first
    rec = model.eval().reconstruct(x)
    hit = torch.isin(rec.keys, x.keys).sum().item()
    assert hit / (len(rec) + len(x) - hit) > 0.8  # voxel IoU of the predicted structure
    (vertices, faces), = model.decode_to_mesh(model.encode(x))
    radius = np.linalg.norm(vertices, axis=1)
    assert len(faces) > 100 and np.abs(radius - 0.3).max() < 1.5 / 16  # within 1.5 voxels of the sphere


def test_a_pass_in_conv_slabs_equals_the_one_pass_pass(monkeypatch):
    """With spconv's limit lowered to a few hundred rows, every convolution of the encoder and the
    decoder runs in slabs: the reconstruction and the weights' gradients do not change."""
    from meshforge.sparse import conv

    torch.manual_seed(0)
    model = tiny().double()
    x = batch(shell(12, 0.3), resolution=12)  # 960 voxels
    x = x.replace(x.feats.double())

    def run():
        out = model(x.replace(x.feats), sample=False)
        loss = out.sdf.feats.square().sum() + out.exist_logits.square().sum()
        return out.sdf.feats.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    whole, whole_grads = run()
    monkeypatch.setattr(conv, "MAX_FEATURE_BYTES", 400 * 16 * 8)  # slabs of ~200 rows of 16 float64 channels
    sliced, sliced_grads = run()
    torch.testing.assert_close(sliced, whole, rtol=1e-9, atol=1e-9)
    for a, b in zip(sliced_grads, whole_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
