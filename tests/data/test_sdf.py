import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

from meshforge.config import from_dict
from meshforge.data.canonical import normalize_vertices
from meshforge.data.sdf import resample, voxelize
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_geometry import sharp_edges, winding_numbers
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.shards import is_val, split_key
from meshforge.data.synth import generate, synth_mesh
from meshforge.errors import ConfigError, MeshforgeError
from meshforge.runtime import has_module
from meshforge.sparse.marching_cubes import marching_cubes
from meshforge.stages import RunContext


def framed(vertices, fill=0.9, rotate=None):
    v = normalize_vertices(vertices)
    if rotate is not None:
        v = normalize_vertices(Rotation.from_euler("xyz", rotate).apply(v))
    return v * fill


def keys(coords, R):
    c = np.asarray(coords, np.int64)
    return (c[:, 0] * R + c[:, 1]) * R + c[:, 2]


def dense_distance(vertices, faces, R):
    """Brute force: distance from every voxel centre of the dense grid to every triangle (trimesh)."""
    grid = np.stack(np.meshgrid(*[np.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    points = (grid + 0.5) / R - 0.5
    best = np.full(len(points), np.inf)
    for tri in vertices[faces]:
        closest = trimesh.triangles.closest_point(np.repeat(tri[None], len(points), 0), points)
        best = np.minimum(best, np.linalg.norm(closest - points, axis=1))
    return best


def inside_union_of_convex_parts(vertices, faces, points):
    """Exact inside test for a union of convex, outward-wound parts (how synth builds meshes)."""
    n = len(vertices)
    adjacency = coo_matrix((np.ones(faces.size), (faces.ravel(), np.roll(faces, 1, 1).ravel())), shape=(n, n))
    _, part = connected_components(adjacency, directed=False)
    inside = np.zeros(len(points), bool)
    for label in np.unique(part):
        f = faces[part[faces[:, 0]] == label]
        a, b, c = vertices[f[:, 0]], vertices[f[:, 1]], vertices[f[:, 2]]
        normal = np.cross(b - a, c - a)
        inside |= (np.einsum("fj,pfj->pf", normal, points[:, None, :] - a[None]) < 0).all(1)
    return inside


@pytest.mark.parametrize("family,R,rotate", [("chair", 16, (0.3, 0.5, 0.1)), ("lamp", 32, None)])
def test_band_and_distances_match_a_dense_brute_force(family, R, rotate):
    v, f = synth_mesh(family, 0, 3)
    v = framed(v, rotate=rotate)
    sdf = voxelize(v, f, R, band=3.0)
    reference = dense_distance(v, f, R) * R  # voxel units
    k = keys(sdf.coords.numpy(), R)
    # Exactly the voxels within the band (up to float32 ties at its edge), with exact distances.
    mine = np.zeros(R**3, bool)
    mine[k] = True
    clear = np.abs(reference - 3.0) > 1e-4
    assert np.array_equal(mine[clear], (reference < 3.0)[clear]) and len(k) == len(np.unique(k))
    assert np.abs(np.abs(sdf.sdf.numpy()) * R - reference[k]).max() < 1e-4
    assert sdf.coords.dtype == torch.int32 and sdf.coords.min() >= 0 and sdf.coords.max() < R


def test_results_do_not_depend_on_the_chunk_size():
    # Tiny chunks exercise the chunk loops, the cross-chunk minimum and the buffer compaction.
    v, f = synth_mesh("lamp", 2, 7)
    v = framed(v, rotate=(0.4, 0.1, 0.9))
    whole, pieces = voxelize(v, f, 24), voxelize(v, f, 24, chunk=300)
    assert torch.equal(whole.coords, pieces.coords) and torch.equal(whole.sharp, pieces.sharp)
    assert torch.equal(whole.sdf, pieces.sdf)


SIGN_BACKENDS = ["torch", pytest.param("pcu", marks=pytest.mark.skipif(
    not has_module("point_cloud_utils"), reason="needs point-cloud-utils"))]


@pytest.mark.parametrize("sign_backend", SIGN_BACKENDS)
def test_signs_agree_with_an_exact_inside_test_on_overlapping_parts(sign_backend):
    # Synth furniture is a union of intersecting convex boxes and cylinders: not watertight as a
    # whole, the case where winding numbers beat per-triangle normal tests.
    agree, total = 0, 0
    for i, family in enumerate(("table", "chair", "shelf", "stool")):
        v, f = synth_mesh(family, 1, i)
        v = framed(v, rotate=(0.2 * i, 0.4, 0.1))
        sdf = voxelize(v, f, 32, sign_backend=sign_backend)
        inside = inside_union_of_convex_parts(v, f, sdf.centres().double().numpy())
        agree += int(((sdf.sdf < 0).numpy() == inside).sum())
        total += len(sdf)
    assert agree / total >= 0.999


def test_winding_number_is_one_inside_zero_outside_and_half_on_an_open_plane():
    sphere = trimesh.creation.icosphere(3)
    tri = torch.as_tensor(sphere.vertices[sphere.faces], dtype=torch.float32)
    points = torch.tensor([[0.0, 0, 0], [0.5, 0.2, -0.1], [1.5, 0, 0], [0, -3, 1]])
    w = winding_numbers(points, tri, chunk=1000)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.0, 0.0]), atol=1e-4)
    square = torch.tensor([[[-9.0, -9, 0], [9, -9, 0], [9, 9, 0]], [[-9.0, -9, 0], [9, 9, 0], [-9, 9, 0]]])
    w = winding_numbers(torch.tensor([[0.0, 0, 1e-3], [0, 0, -1e-3]]), square, chunk=10)
    assert torch.allclose(w.abs(), torch.tensor([0.5, 0.5]), atol=1e-3) and w[0] * w[1] < 0


