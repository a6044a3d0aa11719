"""Atomic writes and content hashing.

Every file meshforge writes goes through a temporary file in the same folder followed by
``os.replace``, so a crash or a Ctrl-C never leaves a half-written output where a finished one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and folders alike: whatever the caller creates at the temporary path replaces
    ``path`` in one rename (a folder being replaced is moved aside first, then deleted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path | str) -> int:
    """Delete what :func:`atomic_path` leaves under ``folder`` when its process is killed mid-write
    (``.NAME.XXXX.tmp`` and ``.NAME.old``); returns how many were removed.

    Only call this when no other process is writing into ``folder``: their temporaries look the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [
        p
        for p in folder.rglob(".*")
        if p.name.endswith((".tmp", ".old"))
        # not inside a hidden folder: .git, or a temporary folder that goes as a whole
        and not any(q.name.startswith(".") for q in p.relative_to(folder).parents if q.name)
    ]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path | str, what: str, hint: str = "") -> Any:
    """The JSON document at ``path``; one that cannot be read or parsed is an InputError naming the
    file: ``not a readable {what} ({the error}){hint}``."""
    from meshforge.errors import InputError

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a readable {what} ({error}){hint}") from error


def hash_path(path: Path | str) -> str:
    """Content hash of a file or of a folder's files (names and bytes), independent of mtimes."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            continue
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
