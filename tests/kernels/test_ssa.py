"""Spatial Sparse Attention: the block layout, the pooling, and the Triton kernels against the reference.

On a CPU-only machine the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py before anything imports the kernel module) at small sizes; GPU
tests run the compiled kernels at full size in bf16.
"""

import pytest
import torch
from meshforge.kernels.ssa import (
    SSAConfig,
    build_layout,
    compress_kv,
    gathered,
    mix,
    range_attn,
    spatial_sparse_attention,
    ssa_reference,
    triton_path,
)
from meshforge.kernels.ssa.plans import AttnPlan, selection_plan
from meshforge.kernels.ssa.reference import (
    block_scores_reference,
    compress_reference,
    masked_attention,
    tile_sharing_error,
)
from meshforge.kernels.ssa.select import topk_blocks

from meshforge.data.canonical import normalize_vertices
from meshforge.data.sdf import voxelize
from meshforge.data.synth import synth_mesh

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shell_coords(n_points: int, resolution: int, seed: int) -> torch.Tensor:
    """Voxels of a thin spherical shell: surface-like sparsity, blocks holding 1 to dozens of tokens."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n_points, 3, generator=g)
    p = p / p.norm(dim=1, keepdim=True) * (0.3 + 0.15 * torch.rand(n_points, 1, generator=g))
    return torch.unique(((p + 0.5) * resolution).long().clamp(0, resolution - 1), dim=0)


def batch_coords(sizes: list[tuple[int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated shells (``(points, resolution)`` each; ``(0, r)`` is an empty sequence) and cu_seqlens."""
    parts = [
        shell_coords(n, r, seed + i) if n else torch.zeros(0, 3, dtype=torch.long)
        for i, (n, r) in enumerate(sizes)
    ]
    cu = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
    return torch.cat(parts), cu


