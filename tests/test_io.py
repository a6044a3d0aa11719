import pytest

from meshforge.io import atomic_path, atomic_write_text, hash_path, remove_stale_temporaries


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_folder_replacement(tmp_path):
    target = tmp_path / "dataset"
    for content in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text(content)
    assert (target / "data.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_hash_path_is_content_based(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.bin").write_bytes(b"123")
    assert hash_path(a) == hash_path(b)
    (b / "x.bin").write_bytes(b"124")
    assert hash_path(a) != hash_path(b)


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".keep.txt.a1b2.tmp").write_text("half")  # a killed atomic_write_text
    (tmp_path / ".step_0000010.c3d4.tmp").mkdir()  # a killed folder write
    (tmp_path / ".step_0000010.c3d4.tmp" / "state.pt").write_text("half")
    (tmp_path / ".step_0000010.old").mkdir()  # killed between the two renames of a replacement
    (tmp_path / ".hidden").write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == 3
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [".hidden", "keep.txt", "sub"]
    assert remove_stale_temporaries(tmp_path / "missing") == 0
