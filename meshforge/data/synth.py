"""Procedural low-poly furniture: the built-in dataset of the quickstart, the tests and the benchmarks.

Eight families (table, chair, shelf, lamp, stool, cabinet, bench, desk), each assembled from boxes,
beams (boxes between two points), cylinders, frustums and cones with random proportions, part
styles and part counts, like the planar, part-based meshes of ShapeNet as processed by MeshGPT.
Parts intersect rather than being welded, as in ShapeNet. Y is up and shapes are axis-aligned,
as in ShapeNet.

Mesh ``i`` of a dataset depends only on ``(seed, i)``: growing ``n`` keeps the first meshes.
Families take turns (``i % len(families)``), so every family is equally represented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meshforge.io import atomic_path, atomic_write_json
from meshforge.runtime import track

Mesh = tuple[np.ndarray, np.ndarray]  # vertices float64 [V,3], faces int64 [F,3]

FORMATS = ("obj", "ply", "stl", "off")


class Parts:
    """Accumulates convex parts into one triangle soup, each part with outward-facing winding."""

    def __init__(self) -> None:
        self.vertices: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.count = 0

    def _add(self, v: np.ndarray, f: np.ndarray) -> None:
        # Parts are convex, so "outward" means away from the part's centroid.
        tri = v[f]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        inward = np.einsum("ij,ij->i", normal, tri.mean(axis=1) - v.mean(axis=0)) < 0
        f = np.where(inward[:, None], f[:, ::-1], f)
        self.vertices.append(v)
        self.faces.append(f + self.count)
        self.count += len(v)

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> None:
        """Axis-aligned box between corners ``lo`` and ``hi``."""
        lo_, hi_ = np.asarray(lo, float), np.asarray(hi, float)
        bits = (np.arange(8)[:, None] >> np.arange(3)) & 1  # corner i has coordinate bits i = x + 2y + 4z
        self._add(np.where(bits == 1, hi_, lo_), _BOX_FACES)

    def slab(self, centre: tuple[float, float, float], size: tuple[float, float, float]) -> None:
        c, s = np.asarray(centre, float), np.asarray(size, float) / 2
        self.box(tuple(c - s), tuple(c + s))

    def beam(self, p0: tuple[float, float, float], p1: tuple[float, float, float], width: float) -> None:
        """Square-section box from ``p0`` to ``p1`` (legs, rails, arms at any angle)."""
        self.plank(p0, p1, width, width)

    def plank(
        self,
        p0: tuple[float, float, float],
        p1: tuple[float, float, float],
        width: float,
        thickness: float,
        across: tuple[float, float, float] | None = None,
    ) -> None:
        """Box from ``p0`` to ``p1``, ``width`` along ``across`` (default x, or z for planks along x)
        and ``thickness`` along the third direction (tilted chair backs)."""
        a, b = np.asarray(p0, float), np.asarray(p1, float)
        u, w = _frame(b - a, across)
        bits = (np.arange(8)[:, None] >> np.arange(3)) & 1
        offset = (bits[:, :1] - 0.5) * width * u + (bits[:, 1:2] - 0.5) * thickness * w
        self._add(np.where(bits[:, 2:] == 1, b, a) + offset, _BOX_FACES)

    def frustum(
        self,
        p0: tuple[float, float, float],
        p1: tuple[float, float, float],
        r0: float,
        r1: float,
        segments: int,
    ) -> None:
        """Closed frustum along p0 -> p1 (a cylinder when r0 == r1, a cone when r1 == 0)."""
        a, b = np.asarray(p0, float), np.asarray(p1, float)
        u, w = _frame(b - a)
        # Offset by half a step so 4-segment frusta are axis-aligned square posts.
        angle = (np.arange(segments) + 0.5) * 2 * np.pi / segments
        ring = np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w
        k = np.arange(segments)
        nxt = (k + 1) % segments
        fan = np.stack([np.zeros(segments - 2, int), k[1:-1], k[2:]], axis=1)
        if r1 == 0:
            v = np.concatenate([a + r0 * ring, b[None]])
            f = np.concatenate([np.stack([k, nxt, np.full(segments, segments)], 1), fan])
        else:
            v = np.concatenate([a + r0 * ring, b + r1 * ring])
            side = np.concatenate(
                [np.stack([k, nxt, nxt + segments], 1), np.stack([k, nxt + segments, k + segments], 1)]
            )
            f = np.concatenate([side, fan, fan + segments])
        self._add(v, f)

    def mesh(self) -> Mesh:
        return np.concatenate(self.vertices), np.concatenate(self.faces).astype(np.int64)


def _frame(
    axis: np.ndarray, across: tuple[float, float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``u`` (towards ``across``) and ``w`` spanning the plane orthogonal to ``axis``."""
    axis = axis / np.linalg.norm(axis)
    if across is None:
        across = (1.0, 0.0, 0.0) if abs(axis[0]) < 0.9 else (0.0, 0.0, 1.0)
    u = np.asarray(across, float) - np.dot(across, axis) * axis
    u /= np.linalg.norm(u)
    return u, np.cross(axis, u)


