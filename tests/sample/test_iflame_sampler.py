"""Batched iFlame sampling: grammar, per-sequence stopping, determinism, agreement with forward."""

import numpy as np
import pytest
import torch

from meshforge.data.tokens import Vocab, decode_tokens
from meshforge.errors import MeshforgeError
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.sample.iflame import SampleConfig, filter_logits, sample_tokens

VOCAB = Vocab(7)


def tiny_model() -> IFlame:
    torch.manual_seed(0)
    return IFlame(IFlameConfig(dim=32, n_heads=2, blocks=(1, 1, 2, 1, 1), max_seq_len=90))


class ScriptedModel:
    """Stands in for IFlame: prefers END wherever it is allowed once sequence i has i + 1 faces,
    and otherwise coordinate ``(position * 7) % levels``."""

    def __init__(self) -> None:
        self.config = IFlameConfig(dim=8, n_heads=2)
        self.training = False
        self.fed: list[torch.Tensor] = []

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def init_cache(self, batch, max_len, device):
        return {"t": 0, "batch": batch}

    def step(self, tokens, cache):
        self.fed.append(tokens.clone())
        t, batch = cache["t"], cache["batch"]
        cache["t"] += 1
        logits = torch.zeros(batch, VOCAB.size)
        logits[:, (t * 7) % VOCAB.levels] = 5.0
        faces_done = t // 9
        logits[torch.arange(batch) + 1 <= faces_done, VOCAB.end] = 10.0
        logits[:, VOCAB.start] = 20.0  # never allowed: the grammar must mask it
        return logits


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.1)).tolist() == [[True, False, False, False]]


def test_each_sequence_stops_at_its_own_end_and_grammar_holds():
    model = ScriptedModel()
    cfg = SampleConfig(n=3, batch_size=3, max_faces=10, temperature=0)
    sequences, stats = sample_tokens(model, VOCAB, cfg, "cpu")
    # Sequence i ends after i + 1 faces; END is only allowed at a face boundary.
    assert [len(s) for s in sequences] == [9, 18, 27]
    expected = np.array([(t * 7) % VOCAB.levels for t in range(27)])
    for s in sequences:
        np.testing.assert_array_equal(s, expected[: len(s)])
    # The batch stops once the last sequence ends; finished sequences are fed PAD meanwhile.
    assert stats["steps"] == 28 and stats["tokens"] == 9 + 18 + 27 + 3
    fed = torch.stack(model.fed, 1)
    assert (fed[:, 0] == VOCAB.start).all() and fed[0, 10] == VOCAB.end and (fed[0, 11:] == VOCAB.pad).all()
    assert (fed[2, 1:] < VOCAB.levels).all()
    assert stats["tokens_per_s"] > 0


def test_max_faces_truncates_to_whole_faces():
    sequences, _ = sample_tokens(ScriptedModel(), VOCAB, SampleConfig(n=2, batch_size=2, max_faces=1, temperature=0), "cpu")
    assert [len(s) for s in sequences] == [9, 9]


def test_sampling_is_seeded_and_decodes_to_meshes():
    model = tiny_model()
    cfg = SampleConfig(n=3, batch_size=2, max_faces=4, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first, _ = sample_tokens(model, VOCAB, cfg, "cpu")
    again, _ = sample_tokens(model, VOCAB, cfg, "cpu")
    other, _ = sample_tokens(model, VOCAB, SampleConfig(**{**cfg.__dict__, "seed": 8}), "cpu")
    assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    for s in first:
        assert len(s) % 9 == 0 and 9 <= len(s) <= 36 and (s < VOCAB.levels).all()
        mesh = decode_tokens(s, VOCAB)
        assert mesh.faces.shape[1] == 3 and mesh.vertices.max() < VOCAB.levels


def test_greedy_samples_are_the_argmax_of_the_full_forward():
    """The cached sampler feeds back what it sampled: re-scoring its output with forward agrees."""
    model = tiny_model().eval()
    (seq,), _ = sample_tokens(model, VOCAB, SampleConfig(n=1, batch_size=1, max_faces=3, temperature=0), "cpu")
    assert len(seq) == 27  # a random model essentially never picks END at greedy
    inputs = torch.tensor([[VOCAB.start, *seq[:-1]]])
    with torch.no_grad():
        logits = model(inputs)[0]
    logits[:, VOCAB.levels :] = float("-inf")  # the grammar: coordinates only (END is not the argmax)
    assert logits.argmax(-1).tolist() == seq.tolist()


def test_vocabulary_and_length_mismatches_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        sample_tokens(tiny_model(), Vocab(6), SampleConfig(n=1), "cpu")
    with pytest.raises(MeshforgeError, match="max_faces 11"):
        sample_tokens(tiny_model(), VOCAB, SampleConfig(n=1, max_faces=11), "cpu")


def test_batches_of_one_size_share_a_decoder_emptied_in_between():
    """Greedy sequences from the same start are identical: a second batch that saw the first one's
    cache would diverge from it."""
    cfg = SampleConfig(n=4, batch_size=2, max_faces=9, temperature=0)
    sequences, stats = sample_tokens(tiny_model(), VOCAB, cfg, "cpu")
    assert len(sequences) == 4 and stats["steps"] > 0
    for seq in sequences[1:]:
        np.testing.assert_array_equal(seq, sequences[0])


def test_prompted_greedy_completions_keep_their_prompts_and_are_the_forward_argmax():
    """Prompts of different lengths (batched by length, results in the caller's order) are kept as
    the sequences' first faces, and the greedy completion after a one-pass prefill is what the full
    forward pass would pick at every later position."""
    model = tiny_model().eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB.levels, 9 * k) for k in (2, 1, 2, 0)]
    cfg = SampleConfig(n=4, batch_size=4, max_faces=4, temperature=0)
    sequences, stats = sample_tokens(model, VOCAB, cfg, "cpu", prompts=prompts)
    assert stats["steps"] == (1 + 17) + (1 + 26) + 36  # three batches: a prefill then steps each
    for prompt, seq in zip(prompts, sequences):
        assert len(seq) == 36  # a random model essentially never picks END at greedy
        np.testing.assert_array_equal(seq[: len(prompt)], prompt)
        with torch.no_grad():
            logits = model(torch.tensor([[VOCAB.start, *seq[:-1]]]))[0]
        logits[:, VOCAB.levels :] = float("-inf")
        assert logits.argmax(-1)[len(prompt) :].tolist() == seq[len(prompt) :].tolist()


def test_a_prompt_must_leave_room_under_max_faces():
    prompts = [np.zeros(27, dtype=np.int64)]
    with pytest.raises(MeshforgeError, match="prompt of 3 faces leaves nothing to sample under max_faces 3"):
        sample_tokens(tiny_model(), VOCAB, SampleConfig(n=1, batch_size=1, max_faces=3), "cpu", prompts=prompts)
    with pytest.raises(ValueError, match="whole faces"):
        sample_tokens(tiny_model(), VOCAB, SampleConfig(n=1, batch_size=1, max_faces=3), "cpu", prompts=[np.zeros(5)])
