import numpy as np
import pytest
import torch
import trimesh

from meshforge.sample.export import mesh_problem
from meshforge.sparse.marching_cubes import CASES, complete_cubes, marching_cubes


def band_of(field, R, band):
    """Voxels of the dense R^3 grid within ``band`` voxels of the zero level of ``field(points)``."""
    grid = np.stack(np.meshgrid(*[np.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    values = field((grid + 0.5) / R - 0.5)
    keep = np.abs(values) < band / R
    return grid[keep], values[keep]


def sphere(p, r=0.3):
    return np.linalg.norm(p, axis=1) - r


def torus(p, major=0.25, minor=0.1):
    ring = np.linalg.norm(p[:, :2], axis=1) - major
    return np.hypot(ring, p[:, 2]) - minor


def test_case_table_cuts_every_mixed_tetrahedron():
    counts = (CASES[..., 0] >= 0).sum(1)
    assert counts[0] == counts[15] == 0
    for mask in range(1, 15):
        inside = (mask).bit_count()
        assert counts[mask] == (2 if inside == 2 else 1)


@pytest.mark.parametrize("field,euler", [(sphere, 2), (torus, 0)])
def test_closed_surfaces_are_watertight_outward_and_on_the_level_set(field, euler):
    R = 32
    coords, values = band_of(field, R, 2.0)
    vertices, faces = marching_cubes(coords, values, R)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert len(vertices) - len(mesh.edges_unique) + len(faces) == euler  # the right topology
    assert mesh.volume > 0  # normals point out, towards positive values
    # Vertices interpolate a smooth field linearly along edges of at most sqrt(3) voxels.
    assert np.abs(field(vertices.astype(np.float64))).max() < 0.15 / R


def test_volume_matches_the_analytic_sphere_and_level_shifts_the_surface():
    R = 40
    coords, values = band_of(sphere, R, 3.0)
    mesh = trimesh.Trimesh(*marching_cubes(coords, values, R), process=False)
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.01)
    inflated = trimesh.Trimesh(*marching_cubes(coords, values, R, level=0.02), process=False)
    assert inflated.volume == pytest.approx(4 / 3 * np.pi * 0.32**3, rel=0.01)


def test_planes_are_reproduced_exactly_and_crossings_on_grid_points_merge():
    R = 16
    normal = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    coords, values = band_of(lambda p: p @ normal - 0.01, R, 3.0)
    vertices, _ = marching_cubes(coords, values, R)
    assert np.abs(vertices @ normal - 0.01).max() < 1e-6
    # z = 0.5 / R exactly on a layer of grid points: every vertex is a grid point, merged once.
    coords, values = band_of(lambda p: p[:, 2] - 0.5 / R, R, 2.0)
    vertices, faces = marching_cubes(coords, values, R)
    assert len(vertices) == len(np.unique(vertices, axis=0)) and len(faces) > 0
    assert np.allclose(vertices[:, 2], 0.5 / R)
    areas = trimesh.Trimesh(vertices, faces, process=False).area_faces
    assert areas.min() > 0


def test_only_complete_cubes_are_used_and_nothing_dense_is_needed():
    coords = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1], [5, 5, 5]]
    )
    base, rows = complete_cubes(coords, 8)
    assert base.tolist() == [[0, 0, 0]] and torch.equal(coords[rows[0]].long(), coords[:8].long())
    values = torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1, -1])
    vertices, faces = marching_cubes(coords, values, 8)
    assert len(faces) >= 1 and (vertices < (1.5 / 8 - 0.5)).all()
    # A grid far bigger than memory would allow densely: a few voxels at R = 2^20.
    far = torch.tensor([[2**20 - 2, 7, 9]]) + torch.tensor(
        [[(k >> i) & 1 for i in range(3)] for k in range(8)]
    )
    vertices, faces = marching_cubes(far, values[:8], 2**20)
    assert len(faces) >= 1
    empty = marching_cubes(np.zeros((0, 3), int), np.zeros(0), 8)
    assert empty[0].shape == (0, 3) and empty[1].shape == (0, 3)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    coords, values = band_of(torus, 48, 2.0)
    cpu = marching_cubes(coords, values, 48)
    gpu = marching_cubes(torch.as_tensor(coords).cuda(), torch.as_tensor(values).cuda(), 48)
    assert cpu[0].shape == gpu[0].shape and cpu[1].shape == gpu[1].shape
    # Same vertices (named by grid edges, so in the same order) and the same triangles.
    assert np.allclose(cpu[0], gpu[0], atol=1e-6) and np.array_equal(cpu[1], gpu[1])


def test_values_on_the_level_leave_no_degenerate_faces():
    """A network's bf16 SDF puts many values on the level up to rounding, or exactly on it: crossings
    snap to grid points and triangles that fall onto a grid edge are dropped, so no face has zero area."""
    g = torch.Generator().manual_seed(0)
    resolution = 48
    idx = torch.stack(torch.meshgrid(*(torch.arange(resolution),) * 3, indexing="ij"), -1).reshape(-1, 3)
    points = (idx + 0.5) / resolution - 0.5
    for _ in range(10):
        centres = torch.rand(6, 3, generator=g) * 0.6 - 0.3
        sdf = torch.cdist(points, centres).min(1).values - 0.12
        values = (sdf + 0.01 * torch.randn(len(sdf), generator=g)).to(torch.bfloat16).float()
        band = values.abs() < 3.0 / resolution
        vertices, faces = marching_cubes(idx[band], values[band], resolution)
        assert len(faces) > 20_000 and mesh_problem(vertices, faces) is None
