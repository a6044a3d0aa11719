"""Token datasets on disk: flat memory-mappable arrays per split, and the training-side reader.

Layout of a dataset folder (written by :func:`meshforge.data.tokenize.tokenize_folder`)::

    manifest.json   counts, skipped files and reasons, bits, max_faces, augmentation, classes, config
    config.yaml     the TokenizeConfig that produced it
    train/ val/     vertices.npy  float32 [total_V, 3]  normalised geometry (not quantised)
                    faces.npy     int32   [total_F, 3]  indices local to each mesh
                    tokens.npy    uint8 (int16 above 8 bits) [total_T]  canonical coordinate tokens
                    index.npy     int64   [N, 6]  vertex off, vertex count, face off, face count,
                                                  token off, token count
                    names.json    [N] mesh names (input-relative, without suffix)
                    labels.json   [N] class label of each mesh, or null

The stored geometry is exactly the part of each mesh that survives canonicalisation, and the
stored tokens are ``encode_mesh(canonicalize(geometry))``: re-canonicalising with augmentation
can only merge faces, so an augmented mesh never exceeds the dataset's ``max_faces``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from meshforge.data.canonical import Augment, canonicalize
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import READ_ERRORS, InputError, MeshforgeError

SPLITS = ("train", "val")
FORMAT = "meshforge-tokens/1"
INDEX_COLUMNS = ("vertex_offset", "vertex_count", "face_offset", "face_count", "token_offset", "token_count")
SPLIT_BITS = 7  # the split key is computed at a fixed resolution so every dataset kind agrees


@dataclass
class MeshRecord:
    """One tokenised mesh before it is packed into a split."""

    name: str
    source: str  # the input file (``file#member`` inside a collection), for the manifest
    vertices: np.ndarray  # float32 [V,3] normalised
    faces: np.ndarray  # int32 [F,3]
    tokens: np.ndarray  # canonical coordinate tokens
    split_key: str  # content hash deciding train/val
    source_split: Literal["train", "val"] | None = None  # the split the source gave it, if any
    category: str | None = None  # the category the source gave it, if any
    label: str | None = None


def split_key(vertices: np.ndarray, faces: np.ndarray) -> str:
    """Content hash of a mesh's canonical 7-bit form: identical shapes get identical keys.

    Used for the train/val split of every dataset kind (tokens, sparse SDF), so one mesh lands in
    the same split everywhere and duplicates can never straddle train and val.
    """
    tokens = encode_mesh(canonicalize(vertices, faces, bits=SPLIT_BITS)).astype(np.uint8)
    return hashlib.sha256(tokens.tobytes()).hexdigest()


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split: the key's leading 64 bits as a fraction of 2**64, against ``val_fraction``."""
    return int(key[:16], 16) / 2.0**64 < val_fraction


def assign_splits(
    keys: list[str], val_fraction: float, fixed: list[Literal["train", "val"] | None] | None = None
) -> list[Literal["train", "val"]]:
    """Per-key split; with at least two meshes and ``val_fraction > 0`` neither split is left empty
    (the smallest key goes to val, or the largest to train), so small datasets stay usable.

    ``fixed`` holds the splits a source already gave its meshes (MeshGPT's train/val lists), kept
    as they are: the hash rule decides only the others, and only those are moved to fill a split.
    """
    fixed = fixed or [None] * len(keys)
    splits: list[Literal["train", "val"]] = [
        f or ("val" if is_val(k, val_fraction) else "train") for k, f in zip(keys, fixed)
    ]
    free = [i for i, f in enumerate(fixed) if f is None]
    if len(keys) >= 2 and val_fraction > 0 and free:
        if "val" not in splits:
            splits[min(free, key=keys.__getitem__)] = "val"
        if "train" not in splits:
            splits[max(free, key=keys.__getitem__)] = "train"
    return splits


def split_source(fixed: list[str | None]) -> str:
    """How a dataset's meshes were split (given the ``fixed`` splits of :func:`assign_splits`), for manifests."""
    given = sum(f is not None for f in fixed)
    if given == 0:
        return "content hash"
    return "the source's own train/val split" + ("" if given == len(fixed) else " + content hash for the rest")


