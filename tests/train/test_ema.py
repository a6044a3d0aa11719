"""The weights' moving average: its warmed-up update, checkpointing, bit-exact resume, loading."""

import pytest
import torch
from torch import nn

from meshforge.checkpoints import EMA_WEIGHTS, latest_checkpoint, load_ema, load_weights
from meshforge.models.registry import load_model
from meshforge.train.config import TrainSettings
from meshforge.train.ema import EMA, ema_decay_at
from meshforge.train.trainer import train
from tests.train.toy import ToyModel, ToyTask, toy_config

torch.set_num_threads(1)


def test_update_is_the_warmed_up_lerp_towards_the_parameters():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = [p.detach().double().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.95)
    expected = start
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(step)
        d = min(0.95, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
    for got, want in zip(ema.state_dict().values(), expected):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)  # float32 rounding of a few lerps
    assert ema_decay_at(0.999, 0) == 0.1 and ema_decay_at(0.999, 10**6) == 0.999
    assert list(ema.state_dict()) == ["weight", "bias"]


def test_decay_defaults_and_validation():
    from meshforge.train.tasks.dit import DiTTaskConfig
    from meshforge.train.tasks.iflame import TrainIFlameConfig

    assert TrainSettings().ema_decay == 0.0
    assert TrainIFlameConfig(data="d", out="o").ema_decay == 0.0
    assert DiTTaskConfig(data="d", out="o").ema_decay == 0.999
    with pytest.raises(ValueError, match="ema_decay"):
        TrainSettings(ema_decay=1.0)
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), 0.0)


def test_resume_continues_the_average_bit_exactly_and_loading_prefers_it(tmp_path):
    cfg = toy_config(ema_decay=0.9)
    full = tmp_path / "full"
    train(ToyTask(batch_size=8), cfg, full, device="cpu")
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        train(ToyTask(batch_size=8, interrupt_at=20), cfg, split, device="cpu")
    assert (latest_checkpoint(split) / EMA_WEIGHTS).is_file()
    train(ToyTask(batch_size=8), cfg, split, device="cpu", resume=True)

    a, b = load_ema(latest_checkpoint(full)), load_ema(latest_checkpoint(split))
    assert sorted(a) == sorted(b) == sorted(n for n, _ in ToyModel(ToyTask(8).cfg).named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name

    _, averaged, meta = load_model(full)
    _, raw, raw_meta = load_model(full, ema=False)
    assert meta["weights"] == "ema" and raw_meta["weights"] == "model"
    assert torch.equal(averaged.fc1.weight, a["fc1.weight"])
    assert averaged.head.weight is averaged.embed.weight  # ties survive
    trained = ToyModel(ToyTask(8).cfg)
    load_weights(trained, latest_checkpoint(full))
    assert torch.equal(raw.fc1.weight, trained.fc1.weight) and not torch.equal(raw.fc1.weight, averaged.fc1.weight)


def test_without_a_decay_there_is_no_average(tmp_path):
    train(ToyTask(batch_size=8), toy_config(steps=10), tmp_path, device="cpu")
    assert load_ema(latest_checkpoint(tmp_path)) is None
    assert load_model(tmp_path)[2]["weights"] == "model"
