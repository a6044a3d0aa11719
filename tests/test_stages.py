import sys

import pytest
import torch

from meshforge.errors import MeshforgeError
from meshforge.stages import RunContext, discover_stages
from tests.plugin_fixture import install_exiting_plugins


def test_a_plugin_that_exits_or_raises_base_exception_at_import_is_only_a_failure(tmp_path, monkeypatch):
    install_exiting_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = discover_stages()
    finally:
        for name in ("mf_exits", "mf_base"):
            sys.modules.pop(name, None)
    assert loaded.failures["exits"] == "called sys.exit(3) at import"
    assert loaded.failures["base"] == "Boom: not an Exception"
    assert {"tokenize", "train-iflame", "sample", "eval"} <= set(loaded.stages)


def test_run_context_resolves_its_device_once_when_asked():
    ctx = RunContext(device="cpu")
    assert ctx.torch_device == torch.device("cpu") and ctx.torch_device is ctx.torch_device
    unknown = RunContext(device="tpu")  # stages that run no model never ask
    with pytest.raises(MeshforgeError, match="unknown device 'tpu'"):
        _ = unknown.torch_device