def write_split(folder: Path, records: list[MeshRecord], vocab: Vocab) -> dict[str, int]:
    """Pack records into ``folder`` (which the caller renames into place atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    v_counts = np.array([len(r.vertices) for r in records], dtype=np.int64)
    f_counts = np.array([len(r.faces) for r in records], dtype=np.int64)
    t_counts = np.array([len(r.tokens) for r in records], dtype=np.int64)
    index = np.zeros((len(records), 6), dtype=np.int64)
    for col, counts in ((0, v_counts), (2, f_counts), (4, t_counts)):
        index[:, col] = np.cumsum(counts) - counts
        index[:, col + 1] = counts

    def cat(arrays: list[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    np.save(folder / "vertices.npy", cat([r.vertices for r in records], (0, 3), np.dtype(np.float32)))
    np.save(folder / "faces.npy", cat([r.faces for r in records], (0, 3), np.dtype(np.int32)))
    np.save(folder / "tokens.npy", cat([r.tokens for r in records], (0,), vocab.storage_dtype))
    np.save(folder / "index.npy", index)
    (folder / "names.json").write_text(json.dumps([r.name for r in records]) + "\n")
    (folder / "labels.json").write_text(json.dumps([r.label for r in records]) + "\n")
    return {"meshes": len(records), "faces": int(f_counts.sum()), "tokens": int(t_counts.sum())}


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            root, "not a token dataset (no manifest.json; create one with `meshforge tokenize`)"
        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(path, f"unsupported dataset format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


class TokenDataset:
    """Memory-mapped token dataset split; items are coordinate-token arrays (int64).

    Without ``augment`` (and at the stored ``bits``) items are the stored canonical tokens. With
    ``augment`` each item is re-canonicalised from the stored geometry with a random scale/shift
    drawn from ``(seed, epoch, index)``, so data order and augmentation are reproducible and
    resumable (call :meth:`set_epoch` each epoch). A different ``bits`` than the stored one also
    re-canonicalises, so one dataset serves several resolutions.
    """

    def __init__(
        self,
        root: Path,
        split: Literal["train", "val"] = "train",
        augment: Augment | None = None,
        bits: int | None = None,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise MeshforgeError(f"unknown split {split!r} (expected train or val)")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.stored_bits = int(self.manifest["bits"])
        self.bits = self.stored_bits if bits is None else bits
        self.vocab = Vocab(self.bits)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        folder = self.root / split
        try:
            self._vertices = np.load(folder / "vertices.npy", mmap_mode="r")
            self._faces = np.load(folder / "faces.npy", mmap_mode="r")
            self._tokens = np.load(folder / "tokens.npy", mmap_mode="r")
            self._index = np.load(folder / "index.npy")
            self.names: list[str] = json.loads((folder / "names.json").read_text())
            self.labels: list[str | None] = json.loads((folder / "labels.json").read_text())
        except READ_ERRORS as exc:
            raise InputError(folder, f"incomplete or damaged token dataset split ({type(exc).__name__}: {exc})") from None
        self.classes: list[str] = list(self.manifest.get("classes", []))

    def __len__(self) -> int:
        return len(self._index)

    def face_counts(self) -> np.ndarray:
        """Stored faces of every mesh (int64 [N]): what its token sequence length is made of."""
        return self._index[:, 3].copy()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mesh(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised geometry of mesh ``i``: vertices float32 [V,3], faces int64 [F,3]."""
        v_off, v_n, f_off, f_n, _, _ = self._index[i]
        return np.asarray(self._vertices[v_off : v_off + v_n]), np.asarray(
            self._faces[f_off : f_off + f_n], np.int64
        )

    def stored_tokens(self, i: int) -> np.ndarray:
        _, _, _, _, t_off, t_n = self._index[i]
        return np.asarray(self._tokens[t_off : t_off + t_n], dtype=np.int64)

    def tokens(self, i: int, epoch: int | None = None) -> np.ndarray:
        if self.augment is None and self.bits == self.stored_bits:
            return self.stored_tokens(i)
        vertices, faces = self.mesh(i)
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, i])
        try:
            return encode_mesh(
                canonicalize(vertices, faces, self.bits, self.augment, rng=rng, name=self.names[i])
            )
        except InputError:
            # An extreme scale can collapse a thin mesh entirely; the stored form is always valid.
            if self.bits != self.stored_bits:
                raise
            return self.stored_tokens(i)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.tokens(i % len(self))

    def label_index(self, i: int) -> int | None:
        """Class id of mesh ``i`` (position of its label in ``classes``), ``None`` when unlabelled."""
        label = self.labels[i]
        return self.classes.index(label) if label is not None else None
