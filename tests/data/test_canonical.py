import numpy as np
import pytest

from meshforge.data.canonical import Augment, canonicalize, dequantize, normalize_vertices, quantize
from meshforge.data.synth import FAMILIES, synth_mesh
from meshforge.errors import InputError


def assert_canonical(mesh, bits=7):
    v, f = mesh.vertices, mesh.faces
    assert v.min() >= 0 and v.max() < 2**bits
    keys = (v[:, 2] * 2**bits + v[:, 1]) * 2**bits + v[:, 0]
    assert (np.diff(keys) > 0).all(), "vertices strictly sorted by (z, y, x): merged and ordered"
    assert np.array_equal(np.unique(f), np.arange(len(v))), "every vertex used"
    assert (f[:, 0] < f[:, 1]).all() and (f[:, 0] < f[:, 2]).all(), "lowest index first"
    assert (np.lexsort(f.T[::-1]) == np.arange(len(f))).all(), "faces sorted by index triples"
    assert len(np.unique(np.sort(f, axis=1), axis=0)) == len(f), "no duplicate faces"
    p = v[f]
    assert np.any(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]) != 0, axis=1).all(), "no degenerate faces"


def test_normalize_and_quantize_ranges():
    v = np.random.default_rng(0).normal(size=(50, 3)) * [3, 1, 2] + 10
    n = normalize_vertices(v)
    assert n.min() >= -0.5 and n.max() <= 0.5
    assert np.ptp(n, axis=0).max() == pytest.approx(1.0)
    assert (n.min(axis=0) + n.max(axis=0)) == pytest.approx(np.zeros(3))
    q = quantize(n, 7)
    assert q.min() >= 0 and q.max() == 127
    assert np.abs(dequantize(q, 7) - n).max() <= 0.5 / 128 + 1e-12


@pytest.mark.parametrize("family", list(FAMILIES))
def test_canonical_properties_on_every_family(family):
    v, f = synth_mesh(family, 0, 3)
    assert_canonical(canonicalize(v, f))


def test_invariant_to_input_order_rotation_similarity_and_soup():
    v, f = synth_mesh("chair", 0, 1)
    ref = canonicalize(v, f)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(v))
    inv = np.argsort(perm)
    f2 = inv[f][rng.permutation(len(f))]
    f2 = np.roll(f2, 1, axis=1)  # cyclic rotation keeps the winding
    v2 = v[perm] * 3.7 + [1.0, -2.0, 5.0]
    other = canonicalize(v2, f2)
    np.testing.assert_array_equal(other.vertices, ref.vertices)
    np.testing.assert_array_equal(other.faces, ref.faces)
    # An STL-style triangle soup (no shared vertices) canonicalises to the same indexed mesh.
    soup = canonicalize(v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3))
    np.testing.assert_array_equal(soup.faces, ref.faces)


def test_winding_preserved_and_duplicates_and_degenerates_dropped():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1e-4, 0, 0]], float)
    faces = np.array([[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 1, 3], [0, 4, 2], [0, 0, 1]])
    mesh = canonicalize(v, faces)
    # [2,1,0] duplicates [0,1,2] (reverse winding), [1,2,0] is the same face rotated; vertex 4 merges
    # into vertex 0 so [0,4,2] is degenerate; [0,0,1] is degenerate.
    assert mesh.num_faces == 2
    normals = {tuple(np.sign(np.cross(*(mesh.vertices[f[1:]] - mesh.vertices[f[0]])))) for f in mesh.faces}
    assert normals == {(0, 0, 1), (0, -1, 0)}  # +z for (0,1,2), -y for (0,1,3): original windings
    assert sorted(mesh.face_source.tolist()) == [0, 3]


def test_augmentation_changes_tokens_keeps_validity():
    v, f = synth_mesh("table", 0, 2)
    plain = canonicalize(v, f)
    aug = canonicalize(v, f, augment=Augment(), rng=np.random.default_rng(1))
    assert_canonical(aug)
    assert aug.num_faces <= len(f)
    assert not (aug.vertices.shape == plain.vertices.shape and np.array_equal(aug.vertices, plain.vertices))
    again = canonicalize(v, f, augment=Augment(), rng=np.random.default_rng(1))
    np.testing.assert_array_equal(again.vertices, aug.vertices)
    # The longest side still spans the full grid; nothing is clipped off the cube.
    assert np.ptp(aug.vertices, axis=0).max() == 127


def test_no_surviving_face_raises():
    v = np.array([[0, 0, 0], [1, 0, 0], [0.5, 0, 0]], float)  # collinear: zero area on the grid
    with pytest.raises(InputError, match="no face survives"):
        canonicalize(v, np.array([[0, 1, 2]]))
    with pytest.raises(InputError, match="zero or non-finite extent"):
        canonicalize(np.zeros((3, 3)), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError):
        Augment(scale_min=1.2, scale_max=0.8)
