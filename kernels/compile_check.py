"""Compile fastddim's Triton kernels for NVIDIA GPU targets on a machine without a GPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU but does not compile them, so errors that
only the GPU compiler reports (a non-constexpr global, a dtype a GPU instruction does not take) would reach a
GPU user first. This module lowers every kernel variant through Triton's real compiler to PTX and cubin for the
given targets instead; it needs triton's bundled ptxas, not a GPU.

    python -m fastddim.kernels.compile_check            # sm_80 and sm_90, prints one line per variant
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("run without TRITON_INTERPRET: the interpreter replaces the kernels this module compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastddim.kernels import ddim, ddim_backward, threshold  # noqa: E402

POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def _signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_bits"):
            signature[name] = "i64"
        else:
            signature[name] = "i64" if constexprs.get("INT64") else "i32"
    return signature


def step_variants(stride: int = 7):
    """(types, constexprs) covering every value of every constexpr of the step kernel in few compiles: every
    `stride`-th combination (a stride prime to the factor sizes spreads the values evenly)."""
    dtypes = ["fp16", "bf16", "fp32", "fp64"]
    combos = itertools.product(range(3), [False, True], range(3), range(3), range(3), [False, True])
    for i, (prediction, clip, timestep_mode, noise, guidance, strided) in enumerate(combos):
        if i % stride:
            continue
        dtype = dtypes[i % len(dtypes)]
        types = {
            "model_output_ptr": POINTER[dtype], "uncond_ptr": POINTER[dtype], "sample_ptr": POINTER[dtype],
            "noise_ptr": POINTER[dtype], "prev_ptr": POINTER[dtype], "x0_ptr": POINTER[dtype],
            "table_ptr": "*fp64", "timestep_ptr": "*i64", "rng_ptr": "*i64", "stats_ptr": "*fp64",
            "threshold_ptr": "*fp64" if dtype == "fp64" else "*fp32",
        }
        constexprs = dict(PREDICTION=prediction, CLIP=clip, USE_CLIPPED=bool(i % 2), TIMESTEP_MODE=timestep_mode,
                          NOISE=noise, GUIDANCE=guidance, STRIDED=strided, INT64=bool(i % 3 == 0),
                          MATH_FP64=dtype == "fp64", WRITE_PREV=i % 5 != 1, WRITE_X0=i % 4 != 2,
                          THRESHOLD=i % 3 == 1, BLOCK=ddim.BLOCK_SIZE)
        yield types, constexprs


def threshold_variants(stride: int = 5):
    """(kernel, types, constexprs) covering every value of every constexpr of the thresholding kernels."""
    dtypes = ["fp16", "bf16", "fp32", "fp64"]
    combos = itertools.product(range(3), range(3), range(3), [False, True], [False, True], [False, True])
    for i, (prediction, timestep_mode, guidance, strided, first, histogram) in enumerate(combos):
        if i % stride:
            continue
        dtype = dtypes[i % len(dtypes)]
        types = {
            "model_output_ptr": POINTER[dtype], "uncond_ptr": POINTER[dtype], "sample_ptr": POINTER[dtype],
            "table_ptr": "*fp64", "timestep_ptr": "*i64", "stats_ptr": "*fp64", "hist_ptr": "*i64",
            "counts_ptr": "*i64", "extremes_ptr": "*i64", "state_ptr": "*i64",
        }
        constexprs = dict(PREDICTION=prediction, TIMESTEP_MODE=timestep_mode, GUIDANCE=guidance, STRIDED=strided,
                          INT64=bool(i % 3 == 0), MATH_FP64=dtype == "fp64", FIRST=first, HISTOGRAM=histogram,
                          NUM_BINS=threshold.NUM_BINS, BLOCK=threshold.PASS_BLOCK)
        if dtype == "fp64":  # float64 bit patterns take 64-bit integers
            types.update(window_lo="i64", window_hi="i64")
        yield threshold._threshold_pass_kernel, types, constexprs
    for math_fp64, first, select, last in itertools.product([False, True], repeat=4):
        types = {"hist_ptr": "*i64", "counts_ptr": "*i64", "extremes_ptr": "*i64", "state_ptr": "*i64",
                 "values_ptr": "*fp64" if math_fp64 else "*fp32"}
        if math_fp64:
            types["window_lo"] = "i64"
        constexprs = dict(MATH_FP64=math_fp64, FIRST=first, SELECT=select, LAST=last, NUM_BINS=threshold.NUM_BINS)
        yield threshold._threshold_select_kernel, types, constexprs


def backward_variants(stride: int = 5):
    """(types, constexprs) covering every value of every constexpr of the fused backward kernel."""
    dtypes = ["fp16", "bf16", "fp32", "fp64"]
    combos = itertools.product(range(3), range(3), range(3), [False, True], [False, True], [False, True])
    for i, (prediction, timestep_mode, guidance, clip, threshold_, use_clipped) in enumerate(combos):
        if i % stride:
            continue
        dtype = dtypes[i % len(dtypes)]
        math = "*fp64" if dtype == "fp64" else "*fp32"
        types = {name: POINTER[dtype] for name in ("grad_prev_ptr", "grad_x0_ptr", "model_output_ptr", "uncond_ptr",
                                                   "sample_ptr", "grad_model_ptr", "grad_uncond_ptr",
                                                   "grad_sample_ptr", "grad_noise_ptr")}
        types.update(table_ptr="*fp64", timestep_ptr="*i64", stats_ptr="*fp64", threshold_ptr=math,
                     order_ptr=math, grad_threshold_ptr="*fp64", position_ptr="*i64")
        constexprs = dict(PREDICTION=prediction, CLIP=clip, USE_CLIPPED=use_clipped, TIMESTEP_MODE=timestep_mode,
                          GUIDANCE=guidance, THRESHOLD=threshold_, HAS_GRAD_PREV=i % 4 != 1,
                          HAS_GRAD_X0=i % 4 != 2, WRITE_MODEL=i % 5 != 3, WRITE_UNCOND=guidance == 1,
                          WRITE_SAMPLE=i % 3 != 2, WRITE_NOISE=i % 2 == 0, INT64=bool(i % 3 == 0),
                          MATH_FP64=dtype == "fp64", BLOCK=ddim.BLOCK_SIZE)
        yield types, constexprs


def compile_all(targets=(GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)), stride: int = 7,
                verbose=True) -> int:
    """Compile the variants for every target; returns how many were compiled (raises on the first error)."""
    jobs = [(ddim._ddim_step_kernel, types, constexprs) for types, constexprs in step_variants(stride)]
    jobs.append((ddim._guidance_stats_kernel, {"cond_ptr": "*fp16", "uncond_ptr": "*fp16", "sums_ptr": "*fp64"},
                 dict(BLOCK=ddim.STATS_BLOCK_SIZE)))
    jobs.extend(threshold_variants(max(stride, 5)))
    jobs.extend((ddim_backward._ddim_step_backward_kernel, types, constexprs)
                for types, constexprs in backward_variants(max(stride, 5)))
    count = 0
    for target in targets:
        for kernel, types, constexprs in jobs:
            source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs),
                                               constexprs=constexprs)
            compiled = triton.compile(source, target=target)
            assert compiled.asm.get("cubin"), "no cubin produced"
            count += 1
            if verbose:
                flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k != "BLOCK")
                print(f"sm_{target.arch} {kernel.__name__}[{flags}] ok")
    return count


if __name__ == "__main__":
    print(f"{compile_all()} kernel variants compiled", file=sys.stderr)