# Two triangles per side of the box whose corner i has coordinate bits x = i & 1, y = i >> 1 & 1, z = i >> 2.
_BOX_FACES = np.array([[0, 2, 3], [0, 3, 1], [4, 5, 7], [4, 7, 6], [0, 1, 5], [0, 5, 4],
                       [2, 6, 7], [2, 7, 3], [0, 4, 6], [0, 6, 2], [1, 3, 7], [1, 7, 5]])  # fmt: skip


def _corners(half_w: float, half_d: float) -> list[tuple[float, float]]:
    return [(sx * half_w, sz * half_d) for sx in (-1, 1) for sz in (-1, 1)]


def _leg(p: Parts, rng: np.random.Generator, top: tuple, bottom: tuple, width: float, round_: bool) -> None:
    if round_:
        p.frustum(bottom, top, width / 2 * rng.uniform(0.6, 1.0), width / 2, int(rng.choice([5, 6, 8])))
    else:
        p.beam(bottom, top, width)


def table(rng: np.random.Generator) -> Mesh:
    p = Parts()
    height, thick = rng.uniform(0.55, 0.95), rng.uniform(0.03, 0.08)
    round_top = rng.random() < 0.35
    width = rng.uniform(0.7, 2.0)
    depth = width if round_top else rng.uniform(0.5, 1.1)
    y_top = height - thick
    if round_top:
        p.frustum((0, y_top, 0), (0, height, 0), width / 2, width / 2, int(rng.integers(6, 17)))
    else:
        p.slab((0, height - thick / 2, 0), (width, thick, depth))
    style = rng.choice(["legs", "pedestal", "trestle"], p=[0.6, 0.25, 0.15])
    leg_w = rng.uniform(0.04, 0.1)
    if style == "legs":
        inset = rng.uniform(0.05, 0.2) * min(width, depth)
        hw, hd = width / 2 - inset, depth / 2 - inset
        if round_top:
            hw = hd = width / 2 * 0.7 / np.sqrt(2)
        splay = rng.uniform(0, 0.08) if rng.random() < 0.3 else 0.0
        round_legs = rng.random() < 0.4
        for x, z in _corners(hw, hd):
            _leg(p, rng, (x, y_top, z), (x * (1 + splay), 0, z * (1 + splay)), leg_w, round_legs)
        if rng.random() < 0.5:  # apron
            a = rng.uniform(0.05, 0.12)
            p.slab((0, y_top - a / 2, hd), (2 * hw, a, leg_w * 0.6))
            p.slab((0, y_top - a / 2, -hd), (2 * hw, a, leg_w * 0.6))
            p.slab((hw, y_top - a / 2, 0), (leg_w * 0.6, a, 2 * hd))
            p.slab((-hw, y_top - a / 2, 0), (leg_w * 0.6, a, 2 * hd))
        if rng.random() < 0.3:  # lower shelf
            p.slab((0, rng.uniform(0.1, 0.3) * height, 0), (2 * hw, thick * 0.7, 2 * hd))
    elif style == "pedestal":
        segs = int(rng.choice([4, 6, 8, 10]))
        p.frustum((0, 0.04, 0), (0, y_top, 0), leg_w * 1.2, leg_w * rng.uniform(0.7, 1.2), segs)
        if rng.random() < 0.5:
            p.frustum((0, 0, 0), (0, 0.04, 0), min(width, depth) * 0.3, min(width, depth) * 0.25, segs)
        else:
            for k in range(int(rng.integers(3, 6))):
                ang = 2 * np.pi * k / 5
                p.beam((0, 0.03, 0), (np.cos(ang) * depth * 0.35, 0.01, np.sin(ang) * depth * 0.35), 0.05)
    else:
        hw = width / 2 - rng.uniform(0.05, 0.15)
        for x in (-hw, hw):
            p.slab((x, y_top / 2, 0), (leg_w, y_top, depth * rng.uniform(0.5, 0.9)))
        p.slab((0, y_top * rng.uniform(0.2, 0.5), 0), (2 * hw, leg_w, leg_w))
    return p.mesh()


