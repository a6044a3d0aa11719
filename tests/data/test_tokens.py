import numpy as np
import pytest

from meshforge.data.canonical import canonicalize
from meshforge.data.synth import FAMILIES, synth_mesh
from meshforge.data.tokens import (
    TOKENS_PER_FACE,
    Vocab,
    allowed_next,
    bucketed_length,
    collate_tokens,
    decode_tokens,
    encode_mesh,
    input_sequence,
    target_sequence,
)


def test_vocab_layout():
    vocab = Vocab(7)
    assert (vocab.pad, vocab.start, vocab.end, vocab.size) == (128, 129, 130, 131)
    assert vocab.storage_dtype == np.uint8 and Vocab(9).storage_dtype == np.int16
    with pytest.raises(ValueError):
        Vocab(1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits", [7, 8])
def test_round_trip_is_exact_on_every_family(family, bits):
    vocab = Vocab(bits)
    for index in range(3):
        mesh = canonicalize(*synth_mesh(family, 0, index), bits=bits)
        tokens = encode_mesh(mesh)
        assert len(tokens) == 9 * mesh.num_faces and tokens.max() < vocab.levels
        # A face is 3 vertices of (z, y, x).
        np.testing.assert_array_equal(tokens[:3], mesh.vertices[mesh.faces[0, 0], ::-1])
        decoded = decode_tokens(target_sequence(tokens, vocab), vocab)
        np.testing.assert_array_equal(decoded.vertices, mesh.vertices)
        np.testing.assert_array_equal(decoded.faces, mesh.faces)


def test_sequences_and_decoding_of_imperfect_output():
    vocab = Vocab(7)
    mesh = canonicalize(*synth_mesh("stool", 0, 0))
    coords = encode_mesh(mesh)
    s = target_sequence(coords, vocab)
    x = input_sequence(s, vocab)
    assert len(s) == len(x) == 9 * (mesh.num_faces + 1)
    assert s[len(coords)] == vocab.end and (s[len(coords) + 1 :] == vocab.pad).all()
    assert x[0] == vocab.start and (x[1:] == s[:-1]).all()
    # A trailing partial face is dropped; a repeated face collapses; face order does not matter.
    faces = coords.reshape(-1, 9)
    messy = np.concatenate([faces[::-1].ravel(), faces[0], faces[1, :5]])
    decoded = decode_tokens(messy, vocab)
    np.testing.assert_array_equal(decoded.faces, mesh.faces)
    assert decode_tokens(np.array([vocab.end]), vocab).num_faces == 0


def test_allowed_next():
    vocab = Vocab(7)
    assert allowed_next(0, vocab)[: vocab.levels].all() and not allowed_next(0, vocab)[vocab.end]
    assert allowed_next(9, vocab)[vocab.end] and not allowed_next(10, vocab)[vocab.end]
    for t in range(30):
        mask = allowed_next(t, vocab)
        assert not mask[vocab.pad] and not mask[vocab.start]
    after = allowed_next(27, vocab, ended=True)
    assert after.sum() == 1 and after[vocab.pad]


def test_collate_pads_to_multiples_of_nine():
    vocab = Vocab(7)
    a = np.arange(18) % 128
    b = np.arange(45) % 128
    x, y = collate_tokens([a, b], vocab)
    assert x.shape == y.shape == (2, 54) and x.shape[1] % 9 == 0
    assert y[0, 18] == vocab.end and (y[0, 19:] == vocab.pad).all()
    assert x[0, 19] == vocab.end and (x[0, 20:] == vocab.pad).all()
    assert (x[1, 1:] == y[1, :-1]).all() and x[1, 0] == vocab.start
    x, y = collate_tokens([a, b], vocab, max_len=30)
    assert x.shape == (2, 27) and y[1, 26] == b[26]


def test_batch_lengths_come_from_a_few_dozen_buckets():
    padded = [bucketed_length(TOKENS_PER_FACE * faces) for faces in range(1, 802)]
    assert len(set(padded)) <= 64
    for faces, length in enumerate(padded, start=1):
        assert length % TOKENS_PER_FACE == 0
        assert TOKENS_PER_FACE * faces <= length <= 1.125 * TOKENS_PER_FACE * faces


def test_collate_pads_to_the_bucket_of_the_longest_and_never_past_max_len():
    vocab = Vocab(7)
    sequences = [np.zeros(TOKENS_PER_FACE * faces, dtype=np.int64) for faces in (3, 18)]
    inputs, targets = collate_tokens(sequences, vocab)
    longest = TOKENS_PER_FACE * 19  # 18 faces + the END face
    assert inputs.shape == targets.shape == (2, TOKENS_PER_FACE * 20)  # 19 faces -> the bucket of 20
    real = TOKENS_PER_FACE * 18 + 1  # coordinates and END
    assert (targets[1, :real] != vocab.pad).all() and (targets[1, real:] == vocab.pad).all()
    inputs, _ = collate_tokens(sequences, vocab, max_len=longest + 4)
    assert inputs.shape == (2, longest)