@pytest.mark.parametrize("sign_backend", SIGN_BACKENDS)
def test_a_mesh_with_holes_remeshes_closed_and_keeps_its_inside(sign_backend):
    sphere = trimesh.creation.icosphere(2, radius=0.4)
    # Punch two holes of a few faces each: narrower than the band, so they must be sealed.
    hole = np.argsort(sphere.triangles_center[:, 0])
    faces = np.delete(sphere.faces, np.r_[hole[:3], hole[-2:]], axis=0)
    sdf = voxelize(sphere.vertices, faces, 32, band=3.0, sign_backend=sign_backend)
    closed = inside_union_of_convex_parts(sphere.vertices, sphere.faces, sdf.centres().double().numpy())
    assert ((sdf.sdf < 0).numpy() == closed).mean() > 0.99
    vertices, tris = marching_cubes(sdf.coords, sdf.sdf, 32)
    mesh = trimesh.Trimesh(vertices, tris, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(trimesh.creation.icosphere(2, radius=0.4).volume, rel=0.03)


def test_synth_meshes_remesh_watertight_near_the_input():
    v, f = synth_mesh("desk", 0, 2)
    v = framed(v)
    sdf = voxelize(v, f, 32)
    vertices, tris = marching_cubes(sdf.coords, sdf.sdf, 32)
    mesh = trimesh.Trimesh(vertices, tris, process=False)
    assert mesh.is_watertight and mesh.volume > 0
    # Every re-meshed vertex lies on the input surface, up to the interpolation error of a voxel.
    dist = np.full(len(vertices), np.inf)
    for t in v[f]:
        cp = trimesh.triangles.closest_point(np.repeat(t[None], len(vertices), 0), vertices)
        dist = np.minimum(dist, np.linalg.norm(cp - vertices, axis=1))
    assert dist.max() < 1.0 / 32


def test_sharp_voxels_follow_sharp_edges_only():
    box = trimesh.creation.box(extents=(0.8, 0.6, 0.7))
    edges = sharp_edges(box.vertices, box.faces, 30.0)
    # The 12 box edges, not the flat face diagonals.
    lengths = np.sort(np.linalg.norm(edges[:, 1] - edges[:, 0], axis=1))
    assert np.allclose(lengths, np.repeat([0.6, 0.7, 0.8], 4))
    sdf = voxelize(box.vertices, box.faces, 32, sharp_radius=1.5)
    p = sdf.centres().double().numpy()[:, None, :]
    a, b = edges[None, :, 0], edges[None, :, 1]
    t = np.clip(((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    near_edge = np.linalg.norm(p - a - t[..., None] * (b - a), axis=-1).min(1) * 32
    sharp = sdf.sharp.numpy()
    assert sharp[near_edge < 1.49].all() and not sharp[near_edge > 1.51].any() and sharp.any()
    sphere = trimesh.creation.icosphere(3, radius=0.4)  # dihedral angles ~ 10 degrees
    assert len(sharp_edges(sphere.vertices, sphere.faces, 30.0)) == 0
    # STL-style soups (one vertex copy per face) weld; flipped faces are not creases.
    soup_v = sphere.vertices[sphere.faces].reshape(-1, 3)
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    soup_f[::7] = soup_f[::7, ::-1]
    assert len(sharp_edges(soup_v, soup_f, 30.0)) == 0
    open_v = sphere.vertices
    assert len(sharp_edges(open_v, sphere.faces[1:], 30.0)) == 3  # a hole's rim is sharp


def test_resample_agrees_with_direct_voxelisation():
    v, f = synth_mesh("cabinet", 0, 0)
    v = framed(v, rotate=(0.1, 0.7, 0.3))
    fine, coarse = voxelize(v, f, 48, band=8.0), voxelize(v, f, 24, band=3.0)
    down = resample(fine, 24, band=3.0)
    common, a, b = np.intersect1d(keys(down.coords, 24), keys(coarse.coords, 24), return_indices=True)
    assert len(common) > 0.95 * len(coarse)  # a band wide enough at 2x the resolution covers it
    err = np.abs(down.sdf.numpy()[a] - coarse.sdf.numpy()[b]) * 24
    assert np.median(err) < 0.02 and err.max() < 0.5  # voxels; trilinear errs at creases only
    assert (down.sdf.abs() < 3.0 / 24).all() and down.resolution == 24
    up = resample(coarse, 48)
    assert up.band == 3.0 and (up.sdf.abs() < 3.0 / 48).all()
    same = np.isin(keys(up.coords, 48), keys(fine.coords, 48))
    assert same.all()
    assert up.sharp.any() and up.sharp.float().mean() < 0.8


@pytest.mark.gpu
def test_cuda_matches_cpu():
    v, f = synth_mesh("bench", 0, 5)
    v = framed(v, rotate=(0.3, 0.2, 0.1))
    cpu, gpu = voxelize(v, f, 64, device="cpu"), voxelize(v, f, 64, device="cuda").to("cpu")
    # Float rounding differs between devices: voxels at the band's edge may come and go.
    common, a, b = np.intersect1d(keys(cpu.coords, 64), keys(gpu.coords, 64), return_indices=True)
    assert len(common) >= 0.999 * max(len(cpu), len(gpu))
    assert np.abs(cpu.sdf.numpy()[a] - gpu.sdf.numpy()[b]).max() < 1e-6
    assert (cpu.sharp.numpy()[a] == gpu.sharp.numpy()[b]).mean() > 0.999
    big = voxelize(v, f, 512, device="cuda")
    assert len(big) > 40 * len(cpu)  # the band grows as R^2


# --- dataset folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdf") / "in"
    generate(root, n=6, seed=0, formats=["obj", "stl"])
    (root / "broken").mkdir()
    (root / "broken/nan.obj").write_text("v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n")
    (root / "broken/flat.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    tet_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    tet_f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    (root / "meshgpt.pkl").write_bytes(
        pickle.dumps({"name": ["tet", "bad"], "vertices": [tet_v, tet_v * np.nan], "faces": [tet_f, tet_f]})
    )
    return root


def test_voxelize_folder_writes_the_dataset_format(inputs, tmp_path):
    out = tmp_path / "sdf"
    summary = voxelize_folder(SdfConfig(input=inputs, out=out, resolution=24, val_fraction=0.3, workers=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["meshes"] == 7 and summary["computed"] == 7 and summary["skipped"] == 3
    reasons = {s["path"].split("in/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert "NaN" in reasons["broken/nan.obj"] and "degenerate" in reasons["broken/flat.obj"]
    assert "NaN" in reasons["meshgpt.pkl#bad"]
    assert manifest["counts"]["train"] >= 1 and manifest["counts"]["val"] >= 1
    assert (out / "config.yaml").is_file() and manifest["resolution"] == 24 and manifest["band"] == 3.0

    names = {s: SparseSDFDataset(out, s).names for s in ("train", "val")}
    assert max(names["train"] + names["val"]) == "table/table_00000"
    assert "meshgpt/tet" in names["train"] + names["val"]
    with np.load(out / "train" / f"{names['train'][0]}.npz") as data:
        assert (
            data["coords"].dtype == np.int16
            and data["sdf"].dtype == np.float16
            and data["sharp"].dtype == bool
        )
        assert int(data["resolution"]) == 24 and float(data["band"]) == 3.0
        assert (np.abs(data["sdf"].astype(np.float32)) < 3.0 / 24 + 1e-3).all()
    ds = SparseSDFDataset(out, "train")
    item = ds[0]
    assert item.resolution == 24 and len(item) == len(item.sdf) == len(item.sharp) > 100
    vertices, faces = ds.mesh(0)
    assert np.abs(vertices).max() == pytest.approx(0.45, abs=1e-6)  # fill 0.9 of the unit cube
    # The split follows the content hash of the stored mesh (the tokenizer's rule); at most one mesh
    # moves so that neither split is empty.
    moved = 0
    for split in ("train", "val"):
        data = SparseSDFDataset(out, split)
        for i in range(len(data)):
            moved += is_val(split_key(*data.mesh(i)), 0.3) != (split == "val")
    assert moved <= 1
    # Stored voxels are the voxelisation of the stored mesh.
    again = voxelize(vertices, faces, 24)
    assert torch.equal(again.coords, item.coords)
    assert torch.allclose(again.sdf, item.sdf, atol=1e-3 / 24)


def test_reruns_resume_redo_edited_inputs_and_refuse_other_settings(inputs, tmp_path):
    data, out = tmp_path / "in", tmp_path / "sdf"
    shutil.copytree(inputs, data)
    cfg = SdfConfig(input=data, out=out, resolution=16, workers=2)
    first = voxelize_folder(cfg)
    victim = min(p for p in out.glob("*/*/*.npz") if "chair" not in p.name)
    edited = data / "chair/chair_00001.stl"
    edited.write_bytes(trimesh.creation.box().export(file_type="stl"))
    redone = next(out.glob("*/chair/chair_00001.npz"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz") if p not in (victim, redone)}
    victim.unlink()
    (out / "manifest.json").unlink()  # as after a crash mid-run
    with (out / "config.yaml").open("a") as f:  # as recorded before the device moved to the run context
        f.write("device: auto\n")
    second = voxelize_folder(cfg)
    assert second["computed"] == 2 and second["resumed"] == first["meshes"] - 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished outputs untouched
    assert victim.is_file() and second["meshes"] == first["meshes"]
    assert len(list(out.glob("*/chair/chair_00001.npz"))) == 1  # one copy, whichever split
    dataset = SparseSDFDataset(out, next(out.glob("*/chair/chair_00001.npz")).parts[-3])
    vertices, faces = dataset.mesh(dataset.names.index("chair/chair_00001"))
    assert len(faces) == 12 and np.allclose(np.abs(vertices), 0.45)  # the box that replaced the chair
    with pytest.raises(MeshforgeError, match="resolution 16 -> 32"):
        voxelize_folder(SdfConfig(input=data, out=out, resolution=32, workers=1))


def test_config_validation_and_stage(tmp_path, inputs):
    with pytest.raises(ConfigError, match="band"):
        from_dict(SdfConfig, {"input": "a", "out": "b", "band": 0})
    with pytest.raises(MeshforgeError, match="no mesh files"):
        voxelize_folder(SdfConfig(input=tmp_path, out=tmp_path / "o"))
    from meshforge_plugins.sdf_voxelize import stage

    assert stage.name == "sdf-voxelize" and stage.positional == ("input",) and stage.outputs == ("out",)
    cfg = from_dict(
        stage.config, {"input": str(inputs / "meshgpt.pkl"), "out": str(tmp_path / "d"), "resolution": 16}
    )
    summary = stage.run(cfg, RunContext(device="cpu"))
    assert summary["meshes"] == 1 and summary["skipped"] == 1


def test_meshgpt_pickle_keeps_its_split_and_synset_labels(tmp_path):
    from meshforge.data.latents import mesh_labels
    from tests.data.test_meshio import meshgpt_pickle

    root = tmp_path / "in"
    root.mkdir()
    meshgpt_pickle(root / "processed_data.pkl")
    cfg = SdfConfig(input=root, out=tmp_path / "sdf", resolution=16, band=2.0, workers=1)
    summary = voxelize_folder(cfg)
    manifest = json.loads((tmp_path / "sdf" / "manifest.json").read_text())
    assert (summary["meshes"], summary["train"], summary["val"]) == (4, 3, 1)
    assert manifest["meshes"]["val"] == ["processed_data/03001627_dd04"]
    assert manifest["synsets"] == {"03001627": "chair", "04379243": "table", "09999999": "09999999"}
    assert manifest["classes"] == ["09999999", "chair", "table"]
    labels = mesh_labels(SparseSDFDataset(tmp_path / "sdf", "train"))
    assert labels["processed_data/04379243_bb02"] == "table" and labels["processed_data/03001627_dd04"] == "chair"
    # Re-splitting by content hash moves files without voxelising anything again.
    again = voxelize_folder(from_dict(SdfConfig, {**vars(cfg), "resplit": True}))
    manifest = json.loads((tmp_path / "sdf" / "manifest.json").read_text())
    assert again["computed"] == 0 and manifest["split_source"] == "content hash"
    for split in ("train", "val"):
        data = SparseSDFDataset(tmp_path / "sdf", split)
        on_disk = sorted(f"processed_data/{p.stem}" for p in (tmp_path / "sdf" / split / "processed_data").glob("*.npz"))
        assert on_disk == data.names
    # The hash rule decides each mesh (one may move to val so that val is not empty).
    train = SparseSDFDataset(tmp_path / "sdf", "train")
    assert len(train) >= 3 and not any(is_val(split_key(*train.mesh(i)), 0.05) for i in range(len(train)))


@pytest.mark.skipif(not has_module("point_cloud_utils"), reason="needs point-cloud-utils")
@pytest.mark.parametrize("family", ["table", "chair", "lamp", "shelf"])
def test_point_cloud_utils_signs_equal_the_torch_reference(family):
    """The CPU backend changes only the sign, and the sign only where the winding number is near
    0.5: within a voxel of the surface (w jumps by 1 across it, so away from the surface the
    multipole error of the fast winding number, far below 0.5, cannot flip it). Distances are the
    same computation, so they are bitwise equal."""
    v, f = synth_mesh(family, 0, 1)
    v = framed(v, rotate=(0.3, 0.2, 0.7))
    torch_ref, fast = (voxelize(v, f, 40, sign_backend=b) for b in ("torch", "pcu"))
    assert torch.equal(torch_ref.coords, fast.coords) and torch.equal(torch_ref.sdf.abs(), fast.sdf.abs())
    away = torch_ref.sdf.abs() * 40 > 1.0
    assert torch.equal((torch_ref.sdf < 0)[away], (fast.sdf < 0)[away])
    assert ((torch_ref.sdf < 0) == (fast.sdf < 0)).float().mean() > 0.999
