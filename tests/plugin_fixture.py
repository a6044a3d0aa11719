"""A tiny third-party stage package, installed by writing its distribution metadata into a folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

PLUGIN_SOURCE = '''
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meshforge.errors import MeshforgeError
from meshforge.io import atomic_write_text
from meshforge.stages import Stage

CALLS = []


@dataclass
class EchoConfig:
    input: Path
    out: Path
    times: int = field(default=1, metadata={"help": "How often to repeat the text."})
    mode: Literal["upper", "lower"] = "upper"
    fail: bool = False
    resume: bool = False


def run(cfg, ctx):
    CALLS.append((cfg, ctx))
    if cfg.fail:
        raise MeshforgeError("asked to fail")
    text = Path(cfg.input).read_text() * cfg.times
    atomic_write_text(cfg.out, text.upper() if cfg.mode == "upper" else text.lower())
    return {"chars": len(text), "seed": ctx.seed, "resume": cfg.resume}


stage = Stage(name="echo", help="Copy a text file, shouting.", config=EchoConfig, run=run,
              positional=("input",), inputs=("input",), outputs=("out",))
'''


def install_fake_plugin(root: Path) -> None:
    """Write module ``mf_echo`` and a dist-info declaring its stage plus one broken stage."""
    (root / "mf_echo.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = root / "mf_echo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mf-echo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[meshforge.stages]\necho = mf_echo:stage\nbroken = mf_echo_missing:stage\n"
    )


def install_exiting_plugins(root: Path) -> None:
    """Two plugins whose import ends the process if not contained: ``sys.exit(3)`` and a bare BaseException."""
    (root / "mf_exits.py").write_text("import sys\nsys.exit(3)\n")
    (root / "mf_base.py").write_text("class Boom(BaseException):\n    pass\n\nraise Boom('not an Exception')\n")
    info = root / "mf_exits-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mf-exits\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[meshforge.stages]\nexits = mf_exits:stage\nbase = mf_base:stage\n")