def random_inputs(n: int, heads: int, groups: int, dim: int, seed: int, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, dim, generator=g) for h in (heads, groups, groups))
    gates = torch.rand(n, heads, 3, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (q, k, v, gates)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture
def small_key_tiles(monkeypatch):
    """Key chunks of 16 rows, so that small blocks still span several kernel steps."""
    monkeypatch.setattr(triton_path, "BLOCK_N", 16)


# ---------------------------------------------------------------------------------------------
# Configuration and layout


@pytest.mark.parametrize(
    "kwargs", [{"block_slc": 6, "block_cmp": 4}, {"shift": 8}, {"query_tile": 48}, {"topk": 0}]
)
def test_config_rejects_inconsistent_values(kwargs):
    with pytest.raises(ValueError):
        SSAConfig(**kwargs)


@pytest.mark.parametrize("shift", [0, 2])
def test_layout_groups_each_block_into_one_contiguous_run(shift):
    coords, cu = batch_coords([(300, 20), (0, 8), (120, 12)], seed=1)
    cfg = SSAConfig(block_cmp=2, block_slc=4, window=4, shift=shift, query_tile=16)
    lay = build_layout(coords, cu, cfg)
    n = len(coords)
    seq = torch.repeat_interleave(torch.arange(3), cu.diff())
    assert torch.equal(lay.perm.sort().values, torch.arange(n))
    assert torch.equal(seq[lay.perm], seq), "block order keeps every sequence in its rows"

    def check_groups(order, offsets, group_of_token, key):
        """Runs of ``offsets`` in ``order`` are exactly the tokens of equal ``key``, one id per run."""
        run_of_row = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
        assert torch.equal(group_of_token[order], run_of_row)
        keys = torch.cat([seq[:, None], key], 1)[order]
        same_run = run_of_row[1:] == run_of_row[:-1]
        same_key = (keys[1:] == keys[:-1]).all(1)
        assert torch.equal(same_run, same_key)

    check_groups(lay.perm, lay.cmp_offsets, lay.cmp_block, coords // 2)
    check_groups(lay.perm, lay.slc_offsets, lay.slc_block, coords // 4)
    check_groups(lay.win_perm, lay.win_offsets, lay.window, (coords + shift) // 4)
    assert lay.shared_order == (shift == 0)
    assert torch.equal(lay.cmp_slc[lay.cmp_block], lay.slc_block), (
        "compression blocks nest in selection blocks"
    )
    # Tiles: query_tile consecutive rows, never across sequences, covering every row once.
    assert torch.equal(lay.tile_end - lay.tile_start, torch.clamp(lay.tile_end - lay.tile_start, 1, 16))
    assert torch.equal(seq[lay.tile_start], seq[lay.tile_end - 1])
    covered = torch.repeat_interleave(torch.arange(len(lay.tile_start)), lay.tile_end - lay.tile_start)
    assert torch.equal(covered, lay.tile[lay.perm])
    blocks_per_seq = [lay.slc_block[cu[b] : cu[b + 1]].unique().numel() for b in range(3)]
    assert lay.slc_cu.tolist() == [0, *torch.tensor(blocks_per_seq).cumsum(0).tolist()]


def test_layout_accepts_batch_column_and_rejects_bad_offsets():
    coords, cu = batch_coords([(50, 8)], seed=2)
    cfg = SSAConfig(query_tile=16)
    with_batch = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    assert torch.equal(build_layout(with_batch, cu, cfg).perm, build_layout(coords, cu, cfg).perm)
    with pytest.raises(ValueError, match="cu_seqlens"):
        build_layout(coords, cu + 1, cfg)


def test_pooling_matches_block_by_block_mean_with_position_encoding():
    coords, cu = batch_coords([(200, 16), (80, 10)], seed=3)
    cfg = SSAConfig(block_cmp=4, block_slc=8)
    lay = build_layout(coords, cu, cfg)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, len(coords), 2, 8, generator=g)
    pe = torch.randn(4**3, 2, 8, generator=g)
    k_cmp, v_cmp = compress_kv(k, v, lay, pe_k=pe)
    torch.testing.assert_close(k_cmp, compress_reference(k, lay, pe))
    torch.testing.assert_close(v_cmp, compress_reference(v, lay))


def test_position_encoding_gradient_is_the_gathered_definitions():
    """Pooling adds each block's mean position encoding as one small product; its values and gradients
    equal those of gathering ``pe`` onto every token. Pooling accumulates in float32, so both sum at
    most 64 float32 terms in another order: within 64 * 2^-24 ~ 4e-6 relative."""
    coords, cu = batch_coords([(200, 16), (0, 8), (80, 10)], seed=4)
    lay = build_layout(coords, cu, SSAConfig(block_cmp=4, block_slc=8))
    g = torch.Generator().manual_seed(1)
    k = torch.randn(len(coords), 2, 8, generator=g, requires_grad=True)
    pe = torch.randn(4**3, 2, 8, generator=g, requires_grad=True)
    grad = torch.randn(int(lay.cmp_cu[-1]), 2, 8, generator=g)
    pooled = compress_kv(k, k, lay, pe_k=pe)[0]
    definition = torch.segment_reduce((k + pe[lay.cmp_pos])[lay.perm], "mean", offsets=lay.cmp_offsets, axis=0)
    torch.testing.assert_close(pooled, definition, rtol=1e-5, atol=1e-6)
    ours, theirs = (torch.autograd.grad(out, (k, pe), grad) for out in (pooled, definition))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Triton path vs reference (interpreter on CPU)


def run_both(coords, cu, cfg, heads, groups, dim, seed, dtype=torch.float32):
    """Outputs and gradients of the Triton path and of the reference on the Triton path's selection."""
    lay = build_layout(coords.to(DEVICE), cu.to(DEVICE), cfg)
    q, k, v, gates = random_inputs(len(coords), heads, groups, dim, seed, dtype)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out, selection = triton_path.ssa_triton(q, k, v, gates, lay, *compress_kv(k, v, lay))
    grads = torch.autograd.grad(out, (q, k, v, gates), grad_out)
    ref, ref_selection = ssa_reference(q, k, v, gates, lay)
    ref_on_same, _ = ssa_reference(q, k, v, gates, lay, selection=selection)
    ref_grads = torch.autograd.grad(ref_on_same, (q, k, v, gates), grad_out)
    return out, grads, ref_on_same, ref_grads, selection, ref_selection, ref


def assert_valid_topk(selection, coords, cu, cfg, seed, tol=1e-5):
    """Every chosen block scores at least as high as every block left out (reference scores, tol)."""
    lay = build_layout(coords.to(DEVICE), cu.to(DEVICE), cfg)
    q, k, v, _ = random_inputs(len(coords), selection.shape[1] * 2, selection.shape[1], 16, seed)
    k_cmp, v_cmp = compress_reference(k, lay), compress_reference(v, lay)
    for b in range(lay.batch):
        a, e, c0, c1 = (int(x) for x in (cu[b], cu[b + 1], lay.cmp_cu[b], lay.cmp_cu[b + 1]))
        if a == e:
            continue
        everything = torch.ones(1, e - a, c1 - c0, dtype=torch.bool, device=DEVICE)
        _, probs = masked_attention(q[a:e], k_cmp[c0:c1], v_cmp[c0:c1], everything, 16**-0.5)
        scores = block_scores_reference(probs, lay, b, selection.shape[1])
        chosen = selection[int(lay.tile_cu[b]) : int(lay.tile_cu[b + 1])] - lay.slc_cu[b]
        blocks = torch.arange(scores.shape[-1], device=DEVICE)
        picked = (blocks[:, None] == chosen[:, :, None, :]).any(-1)  # [tiles, G, blocks]
        worst_in = scores.masked_fill(~picked, float("inf")).amin(-1)
        best_out = scores.masked_fill(picked, float("-inf")).amax(-1)
        assert bool((worst_in >= best_out - tol).all())


@pytest.mark.slow
def test_triton_matches_reference_with_gqa_shifted_windows_and_an_empty_sequence(small_key_tiles):
    coords, cu = batch_coords([(90, 10), (0, 4), (40, 8)], seed=4)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=3, window=4, shift=2, query_tile=16)
    out, grads, ref, ref_grads, selection, ref_selection, _ = run_both(coords, cu, cfg, 4, 2, 16, seed=5)
    # The kernels' choice is a top-k of the reference block scores, up to float32 rounding (sums
    # in another order can swap near-ties), and nearly always the very same one...
    assert_valid_topk(selection, coords, cu, cfg, seed=5)
    assert (selection == ref_selection).float().mean() > 0.9
    # ...and outputs and all four gradients agree with the reference on it.
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(["q", "k", "v", "gates"], grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.slow
def test_triton_matches_reference_when_windows_are_the_selection_blocks(small_key_tiles):
    coords, cu = batch_coords([(120, 12)], seed=6)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=2, window=4, shift=0, query_tile=16)
    out, grads, ref, ref_grads, *_ = run_both(coords, cu, cfg, 2, 1, 32, seed=7)
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip(["q", "k", "v", "gates"], grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.slow
def test_selection_of_every_block_is_dense_attention(small_key_tiles):
    """With top-k >= the number of blocks, the selection branch sees every token of the sequence."""
    coords, cu = batch_coords([(60, 8), (30, 6)], seed=8)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=64, window=4, query_tile=16)
    lay = build_layout(coords.to(DEVICE), cu.to(DEVICE), cfg)
    assert int(lay.slc_cu.diff().max()) <= cfg.topk
    q, k, v, _ = random_inputs(len(coords), 2, 1, 16, seed=9)
    only_selection = torch.tensor([0.0, 1.0, 0.0], device=DEVICE).expand(len(coords), 2, 3)
    out, _ = triton_path.ssa_triton(q, k, v, only_selection, lay, *compress_kv(k, v, lay))
    for b in range(2):
        a, e = int(cu[b]), int(cu[b + 1])
        everything = torch.ones(1, e - a, e - a, dtype=torch.bool, device=DEVICE)
        dense, _ = masked_attention(q[a:e], k[a:e], v[a:e], everything, 16**-0.5)
        assert rel_err(out[a:e], dense) < 1e-5


def plan_mask(plan, n_queries: int, n_keys: int, groups: int) -> torch.Tensor:
    """``[G, queries, keys]``: which keys each query reads under ``plan``, from its CSR arrays."""
    mask = torch.zeros(groups, n_queries, n_keys, dtype=torch.bool)
    ptr, start, end = (x.cpu().tolist() for x in (plan.rng_ptr, plan.rng_start, plan.rng_end))
    for g in range(groups):
        for t, (a, e) in enumerate(zip(plan.tile_start.tolist(), plan.tile_end.tolist())):
            for r in range(ptr[g * plan.rng_gstride + t], ptr[g * plan.rng_gstride + t + 1]):
                mask[g, a:e, start[r] : end[r]] = True
    if plan.win_q is not None:
        mask &= plan.win_q.cpu()[None, :, None] == plan.win_k.cpu()[None, None, :]
    return mask


def branch_gradients(q, k, v, plan, tile, grad_out, cap, monkeypatch):
    """(dQ, dK, dV) of one range-attention call, dK/dV pieces of at most ``cap`` steps (None: computed)."""
    monkeypatch.setattr(range_attn, "DKDV_CAP", cap)
    out = range_attn.RangeAttention.apply(q, k, v, plan, tile, q.shape[-1] ** -0.5, None)
    return torch.autograd.grad(out, (q, k, v), grad_out)


def skewed_plan(lengths: list[list[int]], tiles_per_list: int = 2) -> AttnPlan:
    """A plan whose dK/dV side has reverse lists of the given lengths per group (``rev_gstride`` apart),
    each read by ``tiles_per_list`` key tiles; the forward arrays are never read by the schedule."""
    n_lists = len(lengths[0])
    flat = torch.tensor([n for group in lengths for n in group])
    rev_ptr = torch.cat([torch.zeros(1, dtype=torch.long), flat.cumsum(0)]).int()
    kv_list = torch.arange(n_lists).repeat_interleave(tiles_per_list).int()
    none = torch.zeros(0, dtype=torch.int32)
    return AttnPlan(none, none, none, none, none, 0, torch.zeros_like(kv_list), torch.zeros_like(kv_list),
                    kv_list, rev_ptr, torch.zeros(int(flat.sum()), dtype=torch.int32), n_lists, 16)  # fmt: skip


@pytest.mark.parametrize("cap", [None, 5])
def test_dkdv_schedule_covers_each_items_steps_in_capped_pieces_longest_first(cap, monkeypatch):
    """Skewed lists (empty, short, one very long): every item's steps are covered once by equal
    shares of at most ``cap``; short items stay one direct-writing piece; split items own consecutive
    partial slots, listed once for the reduction; the fixed sizes bound the real counts."""
    monkeypatch.setattr(range_attn, "DKDV_CAP", cap)
    monkeypatch.setattr(range_attn, "DKDV_PROGRAMS_PER_SM", 20)
    monkeypatch.setattr(range_attn, "DKDV_MIN_STEPS", 4)
    groups, hpg = 2, 3
    plan = skewed_plan([[0, 1, 2, 40, 7], [3, 0, 90, 1, 1]])
    steps = range_attn.dkdv_steps(plan, groups, hpg)
    sched = range_attn.dkdv_schedule(plan, groups, hpg, torch.device("cpu"))
    total, target = int(steps.sum()), 20  # one "SM" off CUDA
    expected_cap = cap if cap is not None else max(4, -(-total // target))
    assert int(sched.cap) == expected_cap
    spare = target if cap is None else -(-total // cap)  # bounds total / cap
    assert len(sched.piece_item) == len(steps) + spare
    item, lo, hi, slot = (x.tolist() for x in (sched.piece_item, sched.piece_lo, sched.piece_hi,
                                                 sched.piece_slot))  # fmt: skip
    real = [i for i in item if i >= 0]
    assert item[: len(real)] == real, "unused entries come last"
    lengths = [e - b for b, e in zip(lo, hi)][: len(real)]
    assert lengths == sorted(lengths, reverse=True), "longest first"
    split = {}
    for i, n_steps in enumerate(steps.tolist()):
        mine = sorted((lo[p], hi[p], slot[p]) for p in range(len(real)) if item[p] == i)
        n = max(1, -(-n_steps // expected_cap))
        assert len(mine) == n
        assert [b for b, _, _ in mine] == [k * n_steps // n for k in range(n)]
        assert [e for _, e, _ in mine] == [(k + 1) * n_steps // n for k in range(n)]
        if n == 1:
            assert mine[0][2] == -1
        else:
            first = mine[0][2]
            assert [s for _, _, s in mine] == list(range(first, first + n))
            split[i] = (first, n)
    assert any(0 < n <= expected_cap for n in steps.tolist()), "whole items exist"
    assert max(n for _, n in split.values()) >= 3, "an item of several pieces"
    used = sorted(s for s in slot if s >= 0)
    assert used == list(range(len(used))) and len(used) <= sched.n_slots
    listed = {i: (s, n) for i, s, n in zip(*(x.tolist() for x in (sched.split_item, sched.split_slot,
                                                                   sched.split_pieces))) if i >= 0}  # fmt: skip
    assert listed == split
    assert sched.counts() == {"cap": expected_cap, "pieces": len(real), "split_items": len(split)}


@pytest.mark.parametrize("branch", ["compression", "selection", "window"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_split_dkdv_equals_unsplit_and_the_reference(branch, groups, small_key_tiles, monkeypatch):
    """dK/dV with work items cut into pieces equal the unsplit kernel's and the masked definition's;
    dQ is untouched (bit for bit). Caps: the computed one, aimed (through the programs-per-SM target
    and a minimum of 1 step) at about the shortest non-empty item's steps, so that the longer items
    split and the shortest not; and 1, a piece per step. Float32 throughout: a split only regroups a
    row's float32 sum (<= heads x tiles x tile rows = 4 x 9 x 16 = 576 products) into <= 36 partial
    sums added in order, so the results differ from one sum by ~sqrt(576) x 2^-24 ~ 1.5e-6 relative
    in norm (576 x 2^-24 ~ 3.4e-5 at worst, for sums of one sign; these are of random sign): 1e-5."""
    coords, cu = batch_coords([(90, 10), (0, 4), (40, 8)], seed=30)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=2, window=4, shift=2, query_tile=16)
    layout = build_layout(coords.to(DEVICE), cu.to(DEVICE), cfg)
    n, heads = len(coords), 4
    q, k, v, _ = random_inputs(n, heads, groups, 16, seed=31)
    cmp_plan, win_plan = triton_path.branch_plans(layout)
    if branch == "compression":
        k, v = (compress_kv(k, v, layout)[i].detach().requires_grad_() for i in (0, 1))
        plan = cmp_plan
    elif branch == "selection":
        scores = torch.rand(len(layout.tile_start), groups, cmp_plan.score_width,
                            generator=torch.Generator().manual_seed(32)).to(DEVICE)  # fmt: skip
        plan = selection_plan(layout, topk_blocks(scores, layout), triton_path.BLOCK_N)
    else:
        plan = win_plan
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(33)).to(DEVICE)
    unsplit = branch_gradients(q, k, v, plan, cfg.query_tile, grad_out, range_attn.DKDV_NO_SPLIT, monkeypatch)
    mask = plan_mask(plan, n, len(k), groups).repeat_interleave(heads // groups, 0).to(DEVICE)
    ref_out, _ = masked_attention(q, k, v, mask, 16**-0.5)
    reference = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    steps = range_attn.dkdv_steps(plan, groups, heads // groups)
    shortest, nonempty = int(steps[steps > 0].min()), int((steps > 0).sum())
    # The computed cap, aimed at about the shortest non-empty item's steps: the longer ones split.
    monkeypatch.setattr(range_attn, "_sm_count", lambda device: 1)  # as in the interpreter
    monkeypatch.setattr(range_attn, "DKDV_PROGRAMS_PER_SM", int(steps.sum()) // shortest)
    monkeypatch.setattr(range_attn, "DKDV_MIN_STEPS", 1)
    for cap in (None, 1):
        monkeypatch.setattr(range_attn, "DKDV_CAP", cap)
        split = range_attn.dkdv_schedule(plan, groups, heads // groups, q.device).counts()["split_items"]
        assert 0 < split and (cap == 1 or split < nonempty), "some items in several pieces, others whole"
        dq, dk, dv = branch_gradients(q, k, v, plan, cfg.query_tile, grad_out, cap, monkeypatch)
        assert torch.equal(dq, unsplit[0])
        for name, a, b, ref in (("k", dk, unsplit[1], reference[1]), ("v", dv, unsplit[2], reference[2])):
            assert rel_err(a, b) < 1e-5, (name, cap)
            assert rel_err(a, ref) < 1e-5, (name, cap)
    for name, a, ref in zip("qkv", unsplit, reference):
        assert rel_err(a, ref) < 1e-5, name


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("chunk", [1 << 24, 1 << 12])
def test_gathered_form_equals_the_reference(shift, chunk, monkeypatch):
    """The CPU path (per-tile gathers, chunked) against the dense masked definition, float32: an
    empty sequence, one with fewer selection blocks than top-k, GQA, shifted windows, small chunks."""
    monkeypatch.setattr(gathered, "CHUNK_ELEMENTS", chunk)
    coords, cu = batch_coords([(400, 16), (0, 8), (30, 4), (250, 12)], seed=20 + shift)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=3, window=4, shift=shift, query_tile=16)
    layout = build_layout(coords, cu, cfg)
    assert int(layout.slc_cu[3] - layout.slc_cu[2]) < cfg.topk
    q, k, v, gates = random_inputs(len(coords), 4, 2, 8, seed=21, device="cpu")
    out, selection = gathered.ssa_gathered(q, k, v, gates, layout)
    ref, ref_selection = ssa_reference(q, k, v, gates, layout)
    assert torch.equal(selection, ref_selection)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gates), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v, gates), grad)
    for name, a, b in zip(["q", "k", "v", "gates"], grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


def pytorch_mix(branches, gates, perm):
    """What the fused gated sum replaces: the mix in block order, gathered back to the caller's order."""
    in_block_order = gates[perm].to(branches[0].dtype)
    return sum(o * in_block_order[..., b : b + 1] for b, o in enumerate(branches))[torch.argsort(perm)]


def assert_gated_sum_matches(branches, gates, perm, grad, tol):
    fused = mix.gated_sum(*branches, gates, perm)
    expected = pytorch_mix(branches, gates, perm)
    assert rel_err(fused, expected) < tol
    ours = torch.autograd.grad(fused, (*branches, gates), grad)
    theirs = torch.autograd.grad(expected, (*branches, gates), grad)
    for name, a, b in zip(["cmp", "slc", "win", "gates"], ours, theirs):
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("head_dim", [16, 24])
def test_fused_gated_sum_equals_the_pytorch_mix(head_dim):
    """The fused kernel against the op it replaces (mix in block order, gather to the caller's order),
    values and all four gradients, float32: each value is a sum of 3 (mix, dO) or head_dim (gate
    gradient) float32 products in another order, within head_dim x 2^-24 < 2e-6 relative."""
    n, heads = 150, 3  # 450 (token, head) rows: a partial last program; head dim 24 pads to 32
    g = torch.Generator().manual_seed(50)
    branches = [torch.randn(n, heads, head_dim, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    gates = torch.rand(n, heads, 3, generator=g).to(DEVICE).requires_grad_()
    perm = torch.randperm(n, generator=g).to(DEVICE)
    grad = torch.randn(n, heads, head_dim, generator=g).to(DEVICE)
    assert_gated_sum_matches(branches, gates, perm, grad, 2e-6)


def test_cpu_dispatch_is_the_gathered_form_and_checks_shapes():
    coords, cu = batch_coords([(80, 10)], seed=10)
    cfg = SSAConfig(block_cmp=2, block_slc=4, window=4, query_tile=16)
    q, k, v, gates = random_inputs(len(coords), 4, 2, 16, seed=11, device="cpu")
    out = spatial_sparse_attention(q, k, v, gates, coords, cu, cfg)
    layout = build_layout(coords, cu, cfg)
    torch.testing.assert_close(out, gathered.ssa_gathered(q, k, v, gates, layout)[0], rtol=0, atol=0)
    reference = spatial_sparse_attention(q, k, v, gates, coords, cu, cfg, backend="reference")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gates"):
        spatial_sparse_attention(q, k, v, gates[..., :2], coords, cu, cfg)
    with pytest.raises(ValueError, match="G \\| H"):
        spatial_sparse_attention(
            q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), gates, coords, cu, cfg
        )


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at full size, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_bf16_matches_reference_at_full_size(dim):
    coords, cu = batch_coords([(6000, 64), (3000, 48)], seed=12)
    cfg = SSAConfig(window=8, shift=4)
    out, grads, ref, ref_grads, selection, ref_selection, _ = run_both(
        coords, cu, cfg, 16, 4, dim, 13, torch.bfloat16
    )
    # bf16 block scores may order near-ties differently; nearly every choice must agree.
    assert (selection == ref_selection).float().mean().item() > 0.95
    assert rel_err(out, ref) < 1e-2
    for name, a, b in zip(["q", "k", "v", "gates"], grads, ref_grads):
        assert rel_err(a, b) < 2e-2, name


@pytest.mark.gpu
def test_gpu_full_selection_equals_flash_attention():
    coords, cu = batch_coords([(30000, 80)], seed=14)
    cfg = SSAConfig(topk=10_000)
    lay = build_layout(coords.cuda(), cu.cuda(), cfg)
    q, k, v, _ = random_inputs(len(coords), 16, 16, 64, seed=15, dtype=torch.bfloat16)
    only_selection = torch.tensor([0.0, 1.0, 0.0], device="cuda").expand(len(coords), 16, 3)
    out, _ = triton_path.ssa_triton(q, k, v, only_selection, lay, *compress_kv(k, v, lay))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))
    assert rel_err(out, dense[0].transpose(0, 1)) < 1e-2


@pytest.mark.gpu
def test_gpu_split_dkdv_equals_unsplit_on_a_real_latent_with_two_kv_heads(monkeypatch):
    """The released DiT's heads (16 query, 2 KV, dim 64, bf16) on the synth table's surface band at
    the 1024^3 grid's latent resolution (123,552 tokens): each branch's dK/dV with the computed cap
    (which splits the compression items, 8 heads x 1,930 tiles each) and with a small fixed cap per
    branch (which splits some items of every branch) equal the unsplit ones. Both sum the same bf16
    products in float32, in another grouping (~sqrt(n) x 2^-24 ~ 1e-4 relative for the ~1e6 terms
    of a compression row), and round once to bf16 (<= 2^-9 relative each): within 2^-8 + 1e-4 <
    5e-3 in norm. dQ's kernel is untouched: bit for bit."""
    vertices, faces = synth_mesh("table", seed=0, index=0)
    coords = voxelize(normalize_vertices(vertices) * 0.9, faces, 128, band=1.0, device="cuda").coords.long()
    cfg = SSAConfig()
    layout = build_layout(coords, torch.tensor([0, len(coords)], device="cuda"), cfg)
    assert len(coords) > 100_000
    q, k, v, _ = random_inputs(len(coords), 16, 2, 64, seed=40, dtype=torch.bfloat16)
    qs, ks, vs = (triton_path.to_block_order(t, layout).detach().requires_grad_() for t in (q, k, v))
    k_cmp, v_cmp = (t.detach().requires_grad_() for t in compress_kv(ks, vs, layout))
    cmp_plan, win_plan = triton_path.branch_plans(layout)
    _, score = triton_path.compression_branch(qs, k_cmp, v_cmp, layout)
    branches = {  # name: keys, values, plan, a fixed cap that splits some of its items
        "compression": (k_cmp, v_cmp, cmp_plan, 1000),
        "selection": (ks, vs, selection_plan(layout, topk_blocks(score, layout), triton_path.BLOCK_N), 128),
        "window": (ks, vs, win_plan, 8),
    }
    grad_out = torch.randn_like(qs)
    for name, (bk, bv, plan, small_cap) in branches.items():
        unsplit = branch_gradients(qs, bk, bv, plan, cfg.query_tile, grad_out, range_attn.DKDV_NO_SPLIT, monkeypatch)
        for cap in (None, small_cap):
            monkeypatch.setattr(range_attn, "DKDV_CAP", cap)
            split = range_attn.dkdv_schedule(plan, 2, 8, qs.device).counts()["split_items"]
            assert split > 0 or (cap is None and name != "compression"), (name, cap)
            dq, dk, dv = branch_gradients(qs, bk, bv, plan, cfg.query_tile, grad_out, cap, monkeypatch)
            assert torch.equal(dq, unsplit[0]), name
            assert rel_err(dk, unsplit[1]) < 5e-3, (name, cap)
            assert rel_err(dv, unsplit[2]) < 5e-3, (name, cap)


@pytest.mark.gpu
def test_gpu_fused_gated_sum_matches_the_pytorch_mix_in_bf16():
    """123k tokens, 16 heads of 64, bf16, float32 gates. The kernel rounds once (<= 2^-9 relative);
    the PyTorch mix rounds the cast gates, three products and two sums: within ~6 x 2^-9 < 1.2e-2."""
    n, heads = 123_552, 16
    branches = [torch.randn(n, heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    gates = torch.rand(n, heads, 3, device="cuda", requires_grad=True)
    perm = torch.randperm(n, device="cuda")
    grad = torch.randn_like(branches[0])
    assert_gated_sum_matches(branches, gates, perm, grad, 1.2e-2)


# ---------------------------------------------------------------------------------------------
# Per-token selection (the paper's) against the tile-shared one


def test_per_token_selection_is_each_querys_own_top_k():
    coords, cu = batch_coords([(900, 24)], seed=7)
    cfg = SSAConfig(block_cmp=2, block_slc=4, topk=3, window=4, query_tile=16)
    layout = build_layout(coords, cu, cfg)
    q, k, v, gates = (t.detach().cpu() for t in random_inputs(len(coords), 4, 2, 8, seed=7, device="cpu"))
    k_cmp, v_cmp = compress_reference(k, layout), compress_reference(v, layout)
    _, selection = ssa_reference(q, k, v, gates, layout, k_cmp, v_cmp, per_token=True)
    _, probs = masked_attention(q, k_cmp, v_cmp, torch.ones(1, len(q), len(k_cmp), dtype=torch.bool), 8**-0.5)
    for i in (0, 123, len(q) - 1):  # the definition, one query at a time
        per_block = torch.zeros(2, int(layout.slc_cu[-1]))
        for c in range(len(k_cmp)):
            per_block[:, layout.cmp_slc[c]] += probs[:, i, c].reshape(2, 2).sum(1)
        assert torch.equal(selection[i], per_block.topk(3, dim=-1).indices.sort(dim=-1).values)


def tile_study_inputs(points: int, resolution: int, seed: int, tiles: tuple[int, ...], topk: int, heads: int):
    """One shell sequence, its layouts at each query tile, CPU q/k/v/gates (2 KV heads) and pooled k/v."""
    coords, cu = batch_coords([(points, resolution)], seed=seed)
    layouts = {t: build_layout(coords, cu, SSAConfig(block_cmp=2, block_slc=4, topk=topk, window=4, query_tile=t))
               for t in tiles}
    q, k, v, gates = (t.detach().cpu() for t in random_inputs(len(coords), heads, 2, 8, seed=seed, device="cpu"))
    widest = layouts[max(tiles)]
    return layouts, (q, k, v, gates), (compress_reference(k, widest), compress_reference(v, widest))


def test_tile_sharing_error_matches_the_reference_outputs():
    """The study's per-token and tile-shared outputs are the reference's (all rows sampled)."""
    layouts, (q, k, v, gates), (k_cmp, v_cmp) = tile_study_inputs(700, 24, 8, (16, 64), topk=3, heads=4)
    study = tile_sharing_error(q, k, v, gates, layouts, torch.arange(len(q)), k_cmp, v_cmp, chunk=100)
    token, _ = ssa_reference(q, k, v, gates, layouts[64], k_cmp, v_cmp, per_token=True)
    for size, layout in layouts.items():
        shared, _ = ssa_reference(q, k, v, gates, layout, k_cmp, v_cmp)
        # Same selections, same float32 attention: only the chunking of the queries differs.
        assert study[size]["out_rel_err"] == pytest.approx(rel_err(shared, token), rel=1e-4, abs=1e-6)
        assert 0 < study[size]["overlap"] < 1
    assert study[16]["overlap"] > study[64]["overlap"]  # smaller tiles agree more with each query


def test_tile_sharing_costs_nothing_when_every_block_is_selected():
    layouts, (q, k, v, gates), (k_cmp, v_cmp) = tile_study_inputs(300, 16, 9, (16, 32), topk=10_000, heads=2)
    study = tile_sharing_error(q, k, v, gates, layouts, torch.arange(len(q)), k_cmp, v_cmp)
    for size in layouts:
        assert study[size] == {"overlap": 1.0, "slc_rel_err": 0.0, "out_rel_err": 0.0}
