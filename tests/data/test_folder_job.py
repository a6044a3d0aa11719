"""The folder-job runner shared by tokenize and sdf-voxelize: per-mesh skips, lazy loads, names, labels."""

import json
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import trimesh

from meshforge.data.folder_job import discover_meshes, file_meshes
from meshforge.errors import InputError, MeshforgeError

TET_V = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
TET_F = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


@dataclass
class Seen:
    name: str
    source: str
    faces: int
    category: str | None = None


def count_faces(mesh):
    raw = mesh.load()
    if len(raw.faces) > 4:
        raise InputError(mesh.source, "too many faces")
    return Seen(mesh.name, mesh.source, len(raw.faces), mesh.category)


def collection(path, names, vertices):
    path.write_bytes(pickle.dumps({"name": names, "vertices": vertices, "faces": [TET_F] * len(names)}))


def test_members_that_fail_as_inputs_are_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "set.pkl"
    collection(path, ["tet", "bad", "big"], [TET_V, TET_V * np.nan, TET_V])
    big = trimesh.creation.icosphere(subdivisions=1)
    data = pickle.loads(path.read_bytes())
    data["vertices"][2], data["faces"][2] = np.asarray(big.vertices), np.asarray(big.faces)
    path.write_bytes(pickle.dumps(data))

    result = file_meshes(path, "set", count_faces)
    assert [(m.name, m.source, m.faces) for m in result.meshes] == [("set/tet", f"{path}#tet", 4)]
    assert sorted(s.path for s in result.skipped) == [f"{path}#bad", f"{path}#big"]
    assert next(s for s in result.skipped if s.path.endswith("big")).reason == "too many faces"


def test_a_collection_without_a_usable_member_is_an_input_error_and_a_job_failure_propagates(tmp_path):
    path = tmp_path / "set.pkl"
    collection(path, ["a", "b"], [TET_V * np.nan, TET_V * np.nan])
    with pytest.raises(InputError, match="no usable mesh among 2 in the collection"):
        file_meshes(path, "set", count_faces)

    collection(path, ["a", "b"], [TET_V, TET_V])

    def disk_full(mesh):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):  # not a skip: run_batch turns it into a failure of the job
        file_meshes(path, "set", disk_full)


def test_a_single_file_is_only_read_when_the_job_loads_it(tmp_path):
    path = tmp_path / "damaged.obj"
    path.write_text("v nonsense\nf 1 2\n")
    resumed = file_meshes(path, "damaged", lambda mesh: Seen(mesh.name, mesh.source, -1))
    assert [(m.name, m.source) for m in resumed.meshes] == [("damaged", str(path))]
    with pytest.raises(InputError):
        file_meshes(path, "damaged", count_faces)


def test_a_folder_run_names_labels_and_sorts_skips(tmp_path):
    root = tmp_path / "in"
    (root / "tables").mkdir(parents=True)
    (root / "tables" / "t.obj").write_text(trimesh.Trimesh(TET_V, TET_F).export(file_type="obj"))
    collection(root / "set.pkl", ["tet", "bad"], [TET_V, TET_V * np.nan])
    (root / "notes.txt").write_text("not a mesh")
    (root / "labels.json").write_text(json.dumps({"set.pkl": "chair"}))

    folder = discover_meshes(root)
    run = folder.run(file_meshes_of_folder, workers=1, description="test", on_failure="nothing written")
    assert [(m.name, m.category) for m in run.meshes] == [("set/tet", "chair"), ("tables/t", None)]
    assert [s.path for s in run.skipped] == sorted([str(root / "notes.txt"), f"{root / 'set.pkl'}#bad"])
    assert run.label_manifest(run.meshes)["classes"] == ["chair"]  # labels.json, when present, decides
    assert [m.name for m in run.meshes] == [m.name for m in folder.run(
        file_meshes_of_folder, workers=2, description="test", on_failure="nothing written").meshes]

    (tmp_path / "empty").mkdir()
    with pytest.raises(MeshforgeError, match="no mesh files found"):
        discover_meshes(tmp_path / "empty")


def file_meshes_of_folder(path, name):
    return file_meshes(path, name, count_faces)