def chair(rng: np.random.Generator) -> Mesh:
    p = Parts()
    w, d = rng.uniform(0.38, 0.6), rng.uniform(0.38, 0.6)
    seat_y, thick = rng.uniform(0.38, 0.5), rng.uniform(0.03, 0.08)
    p.slab((0, seat_y + thick / 2, 0), (w, thick, d))
    leg_w = rng.uniform(0.03, 0.06)
    hw, hd = w / 2 - leg_w / 2, d / 2 - leg_w / 2
    splay = rng.uniform(0.0, 0.12) if rng.random() < 0.4 else 0.0
    round_legs = rng.random() < 0.35
    for x, z in _corners(hw, hd):
        _leg(p, rng, (x, seat_y, z), (x * (1 + splay), 0, z * (1 + splay)), leg_w, round_legs)
    if rng.random() < 0.4:  # stretchers between front and back legs
        y = seat_y * rng.uniform(0.2, 0.4)
        for x in (-hw, hw):
            p.beam((x, y, -hd), (x, y, hd), leg_w * 0.6)
    back_h, tilt = rng.uniform(0.3, 0.6), rng.uniform(0.0, 0.12)
    y0, y1 = seat_y + thick, seat_y + thick + back_h
    z_back = -d / 2 + leg_w / 2
    style = rng.choice(["panel", "slats", "rails"])
    if style == "panel":
        p.plank((0, y0, z_back), (0, y1, z_back - tilt), w, rng.uniform(0.02, 0.05), across=(1, 0, 0))
    else:
        for x in (-hw, hw):  # back posts
            p.beam((x, y0, z_back), (x, y1, z_back - tilt), leg_w)
        p.beam((-hw, y1 - 0.03, z_back - tilt), (hw, y1 - 0.03, z_back - tilt), leg_w * 1.2)
        n = int(rng.integers(2, 6))
        for k in range(n):
            if style == "slats":
                x = -hw + (k + 1) * 2 * hw / (n + 1)
                p.beam((x, y0, z_back), (x, y1, z_back - tilt), leg_w * 0.7)
            else:
                f = (k + 1) / (n + 1)
                y = y0 + f * back_h
                p.beam((-hw, y, z_back - f * tilt), (hw, y, z_back - f * tilt), leg_w * 0.7)
    if rng.random() < 0.35:  # armrests
        arm_y = seat_y + rng.uniform(0.18, 0.28)
        for x in (-w / 2, w / 2):
            p.beam((x, arm_y, -d / 2), (x, arm_y, d / 2 * rng.uniform(0.7, 1.1)), 0.05)
            p.beam((x, seat_y, d / 2 - 0.05), (x, arm_y, d / 2 - 0.05), 0.035)
    return p.mesh()


