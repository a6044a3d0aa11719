import os
import pickle

import numpy as np
import pytest
import trimesh

from meshforge.data.meshio import iter_mesh_files, load_collection, load_mesh_file, load_meshes
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


def test_point_cloud_is_not_a_mesh(tmp_path):
    path = tmp_path / "cloud.ply"
    path.write_bytes(trimesh.PointCloud(np.random.default_rng(0).random((20, 3))).export(file_type="ply"))
    with pytest.raises(InputError, match="empty mesh|no faces|not a surface mesh"):
        load_meshes(path)


def _pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return path


def test_meshgpt_collections(tmp_path):
    v, f = synth_mesh("lamp", 0, 0)
    layouts = {
        "list.pkl": [{"vertices": v, "faces": f, "name": "a"}, {"vertices": TET_V, "faces": TET_F}],
        # MeshGPT's own layout: parallel lists, faces as ragged n-gons.
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
