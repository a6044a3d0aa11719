from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from meshforge.config import config_hash, from_dict, load_config, parse_override, save_config, to_dict
from meshforge.errors import ConfigError


@dataclass
class Inner:
    width: int = 8
    rates: list[float] = field(default_factory=lambda: [0.1])


@dataclass
class Outer:
    data: Path
    bits: int = 7
    kind: Literal["a", "b"] = "a"
    scale: float = 1.0
    note: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.bits < 1:
            raise ValueError("bits must be >= 1")


def test_from_dict_coerces_and_nests():
    cfg = from_dict(Outer, {"data": "x/y", "scale": 2, "flag": "yes", "inner": {"rates": "0.5,0.25"}})
    assert cfg.data == Path("x/y") and cfg.scale == 2.0 and isinstance(cfg.scale, float)
    assert cfg.flag is True and cfg.inner.rates == [0.5, 0.25] and cfg.inner.width == 8


@pytest.mark.parametrize(
    "data, message",
    [
        ({"data": "d", "bitz": 3}, "bitz: unknown option"),
        ({"data": "d", "bits": "many"}, "bits: expected an integer"),
        ({"data": "d", "kind": "c"}, "kind: 'c' is not one of 'a', 'b'"),
        ({"data": "d", "inner": {"width": 1.5}}, "inner.width: expected an integer"),
        ({"data": "d", "inner": {"rates": ["x"]}}, "inner.rates[0]: expected a number"),
        ({}, "data: required option is missing"),
        ({"data": "d", "bits": 0}, "bits must be >= 1"),
        ({"data": "d", "flag": 3}, "flag: expected true/false"),
    ],
)
def test_from_dict_names_the_bad_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = from_dict(Outer, {"data": "d", "note": "hi", "inner": {"width": 3}})
    save_config(cfg, tmp_path / "c.yaml")
    keys, value = parse_override("inner.width=5")
    loaded = load_config(Outer, tmp_path / "c.yaml", {".".join(keys): value})
    assert loaded.inner.width == 5 and loaded.note == "hi" and loaded.data == Path("d")
    assert to_dict(loaded)["data"] == "d"
    assert config_hash(cfg) != config_hash(loaded)
    assert config_hash(cfg) == config_hash(from_dict(Outer, to_dict(cfg)))


def test_a_training_runs_config_yaml_loads_back_as_the_stage_config(tmp_path):
    # The record the trainer writes: its stage options under task_config, beside other sections.
    stage = from_dict(Outer, {"data": "d", "note": "run", "inner": {"width": 7}})
    save_config({"task": "ss-vae", "train": {"steps": 3}, "model": {"width": 7}, "task_config": stage},
                tmp_path / "config.yaml")
    loaded = load_config(Outer, tmp_path / "config.yaml", {"note": "resumed"})
    assert loaded.inner.width == 7 and loaded.data == Path("d") and loaded.note == "resumed"


def test_bad_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")