def shelf(rng: np.random.Generator) -> Mesh:
    p = Parts()
    w, h, d = rng.uniform(0.5, 1.6), rng.uniform(0.7, 2.0), rng.uniform(0.22, 0.45)
    t = rng.uniform(0.02, 0.05)
    n = int(rng.integers(2, 7))
    if rng.random() < 0.75:  # bookcase: side panels
        for x in (-w / 2 + t / 2, w / 2 - t / 2):
            p.slab((x, h / 2, 0), (t, h, d))
        if rng.random() < 0.6:
            p.slab((0, h / 2, -d / 2 + t / 4), (w, h, t / 2))
        base = rng.uniform(0.0, 0.1)
    else:  # open shelving on four posts
        post = rng.uniform(0.025, 0.05)
        for x, z in _corners(w / 2 - post / 2, d / 2 - post / 2):
            p.beam((x, 0, z), (x, h, z), post)
        base = rng.uniform(0.05, 0.2)
    for k in range(n):
        y = base + (h - base - t) * k / (n - 1) + t / 2
        p.slab((0, y, 0), (w - 1e-3, t, d - 1e-3))
    if rng.random() < 0.3:  # cornice
        p.slab((0, h + 0.02, 0), (w + 0.04, 0.04, d + 0.02))
    return p.mesh()


def lamp(rng: np.random.Generator) -> Mesh:
    p = Parts()
    floor = rng.random() < 0.5
    height = rng.uniform(1.2, 1.8) if floor else rng.uniform(0.35, 0.7)
    segs = int(rng.choice([5, 6, 8, 10, 12]))
    base_r = rng.uniform(0.1, 0.2) if floor else rng.uniform(0.06, 0.12)
    base_h = rng.uniform(0.02, 0.06)
    if rng.random() < 0.7:
        p.frustum((0, 0, 0), (0, base_h, 0), base_r, base_r * rng.uniform(0.6, 1.0), segs)
    else:
        p.slab((0, base_h / 2, 0), (2 * base_r, base_h, 2 * base_r))
    pole_r = rng.uniform(0.008, 0.02)
    shade_r0 = rng.uniform(0.08, 0.25) if floor else height * rng.uniform(0.15, 0.35)
    shade_h = shade_r0 * rng.uniform(0.8, 1.6)
    shade_r1 = shade_r0 * rng.uniform(0.3, 0.8)
    arms = int(rng.choice([1, 1, 1, 2, 3]))
    if arms == 1 and rng.random() < 0.5:  # angled desk/architect lamp: two arm segments
        elbow = (rng.uniform(-0.2, 0.2), height * rng.uniform(0.45, 0.65), rng.uniform(-0.1, 0.1))
        head = (rng.uniform(0.15, 0.4), height, 0.0)
        p.frustum((0, base_h, 0), elbow, pole_r, pole_r, 6)
        p.frustum(elbow, head, pole_r, pole_r, 6)
        p.frustum(head, (head[0] + 0.05, head[1] - shade_h, 0), shade_r1, shade_r0, segs)
        return p.mesh()
    p.frustum((0, base_h, 0), (0, height, 0), pole_r, pole_r, 6)
    if arms == 1:
        top = height + shade_h * rng.uniform(0.1, 0.5)
        p.frustum((0, top - shade_h, 0), (0, top, 0), shade_r0, shade_r1, segs)
        if rng.random() < 0.3:  # finial
            p.frustum((0, top, 0), (0, top + 0.05, 0), 0.02, 0.0, 4)
        return p.mesh()
    reach = rng.uniform(0.2, 0.4)
    for k in range(arms):
        ang = 2 * np.pi * k / arms + rng.uniform(-0.2, 0.2)
        end = (np.cos(ang) * reach, height + rng.uniform(-0.1, 0.15), np.sin(ang) * reach)
        p.frustum((0, height, 0), end, pole_r * 0.8, pole_r * 0.8, 4)
        p.frustum((end[0], end[1] - shade_h * 0.8, end[2]), end, shade_r0 * 0.6, shade_r1 * 0.6, segs)
    return p.mesh()


