"""fla's autotuned kernel configs, kept per GPU so that a fresh machine does not autotune them again.

fla's chunked kernels autotune on their first call in a process: Triton compiles and times every
candidate config of every kernel, most of the ~100 s first training step on a fresh machine
(Triton's on-disk caches only help a machine that has run the kernels before). The configs the
autotuners chose on a GPU are recorded by :func:`record_configs` into ``fla_configs/<GPU>.json``
(``benchmarks/first_step.py --record`` does it), and :func:`apply_configs` puts them into the
autotuners' own caches before their first call, so only the chosen config of each kernel compiles.
A table applies only to the GPU, Triton and fla versions it was recorded with (config names and
autotuning keys change between versions); a key not in the table (another head width, another
dtype) autotunes as before, so the kernels' behaviour is the autotuner's own either way.
``MESHFORGE_FLA_CONFIGS=0`` turns the tables off.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "fla_configs"
ENV_SWITCH = "MESHFORGE_FLA_CONFIGS"


def table_path(device_name: str, directory: Path | None = None) -> Path:
    """Where the table of a GPU lives (in ``directory``, by default :data:`CONFIG_DIR`): its name
    with every run of other characters as ``_``."""
    return (directory or CONFIG_DIR) / f"{re.sub(r'[^0-9A-Za-z]+', '_', device_name).strip('_')}.json"


def versions() -> dict[str, str | None]:
    """The versions a table is only valid for."""

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"triton": installed("triton"), "fla": installed("fla-core")}


def fla_autotuners() -> dict[str, Any]:
    """Every Triton autotuner defined by the fla modules imported so far, by the qualified name of its kernel."""
    from triton.runtime.autotuner import Autotuner

    found: dict[str, Any] = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("fla."):
            continue
        for value in list(vars(module).values()):
            # Down the wrappers (heuristics over an autotuner over a JIT function) to the Python function.
            tuner = None
            while hasattr(value, "fn"):
                tuner = value if isinstance(value, Autotuner) else tuner
                value = value.fn
            if tuner is not None:
                found[f"{value.__module__}.{value.__qualname__}"] = tuner
    return found


def _config_fields(config: Any) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _json_key(key: tuple) -> list:
    return [list(part) if isinstance(part, tuple) else part for part in key]


def _tuple_key(key: list) -> tuple:
    return tuple(tuple(part) if isinstance(part, list) else part for part in key)


def record_configs(device_name: str, directory: Path | None = None) -> Path:
    """Write what the fla autotuners of this process chose (their caches) as ``device_name``'s table;
    entries already in the table for keys this process did not meet are kept."""
    from meshforge.io import atomic_write_json

    path = table_path(device_name, directory)
    known = _read(path, device_name) or {}
    kernels: dict[str, list[dict[str, Any]]] = {}
    for name, tuner in sorted(fla_autotuners().items()):
        entries = {json.dumps(e["key"]): e for e in known.get(name, [])}
        for key, config in tuner.cache.items():
            entries[json.dumps(_json_key(key))] = {"key": _json_key(key), "config": _config_fields(config)}
        if entries:
            kernels[name] = [entries[k] for k in sorted(entries)]
    atomic_write_json(path, {"device": device_name, **versions(), "kernels": kernels})
    return path


def _read(path: Path, device_name: str) -> dict[str, list[dict[str, Any]]] | None:
    """The table's kernels if it exists and was recorded on this GPU with these versions."""
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    if table.get("device") != device_name or {k: table.get(k) for k in ("triton", "fla")} != versions():
        return None
    return table["kernels"]


def apply_configs(device_name: str, directory: Path | None = None) -> int:
    """Fill the fla autotuners' caches with ``device_name``'s table; the number of entries applied.

    An entry is applied only where the autotuner has the recorded config among its own candidates
    (the same object is used, hooks included) and has not already chosen one for that key.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return 0
    kernels = _read(table_path(device_name, directory), device_name)
    if not kernels:
        return 0
    applied = 0
    for name, tuner in fla_autotuners().items():
        candidates = {json.dumps(_config_fields(c), sort_keys=True): c for c in tuner.configs}
        for entry in kernels.get(name, []):
            key = _tuple_key(entry["key"])
            config = candidates.get(json.dumps(entry["config"], sort_keys=True))
            if config is not None and key not in tuner.cache:
                tuner.cache[key] = config
                applied += 1
    return applied
