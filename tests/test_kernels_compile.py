"""The kernels compile for real NVIDIA targets (sm_80, sm_90, sm_100) with Triton's own compiler and bundled
ptxas, and their PTX has the properties a GPU run relies on.

The rest of the suite runs the kernels in Triton's interpreter, which never compiles them: it neither contracts
a * b + c into an fma nor shows how often a program does float64 work. These tests read the compiled PTX. They
run in a subprocess because this test session has TRITON_INTERPRET=1 set. The full covering sets compile with
`python -m fastddim.kernels.compile_check` (CI: .ci/kernels-newest-triton.sh); here a subset.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

# One PTX instruction working on float32 / float64 values (arithmetic, comparison or conversion), optionally
# predicated; loads, stores and moves name bit widths (b32, b64), not float types.
FLOAT_OP = r"^\s*(@!?%p\d+\s+)?[a-z][\w.]*\.f{bits}\b"


def run_compiler(body: str):
    """Run `body` (Python, with compile_check's names imported and `ptx(kernel, types, constexprs, arch=90,
    **options)` defined) without TRITON_INTERPRET; returns what it printed as JSON on its last line."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = textwrap.dedent("""
        import json, re
        from triton.backends.compiler import GPUTarget
        from fastddim.kernels.compile_check import *
        from fastddim.kernels import ddim, threshold

        def ptx(kernel, types, constexprs, arch=90, options=None):
            return compile_variant(kernel, types, constexprs, GPUTarget("cuda", arch, 32), options).asm["ptx"]

        def count(pattern, text):
            return len(re.findall(pattern, text, flags=re.M))

        FLOAT_OP = %r
    """ % FLOAT_OP) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_subset_of_the_covering_sets_compiles_for_sm80_sm90_sm100():
    counts = run_compiler("""
        targets = tuple(GPUTarget("cuda", arch, 32) for arch in (80, 90, 100))
        print(json.dumps(compile_all(targets=targets, every=11, verbose=False)))
    """)
    assert counts >= 3 * 9


def test_covering_sets_hold_every_pair_of_step_options():
    """compile_check's promise on the step kernel: every pair of values of two of its options is compiled
    (fp64 with clip_sample is the pair that failed to compile with triton 3.9 before)."""
    missing = run_compiler("""
        import itertools
        rows = [constexprs for kernel, types, constexprs in step_variants()]
        names = ["PREDICTION", "CLIP", "USE_CLIPPED", "TIMESTEP_MODE", "NOISE", "GUIDANCE", "STRIDED", "INT64",
                 "MATH_FP64", "THRESHOLD"]
        missing = []
        for a, b in itertools.combinations(names, 2):
            values = itertools.product({row[a] for row in rows}, {row[b] for row in rows})
            seen = {(row[a], row[b]) for row in rows}
            missing += [f"{a}={x} {b}={y}" for x, y in values if (x, y) not in seen]
        print(json.dumps(missing))
    """)
    assert missing == []


def test_select_kernel_does_no_floating_point_arithmetic():
    """The rank = ratio * (n - 1) and the weight rank - floor(rank) that torch.quantile computes come from torch
    on the host: a kernel computing them contracts to fma(ratio, n - 1, -floor(rank)) on sm_90 (weight 0.08508
    instead of torch's 0.08496 at 0.995 over 4x64x64, -0.020 instead of 0 at 2**24 + 4 elements)."""
    found = run_compiler("""
        found = []
        for kernel, types, constexprs in threshold_variants():
            if kernel is threshold._threshold_select_kernel:
                text = ptx(kernel, types, constexprs)
                for bits in (32, 64):
                    found += [line for line in text.splitlines() if re.match(FLOAT_OP.format(bits=bits), line)]
        print(json.dumps(found))
    """)
    assert found == []


def test_x0_is_computed_without_contraction():
    """The thresholding passes and the step compute x0 with the same operations, each rounded as written
    (LAUNCH_OPTIONS: no fma contraction), so the threshold is that of the x0 the step clamps, on any GPU.
    Control: with contraction allowed the same kernels do contain fmas."""
    fmas = run_compiler("""
        step_types = {"model_output_ptr": "*fp32", "sample_ptr": "*fp32", "uncond_ptr": "*fp32",
                      "noise_ptr": "*fp32", "prev_ptr": "*fp32", "x0_ptr": "*fp32", "table_ptr": "*fp64",
                      "timestep_ptr": "*i64", "rng_ptr": "*fp64", "stats_ptr": "*fp64", "threshold_ptr": "*fp32"}
        pass_types = {"model_output_ptr": "*fp32", "sample_ptr": "*fp32", "uncond_ptr": "*fp32",
                      "table_ptr": "*fp64", "timestep_ptr": "*i64", "stats_ptr": "*fp64", "hist_ptr": "*i64",
                      "counts_ptr": "*i64", "extremes_ptr": "*i64", "state_ptr": "*i64"}
        result = {}
        for prediction in (0, 1, 2):
            step = dict(PREDICTION=prediction, CLIP=False, USE_CLIPPED=True, TIMESTEP_MODE=0, NOISE=1,
                        GUIDANCE=2, STRIDED=False, SAMPLE_PROGRAMS=True, INT64=False, MATH_FP64=False,
                        WRITE_PREV=True, WRITE_X0=True, THRESHOLD=True, BLOCK=ddim.BLOCK_SIZE)
            first = dict(PREDICTION=prediction, TIMESTEP_MODE=0, GUIDANCE=2, STRIDED=False, INT64=False,
                         MATH_FP64=False, FIRST=True, HISTOGRAM=True, NUM_BINS=threshold.NUM_BINS,
                         BLOCK=threshold.PASS_BLOCK)
            for name, kernel, types, constexprs in (("step", ddim._ddim_step_kernel, step_types, step),
                                                    ("pass", threshold._threshold_pass_kernel, pass_types, first)):
                result[f"{name}{prediction}"] = count(r"\\bfma\\.", ptx(kernel, types, constexprs))
                result[f"{name}{prediction}-fused"] = count(
                    r"\\bfma\\.", ptx(kernel, types, constexprs, options={"enable_fp_fusion": True}))
        print(json.dumps(result))
    """)
    assert {k: v for k, v in fmas.items() if not k.endswith("-fused")} == {
        k: 0 for k in fmas if not k.endswith("-fused")}
    assert all(fmas[f"{name}{p}-fused"] > 0 for name in ("step", "pass") for p in (0, 2))


@pytest.mark.parametrize("timestep_mode", [0, 1, 2], ids=["host-timestep", "device-timestep", "per-sample"])
def test_float64_work_is_per_program_not_per_element(timestep_mode):
    """Coefficients (float64: table reads, square roots, the eta terms) and the guidance statistics' ratio are
    computed once per program for half and single precision, never per element: the number of float64
    instructions in the PTX does not grow with BLOCK (consumer GPUs run float64 at 1/32-1/64 rate)."""
    counts = run_compiler(f"""
        mode = {timestep_mode}
        step_types = {{"model_output_ptr": "*fp16", "sample_ptr": "*fp16", "uncond_ptr": "*fp16",
                      "noise_ptr": "*fp16", "prev_ptr": "*fp16", "x0_ptr": "*fp16", "table_ptr": "*fp64",
                      "timestep_ptr": "*i64", "rng_ptr": "*fp64", "stats_ptr": "*fp64", "threshold_ptr": "*fp32"}}
        pass_types = {{"model_output_ptr": "*fp32", "sample_ptr": "*fp32", "uncond_ptr": "*fp32",
                      "table_ptr": "*fp64", "timestep_ptr": "*i64", "stats_ptr": "*fp64", "hist_ptr": "*i64",
                      "counts_ptr": "*i64", "extremes_ptr": "*i64", "state_ptr": "*i64"}}
        result = {{}}
        for extras in ("plain", "rescaled-thresholded"):
            rich = extras != "plain"
            for block in (1024, 4096):
                step = dict(PREDICTION=0, CLIP=False, USE_CLIPPED=True, TIMESTEP_MODE=mode, NOISE=1,
                            GUIDANCE=2 if rich else 1, STRIDED=True,
                            SAMPLE_PROGRAMS=ddim.sample_programs(mode, 2 if rich else 1, rich), INT64=False,
                            MATH_FP64=False, WRITE_PREV=True, WRITE_X0=True, THRESHOLD=rich, BLOCK=block)
                text = ptx(ddim._ddim_step_kernel, step_types, step)
                result[f"step-{{extras}}-{{block}}"] = count(FLOAT_OP.format(bits=64), text)
        for block in (1024, 4096):
            first = dict(PREDICTION=0, TIMESTEP_MODE=mode, GUIDANCE=2, STRIDED=True, INT64=False, MATH_FP64=False,
                         FIRST=True, HISTOGRAM=True, NUM_BINS=threshold.NUM_BINS, BLOCK=block)
            text = ptx(threshold._threshold_pass_kernel, pass_types, first)
            result[f"pass-{{block}}"] = count(FLOAT_OP.format(bits=64), text)
        print(json.dumps(result))
    """)
    for kernel in ("step-plain", "step-rescaled-thresholded", "pass"):
        assert counts[f"{kernel}-4096"] == counts[f"{kernel}-1024"], counts
        assert counts[f"{kernel}-1024"] <= 40, counts


def test_philox_offsets_advance_after_every_program_read_them_in_the_ptx():
    """The in-kernel advance of the Philox offsets is ordered by the GPU memory model only if each program
    passes a barrier (all its threads have loaded their offsets) before taking its ticket with an acquire-release
    atomic at GPU scope, and the last program's updates are atomics too. The interpreter runs programs one after
    another and cannot show this; the sm_90 PTX can."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "from triton.backends.compiler import GPUTarget\n"
        "from fastddim.kernels.compile_check import compile_variant, step_variants\n"
        "kernel, types, constexprs = next(v for v in step_variants() if v[2]['NOISE'] == 2 and not v[2]['INT64'])\n"
        "print(compile_variant(kernel, types, constexprs, GPUTarget('cuda', 90, 32)).asm['ptx'])\n"
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
