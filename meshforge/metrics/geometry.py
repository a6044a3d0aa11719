"""Geometric metrics on surface point samples: reconstruction and generation quality.

Conventions (stated once, used everywhere):

* Meshes are compared in the normalised space of :func:`meshforge.data.canonical.normalize_vertices`
  (bounding box centred, longest side 1), where every token model and the SDF voxeliser work.
* Surfaces are compared through ``n`` points sampled uniformly by area (seeded, so a metric is a
  pure function of its inputs and seed).
* **Chamfer distance** (CD) is the symmetric sum of mean *squared* nearest-neighbour distances,
  ``mean_a min_b |a-b|^2 + mean_b min_a |a-b|^2``, as in the point-cloud generation literature
  (PointFlow, Yang et al. 2019) whose COV/MMD/1-NNA protocol :func:`coverage_mmd_1nna` follows.
* **F-score** at ``tau`` (default :data:`FSCORE_TAU` = 0.01, i.e. 1% of the unit cube's side, as in
  Tatarchenko et al. 2019): harmonic mean of precision (fraction of predicted points within ``tau``
  of the reference) and recall (the converse). Sampling noise alone keeps it below 1 unless
  ``tau`` is well above the point spacing, about ``sqrt(area / n)``; for unit-size meshes use
  ``n`` of 50k or more with the default ``tau``.
* **Normal consistency**: mean ``|cos|`` between each point's face normal and that of its nearest
  point on the other surface, both ways (Mescheder et al. 2019). Unsigned, because generated and
  reconstructed meshes need not share an orientation convention.

Nearest neighbours are exact: a k-d tree on CPU, chunked ``torch.cdist`` on GPU (bounded memory).
The set-to-set matrices of the generative metrics use batched ``torch.cdist`` on either device.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from meshforge.data.canonical import normalize_vertices
from meshforge.errors import InputError, MeshforgeError

FSCORE_TAU = 0.01
GENERATION_POINTS = 2048  # per shape, as in PointFlow's COV/MMD/1-NNA protocol
CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per cdist call: 64 MB in fp32

Mesh = tuple[np.ndarray, np.ndarray]
Points = np.ndarray | torch.Tensor


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly distributed over the surface, and the unit normal of the face each lies on.

    Faces are drawn with probability proportional to their area, then a uniform point inside
    each (the square-root barycentric trick). Returns float64 ``(points [n,3], normals [n,3])``.
    Raises ``ValueError`` for a mesh without surface area.
    """
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces, dtype=np.int64).reshape(-1, 3)]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    total = area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("cannot sample a surface with no area")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(tri), size=n, p=area / total)
    r1, r2 = rng.random((2, n, 1))
    s = np.sqrt(r1)
    t = tri[chosen]
    points = (1 - s) * t[:, 0] + s * (1 - r2) * t[:, 1] + s * r2 * t[:, 2]
    return points, cross[chosen] / area[chosen, None]


def _as_tensor(x: Points, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.to(device=device or t.device, dtype=torch.float32)


def nearest(a: Points, b: Points) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point of ``a`` [N,3]: the Euclidean distance to its nearest point of ``b`` [M,3], and its index.

    On CPU a k-d tree answers in O(N log M), which keeps 100k-point reconstruction metrics to a
    fraction of a second; on GPU brute force (:func:`nearest_brute_force`) is faster. Both are exact.
    """
    a = _as_tensor(a)
    b = _as_tensor(b, a.device)
    if a.device.type != "cpu":
        return nearest_brute_force(a, b)
    from scipy.spatial import cKDTree

    dist, index = cKDTree(b.double().numpy()).query(a.double().numpy(), workers=-1)
    return torch.from_numpy(dist).float(), torch.from_numpy(index).long()


def nearest_brute_force(a: Points, b: Points) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` by chunked ``torch.cdist`` on the tensors' device (bounded memory)."""
    a = _as_tensor(a)
    b = _as_tensor(b, a.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, len(b)))
    dist, index = [], []
    for chunk in a.split(rows):
        d, i = torch.cdist(chunk, b).min(dim=1)
        dist.append(d)
        index.append(i)
    return torch.cat(dist), torch.cat(index)


def chamfer(a: Points, b: Points) -> float:
    """Chamfer distance: mean squared nearest distance from ``a`` to ``b`` plus from ``b`` to ``a``."""
    return float(nearest(a, b)[0].square().mean() + nearest(b, a)[0].square().mean())


