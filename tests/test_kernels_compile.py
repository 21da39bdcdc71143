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


def test_philox_offsets_advance_after_every_program_read_them_in_the_ptx():
    """The in-kernel advance of the Philox offsets is ordered by the GPU memory model only if each program
    passes a barrier (all its threads have loaded their offsets) before taking its ticket with an acquire-release
    atomic at GPU scope, and the last program's updates are atomics too. The interpreter runs programs one after
    another and cannot show this; the sm_90 PTX can."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from fastddim.kernels import ddim\n"
        "from fastddim.kernels.compile_check import _signature, step_variants\n"
        "types, constexprs = next((t, c) for t, c in step_variants(1) if c['NOISE'] == 2 and not c['INT64'])\n"
        "signature = _signature(ddim._ddim_step_kernel, types, constexprs)\n"
        "source = triton.compiler.ASTSource(fn=ddim._ddim_step_kernel, signature=signature, constexprs=constexprs)\n"
        "print(triton.compile(source, target=GPUTarget('cuda', 90, 32)).asm['ptx'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    atomics = [i for i, line in enumerate(lines) if "atom." in line]
    assert atomics, "no atomics: the offsets are not advanced in the kernel"
    ticket = atomics[0]
    assert "atom.global.gpu.acq_rel.add" in lines[ticket], lines[ticket]
    assert any(line.startswith("bar.sync") for line in lines[:ticket]), "no barrier before the ticket"
    assert any("atom.global.gpu.acq_rel.add" in lines[i] for i in atomics[1:]), "offsets not advanced atomically"
    assert any("atom.global.gpu.acq_rel.exch" in lines[i] for i in atomics[1:]), "ticket not reset atomically"
