import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import trimesh

from meshforge.data.meshio import (
    iter_mesh_files,
    load_collection,
    load_mesh_file,
    load_meshes,
    scan_mesh_files,
)
from meshforge.data.synth import mesh_bytes, synth_mesh
from meshforge.errors import InputError

QUAD = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
TET_V = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
TET_F = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


@pytest.mark.parametrize("fmt", ["obj", "ply", "stl", "off"])
def test_mesh_formats_load_the_same_geometry(tmp_path, fmt):
    v, f = synth_mesh("desk", 0, 0)
    path = tmp_path / f"desk.{fmt}"
    path.write_bytes(mesh_bytes(v, f, fmt))
    (mesh,) = load_meshes(path)
    assert mesh.name == "desk" and mesh.faces.dtype == np.int64 and mesh.vertices.dtype == np.float64
    assert len(mesh.faces) == len(f)
    np.testing.assert_allclose(mesh.vertices[mesh.faces], v[f], atol=1e-5)


def test_scene_is_merged_with_transforms(tmp_path):
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box())
    scene.add_geometry(
        trimesh.creation.box(), transform=trimesh.transformations.translation_matrix([5, 0, 0])
    )
    path = tmp_path / "scene.glb"
    path.write_bytes(scene.export(file_type="glb"))
    (mesh,) = load_meshes(path)
    assert len(mesh.faces) == 24
    assert mesh.vertices[:, 0].max() == pytest.approx(5.5)


