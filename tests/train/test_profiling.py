import gzip
import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from meshforge.train.profiling import PHASES, _union_length, summarize
from meshforge.train.trainer import train
from tests.train.toy import ToyTask, toy_config

torch.set_num_threads(1)


def test_union_length_counts_overlapping_kernels_once():
    assert _union_length([]) == 0
    assert _union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)


def _event(name, start, end, device=DeviceType.CPU, annotation=False):
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=device, time_range=span, is_user_annotation=annotation)


def test_summary_counts_kernels_not_the_gpu_shadows_of_annotations():
    gpu = DeviceType.CUDA
    events = [
        _event("ProfilerStep#1", 0, 100), _event("phase:forward", 10, 40), _event("phase:backward", 40, 90),
        _event("cudaLaunchKernel", 12, 13), _event("cudaLaunchKernel", 41, 42),
        _event("gemm", 20, 50, gpu), _event("ncclDevKernel_AllReduce", 45, 70, gpu),
        _event("phase:forward", 15, 95, gpu, annotation=True),  # spans the phase on the GPU timeline
        _event("ProfilerStep#2", 100, 130),  # the partial interval of a run stopped in the window
        _event("phase:forward", 110, 120, gpu, annotation=True),  # a late GPU shadow makes it no step
        _event("late_kernel", 105, 120, gpu),
    ]
    summary = summarize(events)
    assert summary["steps"] == 1 and summary["step_s"] == 100e-6
    assert summary["gpu_busy_s"] == 50e-6 and summary["gpu_busy_frac"] == 0.5  # union of 20-50 and 45-70
    assert summary["comm_s"] == 25e-6 and summary["launches"] == 2
    assert summary["phases_s"]["forward"] == 30e-6 and summary["phases_s"]["backward"] == 50e-6


def test_profiled_run_writes_trace_operators_and_a_per_step_summary(tmp_path):
    summary = train(ToyTask(batch_size=8), toy_config(steps=16, profile_steps=3), tmp_path, device="cpu")
    profile = summary["profile"]
    assert profile == json.loads((tmp_path / "profile" / "rank0.json").read_text())
    assert profile["steps"] == 3 and profile["step_s"] > 0
    assert set(profile["phases_s"]) == set(PHASES)
    # The phases are host time inside the step, and on a CPU the step is all host time.
    assert 0 < sum(profile["phases_s"].values()) <= profile["step_s"] * 1.05
    assert profile["phases_s"]["backward"] > 0 and profile["phases_s"]["optimizer"] > 0
    assert profile["gpu_busy_frac"] is None and profile["launches"] == 0  # no device on a CPU run
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "rank0.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "phase:forward" for e in trace["traceEvents"])
    assert "Self CPU" in (tmp_path / "profile" / "rank0.txt").read_text()
    top = profile["top_operators"]
    assert 0 < len(top) <= 40 and all(op["self_s"] >= 0 and op["calls"] > 0 for op in top)
    assert [op["self_s"] for op in top] == sorted((op["self_s"] for op in top), reverse=True)
    assert not any(op["name"].startswith(("phase:", "ProfilerStep")) for op in top)
    assert any(op["name"] == "aten::mm" or op["name"] == "aten::addmm" for op in top)  # the toy model's linears


def test_a_run_shorter_than_the_window_writes_what_it_profiled(tmp_path):
    summary = train(ToyTask(batch_size=8), toy_config(steps=13, profile_steps=5), tmp_path, device="cpu")
    assert summary["profile"]["steps"] == 2  # steps 12 and 13 of the window of 12-16 ran
