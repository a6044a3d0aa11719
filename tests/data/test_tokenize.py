import gzip
import json
import pickle
import shutil

import numpy as np
import pytest
import trimesh

from meshforge.data.canonical import Augment, canonicalize
from meshforge.data.shards import TokenDataset, is_val, split_key
from meshforge.data.synth import generate
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.data.tokens import Vocab, collate_tokens, decode_tokens, encode_mesh
from meshforge.errors import MeshforgeError
from meshforge.stages import RunContext

BROKEN = {
    "broken/truncated.obj": "v 0 0 0\nv 1 0 0\nv 0 1",
    "broken/nan.obj": "v 0 0 0\nv 1 0 nan\nv 0 1 0\nf 1 2 3\n",
    "broken/empty.obj": "",
    "broken/notes.txt": "not a mesh",
    "broken/flat.obj": "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n",
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """16 good synth meshes in four formats, a pickle of parallel lists, broken files, a duplicate, a texture."""
    root = tmp_path_factory.mktemp("mixed") / "in"
    generate(root, n=16, seed=0, formats=["obj", "ply", "stl", "off"])
    for rel, text in BROKEN.items():
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_text(text)
    (root / "broken/big.obj").write_bytes(
        trimesh.creation.icosphere(subdivisions=3).export(file_type="obj").encode()
    )
    (root / "broken/texture.png").write_bytes(b"\x89PNG")
    (root / "copies").mkdir()
    shutil.copy(root / "chair/chair_00001.ply", root / "copies/chair.ply")
    tet_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    tet_f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    prism_v = np.concatenate([tet_v[:3], tet_v[:3] + [0, 0, 2]])
    prism_f = [[0, 2, 1], [3, 4, 5], [0, 1, 4, 3], [1, 2, 5, 4], [2, 0, 3, 5]]
    (root / "meshgpt.pkl").write_bytes(
        pickle.dumps(
            {
                "name": ["tet", "prism", "bad"],
                "vertices": [tet_v, prism_v, tet_v * np.nan],
                "faces": [tet_f, prism_f, tet_f],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def dataset(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "tokens"
    summary = tokenize_folder(TokenizeConfig(input=mixed, out=out, val_fraction=0.25, workers=2))
    return out, summary


def test_mixed_folder_writes_dataset_and_records_every_skip(dataset, mixed):
    out, summary = dataset
    assert summary["meshes"] == 18 and summary["train"] + summary["val"] == 18 and summary["val"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["path"].replace(str(mixed) + "/", ""): s["reason"] for s in manifest["skipped"]}
    assert len(reasons) == manifest["counts"]["skipped"] == 8
    assert "unreadable" in reasons["broken/truncated.obj"] or "no faces" in reasons["broken/truncated.obj"]
    assert "NaN" in reasons["broken/nan.obj"]
    assert reasons["broken/empty.obj"] == "empty file"
    assert "not a mesh file" in reasons["broken/notes.txt"]
    assert "zero surface area" in reasons["broken/flat.obj"]
    assert "more than max_faces=800" in reasons["broken/big.obj"]
    assert reasons["copies/chair.ply"] == "duplicate of chair/chair_00001 (identical canonical mesh)"
    assert "NaN" in reasons["meshgpt.pkl#bad"]
    assert manifest["bits"] == 7 and manifest["vocab"]["size"] == 131
    assert manifest["augment"] == {"scale_min": 0.75, "scale_max": 1.25, "shift": 0.1}
    assert manifest["classes"] == sorted(
        ["table", "chair", "shelf", "lamp", "stool", "cabinet", "bench", "desk"]
    )
    assert (out / "config.yaml").is_file()


def test_shards_are_memory_mapped_and_consistent(dataset):
    out, _ = dataset
    names = []
    vocab = Vocab(7)
    for split in ("train", "val"):
        tokens = np.load(out / split / "tokens.npy", mmap_mode="r")
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8
        index = np.load(out / split / "index.npy")
        assert index.shape[1] == 6 and (index[:, 5] == 9 * index[:, 3]).all()
        ds = TokenDataset(out, split)
        names += ds.names
        for i in range(len(ds)):
            vertices, faces = ds.mesh(i)
            assert vertices.dtype == np.float32 and np.abs(vertices).max() <= 0.5
            stored = ds[i]
            # Stored tokens are exactly the canonical tokens of the stored geometry.
            np.testing.assert_array_equal(stored, encode_mesh(canonicalize(vertices, faces)))
            assert len(stored) == 9 * len(faces) and len(faces) <= 800
            np.testing.assert_array_equal(encode_mesh(decode_tokens(stored, vocab)), stored)
            if ds.names[i].startswith("chair/"):
                assert ds.labels[i] == "chair" and ds.classes[ds.label_index(i)] == "chair"
            if ds.names[i].startswith("meshgpt/"):
                assert ds.labels[i] is None
    assert len(set(names)) == 18 and {"meshgpt/tet", "meshgpt/prism"} <= set(names)


def test_split_is_by_content_and_deterministic(dataset, mixed, tmp_path):
    out, _ = dataset
    val = TokenDataset(out, "val")
    for i in range(len(val)):
        assert is_val(split_key(*val.mesh(i)), 0.25)
    # A second run on a subset: byte-identical arrays for the meshes kept, same split for each.
    subset = tmp_path / "subset"
    shutil.copytree(
        mixed, subset, ignore=shutil.ignore_patterns("broken", "copies", "meshgpt.pkl", "*_0000[0-3].*")
    )
    tokenize_folder(TokenizeConfig(input=subset, out=tmp_path / "again", val_fraction=0.25, workers=1))
    for split in ("train", "val"):
        full, part = TokenDataset(out, split), TokenDataset(tmp_path / "again", split)
        assert set(part.names) <= set(full.names)
        for i, name in enumerate(part.names):
            np.testing.assert_array_equal(part[i], full[full.names.index(name)])


def test_augmented_items_are_valid_reproducible_and_varied(dataset):
    out, _ = dataset
    vocab = Vocab(7)
    ds = TokenDataset(out, "train", augment=Augment(), seed=3)
    plain = TokenDataset(out, "train")
    first = ds[0]
    assert not np.array_equal(first, plain[0])
    np.testing.assert_array_equal(first, TokenDataset(out, "train", augment=Augment(), seed=3)[0])
    ds.set_epoch(1)
    assert not np.array_equal(ds[0], first)
    for i in range(len(ds)):
        tokens = ds[i]
        assert tokens.max() < vocab.levels and len(tokens) // 9 <= len(plain.mesh(i)[1])
        np.testing.assert_array_equal(encode_mesh(decode_tokens(tokens, vocab)), tokens)
    x, y = collate_tokens([ds[i] for i in range(4)], vocab)
    assert x.shape == y.shape and x.shape[1] % 9 == 0
    # Another resolution re-canonicalises from the stored geometry.
    assert TokenDataset(out, "train", bits=8)[0].max() >= 128


def test_nothing_usable_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for rel, text in BROKEN.items():
        (root / rel.split("/")[1]).write_text(text)
    with pytest.raises(MeshforgeError, match="no usable mesh among 4 files"):
        tokenize_folder(TokenizeConfig(input=root, out=tmp_path / "out", workers=1))
    assert not (tmp_path / "out").exists()
    with pytest.raises(MeshforgeError, match="no such file"):
        tokenize_folder(TokenizeConfig(input=tmp_path / "missing", out=tmp_path / "out"))


def test_stages_run_through_the_plugin_protocol(tmp_path):
    from meshforge_plugins.synth import stage as synth
    from meshforge_plugins.tokenize import stage as tokenize

    from meshforge.config import from_dict

    synth.run(from_dict(synth.config, {"out": str(tmp_path / "s"), "n": 8}), RunContext(seed=5))
    summary = tokenize.run(
        from_dict(tokenize.config, {"input": str(tmp_path / "s"), "out": str(tmp_path / "d"), "workers": 1}),
        RunContext(),
    )
    assert summary["meshes"] == 8 and summary["skipped"] == 0
    assert tokenize.positional == ("input",) and tokenize.outputs == ("out",) and synth.outputs == ("out",)


def test_meshgpt_pickle_keeps_its_split_and_labels_by_synset(tmp_path):
    from tests.data.test_meshio import meshgpt_pickle

    root = tmp_path / "shapenet"
    root.mkdir()
    meshgpt_pickle(root / "processed_data.pkl")
    summary = tokenize_folder(TokenizeConfig(input=root, out=tmp_path / "ds", workers=1))
    assert (summary["meshes"], summary["train"], summary["val"], summary["skipped"]) == (4, 3, 1, 0)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["synsets"] == {"03001627": "chair", "04379243": "table", "09999999": "09999999"}
    assert manifest["classes"] == ["09999999", "chair", "table"]
    assert manifest["split_source"] == "the source's own train/val split"
    val = TokenDataset(tmp_path / "ds", "val")
    assert val.names == ["processed_data/03001627_dd04"] and val.labels == ["chair"]
    train = TokenDataset(tmp_path / "ds", "train")
    assert dict(zip(train.names, train.labels)) == {
        "processed_data/03001627_aa01": "chair",
        "processed_data/04379243_bb02": "table",
        "processed_data/09999999_cc03": "09999999",
    }
    # --resplit: the content hash decides (a val fraction of 0 puts everything in train).
    tokenize_folder(TokenizeConfig(input=root, out=tmp_path / "re", workers=1, resplit=True, val_fraction=0))
    assert len(TokenDataset(tmp_path / "re", "train")) == 4 and len(TokenDataset(tmp_path / "re", "val")) == 0


def test_meshanything_npz_is_split_by_hash(tmp_path):
    root = tmp_path / "ma"
    root.mkdir()
    shapes = [trimesh.creation.box(), trimesh.creation.icosphere(subdivisions=1), trimesh.creation.cone(0.5, 1, 8)]
    items = np.empty(len(shapes), dtype=object)
    items[:] = [{"vertices": np.asarray(m.vertices), "faces": np.asarray(m.faces)} for m in shapes]
    np.savez(root / "train.npz", npz_list=items)
    summary = tokenize_folder(TokenizeConfig(input=root, out=tmp_path / "ds", workers=1, val_fraction=0.3))
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert summary["meshes"] == 3 and summary["train"] >= 1 and summary["val"] >= 1
    assert manifest["split_source"] == "content hash" and manifest["classes"] == [] and manifest["synsets"] == {}
    val = TokenDataset(tmp_path / "ds", "val")
    for i in range(len(val)):  # the hash rule, or the one mesh moved to fill val
        assert is_val(split_key(*val.mesh(i)), 0.3) or summary["val"] == 1


def test_tokenize_and_sdf_voxelize_find_and_skip_the_same_files(tmp_path):
    from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder

    root = tmp_path / "in"
    root.mkdir()
    (root / "box.obj.gz").write_bytes(gzip.compress(trimesh.creation.box().export(file_type="obj").encode()))
    (root / "cone.obj").write_text(trimesh.creation.cone(0.5, 1, 8).export(file_type="obj"))
    (root / "notes.txt").write_text("not a mesh")
    (root / "loop").symlink_to(root, target_is_directory=True)
    tokens = tokenize_folder(TokenizeConfig(input=root, out=tmp_path / "tok", workers=1))
    sdf = voxelize_folder(SdfConfig(input=root, out=tmp_path / "sdf", resolution=16, band=2.0, workers=1), "cpu")
    skipped = {
        name: sorted(s["path"] for s in json.loads((tmp_path / name / "manifest.json").read_text())["skipped"])
        for name in ("tok", "sdf")
    }
    assert tokens["meshes"] == sdf["meshes"] == 2
    assert skipped["tok"] == skipped["sdf"] == [str(root / "loop"), str(root / "notes.txt")]
