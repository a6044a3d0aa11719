"""Geometric metrics: surface sampling, Chamfer, F-score, normal consistency, COV/MMD/1-NNA."""

import numpy as np
import pytest
import torch
import trimesh

from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate, synth_mesh
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.errors import MeshforgeError
from meshforge.metrics.geometry import (
    chamfer,
    coverage_mmd_1nna,
    evaluate_generated,
    evaluate_generation,
    fscore,
    nearest,
    nearest_brute_force,
    normal_consistency,
    pairwise_chamfer,
    reconstruction_metrics,
    sample_surface,
)
from meshforge.sample.export import write_samples

CUBE = (trimesh.creation.box().vertices, trimesh.creation.box().faces)


def grid_points(step=1.0, n=5):
    axis = np.arange(n) * step
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def test_surface_samples_lie_on_the_faces_they_report():
    points, normals = sample_surface(*CUBE, 4000, seed=3)
    assert points.shape == normals.shape == (4000, 3)
    # On a unit cube every point has a coordinate at +-0.5, along its face normal.
    on_face = np.isclose(np.abs(points), 0.5)
    assert on_face.any(axis=1).all()
    np.testing.assert_allclose(np.abs(normals).sum(1), 1)
    np.testing.assert_allclose((points * normals).sum(1), 0.5)
    a, _ = sample_surface(*CUBE, 100, seed=3)
    b, _ = sample_surface(*CUBE, 100, seed=3)
    np.testing.assert_array_equal(a, b)


def test_sampling_is_uniform_by_area():
    # Two triangles of areas 1 and 3 in the z = 0 plane.
    v = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [10, 0, 0], [13, 0, 0], [10, 2, 0]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    points, _ = sample_surface(v, f, 40_000, seed=0)
    big = points[:, 0] >= 10
    assert big.mean() == pytest.approx(0.75, abs=0.01)
    # Uniform inside a triangle: the mean is its centroid.
    np.testing.assert_allclose(points[big].mean(0), v[3:].mean(0), atol=0.02)
    with pytest.raises(ValueError, match="no area"):
        sample_surface(v[:3] * [1, 0, 0], f[:1], 10)


def test_kd_tree_and_brute_force_nearest_agree():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(700, 3, generator=gen), torch.rand(900, 3, generator=gen)
    d_tree, i_tree = nearest(a, b)
    d_brute, i_brute = nearest_brute_force(a, b)
    torch.testing.assert_close(d_tree, d_brute, atol=1e-5, rtol=0)
    assert (i_tree == i_brute).float().mean() > 0.99  # ties at float32 precision may pick either


def test_chamfer_of_a_shifted_grid_is_twice_the_squared_shift():
    a = grid_points()
    assert chamfer(a, a) == 0
    # The shift is far below the grid spacing, so every nearest neighbour is the shifted twin.
    assert chamfer(a, a + [0.1, 0, 0]) == pytest.approx(2 * 0.01, rel=1e-5)
    assert chamfer(a, a + [0.1, 0, 0]) == chamfer(a + [0.1, 0, 0], a)


def test_fscore():
    a = grid_points()
    assert fscore(a, a) == 1
    shifted = a + [0.02, 0, 0]
    assert fscore(shifted, a, tau=0.01) == 0
    assert fscore(shifted, a, tau=0.03) == 1
    # Half of the prediction far away: precision 1/2, recall 1, F = 2/3.
    pred = np.concatenate([a, a + 100])
    assert fscore(pred, a) == pytest.approx(2 / 3)


def test_normal_consistency_is_unsigned():
    p = grid_points()
    n = np.tile([0.0, 0.0, 1.0], (len(p), 1))
    assert normal_consistency(p, n, p, n) == pytest.approx(1)
    assert normal_consistency(p, n, p, -n) == pytest.approx(1)
    assert normal_consistency(p, n, p, np.tile([1.0, 0.0, 0.0], (len(p), 1))) == pytest.approx(0)


def test_reconstruction_metrics_separate_good_from_bad():
    same = reconstruction_metrics(CUBE, CUBE, n_points=20_000, tau=0.05)
    box = trimesh.creation.box(extents=(1.0, 0.6, 1.0))
    worse = reconstruction_metrics((box.vertices, box.faces), CUBE, n_points=20_000, tau=0.05)
    assert same["chamfer"] < 1e-3 and same["fscore"] > 0.99 and same["normal_consistency"] > 0.97
    assert worse["chamfer"] > 10 * same["chamfer"] and worse["fscore"] < 0.8


def test_pairwise_chamfer_matches_chamfer():
    gen = torch.Generator().manual_seed(1)
    set_a = [torch.rand(64, 3, generator=gen) for _ in range(3)]
    set_b = [torch.rand(48, 3, generator=gen) for _ in range(4)]
    matrix = pairwise_chamfer(set_a, set_b)
    assert matrix.shape == (3, 4)
    expected = torch.tensor([[chamfer(a, b) for b in set_b] for a in set_a])
    torch.testing.assert_close(matrix, expected, atol=1e-6, rtol=1e-5)


