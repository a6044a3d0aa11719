"""Face tokens: the one vocabulary and sequence layout every token model and sampler uses.

Vocabulary (``Vocab(bits)``, ``L = 2**bits`` quantisation levels)::

    0 .. L-1   coordinate tokens (a quantised coordinate)
    L          PAD    (right padding; never a training target)
    L + 1      START  (first input position)
    L + 2      END    (after the last face)
    size = L + 3      (131 for the default 7 bits)

A face is 9 tokens: its three vertices in face order, each vertex as (z, y, x). A mesh is its
canonical faces in canonical order (see :mod:`meshforge.data.canonical`), ``9F`` tokens.

Training sequences, for a mesh with F faces::

    S (targets) = [9F coordinate tokens, END, PAD x 8]      length 9(F + 1)
    X (inputs)  = [START] + S[:-1]

Position ``t`` of X predicts ``S[t]``. Keeping every length a multiple of 9 lets hourglass models
pool tokens -> vertices -> faces (by 3, then 3) without ragged ends; the 8 PADs after END are
never targets. Batches right-pad X and S with PAD to a common multiple of 9.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meshforge.data.canonical import CanonicalMesh, from_quantized

TOKENS_PER_VERTEX = 3
TOKENS_PER_FACE = 9


@dataclass(frozen=True)
class Vocab:
    bits: int = 7

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 14:
            raise ValueError(f"bits must be in [2, 14], got {self.bits}")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def pad(self) -> int:
        return self.levels

    @property
    def start(self) -> int:
        return self.levels + 1

    @property
    def end(self) -> int:
        return self.levels + 2

    @property
    def size(self) -> int:
        return self.levels + 3

    @property
    def storage_dtype(self) -> np.dtype:
        """The smallest dtype that holds every coordinate token (for token shards)."""
        return np.dtype(np.uint8) if self.levels <= 256 else np.dtype(np.int16)


def encode_mesh(mesh: CanonicalMesh) -> np.ndarray:
    """The ``9F`` coordinate tokens of a canonical mesh (int64)."""
    zyx = np.asarray(mesh.vertices, dtype=np.int64)[:, ::-1]
    return zyx[np.asarray(mesh.faces, dtype=np.int64)].reshape(-1)


def target_sequence(coords: np.ndarray, vocab: Vocab) -> np.ndarray:
    """S = [coords, END, PAD x 8]; ``coords`` must be whole faces."""
    coords = np.asarray(coords, dtype=np.int64)
    if len(coords) % TOKENS_PER_FACE:
        raise ValueError(f"{len(coords)} coordinate tokens is not a whole number of faces")
    tail = np.full(TOKENS_PER_FACE, vocab.pad, dtype=np.int64)
    tail[0] = vocab.end
    return np.concatenate([coords, tail])


def input_sequence(targets: np.ndarray, vocab: Vocab) -> np.ndarray:
    """X = [START] + S[:-1]."""
    targets = np.asarray(targets, dtype=np.int64)
    return np.concatenate([np.array([vocab.start], dtype=np.int64), targets[:-1]])


def decode_tokens(tokens: np.ndarray, vocab: Vocab) -> CanonicalMesh:
    """Tokens (coordinates, optionally followed by END/PAD) -> canonical mesh.

    Reading stops at the first non-coordinate token (END, or PAD/START that a model should not
    have produced); an incomplete trailing face is dropped. Vertices with equal coordinates are
    merged, degenerate and duplicate faces dropped, and everything put in canonical order, so the
    result is exactly the encoded mesh for any canonical input.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    special = np.flatnonzero((tokens < 0) | (tokens >= vocab.levels))
    stop = int(special[0]) if len(special) else len(tokens)
    whole = stop - stop % TOKENS_PER_FACE
    zyx = tokens[:whole].reshape(-1, TOKENS_PER_VERTEX)
    corners = zyx[:, ::-1]  # one row per face corner, (x, y, z)
    faces = np.arange(len(corners), dtype=np.int64).reshape(-1, 3)
    return from_quantized(corners, faces, vocab.bits)


def allowed_next(position: int, vocab: Vocab, ended: bool = False) -> np.ndarray:
    """Boolean mask over the vocabulary of tokens allowed at position ``position`` of S.

    Coordinates are allowed anywhere before END; END only at a face boundary after at least one
    face; once ``ended``, only PAD. START and PAD never appear in S before END.
    """
    mask = np.zeros(vocab.size, dtype=bool)
    if ended:
        mask[vocab.pad] = True
        return mask
    mask[: vocab.levels] = True
    if position > 0 and position % TOKENS_PER_FACE == 0:
        mask[vocab.end] = True
    return mask


def bucketed_length(length: int) -> int:
    """``length`` tokens rounded up to whole faces, and the faces up to a number with at most 4
    significant bits (1-16, 18, 20, ..., 32, 36, 40, ...: 8 steps per octave past 16).

    A batch then pads by at most an eighth of its longest sequence, and a training run meets a few
    dozen sequence lengths instead of hundreds: kernels that plan or specialise per shape (SDPA's
    cuDNN backend, Triton, the CUDA caching allocator) pay for each length once.
    """
    faces = -(-length // TOKENS_PER_FACE)
    shift = max(faces.bit_length() - 4, 0)
    return TOKENS_PER_FACE * (-(-faces >> shift) << shift)


def collate_tokens(
    sequences: list[np.ndarray], vocab: Vocab, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-token arrays -> (inputs, targets) LongTensors [B, L], PAD after each sequence.

    L is the longest target sequence rounded up by :func:`bucketed_length` (a multiple of 9), and
    at most ``max_len``. With ``max_len`` (rounded down to a multiple of 9) longer sequences keep
    their first faces only; their END is then not seen, which is the right signal for a prefix.
    """
    if not sequences:
        raise ValueError("collate_tokens needs at least one sequence")
    if max_len is not None:
        max_len -= max_len % TOKENS_PER_FACE
        if max_len <= 0:
            raise ValueError("max_len must be at least 9 (one face)")
    targets = [target_sequence(s, vocab) for s in sequences]
    if max_len is not None:
        targets = [t[:max_len] for t in targets]
    length = bucketed_length(max(len(t) for t in targets))
    if max_len is not None:
        length = min(length, max_len)
    x = torch.full((len(targets), length), vocab.pad, dtype=torch.long)
    y = torch.full((len(targets), length), vocab.pad, dtype=torch.long)
    for i, t in enumerate(targets):
        y[i, : len(t)] = torch.from_numpy(t)
        x[i, : len(t)] = torch.from_numpy(input_sequence(t, vocab))
    return x, y