def stool(rng: np.random.Generator) -> Mesh:
    p = Parts()
    height = rng.uniform(0.4, 0.85)
    r = rng.uniform(0.15, 0.25)
    thick = rng.uniform(0.03, 0.07)
    round_seat = rng.random() < 0.65
    segs = int(rng.choice([6, 8, 10, 12]))
    if round_seat:
        p.frustum((0, height - thick, 0), (0, height, 0), r * rng.uniform(0.85, 1.0), r, segs)
    else:
        p.slab((0, height - thick / 2, 0), (2 * r, thick, 2 * r))
    if rng.random() < 0.25:  # bar stool: column, disc foot, foot ring
        p.frustum((0, 0.03, 0), (0, height - thick, 0), 0.03, 0.025, 6)
        p.frustum((0, 0, 0), (0, 0.03, 0), r * 1.1, r, segs)
        y = height * 0.35
        p.frustum((0, y - 0.015, 0), (0, y + 0.015, 0), r * 0.8, r * 0.8, segs)
        return p.mesh()
    legs = int(rng.choice([3, 4, 4]))
    spread = rng.uniform(1.0, 1.5)
    leg_w = rng.uniform(0.025, 0.05)
    round_legs = rng.random() < 0.5
    feet = []
    for k in range(legs):
        ang = 2 * np.pi * k / legs + np.pi / 4
        top = (np.cos(ang) * r * 0.7, height - thick, np.sin(ang) * r * 0.7)
        foot = (np.cos(ang) * r * 0.7 * spread, 0.0, np.sin(ang) * r * 0.7 * spread)
        _leg(p, rng, top, foot, leg_w, round_legs)
        feet.append((top, foot))
    if rng.random() < 0.5:  # stretcher ring
        f = rng.uniform(0.25, 0.5)
        ring = [tuple(np.asarray(b) + f * (np.asarray(t) - np.asarray(b))) for t, b in feet]
        for k in range(legs):
            p.beam(ring[k], ring[(k + 1) % legs], leg_w * 0.6)
    return p.mesh()


def cabinet(rng: np.random.Generator) -> Mesh:
    p = Parts()
    w, h, d = rng.uniform(0.4, 1.5), rng.uniform(0.4, 1.9), rng.uniform(0.3, 0.6)
    base_style = rng.choice(["plinth", "legs", "none"])
    base = rng.uniform(0.05, 0.2) if base_style != "none" else 0.0
    p.slab((0, base + (h - base) / 2, 0), (w, h - base, d))
    if base_style == "plinth":
        p.slab((0, base / 2, 0.01), (w - 0.04, base, d - 0.04))
    elif base_style == "legs":
        leg = rng.uniform(0.03, 0.06)
        for x, z in _corners(w / 2 - leg, d / 2 - leg):
            p.beam((x, 0, z), (x, base, z), leg)
    if rng.random() < 0.4:  # overhanging top
        p.slab((0, h + 0.015, 0.01), (w + 0.04, 0.03, d + 0.04))
    rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    gap = 0.01
    cell_w, cell_h = (w - gap) / cols, (h - base - gap) / rows
    handle = rng.choice(["bar", "knob", "none"], p=[0.5, 0.3, 0.2])
    for r in range(rows):
        for c in range(cols):
            x = -w / 2 + gap / 2 + (c + 0.5) * cell_w
            y = base + gap / 2 + (r + 0.5) * cell_h
            p.slab((x, y, d / 2 + 0.01), (cell_w - gap, cell_h - gap, 0.02))
            if handle == "bar":
                p.slab((x, y + cell_h * 0.3, d / 2 + 0.035), (min(0.15, cell_w * 0.5), 0.015, 0.02))
            elif handle == "knob":
                p.frustum(
                    (x, y + cell_h * 0.3, d / 2 + 0.02), (x, y + cell_h * 0.3, d / 2 + 0.05), 0.015, 0.02, 6
                )
    return p.mesh()


