import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("meshforge.models.iflame")

from meshforge.data.shards import TokenDataset
from meshforge.data.synth import generate
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.errors import ConfigError
from meshforge.train.tasks.iflame import IFlameTask, TrainIFlameConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("iflame")
    generate(root / "synth", n=16, seed=0, max_faces=100, families=["table", "lamp", "bench", "cabinet"])
    tokenize_folder(TokenizeConfig(input=root / "synth", out=root / "tokens", max_faces=100, val_fraction=0.25, workers=1))
    return root / "tokens"


def task(data, tmp_path, **kw) -> IFlameTask:
    return IFlameTask(TrainIFlameConfig(data=data, out=tmp_path / "run", **{"batch_size": 4, **kw}))


def rows(inputs, targets, pad):
    """Each sequence without its padding, as comparable tuples."""
    return [tuple(t[t != pad].tolist()) for t in targets], [tuple(x[: (t != pad).sum()].tolist()) for x, t in zip(inputs, targets)]


def test_ranks_split_the_same_global_batch(data, tmp_path):
    t = task(data, tmp_path)
    pad = t.vocab.pad
    whole = next(t.batches(0, 1, seed=3, start_step=5))
    halves = [next(t.batches(r, 2, seed=3, start_step=5)) for r in range(2)]
    y_whole, x_whole = rows(*whole, pad)
    y_parts = [y for h in halves for y in rows(*h, pad)[0]]
    x_parts = [x for h in halves for x in rows(*h, pad)[1]]
    assert y_whole == y_parts and x_whole == x_parts
    assert whole[0].shape[1] % 9 == 0 and (whole[0][:, 0] == t.vocab.start).all()


def test_batches_resume_at_any_step_and_augmentation_varies(data, tmp_path):
    t = task(data, tmp_path)
    stream = t.batches(0, 1, seed=0, start_step=0)
    first = [next(stream) for _ in range(6)]
    resumed = next(t.batches(0, 1, seed=0, start_step=4))
    assert all(torch.equal(a, b) for a, b in zip(first[4], resumed))
    # With the whole train split as the batch, each step is one epoch: the same meshes, re-augmented.
    n_train = len(TokenDataset(data, "train"))
    plain, augmented = (task(data, tmp_path, augment=a, batch_size=n_train, length_groups=1) for a in (False, True))

    def meshes(t, step):
        return sorted(rows(*next(t.batches(0, 1, seed=0, start_step=step)), t.vocab.pad)[0])

    assert meshes(plain, 0) == meshes(plain, 1)
    assert meshes(augmented, 0) != meshes(augmented, 1)
    assert meshes(augmented, 1) == meshes(augmented, 1)


def test_loss_is_cross_entropy_over_non_pad_targets(data, tmp_path):
    t = task(data, tmp_path)
    inputs, targets = next(t.batches(0, 1, seed=0, start_step=0))
    logits = torch.randn(*inputs.shape, t.vocab.size, generator=torch.Generator().manual_seed(0))

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    loss, metrics = t.loss(Fixed(), (inputs, targets))
    keep = targets != t.vocab.pad
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-6)
    assert metrics["tokens"].item() == keep.sum().item()
    assert metrics["acc"].item() == pytest.approx((logits[keep].argmax(-1) == targets[keep]).float().mean().item())


def test_model_must_fit_the_data(data, tmp_path):
    from meshforge.models.iflame import IFlameConfig

    with pytest.raises(ConfigError, match="vocab"):
        task(data, tmp_path, model=IFlameConfig(vocab_size=99))
    with pytest.raises(ConfigError, match="max_seq_len 99"):
        task(data, tmp_path, model=IFlameConfig(max_seq_len=99))
    assert task(data, tmp_path, model=IFlameConfig(max_seq_len=99), max_faces=10).max_len == 99


def test_config_validation():
    with pytest.raises(ValueError, match="max_faces"):
        TrainIFlameConfig(data="d", out="o", max_faces=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainIFlameConfig(data="d", out="o", batch_size=0)


def test_bucketed_batches_never_outgrow_a_model_sized_to_the_longest_mesh(data, tmp_path):
    """A model of exactly the dataset's 100 faces + END (909 positions): bucketing may not pad past it."""
    from meshforge.models.iflame import IFlameConfig

    t = task(data, tmp_path, batch_size=9, model=IFlameConfig(dim=32, n_heads=2, max_seq_len=909))
    stream = t.batches(0, 1, seed=0, start_step=0)
    assert max(next(stream)[0].shape[1] for _ in range(8)) <= 909
