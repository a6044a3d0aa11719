import math

import numpy as np
import pytest
import torch
from torch import nn

from meshforge.data.shards import TokenDataset
from meshforge.data.synth import generate
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.data.tokens import input_sequence, target_sequence
from meshforge.metrics.tokens import face_accuracy, perplexity, token_metrics


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    generate(root / "synth", n=12, seed=0, max_faces=120)
    tokenize_folder(TokenizeConfig(input=root / "synth", out=root / "tokens", val_fraction=0.5, max_faces=120, workers=1))
    return TokenDataset(root / "tokens", "val")


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape, self.vocab) + self.anchor


class CopyInput(Uniform):
    """Predicts that the next token repeats the current input token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x, self.vocab).float() * 5 + self.anchor


def test_uniform_model_has_the_vocabulary_as_perplexity(val):
    m = token_metrics(Uniform(val.vocab.size), val, batch_size=3)
    assert m["perplexity"] == pytest.approx(val.vocab.size, rel=1e-5)
    assert m["loss"] == pytest.approx(math.log(val.vocab.size), rel=1e-6)
    # Every non-PAD target counts once: 9F coordinates + END per mesh.
    assert m["tokens"] == sum(len(val[i]) + 1 for i in range(len(val))) and m["meshes"] == len(val)


def test_face_acc_counts_argmax_hits_over_non_pad_targets(val):
    expected_hits = expected_total = 0
    for i in range(len(val)):
        s = target_sequence(val[i], val.vocab)
        x = input_sequence(s, val.vocab)
        keep = s != val.vocab.pad
        expected_hits += int((x[keep] == s[keep]).sum())
        expected_total += int(keep.sum())
    model = CopyInput(val.vocab.size)
    assert face_accuracy(model, val, batch_size=2) == pytest.approx(expected_hits / expected_total, abs=1e-12)
    assert 0 < expected_hits < expected_total


def test_result_does_not_depend_on_batching_and_respects_max_meshes(val):
    model = CopyInput(val.vocab.size)
    one = token_metrics(model, val, batch_size=1)
    many = token_metrics(model, val, batch_size=len(val))
    assert one["face_acc"] == many["face_acc"]
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-6)
    assert perplexity(model, val) == pytest.approx(one["perplexity"], rel=1e-6)
    assert token_metrics(model, val, max_meshes=1)["meshes"] == 1
    assert np.isfinite(one["loss"])