def test_cov_mmd_1nna_by_hand():
    # Single-point clouds on a line, so CD = 2 * distance^2 and every figure can be worked out:
    # gen {0, 0.5}, ref {0.6, 5}. Both gen pick ref 0.6 (COV 1/2); MMD = (2*0.1^2 + 2*4.5^2) / 2;
    # 1-NN: gen 0 -> gen 0.5 (right), gen 0.5 -> ref 0.6 (wrong), ref 0.6 -> gen 0.5 (wrong),
    # ref 5 -> ref 0.6 (right): 1-NNA = 1/2.
    def cloud(x):
        return torch.tensor([[x, 0.0, 0.0]])

    result = coverage_mmd_1nna([cloud(0), cloud(0.5)], [cloud(0.6), cloud(5)])
    assert result["cov"] == 0.5
    assert result["mmd"] == pytest.approx((2 * 0.1**2 + 2 * 4.5**2) / 2, rel=1e-5)
    assert result["1nna"] == 0.5


def ellipsoids(seed, count, n=128, scale=(0.2, 0.5)):
    rng = np.random.default_rng(seed)
    clouds = []
    for _ in range(count):
        d = rng.normal(size=(n, 3))
        clouds.append(d / np.linalg.norm(d, axis=1, keepdims=True) * rng.uniform(*scale, size=3))
    return clouds


def test_cov_mmd_1nna_on_sets():
    ref = ellipsoids(0, 24)
    copy = coverage_mmd_1nna(ref, ref)
    # Memorised samples: perfect COV and MMD (0 up to cdist's rounding), 1-NNA 0.
    assert copy["cov"] == 1.0 and copy["mmd"] < 1e-7 and copy["1nna"] == 0.0
    same = coverage_mmd_1nna(ellipsoids(1, 24), ref)
    assert 0.3 <= same["1nna"] <= 0.7  # drawn from the same distribution: near chance
    apart = coverage_mmd_1nna(ellipsoids(2, 24, scale=(1.0, 1.5)), ref)
    assert apart["1nna"] == 1.0  # disjoint shapes: perfectly separable
    assert apart["mmd"] > 10 * same["mmd"] and apart["cov"] < same["cov"]


def test_evaluate_generated_on_meshes():
    families = ["table", "chair", "lamp", "shelf"]
    tables = [synth_mesh("table", 0, i) for i in range(4)]
    lamps = [synth_mesh("lamp", 0, i) for i in range(4)]
    mixed = [synth_mesh(f, 1, i) for i, f in enumerate(families)]
    copies = evaluate_generated(mixed, mixed, n_points=256)
    assert copies["cov"] == 1.0 and copies["1nna"] == 0.0 and copies["reference"] == 4
    empty = (np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    collapsed = (np.zeros((3, 3)), np.array([[0, 1, 2]]))
    result = evaluate_generated([*tables, empty, collapsed], lamps, n_points=256)
    assert result["invalid"] == 2 and result["generated"] == 4
    # Tables and lamps are told apart, except one odd lamp that is closer to a table than to the
    # other lamps (seeds fixed: the figure is exact).
    assert result["1nna"] == 0.875
    # Two shapes in all leave 1-NNA no neighbour of the other kind: a clear error, not a ValueError.
    needs_three = r"at least three shapes in all, here 1 generated with a surface \(1 without\) and 1 reference"
    with pytest.raises(MeshforgeError, match=needs_three):
        evaluate_generated([tables[0], empty], lamps[:1], n_points=256)


def test_evaluate_generation_reads_sample_and_dataset_folders(tmp_path):
    generate(tmp_path / "synth", n=4, seed=0, max_faces=200, families=["table", "lamp"])
    tokenize_folder(
        TokenizeConfig(
            input=tmp_path / "synth", out=tmp_path / "tokens", max_faces=200, val_fraction=0.5, workers=1
        )
    )
    voxelize_folder(
        SdfConfig(
            input=tmp_path / "synth",
            out=tmp_path / "sdf",
            resolution=16,
            band=2.0,
            val_fraction=0.5,
            workers=1,
        ),
        "cpu",
    )
    samples = [synth_mesh("table", 5, i) for i in range(3)]
    # Two formats per sample must still count as one sample each, and an earlier run's extra
    # samples in the same folder are gone.
    write_samples(samples * 2, tmp_path / "samples", formats=("obj",))
    write_samples(samples, tmp_path / "samples", formats=("obj", "ply"))
    on_tokens = evaluate_generation(tmp_path / "samples", tmp_path / "tokens", split="val", n_points=128)
    on_sdf = evaluate_generation(tmp_path / "samples", tmp_path / "sdf", split="val", n_points=128)
    on_folder = evaluate_generation(tmp_path / "samples", tmp_path / "synth", n=3, n_points=128)
    assert on_tokens["generated"] == on_sdf["generated"] == on_folder["generated"] == 3
    assert on_folder["reference"] == 3
    assert 0 <= on_tokens["cov"] <= 1 and on_tokens["mmd"] > 0
