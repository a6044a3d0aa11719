"""Sample export: mesh files round-trip, per-mesh validity and watertightness, stats and grid."""

import json

import numpy as np
import pytest
import trimesh

from meshforge.data.canonical import canonicalize
from meshforge.data.synth import synth_mesh
from meshforge.data.tokens import Vocab, decode_tokens, encode_mesh
from meshforge.errors import MeshforgeError
from meshforge.runtime import has_module
from meshforge.sample.export import (
    is_watertight,
    mesh_from_canonical,
    mesh_stats,
    postprocess,
    sample_files,
    write_samples,
)

BOX = trimesh.creation.box()
CUBE = (np.asarray(BOX.vertices), np.asarray(BOX.faces))


def test_mesh_from_canonical_round_trips_through_canonicalisation():
    canonical = canonicalize(*synth_mesh("chair", 0, 1), bits=7)
    vertices, faces = mesh_from_canonical(decode_tokens(encode_mesh(canonical), Vocab(7)))
    assert np.all(np.abs(vertices) < 0.5)
    # Cell centres re-quantise to their own cells, so canonicalising again changes nothing.
    again = canonicalize(vertices, faces, bits=7)
    np.testing.assert_array_equal(encode_mesh(again), encode_mesh(canonical))


def test_watertightness():
    assert is_watertight(*CUBE)
    assert not is_watertight(CUBE[0], CUBE[1][1:])  # a missing triangle opens two edges
    # A triangle soup (every face with its own vertices) is closed once equal positions merge.
    soup = CUBE[0][CUBE[1]].reshape(-1, 3), np.arange(36).reshape(-1, 3)
    assert is_watertight(*soup)


@pytest.mark.parametrize(
    "mesh, problem",
    [
        (CUBE, None),
        ((CUBE[0], np.zeros((0, 3), dtype=int)), "no faces"),
        ((np.where(np.arange(8)[:, None] == 0, np.nan, CUBE[0]), CUBE[1]), "non-finite vertices"),
        ((CUBE[0], np.vstack([CUBE[1], [[0, 0, 1]]])), "1 degenerate faces"),
        ((CUBE[0], np.vstack([CUBE[1], [[0, 1, 8]]])), "face index out of range"),
    ],
)
def test_mesh_stats_validity(mesh, problem):
    stats = mesh_stats(*mesh)
    assert stats["problem"] == problem
    assert stats["valid"] == (problem is None)
    assert stats["watertight"] == (problem is None)  # the valid one is the closed cube


def test_write_samples(tmp_path):
    open_box = (CUBE[0], CUBE[1][2:])
    empty = (np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    meshes = [CUBE, open_box, empty]
    stats = write_samples(
        meshes,
        tmp_path / "out",
        formats=("obj", "ply", "glb"),
        extra_stats={"time_s": 1.5, "tokens_per_s": 100.0},
    )
    out = tmp_path / "out"
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["count"] == 3 and stats["valid"] == 2 and stats["watertight"] == 1
    assert stats["faces_total"] == 22 and stats["faces_max"] == 12 and stats["vertices_total"] == 16
    assert stats["time_s"] == 1.5 and stats["tokens_per_s"] == 100.0
    assert [m["name"] for m in stats["meshes"]] == ["sample_000", "sample_001", "sample_002"]
    assert (out / "grid.png").is_file()
    assert not list(out.glob(".*"))  # no temporary files left behind
    for fmt in ("obj", "ply", "glb"):
        loaded = trimesh.load(out / f"sample_000.{fmt}", force="mesh", process=False)
        # OBJ keeps 6 decimals, GLB float32; the faces index the same corners.
        np.testing.assert_allclose(loaded.vertices[loaded.faces], CUBE[0][CUBE[1]], atol=1e-6)


def test_write_samples_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        write_samples([CUBE], tmp_path, formats=("stl",))
    with pytest.raises(ValueError, match="names"):
        write_samples([CUBE, CUBE], tmp_path, names=["a", "a"])
    with pytest.raises(ValueError, match="names"):
        write_samples([CUBE], tmp_path, names=["../escape"])
    with pytest.raises(ValueError, match="redefine"):
        write_samples([CUBE], tmp_path, extra_stats={"count": 3})


def test_rewriting_a_folder_drops_the_previous_samples(tmp_path):
    write_samples([CUBE] * 3, tmp_path, formats=("obj", "ply"))
    (tmp_path / "notes.txt").write_text("mine")
    write_samples([CUBE], tmp_path, formats=("obj",))
    assert sorted(p.name for p in tmp_path.glob("sample_*")) == ["sample_000.obj"]
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only files the previous stats listed go
    assert sample_files(tmp_path) == [[tmp_path / "sample_000.obj"]]


def test_postprocess_fills_holes_and_simplifies_to_the_face_budget():
    sphere = trimesh.creation.icosphere(3)  # 1,280 faces
    holed = np.delete(sphere.faces, [0], axis=0)  # a one-triangle hole
    assert not is_watertight(sphere.vertices, holed)
    vertices, faces = postprocess((sphere.vertices, holed), fill_holes=True)
    assert is_watertight(vertices, faces) and len(faces) == len(sphere.faces)
    if has_module("fast_simplification"):
        vertices, faces = postprocess((sphere.vertices, sphere.faces), simplify=300)
        assert 200 <= len(faces) <= 300 and is_watertight(vertices, faces)
        # Still the unit sphere: decimation moves the surface by a fraction of an edge (~0.1).
        assert np.abs(np.linalg.norm(vertices, axis=1) - 1).max() < 0.05
    # Under the budget nothing changes.
    vertices, faces = postprocess((sphere.vertices, sphere.faces), simplify=5000)
    assert np.array_equal(faces, sphere.faces)


def test_postprocess_without_fast_simplification_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fast_simplification", None)  # makes the import fail
    sphere = trimesh.creation.icosphere(2)
    with pytest.raises(MeshforgeError, match=r"pip install 'meshforge\[post\]'"):
        postprocess((sphere.vertices, sphere.faces), simplify=100)