def fscore(pred: Points, ref: Points, tau: float = FSCORE_TAU) -> float:
    """F-score at ``tau`` of predicted points against reference points (0 when either side is 0)."""
    precision = float((nearest(pred, ref)[0] < tau).float().mean())
    recall = float((nearest(ref, pred)[0] < tau).float().mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def normal_consistency(points_a: Points, normals_a: Points, points_b: Points, normals_b: Points) -> float:
    """Mean absolute cosine between the normals of nearest-neighbour pairs, averaged both ways."""
    na = _as_tensor(normals_a)
    nb = _as_tensor(normals_b, na.device)
    ab = (na * nb[nearest(points_a, points_b)[1].to(na.device)]).sum(dim=1).abs().mean()
    ba = (nb * na[nearest(points_b, points_a)[1].to(na.device)]).sum(dim=1).abs().mean()
    return float((ab + ba) / 2)


def reconstruction_metrics(
    pred: Mesh, ref: Mesh, n_points: int = 100_000, seed: int = 0, tau: float = FSCORE_TAU
) -> dict[str, float]:
    """``chamfer``, ``fscore`` and ``normal_consistency`` of a predicted mesh against its reference.

    Both are sampled with ``n_points`` points as they are (callers put them in normalised space).
    """
    pa, na = sample_surface(*pred, n_points, seed)
    pb, nb = sample_surface(*ref, n_points, seed + 1)
    return {
        "chamfer": chamfer(pa, pb),
        "fscore": fscore(pa, pb, tau),
        "normal_consistency": normal_consistency(pa, na, pb, nb),
    }


def _stack(clouds: Sequence[Points], device: torch.device | None) -> torch.Tensor:
    stacked = torch.stack([_as_tensor(c) for c in clouds])
    return stacked.to(device) if device is not None else stacked


def pairwise_chamfer(
    set_a: Sequence[Points], set_b: Sequence[Points], device: torch.device | str | None = None
) -> torch.Tensor:
    """Chamfer distance between every cloud of ``set_a`` and every cloud of ``set_b``: [A,B] (CPU tensor).

    Clouds within a set must have equal sizes (as :func:`sample_surface` gives). Each row is
    computed against the whole of ``set_b`` in batches that bound the distance tensors' memory.
    """
    a = _stack(set_a, torch.device(device) if device is not None else None)
    b = _stack(set_b, a.device)
    per_pair = a.shape[1] * b.shape[1]
    batch = max(1, CHUNK_ELEMENTS // per_pair)
    out = torch.empty(len(a), len(b))
    for i, cloud in enumerate(a):
        row = []
        for part in b.split(batch):
            d = torch.cdist(cloud.expand(len(part), -1, -1), part).square()
            row.append(d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1))
        out[i] = torch.cat(row).cpu()
    return out


def coverage_mmd_1nna(
    gen: Sequence[Points], ref: Sequence[Points], device: torch.device | str | None = None
) -> dict[str, float]:
    """COV, MMD and 1-NNA of generated point clouds against reference clouds, on Chamfer distance.

    * ``cov``: fraction of references that are the nearest reference of some generated shape
      (diversity; 1 is best).
    * ``mmd``: mean over references of the CD to their closest generated shape (fidelity; 0 is best).
    * ``1nna``: leave-one-out accuracy of the 1-nearest-neighbour classifier telling generated from
      reference shapes in their union. 0.5 is ideal (indistinguishable, with equal set sizes);
      1.0 means the sets are disjoint; below 0.5 means samples copy references.
    """
    if len(gen) == 0 or len(ref) == 0:
        raise ValueError("coverage_mmd_1nna needs at least one generated and one reference shape")
    if len(gen) + len(ref) < 3:
        raise ValueError("1-NNA needs at least three shapes in all")
    gr = pairwise_chamfer(gen, ref, device)
    gg = pairwise_chamfer(gen, gen, device)
    rr = pairwise_chamfer(ref, ref, device)
    n_gen = len(gen)
    full = torch.cat([torch.cat([gg, gr], 1), torch.cat([gr.T, rr], 1)], 0)
    full.fill_diagonal_(float("inf"))
    is_gen = torch.arange(len(full)) < n_gen
    correct = is_gen[full.argmin(dim=1)] == is_gen
    return {
        "cov": len(torch.unique(gr.argmin(dim=1))) / len(ref),
        "mmd": float(gr.min(dim=0).values.mean()),
        "1nna": float(correct.float().mean()),
    }


def evaluate_generated(
    meshes: Sequence[Mesh],
    reference_meshes: Sequence[Mesh],
    n_points: int = GENERATION_POINTS,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """COV/MMD/1-NNA of generated meshes against reference meshes, each normalised and sampled.

    Generated meshes without surface (empty, or all faces degenerate) cannot be scored; they are
    left out and counted as ``invalid``, so a reader sees the fraction the metrics ignore.
    """
    gen = [_normalised_cloud(m, n_points, seed + i) for i, m in enumerate(meshes)]
    ref = [_normalised_cloud(m, n_points, seed + len(meshes) + i) for i, m in enumerate(reference_meshes)]
    if any(c is None for c in ref):
        raise MeshforgeError("a reference mesh has no surface area")
    valid = [c for c in gen if c is not None]
    if not valid:
        raise MeshforgeError(f"none of the {len(gen)} generated meshes has a surface to compare")
    if len(valid) + len(ref) < 3:  # 1-NNA's leave-one-out needs a neighbour of each kind to choose from
        raise MeshforgeError(
            f"COV/MMD/1-NNA need at least three shapes in all, here {len(valid)} generated with a surface "
            f"({len(gen) - len(valid)} without) and {len(ref)} reference: sample more or use a larger reference split"
        )
    scores = coverage_mmd_1nna(valid, ref, device)  # type: ignore[arg-type]
    return {
        **scores,
        "generated": len(valid),
        "invalid": len(gen) - len(valid),
        "reference": len(ref),
        "n_points": n_points,
    }


def _normalised_cloud(mesh: Mesh, n: int, seed: int) -> np.ndarray | None:
    """Points on the mesh after normalising its used vertices; None when it has no surface."""
    vertices, faces = mesh
    used, compact = np.unique(np.asarray(faces, dtype=np.int64).reshape(-1, 3), return_inverse=True)
    try:
        v = normalize_vertices(np.asarray(vertices, dtype=np.float64)[used])
        return sample_surface(v, compact.reshape(-1, 3), n, seed)[0]
    except ValueError:  # no faces, zero extent or zero area
        return None


# ---------------------------------------------------------------------------------------------
# `meshforge eval --metric cov-mmd-1nna`: folders in, figures out


def load_sample_folder(folder: Path) -> list[Mesh]:
    """The meshes of a folder written by ``meshforge sample`` (as its ``stats.json`` lists them, one file
    per sample whatever its formats), or else every mesh file in it. Unreadable files count as invalid."""
    from meshforge.data.meshio import MESH_SUFFIXES, load_mesh_file, visible_files
    from meshforge.sample.export import STATS, sample_files

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder of samples")
    if (folder / STATS).is_file():
        try:
            paths = [files[0] for files in sample_files(folder)]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise InputError(folder / STATS, f"not a stats file of `meshforge sample` ({exc})") from None
    else:
        paths = [p for p in visible_files(folder) if p.parent == folder and p.suffix.lower() in MESH_SUFFIXES]
    if not paths:
        raise InputError(folder, "holds no sampled meshes")
    meshes = []
    for path in paths:
        try:
            raw = load_mesh_file(path)
        except InputError:
            meshes.append((np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)))
            continue
        meshes.append((raw.vertices, raw.faces))
    return meshes


def _dataset(data: Path, split: Literal["train", "val"]) -> Any:
    """A token or sparse SDF dataset split (both offer ``mesh(i)``); None for a folder of mesh files."""
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return None
    fmt = json.loads(manifest.read_text()).get("format")
    from meshforge.data import sdf_dataset, shards

    readers = {shards.FORMAT: shards.TokenDataset, sdf_dataset.FORMAT: sdf_dataset.SparseSDFDataset}
    if fmt not in readers:
        raise InputError(manifest, f"unsupported dataset format {fmt!r} (expected {' or '.join(readers)})")
    return readers[fmt](data, split)


def load_reference(data: Path, split: Literal["train", "val"], n: int | None) -> list[Mesh]:
    """The first ``n`` reference meshes: a token or sparse SDF dataset split, or a folder of mesh files."""
    from meshforge.data.meshio import iter_mesh_files, load_meshes

    data = Path(data)
    dataset = _dataset(data, split)
    if dataset is not None:
        count = len(dataset) if n is None else min(n, len(dataset))
        meshes = [dataset.mesh(i) for i in range(count)]
    else:
        meshes = []
        for path in iter_mesh_files(data):
            meshes.extend((m.vertices, m.faces) for m in load_meshes(path))
            if n is not None and len(meshes) >= n:
                break
    if not meshes:
        raise InputError(
            data, f"holds no reference meshes{' in its ' + split + ' split' if dataset is not None else ''}"
        )
    return meshes[:n]


def evaluate_generation(
    samples: Path,
    data: Path,
    split: Literal["train", "val"] = "val",
    n: int | None = None,
    seed: int = 0,
    n_points: int = GENERATION_POINTS,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """COV/MMD/1-NNA of the meshes in ``samples`` against the ``split`` of ``data`` (first ``n`` meshes)."""
    return evaluate_generated(
        load_sample_folder(samples),
        load_reference(data, split, n),
        n_points=n_points,
        seed=seed,
        device=device,
    )
