import itertools
import math

import pytest
import torch

from meshforge.train.config import TrainConfig
from meshforge.train.optim import (
    NewtonSchulzMuon,
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


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_fallback_muon_matches_torch_muon():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(24, 40))
    b = torch.nn.Parameter(a.detach().clone())
    ours = NewtonSchulzMuon([a], lr=0.02, weight_decay=0.1, momentum=0.95)
    ref = torch.optim.Muon([b], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(5):
        grad = torch.randn(24, 40)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    # The same bf16 operations in the same order: equal to float rounding of the last update.
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(f[10:]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.1)
