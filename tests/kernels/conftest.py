"""Fixtures of the kernel tests."""

import os
import subprocess
import sys

import pytest

HOPPER_PRELUDE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_for_hopper(kernel, types, constants):
    signature = dict(types) | {name: "constexpr" for name in constants}
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
"""


@pytest.fixture
def hopper_compile():
    """Runs a script in a process without TRITON_INTERPRET, after ``compile_for_hopper(kernel, types,
    constants)`` is defined: the interpreter runs a kernel as Python, so it accepts code the compiler
    refuses (a loop-carried value changing type, a construct the frontend lacks); compiling for sm_90,
    down to a cubin, catches that on a machine without a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")

    def run(script: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, "-c", HOPPER_PRELUDE + script], check=False, env=env,
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]

    return run
