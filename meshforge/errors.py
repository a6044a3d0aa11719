"""User-facing errors: each prints as one clear line (the CLI shows a traceback only with ``-v``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

# What numpy, json and zip readers raise on a truncated or otherwise damaged file (a missing file
# is an OSError too): loaders turn these into an InputError naming the file.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zipfile.BadZipFile)


class MeshforgeError(Exception):
    """An error caused by the user's input or environment, not by a bug in meshforge."""


class ConfigError(MeshforgeError):
    """A config or recipe that is unknown, ill-typed or inconsistent."""


class InputError(MeshforgeError):
    """A bad input file; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
