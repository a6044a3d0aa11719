"""Spatial Sparse Attention in plain PyTorch that scales: the CPU path of :func:`spatial_sparse_attention`.

The reference (:mod:`meshforge.kernels.ssa.reference`) builds dense ``n x n`` masks, which is the
clearest statement of the op and needs O(n^2) memory: a 30k-token latent would need tens of GB.
This form gathers, per query tile, only the keys the tile may see, so memory and work follow
SSA's own cost, ``N x (C + topk x m_slc^3 + m_win^3)``:

- compression: each tile's queries against the sequence's block tokens; the same probabilities,
  summed over the tile and the GQA group's heads, score the selection blocks (top-k per tile);
- selection: the rows of the chosen blocks (contiguous ranges in block order, padded to the
  largest block) gathered per tile and group;
- window: the rows of each window (contiguous in window order) padded to the largest window.

Tiles and windows are processed in chunks of bounded size. Arithmetic is float32 like the
reference, whose choices (tile-level top-k, no gradient through the choice) it shares exactly.
"""

from __future__ import annotations

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from meshforge.kernels.ssa.compress import pool_sorted
from meshforge.kernels.utils import padded_rows
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # score-matrix elements per chunk (64 MiB of float32)


def _attend(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``q[M, Q, G, R, D]`` over ``k, v[M, G, K, D]`` where ``key_valid[M, G, K]``.

    Returns the output ``[M, Q, G, R, D]`` and the probabilities ``[M, G, R, Q, K]``.
    """
    scores = torch.einsum("mqgrd,mgkd->mgrqk", q, k) * scale
    # Every query sees at least one key in each branch (its own block, selection or window), so a
    # finite fill is exact and spares the NaN guard (and its backward) that -inf would need.
    scores = scores.masked_fill(~key_valid[:, :, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    return torch.einsum("mgrqk,mgkd->mqgrd", probs, v), probs


def _chunks(count: int, per_item: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(per_item, 1))
    return [slice(i, min(i + step, count)) for i in range(0, count, step)]


def _scatter_rows(parts: list[tuple[Tensor, Tensor]], like: Tensor) -> Tensor:
    """Rows ``[N, H, D]`` from ``(row ids, values)`` pieces that cover each row at most once (zeros elsewhere)."""
    if not parts:
        return torch.zeros_like(like)
    rows, values = (torch.cat(x) for x in zip(*parts))
    return torch.zeros_like(like).index_put((rows,), values)


def ssa_gathered(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    layout: SSALayout,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SSA of ``q[N, H, D]``, ``k, v[N, G, D]``, ``gates[N, H, 3]``; returns ``(out[N, H, D], selection)``
    like :func:`~meshforge.kernels.ssa.reference.ssa_reference` (``k_cmp, v_cmp`` in compression-block order)."""
    cfg = layout.cfg
    heads, dim = q.shape[1:]
    groups = k.shape[1]
    rep = heads // groups
    scale = cfg.scale if cfg.scale is not None else dim**-0.5
    qs, ks, vs = (x[layout.perm].float() for x in (q, k, v))  # block order
    if k_cmp is None:
        k_cmp, v_cmp = pool_sorted(ks, layout), pool_sorted(vs, layout)
    k_cmp, v_cmp = k_cmp.float(), v_cmp.float()

    tile_rows, tile_valid = padded_rows(
        layout.tile_start, layout.tile_end - layout.tile_start, cfg.query_tile
    )
    slc_sizes = layout.slc_offsets.diff()
    cmp_parts: list[tuple[Tensor, Tensor]] = []
    slc_parts: list[tuple[Tensor, Tensor]] = []
    selection = torch.full((len(layout.tile_start), groups, cfg.topk), -1, dtype=torch.int64, device=q.device)
    for b in range(layout.batch):
        t0, t1 = int(layout.tile_cu[b]), int(layout.tile_cu[b + 1])
        c0, c1 = int(layout.cmp_cu[b]), int(layout.cmp_cu[b + 1])
        s0, s1 = int(layout.slc_cu[b]), int(layout.slc_cu[b + 1])
        if t0 == t1:
            continue
        topk = min(cfg.topk, s1 - s0)
        widest = int(slc_sizes[s0:s1].max())
        kc = k_cmp[c0:c1].transpose(0, 1)  # [G, C, D]
        vc = v_cmp[c0:c1].transpose(0, 1)
        cmp_valid = torch.ones(1, groups, c1 - c0, dtype=torch.bool, device=q.device)
        slc_of_cmp = layout.cmp_slc[c0:c1] - s0
        per_tile = cfg.query_tile * heads * max(c1 - c0, topk * widest)
        for part in _chunks(t1 - t0, per_tile):
            tiles = slice(t0 + part.start, t0 + part.stop)
            rows, valid = tile_rows[tiles], tile_valid[tiles]  # [M, Q]
            qt = qs[rows].unflatten(2, (groups, rep))  # [M, Q, G, R, D]
            m = len(rows)

            out, probs = _attend(
                qt, kc.expand(m, -1, -1, -1), vc.expand(m, -1, -1, -1), cmp_valid.expand(m, -1, -1), scale
            )
            cmp_parts.append((rows[valid], out.flatten(2, 3)[valid]))
            # A selection block's score: its compression blocks' probabilities over the tile's
            # real queries and the group's heads (no gradient flows through the choice).
            weights = probs.detach() * valid[:, None, None, :, None]
            cmp_scores = weights.sum((2, 3))  # [M, G, C]
            block_scores = cmp_scores.new_zeros(m, groups, s1 - s0).index_add_(2, slc_of_cmp, cmp_scores)
            chosen = block_scores.topk(topk, dim=-1).indices.sort(dim=-1).values + s0  # [M, G, topk]
            selection[tiles, :, :topk] = chosen

            key_rows, key_valid = padded_rows(layout.slc_offsets[chosen], slc_sizes[chosen], widest)
            key_rows, key_valid = key_rows.flatten(2), key_valid.flatten(2)  # [M, G, topk * widest]
            group = torch.arange(groups, device=q.device)[None, :, None]
            out, _ = _attend(qt, ks[key_rows, group], vs[key_rows, group], key_valid, scale)
            slc_parts.append((rows[valid], out.flatten(2, 3)[valid]))

    win_sizes = layout.win_offsets.diff()
    win_parts: list[tuple[Tensor, Tensor]] = []
    if len(win_sizes):
        qw, kw, vw = (x[layout.win_perm].float() for x in (q, k, v))  # window order
        # Largest windows first, each chunk padded to its own largest: surface windows range from
        # a few voxels to m_win^3, and padding all to the largest would waste most of the memory.
        by_size = win_sizes.argsort(descending=True)
        sizes_sorted = win_sizes[by_size]
        for part in _chunks(len(win_sizes), int(sizes_sorted[0]) ** 2 * heads):
            widest = int(sizes_sorted[part.start])
            rows, valid = padded_rows(layout.win_offsets[by_size[part]], sizes_sorted[part], widest)  # [M, W]
            out, _ = _attend(
                qw[rows].unflatten(2, (groups, rep)),
                kw[rows].transpose(1, 2),
                vw[rows].transpose(1, 2),
                valid[:, None, :].expand(-1, groups, -1),
                scale,
            )
            win_parts.append((rows[valid], out.flatten(2, 3)[valid]))
    o_cmp, o_slc = _scatter_rows(cmp_parts, qs), _scatter_rows(slc_parts, qs)
    o_win = _scatter_rows(win_parts, qs)[layout.win_inv[layout.perm]]  # window order -> block order

    g = gates[layout.perm].float()
    mixed = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return mixed[layout.inv_perm].to(q.dtype), selection
