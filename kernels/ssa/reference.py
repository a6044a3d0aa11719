"""Spatial Sparse Attention by its definition: dense masked attention, one sequence at a time.

Everything happens in the caller's token order with float32 arithmetic and explicit masks, so this
file reads as the specification the Triton path (:mod:`meshforge.kernels.ssa.triton_path`) is tested against:

- compression: attend to every compressed block token of the sequence (``k_cmp, v_cmp``);
- selection: per query tile and GQA group, a selection block scores the compression probabilities
  of its compression blocks, summed over the tile's queries and the group's heads; the top-k
  blocks are kept (fewer when the sequence has fewer) and their real tokens attended;
- window: attend to the tokens of one's own (shifted) window;
- mix: ``gates[..., 0] * cmp + gates[..., 1] * slc + gates[..., 2] * win`` per head.

Selection is a hard top-k: no gradient flows through the choice of blocks, only through the
attention over the chosen ones (as in NSA). The own block is not forced into the selection: the
window branch already attends to the query's neighbourhood (with the defaults the unshifted
windows *are* the selection blocks), so forcing it would spend one of k slots on tokens seen anyway.
Memory is O(n^2) per sequence: for tests and small CPU models only.
"""

from __future__ import annotations

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from torch import Tensor


def compress_reference(x: Tensor, layout: SSALayout, pe: Tensor | None = None) -> Tensor:
    """Mean of ``x + pe[position in block]`` over each compression block, block by block."""
    blocks = []
    for c in range(len(layout.cmp_offsets) - 1):
        rows = torch.nonzero(layout.cmp_block == c).squeeze(1)
        xc = x[rows].float()
        if pe is not None:
            xc = xc + pe[layout.cmp_pos[rows]].float()
        blocks.append(xc.mean(0))
    return torch.stack(blocks).to(x.dtype)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q[n, H, D]`` over ``k, v[m, G, D]`` (GQA) where ``mask[H or 1, n, m]``.

    Returns the float32 output ``[n, H, D]`` and probabilities ``[H, n, m]``.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hnm,mhd->nhd", probs, v), probs


