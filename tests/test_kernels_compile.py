"""The kernels compile for real NVIDIA targets (sm_80, sm_90) with Triton's own compiler and bundled ptxas.

The rest of the suite runs the kernels in Triton's interpreter, which never compiles them; this catches what only
a GPU compile reports. It runs in a subprocess because this test session has TRITON_INTERPRET=1 set.
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "from triton.backends.compiler import GPUTarget\n"
        "from fastddim.kernels.compile_check import compile_all\n"
        "n = compile_all(targets=(GPUTarget('cuda', 80, 32), GPUTarget('cuda', 90, 32)), stride=29, verbose=False)\n"
        "print(n)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) >= 20
