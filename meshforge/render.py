"""Headless CPU rendering: meshes to PNG grids, result tables to PNG. No display, no OpenGL.

Meshes are drawn by a small z-buffer rasteriser in NumPy: a fixed three-quarter orthographic
camera (Y up, as in ShapeNet and the synth data), flat per-face normals and Lambert shading from
a light over the viewer's left shoulder. Each mesh is scaled to fill its tile, so a grid shows
shapes rather than their sizes.

Shading is two-sided: generated meshes often have inconsistent windings, and a mesh that turned
black wherever a normal pointed away would hide its shape. Faces seen from their back are tinted
warm instead, so flipped windings and holes into the interior stay visible in a preview.

Rasterisation is vectorised over every (triangle, pixel in its bounding box) pair, in chunks that
bound memory, with depth resolved by sorting; 16 meshes of 4k faces render in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meshforge.io import atomic_path

Mesh = tuple[np.ndarray, np.ndarray]  # vertices float [V,3], faces int [F,3]

AZIMUTH_DEG = 40.0  # around the up axis, from +Z towards +X
ELEVATION_DEG = 25.0  # above the horizon, looking down
LIGHT = np.array([-0.2, 0.4, 1.0]) / np.linalg.norm([-0.2, 0.4, 1.0])  # view space, towards the light
AMBIENT = 0.3
FRONT_COLOR = np.array([0.55, 0.68, 0.85])
BACK_COLOR = np.array([0.90, 0.62, 0.45])
HIGHLIGHT_COLOR = np.array([0.45, 0.75, 0.40])
MARGIN = 0.06  # of the tile, on every side
CHUNK = 1 << 20  # (triangle, pixel) candidates per rasterisation chunk: ~50 MB of temporaries
LABEL_PX = 18
DPI = 100


def view_rotation(azimuth_deg: float = AZIMUTH_DEG, elevation_deg: float = ELEVATION_DEG) -> np.ndarray:
    """Rows are the camera's right, up and backward axes in world space (so view z points at the viewer)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    back = np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    right = np.cross([0.0, 1.0, 0.0], back)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(back, right), back])


def _drawable(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vertices, faces, kept)``: faces with out-of-range indices or non-finite corners, which cannot
    be drawn, dropped; ``kept`` is the boolean mask of the input faces that remain."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    kept = np.all((f >= 0) & (f < len(v)), axis=1)
    kept[kept] = np.all(np.isfinite(v[f[kept]]), axis=(1, 2))
    return v, f[kept], kept


