"""Data stages under faults: a full disk, damaged outputs, hostile input file names."""

import contextlib
import errno
import itertools
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from meshforge.data import sdf_voxelize
from meshforge.data.names import file_names, member_name
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.shards import TokenDataset, split_key
from meshforge.data.synth import generate, mesh_bytes, synth_mesh
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.errors import InputError, MeshforgeError
from meshforge.runs import load_recipe, run_recipe


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


N_SHAPES = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "in"
    generate(root, n=N_SHAPES, seed=0, formats=["obj"], max_faces=200)
    return root


def sdf_config(data, out, **kw):
    return SdfConfig(input=data, out=out, resolution=8, band=2.0, workers=1, **kw)


@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory):
    """A finished sparse SDF dataset of ``shapes``; tests work on copies (see :func:`copy_of`)."""
    out = tmp_path_factory.mktemp("finished") / "sdf"
    voxelize_folder(sdf_config(shapes, out))
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "sdf"
    shutil.copytree(finished, out)
    return out


def npz_files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.glob("*/**/*.npz"))


def leftovers(out):
    return sorted(p.name for p in out.rglob(".*"))


@contextlib.contextmanager
def disk_full_after(monkeypatch, outputs: int):
    """Writes of meshes through the voxeliser's atomic path fail with ENOSPC after ``outputs`` of them."""
    real, count = sdf_voxelize.atomic_path, itertools.count()

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            if next(count) >= outputs:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with monkeypatch.context() as m:
        m.setattr(sdf_voxelize, "atomic_path", atomic_path)
        yield


def test_a_full_disk_fails_sdf_voxelize_and_a_rerun_completes_the_dataset(shapes, finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)  # an earlier finished run; then most of it is to be redone
    shutil.rmtree(out / "train")
    with disk_full_after(monkeypatch, outputs=1), pytest.raises(MeshforgeError) as caught:
        voxelize_folder(sdf_config(shapes, out))
    message = one_line(caught.value)
    assert "No space left on device" in message and "re-run to resume" in message
    assert len(npz_files(out)) >= 2 and leftovers(out) == []  # val's mesh(es) and the one that fit
    # Not finished, so nothing vouches for it: neither the earlier manifest nor a partial one.
    with pytest.raises(InputError, match="re-run `meshforge sdf-voxelize` to finish it"):
        SparseSDFDataset(out)
    kept = len(npz_files(out))

    again = voxelize_folder(sdf_config(shapes, out))
    assert again["meshes"] == N_SHAPES and again["skipped"] == 0
    assert again["resumed"] == kept and again["computed"] == N_SHAPES - kept
    assert json.loads((out / "manifest.json").read_text())["skipped"] == []


def test_a_recipe_does_not_mark_a_step_stopped_by_a_full_disk_as_done(shapes, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - stage: sdf-voxelize\n    id: sdf\n    input: {shapes}\n    out: sdf\n"
                      "    resolution: 8\n    band: 2.0\n    workers: 1\n")
    run_dir = tmp_path / "run"
    with disk_full_after(monkeypatch, outputs=1), pytest.raises(MeshforgeError, match="step 'sdf' failed"):
        run_recipe(load_recipe(recipe), run_dir, device="cpu")
    assert json.loads((run_dir / "manifests/sdf.json").read_text())["status"] == "failed"
    assert [r["status"] for r in run_recipe(load_recipe(recipe), run_dir, device="cpu")] == ["done"]
    assert len(SparseSDFDataset(run_dir / "sdf", "train")) + len(SparseSDFDataset(run_dir / "sdf", "val")) == N_SHAPES


