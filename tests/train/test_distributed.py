import numpy as np
import pytest
import torch

from meshforge.checkpoints import latest_checkpoint, load_ema
from meshforge.errors import MeshforgeError
from meshforge.train.distributed import global_batch, launch, rank_slice
from meshforge.train.logs import read_csv
from meshforge.train.trainer import train
from tests.train.toy import ToyTask, toy_config


def test_global_batches_walk_through_shuffled_epochs():
    n, batch = 10, 4
    drawn = np.concatenate([global_batch(n, batch, seed=7, step=s)[0] for s in range(5)])  # 20 = 2 epochs
    epochs = np.concatenate([global_batch(n, batch, seed=7, step=s)[1] for s in range(5)])
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(n))  # each epoch is a permutation
    assert (epochs == np.repeat([0, 1], 10)).all()
    assert not (drawn[:10] == drawn[10:]).all()  # reshuffled per epoch
    again, _ = global_batch(n, batch, seed=7, step=3)
    assert (again == drawn[12:16]).all()  # a pure function of (seed, step)
    assert not (global_batch(n, batch, seed=8, step=3)[0] == again).all()


def test_length_groups_keep_the_epochs_and_make_batches_of_similar_length():
    n, batch, groups = 60, 4, 5  # a group spans 20 items: three groups per epoch
    lengths = np.random.default_rng(0).integers(10, 800, n)
    steps = range(3 * groups)
    grouped = [global_batch(n, batch, seed=7, step=s, lengths=lengths, groups=groups) for s in steps]
    plain = [global_batch(n, batch, seed=7, step=s) for s in steps]
    def pairs(batches, group):  # the (index, epoch) pairs of one group's batches
        members = batches[group * groups : (group + 1) * groups]
        return sorted(zip(*(np.concatenate(x) for x in zip(*members))))

    # Every group holds the same items, from the same epochs, as the plain batches it replaces.
    for g in range(3):
        assert pairs(grouped, g) == pairs(plain, g)
    assert sorted(np.concatenate([i for i, _ in grouped])) == list(range(n))  # one epoch, each item once

    def padding(batches):  # tokens spent on padding: each batch pads to its longest item
        return sum(int(lengths[i].max() * len(i) - lengths[i].sum()) for i, _ in batches)

    assert padding(grouped) < 0.4 * padding(plain)  # ~0.25 expected for uniform lengths in groups of 5
    again = global_batch(n, batch, seed=7, step=8, lengths=lengths, groups=groups)
    assert all((a == b).all() for a, b in zip(again, grouped[8]))  # still a pure function of (seed, step)


def test_rank_slices_partition_the_global_batch():
    parts = [rank_slice(12, r, 4) for r in range(4)]
    assert [i for p in parts for i in range(12)[p]] == list(range(12))
    with pytest.raises(MeshforgeError, match="divide evenly over 5"):
        rank_slice(12, 0, 5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path, monkeypatch, optimizer):
    torch.set_num_threads(1)
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(2, "tests.train.ddp_worker", [str(tmp_path / "ddp"), optimizer])
    train(ToyTask(batch_size=8), toy_config(steps=12, optimizer=optimizer, ema_decay=0.9), tmp_path / "one", device="cpu")

    def curve(name):
        return [(r["step"], r["loss"], r["acc"]) for r in read_csv(tmp_path / name / "metrics.csv") if "loss" in r]

    one, two = curve("one"), curve("ddp")
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == list(range(1, 13))
    loss_one, loss_two = np.array([l for _, l, _ in one]), np.array([l for _, l, _ in two])
    # The gradients differ only by fp32 summation order (one batch vs two halves all-reduced), ~1e-7
    # relative. AdamW keeps that in fp32: 1e-5 absolute covers it. Muon orthogonalises in bf16
    # (unit roundoff u = 2**-8): a last-bit gradient difference can round an element of the
    # Newton-Schulz input the other way, which its bf16 iterations spread, so the two runs' updates
    # agree only to about u relative. Step t's loss has moved by the sum of the previous updates'
    # effects, |L_s+1 - L_s| each, so to first order the curves can drift apart by u times that sum.
    atol = np.full(len(loss_one), 1e-5)
    if optimizer == "muon":
        atol[1:] += 2.0**-8 * np.cumsum(np.abs(np.diff(loss_one)))
    assert (np.abs(loss_one - loss_two) <= atol).all(), (loss_one - loss_two, atol)
    # Accuracy counts argmax hits: Muon's drift may flip one token's argmax, 1/40 at most (a batch
    # holds 8 sequences of at least 5 targets).
    acc_atol = 1e-6 + (1 / 40 if optimizer == "muon" else 0)
    assert np.allclose([a for _, _, a in one], [a for _, _, a in two], rtol=0, atol=acc_atol)
    assert (tmp_path / "ddp" / "checkpoints" / "latest").read_text().strip() == "step_0000012"
    # Every rank averages its (identical) weights; rank 0's average is the single process's.
    ema_one, ema_two = (load_ema(latest_checkpoint(tmp_path / name)) for name in ("one", "ddp"))
    assert sorted(ema_one) == sorted(ema_two)
    for name in ema_one:
        torch.testing.assert_close(ema_two[name], ema_one[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ctrl_c_of_the_launcher_checkpoints_the_data_parallel_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from meshforge.checkpoints import latest_checkpoint, load_state

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    script = ("import sys\nfrom meshforge.train.distributed import launch\n"
              f"try:\n    launch(2, 'tests.train.ddp_worker', [{str(out)!r}, 'adamw', '100000'])\n"
              "except KeyboardInterrupt:\n    sys.exit(130)\n")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None:  # the first periodic checkpoint (step 10)
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        output = launcher.communicate(timeout=60)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 130, output
    assert "interrupted: saved" in output
    saved = load_state(latest_checkpoint(out))["step"]
    # Saved on the way out, not just the last periodic checkpoint (every 10 steps).
    assert saved >= 10 and f"step_{saved:07d}" in output.split("interrupted: saved", 1)[1]