def rasterize(corners: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer of triangles already in pixel space.

    ``corners`` is float [F,3,3]: per corner (column, row, closeness), rows growing downwards and
    larger closeness nearer the viewer. A pixel is covered when its centre lies inside (or on an edge
    of) a triangle. Returns ``(face, closeness)`` images [size,size]: the nearest face's index (-1 for
    background) and its interpolated closeness (-inf for background).
    """
    face_img = np.full(size * size, -1, dtype=np.int64)
    depth_img = np.full(size * size, -np.inf)
    xy, z = corners[..., :2], corners[..., 2]
    p0, p1, p2 = xy[:, 0], xy[:, 1], xy[:, 2]
    area = (p1[:, 0] - p0[:, 0]) * (p2[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (p2[:, 0] - p0[:, 0])
    # Pixel centres sit at integer + 0.5: the covered index range of [lo, hi] is ceil(lo-.5)..floor(hi-.5).
    lo = np.clip(np.ceil(xy.min(axis=1) - 0.5), 0, size).astype(np.int64)
    hi = np.clip(np.floor(xy.max(axis=1) - 0.5), -1, size - 1).astype(np.int64)
    extent = np.maximum(hi - lo + 1, 0)
    count = extent[:, 0] * extent[:, 1] * (np.abs(area) > 1e-12)
    tris = np.flatnonzero(count)
    if len(tris) == 0:
        return face_img.reshape(size, size), depth_img.reshape(size, size)
    ends = np.cumsum(count[tris])
    bounds = np.searchsorted(ends, np.arange(CHUNK, ends[-1], CHUNK), side="right")
    for chunk in np.split(tris, bounds):
        if len(chunk) == 0:
            continue
        n = count[chunk]
        tri = np.repeat(chunk, n)
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        width = extent[tri, 0]
        px = lo[tri, 0] + local % width
        py = lo[tri, 1] + local // width
        cx, cy = px + 0.5, py + 0.5
        a, b, c = p0[tri], p1[tri], p2[tri]
        # Barycentric weights from the edge functions; dividing by the signed area makes them
        # independent of the winding (a back face is still rasterised).
        w0 = ((b[:, 0] - cx) * (c[:, 1] - cy) - (b[:, 1] - cy) * (c[:, 0] - cx)) / area[tri]
        w1 = ((c[:, 0] - cx) * (a[:, 1] - cy) - (c[:, 1] - cy) * (a[:, 0] - cx)) / area[tri]
        w2 = 1.0 - w0 - w1
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        tri, pix = tri[inside], (py * size + px)[inside]
        zt = z[tri]
        depth = w0[inside] * zt[:, 0] + w1[inside] * zt[:, 1] + w2[inside] * zt[:, 2]
        # Nearest candidate per pixel within the chunk, then against the buffer so far.
        order = np.lexsort((-depth, pix))
        pix, depth, tri = pix[order], depth[order], tri[order]
        first = np.ones(len(pix), dtype=bool)
        first[1:] = pix[1:] != pix[:-1]
        pix, depth, tri = pix[first], depth[first], tri[first]
        nearer = depth > depth_img[pix]
        depth_img[pix[nearer]] = depth[nearer]
        face_img[pix[nearer]] = tri[nearer]
    return face_img.reshape(size, size), depth_img.reshape(size, size)


def render_mesh(
    vertices: np.ndarray, faces: np.ndarray, size: int = 256, highlight: np.ndarray | None = None
) -> np.ndarray:
    """One mesh as an RGB float image [size,size,3] in [0,1] on white, scaled to fill the tile.
    Faces where the boolean mask ``highlight`` is set (a completion's prompt) are drawn in green."""
    image = np.ones((size, size, 3))
    v, f, kept = _drawable(vertices, faces)
    if len(f) == 0:
        return image
    rotation = view_rotation()
    view = v[np.unique(f)] @ rotation.T
    lo, hi = view.min(axis=0), view.max(axis=0)
    extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    scale = size * (1 - 2 * MARGIN) / extent if extent > 0 else 0.0
    centre = (lo + hi) / 2
    tri = v[f] @ rotation.T  # [F,3,3] view space
    corners = np.stack(
        [
            (tri[..., 0] - centre[0]) * scale + size / 2,
            size / 2 - (tri[..., 1] - centre[1]) * scale,
            tri[..., 2],
        ],
        axis=-1,
    )
    face_img, _ = rasterize(corners, size)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
    facing = normal @ LIGHT
    towards_viewer = normal[:, 2] >= 0
    color = np.where(towards_viewer[:, None], FRONT_COLOR, BACK_COLOR)
    if highlight is not None:
        color[np.asarray(highlight, dtype=bool)[kept]] = HIGHLIGHT_COLOR
    shaded = color * (AMBIENT + (1 - AMBIENT) * np.abs(facing))[:, None]
    covered = face_img >= 0
    image[covered] = shaded[face_img[covered]]
    return image


def _figure(width_px: int, height_px: int) -> Any:
    # A bare Figure on the Agg canvas: no pyplot state, no display, safe in worker processes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def render_grid(
    meshes: Sequence[Mesh],
    path: Path,
    cols: int = 4,
    size: int = 256,
    labels: Sequence[str] | None = None,
    highlights: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Render meshes into a PNG grid of ``size``-pixel tiles, ``cols`` per row, a label under each.

    Labels default to ``"i: F faces"``. Empty or undrawable meshes get a blank tile (their label
    still says how many faces they have). ``highlights``: per mesh, a face mask drawn in green
    (:func:`render_mesh`). Returns ``path``.
    """
    if not meshes:
        raise ValueError("render_grid needs at least one mesh")
    if labels is None:
        labels = [f"{i}: {len(np.asarray(f).reshape(-1, 3))} faces" for i, (_, f) in enumerate(meshes)]
    if len(labels) != len(meshes):
        raise ValueError(f"{len(labels)} labels for {len(meshes)} meshes")
    if highlights is not None and len(highlights) != len(meshes):
        raise ValueError(f"{len(highlights)} highlight masks for {len(meshes)} meshes")
    cols = max(1, min(cols, len(meshes)))
    rows = math.ceil(len(meshes) / cols)
    cell = size + LABEL_PX
    grid = np.ones((rows * cell, cols * size, 3))
    for i, (vertices, faces) in enumerate(meshes):
        r, c = divmod(i, cols)
        highlight = highlights[i] if highlights is not None else None
        grid[r * cell : r * cell + size, c * size : (c + 1) * size] = render_mesh(vertices, faces, size, highlight)
    fig = _figure(cols * size, rows * cell)
    # figimage places pixels one to one (no resampling); its origin is the figure's bottom left.
    fig.figimage((grid * 255).round().astype(np.uint8), xo=0, yo=0, origin="upper")
    for i, label in enumerate(labels):
        r, c = divmod(i, cols)
        x = (c + 0.5) * size / (cols * size)
        y = 1 - (r * cell + size + LABEL_PX / 2) / (rows * cell)
        fig.text(x, y, label, ha="center", va="center", fontsize=8, color="0.2")
    _save(fig, Path(path))
    return Path(path)


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def report_measures(rows: Sequence[dict[str, str]], path: Path, title: str) -> Path:
    """A benchmark's ``{"measure", "value"}`` rows: printed as a rich table and written as a PNG table."""
    from rich.table import Table

    from meshforge.runtime import console

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(row["measure"], row["value"])
    console.print(table)
    return render_table_png(rows, path, title)


def render_table_png(rows: Sequence[dict[str, Any]], path: Path, title: str | None = None) -> Path:
    """A table of result rows (dicts; columns in first-seen key order) as a PNG, for benchmarks."""
    if not rows:
        raise ValueError("render_table_png needs at least one row")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell_text(row.get(c)) for c in columns] for row in rows]
    # Column widths follow their longest text: ~8 px per character (headers are bold) at 9 pt.
    chars = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(columns)]
    col_px = [8 * n + 20 for n in chars]
    width_px = sum(col_px) + 20
    title_px = 30 if title else 0
    height_px = 22 * (len(rows) + 1) + title_px + 20
    fig = _figure(width_px, height_px)
    ax = fig.add_axes((10 / width_px, 10 / height_px, 1 - 20 / width_px, 1 - (20 + title_px) / height_px))
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        colLabels=columns,
        colWidths=[w / sum(col_px) for w in col_px],
        cellLoc="right",
        bbox=(0, 0, 1, 1),  # fill the axes: rows of 22 px, columns as measured
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("0.9")
    if title:
        fig.text(
            0.5,
            1 - (10 + title_px / 2) / height_px,
            title,
            ha="center",
            va="center",
            fontsize=11,
            weight="bold",
        )
    _save(fig, Path(path))
    return Path(path)