def test_a_failure_that_is_not_about_an_input_fails_tokenize_and_leaves_the_dataset(shapes, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    tokenize_folder(TokenizeConfig(input=shapes, out=out, workers=1))
    before = (out / "manifest.json").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("meshforge.data.tokenize.canonicalize", no_space)  # any non-input failure
    with pytest.raises(MeshforgeError) as caught:
        tokenize_folder(TokenizeConfig(input=shapes, out=out, workers=1))
    assert "No space left on device" in one_line(caught.value) and "left unchanged" in str(caught.value)
    assert (out / "manifest.json").read_bytes() == before


def _mount_tmpfs(where, size):
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("mounting a tmpfs is not permitted here")


def test_a_real_full_disk_on_a_small_tmpfs(shapes, finished, tmp_path):
    def pages(path):  # tmpfs counts whole 4 KiB pages per file
        return -(-path.stat().st_size // 4096)

    meshes = sorted(pages(p) for p in finished.rglob("*.npz"))
    small = tmp_path / "small"
    # Room for config.yaml and the two smallest meshes: at least one fits, not all of them.
    _mount_tmpfs(small, 4096 * (pages(finished / "config.yaml") + meshes[0] + meshes[1]))
    total = 4096 * sum(pages(p) for p in finished.rglob("*") if p.is_file())
    try:
        out = small / "sdf"
        with pytest.raises(MeshforgeError) as caught:
            voxelize_folder(sdf_config(shapes, out))
        assert "No space left on device" in one_line(caught.value)
        assert 0 < len(npz_files(out)) < N_SHAPES and leftovers(out) == []
        subprocess.run(["mount", "-o", f"remount,size={2 * total}", str(small)], check=True)
        summary = voxelize_folder(sdf_config(shapes, out))
        assert summary["meshes"] == N_SHAPES and summary["resumed"] > 0 and summary["skipped"] == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_damaged_sdf_output_is_named_and_redone_by_a_rerun(shapes, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    ds = SparseSDFDataset(out, "train")
    victim = out / "train" / f"{ds.names[0]}.npz"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(InputError) as caught:
        ds[0]
    assert str(victim) in one_line(caught.value) and "damaged" in str(caught.value)
    summary = voxelize_folder(sdf_config(shapes, out))
    assert summary["computed"] == 1 and summary["skipped"] == 0
    assert len(SparseSDFDataset(out, "train")[0]) > 0


@pytest.mark.parametrize("name", ["tokens.npy", "index.npy", "names.json"])
@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_truncated_token_shard_is_a_one_line_error(shapes, tmp_path, name, keep):
    out = tmp_path / "tokens"
    tokenize_folder(TokenizeConfig(input=shapes, out=out, workers=1))
    path = out / "train" / name
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(InputError, match="token dataset split") as caught:
        TokenDataset(out, "train")
    one_line(caught.value)


def test_stale_temporaries_of_a_killed_run_are_removed(shapes, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "manifest.json").unlink()
    stale = next(out.glob("*/chair/chair_*.npz"))
    stale.with_name(f".{stale.name}.k3j2h1.tmp").write_bytes(b"half a mesh")
    summary = voxelize_folder(sdf_config(shapes, out))
    assert summary["resumed"] == N_SHAPES and leftovers(out) == []


# --- hostile names ---------------------------------------------------------------------------------

HOSTILE = ["a b.obj", "a_b.obj", "椅子.obj", "桌子.obj", "-rf.obj", "x" * 250 + ".obj", "dup.obj", "dup.ply",
           "dup_obj.obj", "émigré.obj"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "in"
    root.mkdir()
    for i, name in enumerate(HOSTILE):  # every file a different shape, so nothing is a duplicate
        v, f = synth_mesh("chair", 0, i)
        (root / name).write_bytes(mesh_bytes(v, f, name.rsplit(".")[-1]))
    tet_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    tet_f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    (root / "set.pkl").write_bytes(
        pickle.dumps({"name": ["m n", "m_n"], "vertices": [tet_v, tet_v * [1, 2, 3]], "faces": [tet_f, tet_f]})
    )
    return root


def test_names_are_unique_safe_and_stable():
    base = Path("/in")
    files = sorted(base / n for n in HOSTILE)
    names = file_names(files, base)
    assert len(set(names.values())) == len(files)
    assert names[base / "a_b.obj"] == "a_b" and names[base / "dup_obj.obj"] == "dup_obj"  # clean, their own
    assert names[base / "a b.obj"].startswith("a_b-") and names[base / "-rf.obj"].startswith("rf-")
    assert names[base / "dup.obj"] != names[base / "dup.ply"]
    assert all(len(n) < 120 and n.isascii() and not n.startswith(("-", ".")) for n in names.values())
    assert file_names(list(reversed(files)), base) == names  # order does not matter
    assert member_name("set", "m n") != member_name("set", "m_n") == "set/m_n"
    impostor = base / f"{names[base / 'a b.obj']}.obj"  # a file literally named like a suffixed name
    with pytest.raises(MeshforgeError, match="rename one of them"):
        file_names([*files, impostor], base)


def test_sdf_voxelize_keeps_every_mesh_of_hostile_names(hostile, tmp_path):
    out = tmp_path / "sdf"
    summary = voxelize_folder(sdf_config(hostile, out, val_fraction=0.0))
    assert summary["meshes"] == len(HOSTILE) + 2 and summary["skipped"] == 0
    ds = SparseSDFDataset(out, "train")
    assert len(set(ds.names)) == len(ds) == len(npz_files(out)) == len(HOSTILE) + 2
    assert len({split_key(*ds.mesh(i)) for i in range(len(ds))}) == len(ds)  # no mesh twice
    records = json.loads((out / "manifest.json").read_text())["records"]
    assert len({r["source"] for r in records}) == len(records)
    # The same names on a re-run: everything resumes.
    assert voxelize_folder(sdf_config(hostile, out, val_fraction=0.0))["resumed"] == len(HOSTILE) + 2


def test_tokenize_names_are_unique_for_hostile_names(hostile, tmp_path):
    out = tmp_path / "tokens"
    summary = tokenize_folder(TokenizeConfig(input=hostile, out=out, workers=1, val_fraction=0.0))
    ds = TokenDataset(out, "train")
    assert summary["meshes"] == len(ds) == len(set(ds.names)) == len(HOSTILE) + 2
