"""Rectified-flow sampling: ODE solvers against exact solutions, guidance, and the whole
structure -> latent -> VAE -> mesh path on a tiny untrained model."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from meshforge.errors import InputError, MeshforgeError
from meshforge.models.conditioning import ConditionerConfig, ViTConfig
from meshforge.models.ss_dit import LatentFlow, LatentFlowConfig, SSDiTConfig
from meshforge.models.ss_vae import SSVAE, SSVAEConfig
from meshforge.sample.flow import (
    FlowSampling,
    cfg_combine,
    guided_velocity,
    integrate,
    sample_latents,
    sample_meshes,
    time_grid,
)


def test_time_grid_runs_from_noise_to_data():
    t = time_grid(5)
    assert t[0] == 1 and t[-1] == 0 and (t.diff() < 0).all()
    shifted = time_grid(5, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > t[1:-1]).all()
    with pytest.raises(ValueError):
        time_grid(0)


@pytest.mark.parametrize("steps", [1, 3, 17])
def test_euler_is_exact_on_a_straight_flow(steps):
    """The velocity field of a point mass at x0 is linear in x, (x - x0) / t; its paths are the
    straight lines of rectified flow, which Euler follows exactly with any number of steps."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g, dtype=torch.float64)
    out = integrate(lambda x, t: (x - x0) / t, noise, steps, "euler")
    torch.testing.assert_close(out, x0, rtol=1e-12, atol=1e-12)


def solve_error(sampler: str, steps: int) -> float:
    # dx/dt = t x from x(1) = 1 has x(0) = exp(-1/2): curved paths, so the solvers' orders show.
    x = integrate(lambda x, t: t * x, torch.ones(1, dtype=torch.float64), steps, sampler)
    return abs(x.item() - math.exp(-0.5))


def test_heun_is_second_order_and_euler_first():
    # Halving the step halves Euler's error and quarters Heun's (asymptotically; 64 steps is close).
    euler = solve_error("euler", 64) / solve_error("euler", 128)
    heun = solve_error("heun", 64) / solve_error("heun", 128)
    assert euler == pytest.approx(2.0, rel=0.02)
    assert heun == pytest.approx(4.0, rel=0.02)
    assert solve_error("heun", 16) < solve_error("euler", 16) / 50
    with pytest.raises(MeshforgeError, match="unknown sampler"):
        integrate(lambda x, t: x, torch.ones(1), 2, "rk4")


def test_cfg_combination():
    cond, uncond = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_combine(cond, uncond, 7.0), torch.tensor([15.0, 1.0]))


def tiny_flow(kind: str = "class") -> LatentFlow:
    torch.manual_seed(0)
    cfg = LatentFlowConfig(
        dit=SSDiTConfig(dim=32, depth=2, heads=4, kv_heads=2, attention="window", window=4),
        structure=SSDiTConfig(dim=32, depth=1, heads=2, kv_heads=2, attention="full"),
        cond=ConditionerConfig(kind=kind, dim=16, classes=["a", "b"],
                               vit=ViTConfig(dim=32, depth=1, heads=2, patch=8, mlp_hidden=64, pos_grid=2), image_size=16),
        latent_channels=4, resolution=8, structure_patch=2, latent_mean=[0.5] * 4, latent_std=[2.0] * 4,
    )
    model = LatentFlow(cfg)
    for name, p in model.named_parameters():  # leave the zero start, so that samples depend on the model
        if "modulation" in name or ".head." in f".{name}":
            nn.init.normal_(p, std=0.1)
    return model.eval()


def test_guided_velocity_batches_both_branches_into_one_pass():
    model = tiny_flow()
    latents = model.latent_tensor(torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4], [1, 0, 0, 0]], dtype=torch.int32),
                                  torch.zeros(3, 4), 2)
    labels = torch.tensor([0, 1])
    cond = model.conditioner(labels, torch.zeros(2, dtype=torch.bool))
    uncond = model.conditioner(labels, torch.ones(2, dtype=torch.bool))
    feats = torch.randn(3, 4)
    with torch.no_grad():
        guided = guided_velocity(model.dit, latents, cond, uncond, 3.0)(feats, 0.4)
        t = torch.full((2,), 0.4)
        v_c = model.dit(latents.replace(feats), t, cond).feats
        v_u = model.dit(latents.replace(feats), t, uncond).feats
    torch.testing.assert_close(guided, cfg_combine(v_c, v_u, 3.0), rtol=1e-5, atol=1e-6)


def test_sample_latents_are_seeded_and_on_the_latent_grid():
    model = tiny_flow()
    labels = torch.tensor([0, 1, 0])

    structures = []

    def draw(seed):
        return sample_latents(model, labels, 3, steps=2, cfg_scale=2.0, sampler="heun",
                              generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                              on_structure=structures.append)

    a, b, c = draw(0), draw(0), draw(1)
    # The hook saw each item's voxel count before the latent flow ran on them.
    assert structures[0] == a.batch_offsets.diff().tolist() and len(structures) == 3
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    assert not (a.coords.shape == c.coords.shape and torch.equal(a.coords, c.coords))
    assert a.spatial_shape == (8, 8, 8) and a.batch_size == 3
    assert (a.coords[:, 1:] >= 0).all() and (a.coords[:, 1:] < 8).all()
    assert (a.batch_offsets.diff() > 0).all()  # every sample has a structure
    assert a.feats.shape[1] == 4


def test_sample_meshes_decodes_with_the_vae():
    model = tiny_flow("none")
    vae = SSVAE(SSVAEConfig(channels=[8, 8], latent_channels=4, heads=2, window=4, attn_blocks=1, conv_backend="torch"))
    for up in vae.dec_up:  # keep every child voxel, so the decoder's SDF gets re-meshed
        nn.init.zeros_(up.exist_head.weight)
        nn.init.constant_(up.exist_head.bias, 5.0)
    meshes = sample_meshes(model, {}, n=3, batch_size=2, options=FlowSampling(steps=2, cfg_scale=1.0), seed=0, vae=vae)
    assert len(meshes) == 3
    for vertices, faces in meshes:
        assert vertices.ndim == 2 and vertices.shape[1] == 3 and faces.shape[1] == 3
        assert np.all(np.abs(vertices) <= 0.5 + 1e-6)
    again = sample_meshes(model, {}, n=3, batch_size=2, options=FlowSampling(steps=2, cfg_scale=1.0), seed=0, vae=vae)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(meshes, again))
    assert sum(len(f) for _, f in meshes) > 0


def test_sampling_errors_are_clear(tmp_path):
    model = tiny_flow("class")
    model.config.vae_checkpoint = str(tmp_path / "vae-run")
    with pytest.raises(InputError, match="vae-run: the SS-VAE checkpoint this SS-DiT decodes with is missing"):
        sample_meshes(model, {}, n=1, options=FlowSampling(steps=1))
    with pytest.raises(MeshforgeError, match="class-conditioned"):
        model.conditioner.for_sampling(1, tmp_path / "x.png", None)
