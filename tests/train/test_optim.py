import itertools
import math

import pytest
import torch

from meshforge.train.config import TrainConfig
from meshforge.train.optim import (
    Muon,
    build_optimizers,
    lr_factor,
    split_parameters,
    zeropower_newton_schulz,
)
from tests.train.toy import ToyConfig, ToyModel


def test_parameters_split_into_muon_matrices_and_adamw_rest():
    model = ToyModel(ToyConfig())
    muon, decay, no_decay = split_parameters(model)

    def ids(params):
        return {id(p) for p in params}

    assert ids(muon) == ids([model.fc1.weight, model.fc2.weight])
    assert ids(decay) == ids([model.embed.weight])  # the tied head is the embedding, listed once
    assert ids(no_decay) == ids([model.fc1.bias, model.fc2.bias, model.norm.weight, model.norm.bias])
    assert sum(p.numel() for p in muon + decay + no_decay) == sum(p.numel() for p in model.parameters())


def test_optimizer_choice():
    model = ToyModel(ToyConfig())
    muon = build_optimizers(model, TrainConfig(optimizer="muon"))
    assert [type(o).__name__ for o in muon] == ["AdamW", "Muon"]
    adamw = build_optimizers(model, TrainConfig(optimizer="adamw"))
    assert len(adamw) == 1 and sum(len(g["params"]) for g in adamw[0].param_groups) == 7


def test_newton_schulz_orthogonalises():
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_newton_schulz(g).float())
    # The quintic trades exactness for speed: singular values land in roughly [0.7, 1.2].
    assert s.min() > 0.6 and s.max() < 1.25


def test_batched_newton_schulz_orthogonalises_each_matrix_of_a_stack():
    g = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(1))
    stacked = zeropower_newton_schulz(g)
    for one, alone in zip(stacked, g):
        assert torch.allclose(one.float(), zeropower_newton_schulz(alone).float(), rtol=0, atol=2e-2)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_shape_batched_muon_matches_torch_muon():
    """Matrices of two shapes (one tall): the same algorithm as torch's per-matrix loop."""
    torch.manual_seed(0)
    shapes = [(24, 40), (24, 40), (40, 24), (24, 40)]
    ours_params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = Muon(ours_params, lr=0.02, weight_decay=0.1, momentum=0.95)
    ref = torch.optim.Muon(ref_params, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(5):
        for a, b in zip(ours_params, ref_params):
            grad = torch.randn(a.shape)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        # The same bf16 operations per matrix, batched: equal on a CPU (GPU GEMMs may tile differently).
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    # torch's state loads into ours (checkpoints written before this optimiser still resume).
    ours.load_state_dict(ref.state_dict())
    assert all(torch.equal(ours.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
               for a, b in zip(ours_params, ref_params))


def test_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(f[10:]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.1)