def token_block_scores_reference(probs_cmp: Tensor, layout: SSALayout, b: int, groups: int) -> Tensor:
    """Selection-block scores ``[tokens of b, G, blocks of b]`` of each query of sequence ``b`` alone.

    ``probs_cmp[H, n, C_b]``: the compression probabilities of its tokens (caller's order); a
    block's score sums them over its compression blocks and the group's heads.
    """
    c0, c1 = layout.cmp_cu[b], layout.cmp_cu[b + 1]
    s0, s1 = int(layout.slc_cu[b]), int(layout.slc_cu[b + 1])
    heads, n, _ = probs_cmp.shape
    per_group = probs_cmp.detach().float().reshape(groups, heads // groups, n, -1).sum(1)  # [G, n, C_b]
    scores = per_group.new_zeros(groups, n, s1 - s0).index_add(2, layout.cmp_slc[c0:c1] - s0, per_group)
    return scores.permute(1, 0, 2)


def block_scores_reference(probs_cmp: Tensor, layout: SSALayout, b: int, groups: int) -> Tensor:
    """Selection-block scores ``[tiles of b, G, blocks of b]``: the token scores summed over each query tile."""
    a, e = int(layout.cu_seqlens[b]), int(layout.cu_seqlens[b + 1])
    t0, t1 = int(layout.tile_cu[b]), int(layout.tile_cu[b + 1])
    tokens = token_block_scores_reference(probs_cmp, layout, b, groups)
    return tokens.new_zeros(t1 - t0, *tokens.shape[1:]).index_add(0, layout.tile[a:e] - t0, tokens)


def select_reference(scores: Tensor, layout: SSALayout, b: int) -> Tensor:
    """The top-k blocks ``[rows, G, topk]`` of sequence ``b``'s ``scores`` (per tile or per token) as
    global ids, ascending, -1 padded."""
    tiles, groups, blocks = scores.shape
    top = scores.topk(min(layout.cfg.topk, blocks), dim=-1).indices.sort(dim=-1).values
    selected = torch.full((tiles, groups, layout.cfg.topk), -1, dtype=torch.int64, device=scores.device)
    selected[:, :, : top.shape[-1]] = top + layout.slc_cu[b]
    return selected


def ssa_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    layout: SSALayout,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    selection: Tensor | None = None,
    per_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """SSA of ``q[N, H, D]``, ``k, v[N, G, D]``, ``gates[N, H, 3]``; returns ``(out[N, H, D], selection)``.

    ``selection[T, G, topk]`` (global selection-block ids, -1 padded) overrides the top-k choice, so
    that two implementations can be compared on the same blocks; the one used is returned.
    ``per_token``: every query picks its own top-k blocks (the paper's selection) instead of sharing
    its query tile's; ``selection`` is then ``[N, G, topk]``.
    """
    cfg = layout.cfg
    scale = cfg.scale if cfg.scale is not None else q.shape[-1] ** -0.5
    groups = k.shape[1]
    rep = q.shape[1] // groups
    if k_cmp is None:
        k_cmp, v_cmp = compress_reference(k, layout), compress_reference(v, layout)
    chosen = []
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(layout.batch):
        a, e = int(layout.cu_seqlens[b]), int(layout.cu_seqlens[b + 1])
        if a == e:
            continue
        c0, c1 = int(layout.cmp_cu[b]), int(layout.cmp_cu[b + 1])
        qb, kb, vb = q[a:e], k[a:e], v[a:e]

        everything = torch.ones(1, e - a, c1 - c0, dtype=torch.bool, device=q.device)
        o_cmp, p_cmp = masked_attention(qb, k_cmp[c0:c1], v_cmp[c0:c1], everything, scale)

        t0, t1 = int(layout.tile_cu[b]), int(layout.tile_cu[b + 1])
        score = token_block_scores_reference if per_token else block_scores_reference
        if selection is None:
            sel = select_reference(score(p_cmp, layout, b, groups), layout, b)
        else:
            sel = selection[a:e] if per_token else selection[t0:t1]
        chosen.append(sel)
        # Key j is visible to query i in group g when j's block is among i's (tile's) choices.
        row_sel = sel if per_token else sel[layout.tile[a:e] - t0]  # [n, G, topk]
        visible = (row_sel[:, :, :, None] == layout.slc_block[a:e][None, None, None, :]).any(2)  # [n, G, n]
        o_slc, _ = masked_attention(qb, kb, vb, visible.permute(1, 0, 2).repeat_interleave(rep, 0), scale)

        same_window = layout.window[a:e, None] == layout.window[None, a:e]
        o_win, _ = masked_attention(qb, kb, vb, same_window[None], scale)

        g = gates[a:e].float()
        out[a:e] = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    empty = torch.empty(0, groups, cfg.topk, dtype=torch.int64, device=q.device)
    return out.to(q.dtype), torch.cat(chosen) if chosen else empty


def tile_sharing_error(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    layouts: dict[int, SSALayout],
    rows: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    chunk: int = 256,
) -> dict[int, dict[str, float]]:
    """What sharing one top-k selection per query tile costs against per-token selection, on ``rows``.

    One sequence (``q[N, H, D]`` etc., as :func:`ssa_reference`); ``layouts`` maps query-tile sizes
    to layouts of the same coordinates (they differ only in their tiles, which nest: a tile of 16
    lies inside one of 32 and one of 64); ``rows`` are caller-order queries made of whole tiles of
    the largest size, so every tile's shared score is complete. Per tile size:

    - ``overlap``: mean fraction of a query's own top-k blocks that its tile's selection holds;
    - ``slc_rel_err``: ``||o_slc(tile) - o_slc(token)|| / ||o_slc(token)||`` over the rows;
    - ``out_rel_err``: the same for the gated SSA output (compression and window branches are
      identical in both, so only the selection branch differs).

    Memory is O(chunk x N) per head: it runs on real latents of 100k+ tokens.
    """
    cfg = next(iter(layouts.values())).cfg
    scale = cfg.scale if cfg.scale is not None else q.shape[-1] ** -0.5
    groups, rep = k.shape[1], q.shape[1] // k.shape[1]
    any_layout = layouts[max(layouts)]
    slc_block = any_layout.slc_block
    s0, s1 = int(any_layout.slc_cu[0]), int(any_layout.slc_cu[1])
    topk = min(cfg.topk, s1 - s0)

    o_cmp, p_cmp = masked_attention(q[rows], k_cmp, v_cmp, torch.ones(1, len(rows), len(k_cmp), dtype=torch.bool,
                                                                        device=q.device), scale)
    per_group = p_cmp.reshape(groups, rep, len(rows), -1).sum(1)
    token_scores = per_group.new_zeros(groups, len(rows), s1 - s0).index_add(2, any_layout.cmp_slc - s0, per_group)
    token_scores = token_scores.permute(1, 0, 2)  # [rows, G, S]
    selections = {"token": token_scores.topk(topk, dim=-1).indices + s0}
    for size, layout in layouts.items():
        tiles, tile_of_row = torch.unique(layout.tile[rows], return_inverse=True)
        tile_scores = token_scores.new_zeros(len(tiles), *token_scores.shape[1:]).index_add(0, tile_of_row, token_scores)
        selections[size] = (tile_scores.topk(topk, dim=-1).indices + s0)[tile_of_row]

    def branch_outputs(selected: Tensor) -> Tensor:
        outs = []
        for c in range(0, len(rows), chunk):
            r = rows[c : c + chunk]
            visible = (selected[c : c + chunk, :, :, None] == slc_block[None, None, None, :]).any(2)  # [c, G, N]
            outs.append(masked_attention(q[r], k, v, visible.permute(1, 0, 2).repeat_interleave(rep, 0), scale)[0])
        return torch.cat(outs)

    o_win = torch.cat([
        masked_attention(q[r], k, v, (any_layout.window[r, None] == any_layout.window[None, :])[None], scale)[0]
        for r in rows.split(chunk)
    ])
    g = gates[rows].float()
    o_slc = {name: branch_outputs(sel) for name, sel in selections.items()}
    out = {name: g[..., 0:1] * o_cmp + g[..., 1:2] * o + g[..., 2:3] * o_win for name, o in o_slc.items()}
    mine = selections["token"]
    result = {}
    for size in layouts:
        shared = (selections[size][:, :, :, None] == mine[:, :, None, :]).any(2).float().mean()
        result[size] = {
            "overlap": float(shared),
            "slc_rel_err": float((o_slc[size] - o_slc["token"]).norm() / o_slc["token"].norm()),
            "out_rel_err": float((out[size] - out["token"]).norm() / out["token"].norm()),
        }
    return result
