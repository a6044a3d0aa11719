"""Checkpoints under faults: truncated and corrupted files, a full disk, a writer killed mid-save."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshforge import checkpoints as checkpoint
from meshforge.checkpoints import latest_checkpoint, resumable_checkpoint, save_checkpoint
from meshforge.errors import InputError, MeshforgeError
from meshforge.models.registry import load_model
from meshforge.train.trainer import train
from tests.train.toy import ToyConfig, ToyModel, ToyTask, toy_config

torch.set_num_threads(1)
META = {"kind": "toy", "model_config": {"vocab": 13, "width": 16}}
REPO = Path(__file__).resolve().parents[1]


def short_run(steps):
    return toy_config(steps=steps, checkpoint_every=1, keep_checkpoints=3, log_every=1)


def save(out, step, keep=3):
    model = ToyModel(ToyConfig())
    return save_checkpoint(out, step=step, model=model, meta=META, state={"note": torch.tensor([step])}, keep=keep)


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def step_folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def hidden_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob(".*"))


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_a_truncated_file_is_a_one_line_error_naming_it(tmp_path, name):
    step_dir = save(tmp_path, 5)
    recorded = json.loads((step_dir / "meta.json").read_text())["files"]
    assert set(recorded) == {"model.safetensors", "state.pt"}  # every file beside meta.json
    truncate(step_dir / name)
    with pytest.raises(InputError) as caught:
        load_model(tmp_path, "cpu")
    message = str(caught.value)
    assert "\n" not in message and name in message and "truncated" in message


def test_a_corrupted_block_of_the_same_size_is_caught_by_the_hash(tmp_path):
    step_dir = save(tmp_path, 5)
    weights = bytearray((step_dir / "model.safetensors").read_bytes())
    weights[-10] ^= 0xFF  # inside a tensor: safetensors itself would load this silently
    (step_dir / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(InputError, match="model.safetensors does not match the hash"):
        load_model(step_dir, "cpu")


def test_any_file_of_the_folder_is_verified_whatever_its_name(tmp_path, monkeypatch):
    # A later file kind (EMA weights, say) is covered without the verifier knowing its name.
    real_save = checkpoint.torch.save

    def save_with_extra(obj, path):
        real_save(obj, path)
        (Path(path).parent / "ema.safetensors").write_bytes(b"x" * 1000)

    monkeypatch.setattr(checkpoint.torch, "save", save_with_extra)
    step_dir = save(tmp_path, 5)
    truncate(step_dir / "ema.safetensors")
    with pytest.raises(InputError, match="ema.safetensors has 500 bytes, 1000 were written"):
        load_model(step_dir, "cpu")


def test_folders_written_before_files_were_recorded_still_load(tmp_path):
    step_dir = save(tmp_path, 5)
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["files"]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    assert load_model(step_dir, "cpu")[0] == "toy"
    truncate(step_dir / "state.pt")  # unverifiable, but still one line when it is read
    with pytest.raises(InputError, match="unreadable training state"):
        checkpoint.load_state(step_dir)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 10)

    def no_space(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(MeshforgeError) as caught:
        save(tmp_path, 20)
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert latest_checkpoint(tmp_path).name == "step_0000010"
    assert step_folders(tmp_path) == ["step_0000010"] and hidden_leftovers(tmp_path) == []


def test_resume_falls_back_to_the_newest_intact_step_and_keeps_at_most_keep(tmp_path, capsys):
    train(ToyTask(batch_size=8), short_run(steps=3), tmp_path, device="cpu")
    assert step_folders(tmp_path) == ["step_0000001", "step_0000002", "step_0000003"]
    truncate(tmp_path / "checkpoints/step_0000003/state.pt")
    capsys.readouterr()
    summary = train(ToyTask(batch_size=8), short_run(steps=4), tmp_path, device="cpu", resume=True)
    assert summary["resumed_from"] == 2 and summary["last_step"] == 4
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the terminal width
    assert err.count("damaged") == 1 and "step_0000003 is damaged (state.pt has" in err
    assert step_folders(tmp_path) == ["step_0000002", "step_0000003", "step_0000004"]
    assert resumable_checkpoint(tmp_path) == (tmp_path / "checkpoints/step_0000004", [])


def test_resume_with_nothing_intact_left_is_one_line(tmp_path):
    train(ToyTask(batch_size=8), short_run(steps=2), tmp_path, device="cpu")
    for step_dir in (tmp_path / "checkpoints").glob("step_*"):
        truncate(step_dir / "model.safetensors")
    with pytest.raises(MeshforgeError) as caught:
        train(ToyTask(batch_size=8), short_run(steps=3), tmp_path, device="cpu", resume=True)
    message = str(caught.value)
    assert "no intact checkpoint" in message and "step_0000001" in message and "\n" not in message


# A training run whose third checkpoint write stalls half-way, so that the test can SIGKILL it there.
KILLED_WRITER = """
import sys, time
from pathlib import Path
import torch
from meshforge import checkpoints as checkpoint
from meshforge.train.trainer import train
from tests.train.toy import ToyTask, toy_config

real_save, calls = torch.save, []

def stalling_save(obj, path):
    calls.append(path)
    if len(calls) < 3:
        return real_save(obj, path)
    with open(path, "wb") as fh:
        fh.write(b"half a state")
        fh.flush()
        Path(sys.argv[2]).write_text(str(path))
        time.sleep(600)

checkpoint.torch.save = stalling_save
cfg = toy_config(steps=3, checkpoint_every=1, keep_checkpoints=2)
train(ToyTask(batch_size=8), cfg, Path(sys.argv[1]), device="cpu")
"""


def test_a_writer_killed_mid_checkpoint_leaves_a_run_that_resumes(tmp_path):
    out, signal_file = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MESHFORGE_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(signal_file)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never reached its third checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert latest_checkpoint(out).name == "step_0000002"
    assert len(hidden_leftovers(out)) == 1  # the half-written step_0000003 under its temporary name

    cfg = toy_config(steps=3, checkpoint_every=1, keep_checkpoints=2)
    summary = train(ToyTask(batch_size=8), cfg, out, device="cpu", resume=True)
    assert summary["resumed_from"] == 2
    assert step_folders(out) == ["step_0000002", "step_0000003"] and hidden_leftovers(out) == []
    assert load_model(out, "cpu")[2]["step"] == 3