def test_polygons_are_triangulated(tmp_path):
    path = tmp_path / "quad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nf 1 2 3 4\nf 1 2 5\n")
    (mesh,) = load_meshes(path)
    assert len(mesh.faces) == 3


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.obj", "", "empty file"),
        ("nan.obj", "v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n", "NaN or infinite"),
        ("truncated.obj", "v 0 0 0\nv 1 0 0\nv 0 1", "unreadable|no faces"),
        ("flat.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "zero surface area"),
        ("garbage.ply", "ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2\n", "unreadable"),
        ("notes.txt", "hello", "unsupported file type"),
    ],
)
def test_bad_files_raise_one_line_input_errors(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as info:
        load_meshes(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return path


def test_meshgpt_collections(tmp_path):
    v, f = synth_mesh("lamp", 0, 0)
    layouts = {
        "list.pkl": [{"vertices": v, "faces": f, "name": "a"}, {"vertices": TET_V, "faces": TET_F}],
        # Parallel lists, faces as ragged n-gons.
        "meshgpt.pkl": {"name": ["a", "quad"], "vertices": [v, QUAD], "faces": [f.tolist(), [[0, 1, 2, 3]]]},
        "single.pickle": {"vertices": TET_V, "faces": TET_F},
    }
    for name, obj in layouts.items():
        meshes = load_meshes(_pickle(tmp_path / name, obj))
        assert len(meshes) == (1 if name.startswith("single") else 2)
    meshes = load_meshes(tmp_path / "meshgpt.pkl")
    assert [m.name for m in meshes] == ["meshgpt/a", "meshgpt/quad"] and len(meshes[1].faces) == 2
    assert load_meshes(tmp_path / "single.pickle")[0].name == "single"

    np.savez(tmp_path / "numbered.npz", vertices_0=v, faces_0=f, vertices_1=TET_V, faces_1=TET_F)
    assert [len(m.faces) for m in load_meshes(tmp_path / "numbered.npz")] == [len(f), 4]
    objects = np.empty(2, dtype=object)
    objects[:] = [v, TET_V]
    faces = np.empty(2, dtype=object)
    faces[:] = [f, TET_F]
    np.savez(tmp_path / "objects.npz", vertices=objects, faces=faces)
    assert [len(m.faces) for m in load_meshes(tmp_path / "objects.npz")] == [len(f), 4]
    assert len(iter_mesh_files(tmp_path)) == 5


def test_collection_members_fail_individually(tmp_path):
    bad = TET_V.copy()
    bad[0, 0] = np.inf
    path = _pickle(
        tmp_path / "mixed.pkl",
        [
            {"vertices": TET_V, "faces": TET_F, "name": "ok"},
            {"vertices": bad, "faces": TET_F, "name": "inf"},
            {"vertices": TET_V, "faces": TET_F + 10, "name": "range"},
        ],
    )
    meshes, problems = load_collection(path)
    assert [m.name for m in meshes] == ["mixed/ok"]
    assert dict(problems) == {
        "inf": "vertices contain NaN or infinite coordinates",
        "range": "face indices out of range for 4 vertices",
    }
    with pytest.raises(InputError, match="mixed.pkl#inf"):
        load_meshes(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _pickle(tmp_path / "evil.pkl", {"vertices": [TET_V], "faces": [TET_F], "x": _Exploit()})
    with pytest.raises(InputError, match="refusing to load"):
        load_meshes(path)
    assert not (tmp_path / "pwned").exists()


# --- the datasets users already have ------------------------------------------------------------

BOX_QUADS = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
BOX_V = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)


def meshgpt_pickle(path):
    """MeshGPT's processed_data.pkl layout: six keys, per-split parallel lists, n-gon face lists."""
    sphere = trimesh.creation.icosphere(subdivisions=1)
    cone = trimesh.creation.cone(radius=0.5, height=1.0, sections=8)
    data = {
        "name_train": ["03001627_aa01", "04379243_bb02", "09999999_cc03"],
        "vertices_train": [BOX_V, np.asarray(sphere.vertices), np.asarray(cone.vertices)],
        "faces_train": [BOX_QUADS, sphere.faces.tolist(), cone.faces.tolist()],
        "name_val": ["03001627_dd04"],
        "vertices_val": [BOX_V * [1, 2, 0.5]],
        "faces_val": [BOX_QUADS],
    }
    path.write_bytes(pickle.dumps(data))
    return path


def test_meshgpt_processed_shapenet_keeps_split_and_synsets(tmp_path):
    meshes, problems = load_collection(meshgpt_pickle(tmp_path / "processed_data.pkl"))
    assert problems == []
    assert [m.name for m in meshes] == [
        "processed_data/03001627_aa01", "processed_data/04379243_bb02",
        "processed_data/09999999_cc03", "processed_data/03001627_dd04",
    ]
    assert [m.split for m in meshes] == ["train", "train", "train", "val"]
    assert [m.category for m in meshes] == ["03001627", "04379243", "09999999", "03001627"]
    assert len(meshes[0].faces) == 12  # six quads, fanned into two triangles each


def test_meshgpt_split_lists_of_different_lengths_are_an_error(tmp_path):
    path = _pickle(tmp_path / "p.pkl", {"name_train": ["a", "b"], "vertices_train": [TET_V], "faces_train": [TET_F]})
    with pytest.raises(InputError, match=r"name_train, vertices_train and faces_train differ in length \(2, 1, 1\)"):
        load_meshes(path)


def test_meshanything_npz_list(tmp_path):
    items = np.empty(2, dtype=object)
    items[:] = [{"vertices": TET_V, "faces": TET_F}, {"vertices": BOX_V, "faces": np.array(BOX_QUADS)}]
    np.savez(tmp_path / "train.npz", npz_list=items)
    meshes = load_meshes(tmp_path / "train.npz")
    assert [len(m.faces) for m in meshes] == [4, 12]
    assert all(m.split is None and m.category is None for m in meshes)


# --- skip reasons ------------------------------------------------------------------------------


def test_point_cloud_says_so(tmp_path):
    path = tmp_path / "cloud.ply"
    path.write_bytes(trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(file_type="ply"))
    with pytest.raises(InputError, match=r"cloud.ply: point cloud \(no faces\)$"):
        load_meshes(path)


def test_truncated_stl_says_so(tmp_path):
    box = trimesh.creation.box()
    binary = box.export(file_type="stl")
    (tmp_path / "cut.stl").write_bytes(binary[: len(binary) // 2])
    with pytest.raises(InputError, match=r"truncated STL: the header announces 12 triangles \(684 bytes\), the file has 342"):
        load_meshes(tmp_path / "cut.stl")
    (tmp_path / "head.stl").write_bytes(binary[:40])
    with pytest.raises(InputError, match="truncated STL: 40 bytes, shorter than the 84-byte binary header"):
        load_meshes(tmp_path / "head.stl")
    text = box.export(file_type="stl_ascii")
    (tmp_path / "cut_ascii.stl").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="truncated STL: ASCII file without its closing 'endsolid'"):
        load_meshes(tmp_path / "cut_ascii.stl")
    (tmp_path / "whole_ascii.stl").write_text(text)
    assert len(load_meshes(tmp_path / "whole_ascii.stl")[0].faces) == 12


def test_gzipped_meshes_and_collections_load_and_corrupt_gzip_says_so(tmp_path):
    obj = trimesh.creation.box().export(file_type="obj").encode()
    (tmp_path / "box.obj.gz").write_bytes(gzip.compress(obj))
    (mesh,) = load_meshes(tmp_path / "box.obj.gz")
    assert mesh.name == "box" and len(mesh.faces) == 12
    (tmp_path / "set.pkl.gz").write_bytes(gzip.compress(pickle.dumps([{"vertices": TET_V, "faces": TET_F}])))
    assert [m.name for m in load_meshes(tmp_path / "set.pkl.gz")] == ["set/000000"]
    whole = gzip.compress(obj)
    (tmp_path / "cut.obj.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cut.obj.gz: gzip data is corrupt/truncated \(EOFError"):
        load_meshes(tmp_path / "cut.obj.gz")
    (tmp_path / "junk.stl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="gzip data is corrupt/truncated"):
        load_meshes(tmp_path / "junk.stl.gz")


# --- discovery ---------------------------------------------------------------------------------


def test_scan_records_what_it_cannot_read_and_survives_symlink_loops(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    tet = trimesh.Trimesh(TET_V, TET_F).export(file_type="obj")
    (root / "sub" / "a.obj").write_text(tet)
    (root / "b.obj.gz").write_bytes(gzip.compress(tet.encode()))
    (root / "folder.obj").mkdir()
    (root / "folder.obj" / "inner.obj").write_text(tet)
    (root / "notes.txt.gz").write_bytes(gzip.compress(b"x"))
    (root / "material.mtl").write_text("")
    (root / "labels.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.obj").write_text(tet)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # read through the link
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a folder loop
    (root / "x.obj").symlink_to(root / "y.obj")
    (root / "y.obj").symlink_to(root / "x.obj")  # a file link loop
    (root / "gone.ply").symlink_to(root / "missing.ply")
    (root / ".hidden.obj").write_text(tet)

    scan = scan_mesh_files(root)
    found = [p.relative_to(root).as_posix() for p in scan.files]
    assert found == ["b.obj.gz", "folder.obj/inner.obj", "linked/c.obj", "sub/a.obj"]
    reasons = {Path(s.path).relative_to(root).as_posix(): s.reason for s in scan.skipped}
    assert reasons == {
        "folder.obj": "a folder named like a mesh file (its contents are scanned)",
        "gone.ply": f"broken symlink (its target {root / 'missing.ply'} does not exist)",
        "notes.txt.gz": "not a mesh file (unsupported type .txt.gz)",
        "sub/up": f"symlink to a folder already scanned (a loop, or a second link to {root.resolve()})",
        "x.obj": "symlink loop",
        "y.obj": "symlink loop",
    }
    assert iter_mesh_files(root) == scan.files


def test_a_missing_texture_loads_the_geometry_without_trimesh_noise(tmp_path, capfd):
    path = tmp_path / "textured.ply"
    path.write_text(
        "ply\nformat ascii 1.0\ncomment TextureFile missing.png\nelement vertex 3\nproperty float x\n"
        "property float y\nproperty float z\nproperty float s\nproperty float t\nelement face 1\n"
        "property list uchar int vertex_indices\nend_header\n0 0 0 0 0\n1 0 0 1 0\n0 1 0 0 1\n3 0 1 2\n"
    )
    mesh = load_mesh_file(path)
    assert mesh.faces.tolist() == [[0, 1, 2]]
    err = capfd.readouterr().err
    assert "unable to load image" not in err and "Traceback" not in err, err