def bench(rng: np.random.Generator) -> Mesh:
    p = Parts()
    length, depth = rng.uniform(0.9, 2.0), rng.uniform(0.28, 0.5)
    seat_y, thick = rng.uniform(0.38, 0.5), rng.uniform(0.03, 0.07)
    slats = int(rng.choice([1, 1, 2, 3, 4, 5]))
    gap = 0.015 if slats > 1 else 0.0
    slat_d = (depth - gap * (slats - 1)) / slats
    for k in range(slats):
        z = -depth / 2 + slat_d / 2 + k * (slat_d + gap)
        p.slab((0, seat_y + thick / 2, z), (length, thick, slat_d))
    support = rng.choice(["panels", "legs4", "legs6"])
    inset = rng.uniform(0.05, 0.2)
    x_end = length / 2 - inset
    if support == "panels":
        for x in (-x_end, x_end):
            p.slab((x, seat_y / 2, 0), (rng.uniform(0.03, 0.06), seat_y, depth * rng.uniform(0.7, 1.0)))
    else:
        xs = [-x_end, x_end] if support == "legs4" else [-x_end, 0.0, x_end]
        leg_w = rng.uniform(0.04, 0.07)
        for x in xs:
            for z in (-depth / 2 + leg_w, depth / 2 - leg_w):
                p.beam((x, 0, z), (x, seat_y, z), leg_w)
            if rng.random() < 0.5:
                p.beam(
                    (x, seat_y * 0.3, -depth / 2 + leg_w), (x, seat_y * 0.3, depth / 2 - leg_w), leg_w * 0.6
                )
    if rng.random() < 0.4:  # backrest
        back_h, tilt = rng.uniform(0.25, 0.45), rng.uniform(0.02, 0.12)
        for x in (-x_end, x_end):
            p.beam((x, seat_y, -depth / 2), (x, seat_y + back_h, -depth / 2 - tilt), 0.05)
        for k in range(int(rng.integers(1, 4))):
            f = 0.45 + 0.5 * k / 3
            p.slab((0, seat_y + f * back_h, -depth / 2 - f * tilt), (length * 0.95, 0.08, 0.025))
    return p.mesh()


def desk(rng: np.random.Generator) -> Mesh:
    p = Parts()
    w, d, h = rng.uniform(1.0, 1.8), rng.uniform(0.5, 0.8), rng.uniform(0.7, 0.78)
    thick = rng.uniform(0.025, 0.05)
    p.slab((0, h - thick / 2, 0), (w, thick, d))
    ped_w = rng.uniform(0.35, 0.5)
    pedestals = rng.choice([1, 2], p=[0.7, 0.3])
    sides = [1.0, -1.0][:pedestals]
    for side in sides:
        x = side * (w / 2 - ped_w / 2 - 0.01)
        p.slab((x, (h - thick) / 2, 0), (ped_w, h - thick, d - 0.04))
        drawers = int(rng.integers(2, 5))
        dh = (h - thick - 0.02) / drawers
        for k in range(drawers):
            y = 0.01 + (k + 0.5) * dh
            p.slab((x, y, d / 2 - 0.01), (ped_w - 0.02, dh - 0.01, 0.02))
            p.slab((x, y + dh * 0.25, d / 2 + 0.01), (ped_w * 0.4, 0.015, 0.02))
    if pedestals == 1:
        x = -(w / 2 - 0.05)
        if rng.random() < 0.5:
            p.slab((x, (h - thick) / 2, 0), (0.04, h - thick, d - 0.04))
        else:
            leg = rng.uniform(0.04, 0.06)
            for z in (-d / 2 + leg, d / 2 - leg):
                p.beam((x, 0, z), (x, h - thick, z), leg)
    if rng.random() < 0.5:  # modesty panel
        p.slab((0, h - thick - 0.2, -d / 2 + 0.04), (w - 2 * ped_w * (pedestals == 2) - 0.1, 0.35, 0.02))
    if rng.random() < 0.25:  # hutch shelf on top
        p.slab((0, h + 0.3, -d / 2 + 0.12), (w * 0.9, 0.025, 0.22))
        for x in (-w * 0.45, w * 0.45):
            p.slab((x, h + 0.15, -d / 2 + 0.12), (0.025, 0.3, 0.22))
    return p.mesh()


FAMILIES: dict[str, Callable[[np.random.Generator], Mesh]] = {
    "table": table,
    "chair": chair,
    "shelf": shelf,
    "lamp": lamp,
    "stool": stool,
    "cabinet": cabinet,
    "bench": bench,
    "desk": desk,
}


