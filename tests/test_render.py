"""Headless rendering: rasteriser coverage and depth, shading, grid layout and speed, tables."""

import time

import numpy as np
import pytest
import trimesh
from matplotlib.image import imread

from meshforge.render import (
    BACK_COLOR,
    LABEL_PX,
    MARGIN,
    rasterize,
    render_grid,
    render_mesh,
    render_table_png,
)

CUBE = trimesh.creation.box()


def test_triangle_covers_exactly_the_pixel_centres_inside_it():
    size = 16
    # Lower-left half of the image: pixel (i, j) is covered iff its centre has x + y <= size.
    corners = np.array([[[0, 0, 0], [size, 0, 0], [0, size, 0]]], dtype=float)
    face, depth = rasterize(corners, size)
    covered = face == 0
    j, i = np.mgrid[:size, :size]
    np.testing.assert_array_equal(covered, (i + 0.5) + (j + 0.5) <= size)
    assert covered.sum() == size * (size + 1) // 2
    assert np.all(np.isneginf(depth[~covered])) and np.all(face[~covered] == -1)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_nearest_triangle_wins_whatever_the_drawing_order(order):
    near = [[0, 0, 2.0], [8, 0, 2.0], [0, 8, 2.0]]
    far = [[0, 0, 1.0], [8, 0, 1.0], [0, 8, 1.0]]
    tris = np.array([near, far])[list(order)]
    face, depth = rasterize(tris, 8)
    covered = face >= 0
    assert np.all(face[covered] == order.index(0)) and np.all(depth[covered] == 2.0)


def test_depth_is_interpolated_across_the_triangle():
    size = 8
    # Closeness = x / size on a triangle covering everything: a plane, so interpolation is exact.
    corners = np.array([[[-1, -1, -1 / size], [3 * size, -1, 3.0], [-1, 3 * size, -1 / size]]])
    face, depth = rasterize(corners, size)
    assert np.all(face == 0)
    x = np.arange(size) + 0.5
    np.testing.assert_allclose(depth, np.broadcast_to(x / size, (size, size)), atol=1e-12)


def test_cube_fills_its_tile_with_three_flat_shades():
    size = 64
    image = render_mesh(CUBE.vertices, CUBE.faces, size)
    covered = np.any(image < 1, axis=2)
    rows, cols = np.flatnonzero(covered.any(1)), np.flatnonzero(covered.any(0))
    # The taller side of the projection spans the tile minus the margins (to a pixel).
    span = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    assert abs(span - size * (1 - 2 * MARGIN)) <= 1.5
    shades = np.unique(image[covered].round(6), axis=0)
    assert len(shades) == 3  # three visible faces, flat normals, outward windings: front colour only


def test_back_faces_are_tinted():
    size = 32
    front = render_mesh(CUBE.vertices, CUBE.faces, size)
    back = render_mesh(CUBE.vertices, CUBE.faces[:, ::-1], size)
    covered = np.any(front < 1, axis=2)
    np.testing.assert_array_equal(covered, np.any(back < 1, axis=2))
    # Flipped windings: the visible faces are seen from behind, in the warm colour.
    ratio = back[covered] / BACK_COLOR
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, 1), atol=1e-9)


def test_empty_and_broken_meshes_give_blank_tiles():
    assert np.all(render_mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=int), 16) == 1)
    v = CUBE.vertices.copy()
    v[0] = np.nan
    image = render_mesh(v, CUBE.faces, 16)  # faces touching the NaN vertex are dropped, the rest drawn
    assert np.isfinite(image).all() and np.any(image < 1)


def test_grid_layout_and_speed(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=4)  # 5,120 faces
    meshes = [(sphere.vertices, sphere.faces)] * 15 + [(np.zeros((0, 3)), np.zeros((0, 3), dtype=int))]
    start = time.perf_counter()
    render_grid(meshes, tmp_path / "grid.png", cols=4, size=128)
    elapsed = time.perf_counter() - start
    image = imread(tmp_path / "grid.png")
    assert image.shape[:2] == (4 * (128 + LABEL_PX), 4 * 128)
    tile = image[:128, :128, :3]
    assert np.any(tile < 0.9)  # a sphere was drawn
    last = image[3 * (128 + LABEL_PX) : 3 * (128 + LABEL_PX) + 128, 3 * 128 :, :3]
    assert np.all(last == 1)  # the empty mesh's tile is blank
    assert elapsed < 10, f"16 meshes of 5k faces took {elapsed:.1f} s"


def test_grid_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        render_grid([(CUBE.vertices, CUBE.faces)], tmp_path / "g.png", labels=["a", "b"])


def test_table_png(tmp_path):
    rows = [
        {"model": "interleaved", "step_ms": 12.3456},
        {"model": "full", "step_ms": 25.0, "note": "baseline"},
    ]
    render_table_png(rows, tmp_path / "table.png", title="demo")
    image = imread(tmp_path / "table.png")
    assert image.ndim == 3 and image.shape[0] == 22 * 3 + 30 + 20
    assert not list(tmp_path.glob(".*"))  # the atomic write left no temporary file


def test_report_measures_prints_the_rows_and_writes_the_png(tmp_path, capsys):
    from meshforge.render import report_measures

    rows = [{"measure": "step R=512", "value": "0.539 s"}, {"measure": "ssa vs fa2", "value": "6.11x"}]
    path = report_measures(rows, tmp_path / "table.png", "a benchmark")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    shown = printed.out + printed.err
    assert "a benchmark" in shown and "0.539 s" in shown and "6.11x" in shown
