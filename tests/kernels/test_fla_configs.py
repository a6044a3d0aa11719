"""kernels/linear_attention/fla_configs: fla's autotuned configs recorded per GPU and put back into the autotuners."""

import json

import pytest

pytest.importorskip("fla.ops.simple_gla")

from meshforge.kernels.linear_attention import fla_configs
from meshforge.kernels.linear_attention.fla_configs import (
    apply_configs,
    fla_autotuners,
    record_configs,
    table_path,
)

DEVICE = "NVIDIA Test GPU 80GB"
KERNEL = "fla.ops.common.chunk_h.chunk_fwd_kernel_h"  # one of chunk_simple_gla's autotuned kernels


@pytest.fixture
def tuner(monkeypatch):
    """A real fla autotuner with an empty cache of its own for the test."""
    tuner = fla_autotuners()[KERNEL]
    assert len(tuner.configs) > 1  # what makes its first call autotune
    monkeypatch.setattr(tuner, "cache", {})
    return tuner


def test_the_autotuners_of_the_chunked_kernels_are_found():
    found = fla_autotuners()
    assert {KERNEL, "fla.ops.common.chunk_o.chunk_fwd_kernel_o", "fla.ops.common.chunk_h.chunk_bwd_kernel_dh"} <= set(found)


def test_recorded_choices_come_back_as_the_autotuners_own_configs(tuner, tmp_path):
    key = (16, 64, 64, 64, "torch.bfloat16", "torch.float32")
    chosen = tuner.configs[1]
    tuner.cache[key] = chosen
    path = record_configs(DEVICE, tmp_path)
    assert path == tmp_path / "NVIDIA_Test_GPU_80GB.json" == table_path(DEVICE, tmp_path)
    table = json.loads(path.read_text())
    assert table["device"] == DEVICE and table["fla"] == fla_configs.versions()["fla"]
    assert table["kernels"][KERNEL] == [{"key": list(key), "config": fla_configs._config_fields(chosen)}]

    tuner.cache.clear()
    assert apply_configs(DEVICE, tmp_path) == 1
    assert tuner.cache == {key: chosen} and tuner.cache[key] is chosen  # the same object: its hooks too
    # A key the autotuner has already settled is left alone.
    assert apply_configs(DEVICE, tmp_path) == 0


def test_a_new_recording_keeps_the_entries_of_keys_it_did_not_meet(tuner, tmp_path):
    first, second = (16, 64, 64, 64, "torch.bfloat16"), (8, 32, 32, 64, "torch.bfloat16")
    tuner.cache[first] = tuner.configs[0]
    record_configs(DEVICE, tmp_path)
    tuner.cache.clear()
    tuner.cache[second] = tuner.configs[1]
    record_configs(DEVICE, tmp_path)
    tuner.cache.clear()
    assert apply_configs(DEVICE, tmp_path) == 2
    assert tuner.cache == {first: tuner.configs[0], second: tuner.configs[1]}


def test_a_table_of_another_gpu_version_or_config_set_is_not_applied(tuner, tmp_path, monkeypatch):
    key = (16, 64, 64, 64, "torch.bfloat16")
    tuner.cache[key] = tuner.configs[1]
    path = record_configs(DEVICE, tmp_path)
    tuner.cache.clear()
    assert apply_configs("NVIDIA H100 80GB HBM3", tmp_path) == 0  # no table for that GPU

    table = json.loads(path.read_text())
    path.write_text(json.dumps(table | {"triton": "0.0.1"}))
    assert apply_configs(DEVICE, tmp_path) == 0  # recorded with another Triton

    unknown = table["kernels"][KERNEL][0] | {"config": {**table["kernels"][KERNEL][0]["config"], "num_warps": 3}}
    path.write_text(json.dumps(table | {"kernels": {KERNEL: [unknown]}}))
    assert apply_configs(DEVICE, tmp_path) == 0  # not among the autotuner's candidates
    assert tuner.cache == {}

    path.write_text(json.dumps(table))
    monkeypatch.setenv(fla_configs.ENV_SWITCH, "0")
    assert apply_configs(DEVICE, tmp_path) == 0
    monkeypatch.delenv(fla_configs.ENV_SWITCH)
    assert apply_configs(DEVICE, tmp_path) == 1


@pytest.mark.gpu
def test_a_recorded_table_spares_the_next_process_its_autotuning(tmp_path, monkeypatch):
    """On a GPU: the configs chosen while running fla's chunked kernels, recorded, then applied to
    emptied caches, are exactly what the autotuners use on the next call (no key left to tune)."""
    import torch
    from meshforge.kernels.linear_attention import decay_slopes, linear_attention

    q, k, v = (torch.randn(2, 2048, 4, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    slopes = decay_slopes(4).cuda()

    def run():
        linear_attention(q, k, v, slopes, backend="chunk_triton")[0].float().square().sum().backward()

    run()
    device = torch.cuda.get_device_name()
    record_configs(device, tmp_path)
    tuners = {name: t for name, t in fla_autotuners().items() if t.cache}
    assert KERNEL in tuners  # the chunked forward's state kernel autotuned here
    chosen = {name: dict(t.cache) for name, t in tuners.items()}
    for name, tuner in tuners.items():
        monkeypatch.setattr(tuner, "cache", {})
    assert apply_configs(device, tmp_path) == sum(len(c) for c in chosen.values())
    run()
    for name, tuner in tuners.items():
        assert tuner.cache == chosen[name], name  # applied configs used, nothing re-tuned
