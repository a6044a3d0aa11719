import json

import numpy as np
import pytest

from meshforge.data.meshio import iter_mesh_files, load_meshes
from meshforge.data.synth import FAMILIES, generate, synth_mesh


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_meshes_are_valid_closed_and_deterministic(family):
    counts = set()
    for i in range(6):
        v, f = synth_mesh(family, seed=0, index=i)
        assert np.isfinite(v).all() and v.shape[1] == 3
        assert 20 <= len(f) <= 800 and f.min() >= 0 and f.max() < len(v)
        tri = v[f]
        area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1) / 2
        assert (area > 1e-9).all()
        # Every part is closed with outward winding, so the signed volume is positive.
        volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
        assert volume > 0
        assert v[:, 1].min() == pytest.approx(0, abs=0.05)  # stands on the floor (y up)
        counts.add(len(f))
        v2, f2 = synth_mesh(family, seed=0, index=i)
        np.testing.assert_array_equal(v, v2)
        np.testing.assert_array_equal(f, f2)
    assert len(counts) > 1, "part counts should vary within a family"
    v3, _ = synth_mesh(family, seed=1, index=0)
    assert not np.array_equal(v3, synth_mesh(family, seed=0, index=0)[0])


def test_generate_writes_labelled_loadable_files(tmp_path):
    summary = generate(tmp_path / "synth", n=16, seed=0, formats=["obj", "ply", "stl", "off"])
    assert summary["meshes"] == 16 and set(summary["families"]) == set(FAMILIES)
    labels = json.loads((tmp_path / "synth" / "labels.json").read_text())
    files = iter_mesh_files(tmp_path / "synth")
    assert len(files) == 16 and {p.suffix for p in files} == {".obj", ".ply", ".stl", ".off"}
    for path in files:
        rel = path.relative_to(tmp_path / "synth").as_posix()
        assert labels[rel] == path.parent.name
        (mesh,) = load_meshes(path)
        assert len(mesh.faces) >= 20
    # Mesh i depends only on (seed, i): a larger dataset starts with the same files.
    generate(tmp_path / "more", n=20, seed=0, formats=["obj", "ply", "stl", "off"])
    first = min(files).relative_to(tmp_path / "synth")
    assert (tmp_path / "more" / first).read_bytes() == (tmp_path / "synth" / first).read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # written aside and renamed