@dataclass
class SynthConfig:
    """Options of the ``synth`` stage; the dataset seed is the run's global ``--seed``."""

    out: Path = field(metadata={"help": "Folder to write (FAMILY/FAMILY_00000.obj ... and labels.json)."})
    n: int = field(
        default=200,
        metadata={"help": "Number of meshes (families take turns; mesh i depends only on --seed and i)."},
    )
    formats: list[str] = field(
        default_factory=lambda: ["obj"],
        metadata={"help": "File formats, taking turns across meshes: obj, ply, stl, off."},
    )
    families: list[str] = field(
        default_factory=lambda: list(FAMILIES),
        metadata={"help": "Families to draw: table, chair, shelf, lamp, stool, cabinet, bench, desk."},
    )
    min_faces: int = field(default=20, metadata={"help": "Fewest triangles per mesh."})
    max_faces: int = field(default=800, metadata={"help": "Most triangles per mesh."})

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("n must be at least 1")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be among {', '.join(FORMATS)} (got {self.formats})")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families must be among {', '.join(FAMILIES)} (got {self.families})")
        if not 1 <= self.min_faces <= self.max_faces:
            raise ValueError("need 1 <= min_faces <= max_faces")


def synth_mesh(family: str, seed: int, index: int, min_faces: int = 20, max_faces: int = 800) -> Mesh:
    """Mesh ``index`` of ``family`` for ``seed``; redraws until its triangle count is in range."""
    rng = np.random.default_rng([seed, index, list(FAMILIES).index(family)])
    for _ in range(100):
        vertices, faces = FAMILIES[family](rng)
        if min_faces <= len(faces) <= max_faces:
            return vertices, faces
    raise ValueError(f"{family}: no mesh with {min_faces}..{max_faces} faces in 100 draws")


def mesh_bytes(vertices: np.ndarray, faces: np.ndarray, fmt: str) -> bytes:
    """Serialise one mesh (through trimesh for binary formats; OBJ/OFF are written directly)."""
    if fmt == "obj":
        lines = ["# meshforge synth"]
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
        lines += [f"f {a} {b} {c}" for a, b, c in faces + 1]
        return ("\n".join(lines) + "\n").encode()
    if fmt == "off":
        lines = ["OFF", f"{len(vertices)} {len(faces)} 0"]
        lines += [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
        lines += [f"3 {a} {b} {c}" for a, b, c in faces]
        return ("\n".join(lines) + "\n").encode()
    import trimesh

    data = trimesh.Trimesh(vertices, faces, process=False).export(file_type=fmt)
    return data if isinstance(data, bytes) else data.encode()


def generate(
    out_dir: Path,
    n: int,
    seed: int = 0,
    formats: tuple[str, ...] | list[str] = ("obj",),
    *,
    families: list[str] | None = None,
    min_faces: int = 20,
    max_faces: int = 800,
) -> dict:
    """Write ``n`` meshes as ``out_dir/FAMILY/FAMILY_IIIII.EXT`` plus ``labels.json`` (file -> family).

    Formats take turns across meshes. The folder is built aside and renamed into place, so a
    finished ``out_dir`` is always complete. Returns a summary (counts per family, faces range).
    """
    cfg = SynthConfig(
        out=Path(out_dir),
        n=n,
        formats=list(formats),
        families=list(families or FAMILIES),
        min_faces=min_faces,
        max_faces=max_faces,
    )
    labels: dict[str, str] = {}
    face_counts = []
    with atomic_path(cfg.out) as tmp:
        for i in track(range(cfg.n), "synth", total=cfg.n):
            family = cfg.families[i % len(cfg.families)]
            vertices, faces = synth_mesh(family, seed, i, cfg.min_faces, cfg.max_faces)
            fmt = cfg.formats[i % len(cfg.formats)]
            rel = f"{family}/{family}_{i:05d}.{fmt}"
            (tmp / family).mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(mesh_bytes(vertices, faces, fmt))
            labels[rel] = family
            face_counts.append(len(faces))
        atomic_write_json(tmp / "labels.json", labels)
    per_family = {f: sum(1 for v in labels.values() if v == f) for f in cfg.families}
    return {
        "out": str(cfg.out),
        "meshes": cfg.n,
        "families": per_family,
        "faces_min": int(min(face_counts)),
        "faces_max": int(max(face_counts)),
        "faces_mean": round(float(np.mean(face_counts)), 1),
    }
