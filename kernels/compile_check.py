"""Compile fastddim's Triton kernels for NVIDIA GPU targets on a machine without a GPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU but does not compile them, so errors that
only the GPU compiler reports (a non-constexpr global, an intrinsic a target lacks, a dtype a GPU instruction does
not take) would reach a GPU user first. This module lowers kernel variants through Triton's real compiler to PTX
and cubin for the given targets instead, with the launchers' options (`ddim.LAUNCH_OPTIONS`); it needs triton's
bundled ptxas, not a GPU.

What it covers: a variant is fixed by the compile-time parameters (constexprs) and the dtypes of the pointer
arguments. Users can reach about 2.7 million step-kernel variants (every input dtype, timestep dtype and option),
too many to compile, so for each kernel it compiles a covering set: every pair of values of any two of its
parameters (each constexpr, each input's dtype, the timestep tensor's dtype, the 64-bit integer arguments)
appears together in at least one compiled variant, among the combinations the launchers produce (uncond_output's
dtype only with guidance, variance_noise's only with NOISE=1, ...). So every value of every parameter, and every
interaction of two, is compiled; interactions of three or more are sampled. Integer arguments are compiled
unspecialised (Triton also specialises those equal to 1 or divisible by 16 at launch).

    python -m fastddim.kernels.compile_check                 # sm_80, sm_90 and sm_100, one line per variant
    python -m fastddim.kernels.compile_check --arch 90 --every 5   # every 5th variant of the covering sets

Triton caches compiled kernels (~/.triton/cache, or TRITON_CACHE_DIR): time it with an empty cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("run without TRITON_INTERPRET: the interpreter replaces the kernels this module compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastddim.kernels import ddim, ddim_backward, threshold  # noqa: E402

DEFAULT_ARCHS = (80, 90, 100)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# Integer dtypes a timestep tensor may have (fastddim.ops accepts these).
TIMESTEP_DTYPES = ("i8", "i16", "i32", "i64", "u8")
UNUSED = "unused"


def _promoted(a: str, b: str) -> str:
    dtype = torch.promote_types(DTYPES[a], DTYPES[b])
    return next(name for name, value in DTYPES.items() if value == dtype)


def covering_rows(factors: dict[str, list], allowed=lambda a, b: True) -> list[dict]:
    """Rows (one value per factor) in which every allowed pair of values of two factors appears at least once:
    a deterministic greedy construction. `allowed((factor, value), (factor, value))` excludes pairs no launch
    produces; it must be decidable pair by pair."""
    names = list(factors)

    def ok(a, b):
        return allowed(a, b) and allowed(b, a)

    uncovered = {
        ((f, v), (g, w))
        for i, f in enumerate(names) for g in names[i + 1:]
        for v in factors[f] for w in factors[g] if ok((f, v), (g, w))
    }
    order = {name: i for i, name in enumerate(names)}

    def pair(a, b):
        return (a, b) if order[a[0]] < order[b[0]] else (b, a)

    rows = []
    while uncovered:
        (f, v), (g, w) = min(uncovered, key=lambda p: (order[p[0][0]], order[p[1][0]], str(p)))
        row = {f: v, g: w}
        for name in names:
            if name in row:
                continue
            best, best_gain = None, -1
            for value in factors[name]:
                if not all(ok((name, value), (other, row[other])) for other in row):
                    continue
                gain = sum(pair((name, value), (other, row[other])) in uncovered for other in row)
                if gain > best_gain:
                    best, best_gain = value, gain
            if best is None:
                raise ValueError(f"no allowed value of {name} fits {row}")
            row[name] = best
        uncovered -= {pair((a, row[a]), (b, row[b])) for i, a in enumerate(names) for b in names[i + 1:]}
        rows.append({name: row[name] for name in names})
    return rows


def _needs(dependent: str, parameter: str, when):
    """A pair rule: `dependent` is UNUSED exactly when `when(value of parameter)` is false."""
    def allowed(a, b):
        if a[0] == dependent and b[0] == parameter:
            return (a[1] == UNUSED) != bool(when(b[1]))
        return True

    return allowed


def _all(*rules):
    return lambda a, b: all(rule(a, b) for rule in rules)


def _timestep_pointer(mode, dtype):
    return "*fp64" if mode == ddim.TIMESTEP_SCALAR else "*" + dtype


def step_variants():
    """(kernel, types, constexprs) of the step kernel: a covering set of its launchable variants."""
    dtypes = list(DTYPES)
    factors = {
        "model_output": dtypes, "sample": dtypes, "uncond": dtypes + [UNUSED], "noise": dtypes + [UNUSED],
        "timestep_dtype": list(TIMESTEP_DTYPES) + [UNUSED],
        "PREDICTION": [0, 1, 2], "TIMESTEP_MODE": [0, 1, 2], "NOISE": [0, 1, 2], "GUIDANCE": [0, 1, 2],
        "WRITE": ["both", "prev", "x0"],
        "CLIP": [False, True], "USE_CLIPPED": [False, True], "STRIDED": [False, True], "INT64": [False, True],
        "THRESHOLD": [False, True],
    }
    allowed = _all(_needs("uncond", "GUIDANCE", lambda g: g != ddim.GUIDANCE_NONE),
                   _needs("noise", "NOISE", lambda n: n == ddim.NOISE_TENSOR),
                   _needs("timestep_dtype", "TIMESTEP_MODE", lambda m: m != ddim.TIMESTEP_SCALAR))
    for row in covering_rows(factors, allowed):
        out = _promoted(row["model_output"], row["sample"])
        math_fp64 = out == "fp64"
        types = {
            "model_output_ptr": "*" + row["model_output"], "sample_ptr": "*" + row["sample"],
            "uncond_ptr": "*" + (row["sample"] if row["uncond"] == UNUSED else row["uncond"]),
            "noise_ptr": "*" + (row["sample"] if row["noise"] == UNUSED else row["noise"]),
            "prev_ptr": "*" + out, "x0_ptr": "*" + out, "table_ptr": "*fp64",
            "timestep_ptr": _timestep_pointer(row["TIMESTEP_MODE"], row["timestep_dtype"]),
            "rng_ptr": "*i64" if row["NOISE"] == ddim.NOISE_PHILOX else "*fp64",
            "stats_ptr": "*fp64",
            "threshold_ptr": ("*fp64" if math_fp64 else "*fp32") if row["THRESHOLD"] else "*fp64",
        }
        constexprs = dict(
            PREDICTION=row["PREDICTION"], CLIP=row["CLIP"], USE_CLIPPED=row["USE_CLIPPED"],
            TIMESTEP_MODE=row["TIMESTEP_MODE"], NOISE=row["NOISE"], GUIDANCE=row["GUIDANCE"],
            STRIDED=row["STRIDED"],
            SAMPLE_PROGRAMS=ddim.sample_programs(row["TIMESTEP_MODE"], row["GUIDANCE"], row["THRESHOLD"]),
            INT64=row["INT64"], MATH_FP64=math_fp64, WRITE_PREV=row["WRITE"] != "x0",
            WRITE_X0=row["WRITE"] != "prev", THRESHOLD=row["THRESHOLD"], BLOCK=ddim.BLOCK_SIZE,
        )
        yield ddim._ddim_step_kernel, types, constexprs


def threshold_variants():
    """(kernel, types, constexprs) of the thresholding kernels: covering sets of their launchable variants."""
    dtypes = list(DTYPES)
    factors = {
        "model_output": dtypes, "sample": dtypes, "uncond": dtypes + [UNUSED],
        "timestep_dtype": list(TIMESTEP_DTYPES) + [UNUSED],
        "PREDICTION": [0, 1, 2], "TIMESTEP_MODE": [0, 1, 2], "GUIDANCE": [0, 1, 2],
        "STRIDED": [False, True], "INT64": [False, True], "FIRST": [False, True], "HISTOGRAM": [False, True],
    }
    allowed = _all(_needs("uncond", "GUIDANCE", lambda g: g != ddim.GUIDANCE_NONE),
                   _needs("timestep_dtype", "TIMESTEP_MODE", lambda m: m != ddim.TIMESTEP_SCALAR),
                   # Refining passes run only when the window has a histogram.
                   lambda a, b: not (a == ("FIRST", False) and b == ("HISTOGRAM", False)))
    for row in covering_rows(factors, allowed):
        math_fp64 = _promoted(row["model_output"], row["sample"]) == "fp64"
        types = {
            "model_output_ptr": "*" + row["model_output"], "sample_ptr": "*" + row["sample"],
            "uncond_ptr": "*" + (row["sample"] if row["uncond"] == UNUSED else row["uncond"]),
            "table_ptr": "*fp64", "timestep_ptr": _timestep_pointer(row["TIMESTEP_MODE"], row["timestep_dtype"]),
            "stats_ptr": "*fp64", "hist_ptr": "*i64", "counts_ptr": "*i64", "extremes_ptr": "*i64",
            "state_ptr": "*i64",
        }
        if math_fp64:  # float64 bit patterns take 64-bit integers
            types.update(window_lo="i64", window_hi="i64")
        constexprs = dict(PREDICTION=row["PREDICTION"], TIMESTEP_MODE=row["TIMESTEP_MODE"],
                          GUIDANCE=row["GUIDANCE"], STRIDED=row["STRIDED"], INT64=row["INT64"],
                          MATH_FP64=math_fp64, FIRST=row["FIRST"], HISTOGRAM=row["HISTOGRAM"],
                          NUM_BINS=threshold.NUM_BINS, BLOCK=threshold.PASS_BLOCK)
        yield threshold._threshold_pass_kernel, types, constexprs

    factors = {"MATH_FP64": [False, True], "FIRST": [False, True], "SELECT": [False, True],
               "LAST": [False, True], "RANKS_ON_DEVICE": [False, True], "BOUND_ONLY": [False, True],
               "indices": ["i32", "i64"], "weight_bits": ["i32", "i64"]}

    def reachable(a, b):
        # Without a histogram there is one select, the first and the last; float32 weights are 32-bit patterns;
        # a bound <= 1 leaves the window empty (no histogram).
        return not ((a == ("SELECT", False) and b in (("FIRST", False), ("LAST", False)))
                    or (a == ("MATH_FP64", False) and b == ("weight_bits", "i64"))
                    or (a == ("BOUND_ONLY", True) and b in (("FIRST", False), ("LAST", False), ("SELECT", True))))

    for row in covering_rows(factors, reachable):
        types = {"hist_ptr": "*i64", "counts_ptr": "*i64", "extremes_ptr": "*i64", "state_ptr": "*i64",
                 "values_ptr": "*fp64" if row["MATH_FP64"] else "*fp32", "ranks_ptr": "*i64",
                 "below": row["indices"], "above": row["indices"], "weight_bits": row["weight_bits"],
                 "window_lo": "i64" if row["MATH_FP64"] else "i32", "bound_bits": "i64" if row["MATH_FP64"] else "i32"}
        constexprs = {name: row[name]
                      for name in ("MATH_FP64", "FIRST", "SELECT", "LAST", "RANKS_ON_DEVICE", "BOUND_ONLY")}
        constexprs["NUM_BINS"] = threshold.NUM_BINS
        yield threshold._threshold_select_kernel, types, constexprs


def guidance_stats_variants():
    """(kernel, types, constexprs) of the guidance statistics kernel: every pair of input dtypes and INT64."""
    dtypes = list(DTYPES)
    for row in covering_rows({"cond": dtypes, "uncond": dtypes, "INT64": [False, True]}):
        types = {"cond_ptr": "*" + row["cond"], "uncond_ptr": "*" + row["uncond"], "sums_ptr": "*fp64"}
        yield ddim._guidance_stats_kernel, types, dict(INT64=row["INT64"], BLOCK=ddim.STATS_BLOCK_SIZE)


def backward_variants():
    """(kernel, types, constexprs) of the fused backward kernel (kernels/ddim_backward.py): a covering set."""
    dtypes = list(DTYPES)
    factors = {
        "dtype": dtypes, "timestep_dtype": list(TIMESTEP_DTYPES) + [UNUSED],
        "PREDICTION": [0, 1, 2], "TIMESTEP_MODE": [0, 1, 2], "GUIDANCE": [0, 1, 2],
        "CLIP": [False, True], "USE_CLIPPED": [False, True], "THRESHOLD": [False, True],
        "HAS_GRAD_PREV": [False, True], "HAS_GRAD_X0": [False, True], "WRITE_MODEL": [False, True],
        "WRITE_SAMPLE": [False, True], "WRITE_NOISE": [False, True], "INT64": [False, True],
    }
    allowed = _all(_needs("timestep_dtype", "TIMESTEP_MODE", lambda m: m != ddim.TIMESTEP_SCALAR),
                   # A backward runs for at least one output gradient.
                   lambda a, b: not (a == ("HAS_GRAD_PREV", False) and b == ("HAS_GRAD_X0", False)))
    for row in covering_rows(factors, allowed):
        pointer = "*" + row["dtype"]
        math = "*fp64" if row["dtype"] == "fp64" else "*fp32"
        types = {name: pointer for name in ("grad_prev_ptr", "grad_x0_ptr", "model_output_ptr", "uncond_ptr",
                                            "sample_ptr", "grad_model_ptr", "grad_uncond_ptr", "grad_sample_ptr",
                                            "grad_noise_ptr")}
        types.update(table_ptr="*fp64", timestep_ptr=_timestep_pointer(row["TIMESTEP_MODE"], row["timestep_dtype"]),
                     stats_ptr="*fp64", threshold_ptr=math, order_ptr=math, grad_threshold_ptr="*fp64",
                     position_ptr="*i64")
        constexprs = dict(PREDICTION=row["PREDICTION"], CLIP=row["CLIP"], USE_CLIPPED=row["USE_CLIPPED"],
                          TIMESTEP_MODE=row["TIMESTEP_MODE"], GUIDANCE=row["GUIDANCE"], THRESHOLD=row["THRESHOLD"],
                          HAS_GRAD_PREV=row["HAS_GRAD_PREV"], HAS_GRAD_X0=row["HAS_GRAD_X0"],
                          WRITE_MODEL=row["WRITE_MODEL"], WRITE_UNCOND=row["GUIDANCE"] == ddim.GUIDANCE_CFG,
                          WRITE_SAMPLE=row["WRITE_SAMPLE"], WRITE_NOISE=row["WRITE_NOISE"] and row["HAS_GRAD_PREV"],
                          INT64=row["INT64"], MATH_FP64=row["dtype"] == "fp64", BLOCK=ddim.BLOCK_SIZE)
        yield ddim_backward._ddim_step_backward_kernel, types, constexprs


def all_variants():
    return [*step_variants(), *threshold_variants(), *guidance_stats_variants(), *backward_variants()]


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


def compile_variant(kernel, types, constexprs, target: GPUTarget, options=None):
    """Compile one variant for `target` with the launchers' options (or `options`); returns Triton's compiled
    kernel (its `.asm` holds "ptx" and "cubin")."""
    source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs),
                                       constexprs=constexprs)
    return triton.compile(source, target=target, options=dict(ddim.LAUNCH_OPTIONS if options is None else options))


def _compile_job(job) -> str:
    """Compile variant `index` of all_variants() for `arch` (in a worker process: variants are rebuilt there,
    kernels do not pickle); returns its report line."""
    arch, index = job
    kernel, types, constexprs = all_variants()[index]
    compiled = compile_variant(kernel, types, constexprs, GPUTarget("cuda", arch, 32))
    assert compiled.asm.get("cubin"), "no cubin produced"
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("BLOCK", "NUM_BINS"))
    pointers = ",".join(f"{k[:-4]}={v[1:]}" for k, v in types.items() if k.endswith("_ptr"))
    return f"sm_{arch} {kernel.__name__}[{flags}] ({pointers}) ok"


def compile_all(targets=tuple(GPUTarget("cuda", arch, 32) for arch in DEFAULT_ARCHS), every: int = 1,
                verbose=True, jobs: int = 1) -> int:
    """Compile the covering sets (every `every`-th variant of each; 1: all) for every target, in `jobs`
    processes; returns how many were compiled (raises on the first error)."""
    selected, seen = [], {}
    for index, (kernel, _, _) in enumerate(all_variants()):
        position = seen[kernel.__name__] = seen.get(kernel.__name__, -1) + 1
        if position % every == 0:
            selected.append(index)
    work = [(target.arch, index) for target in targets for index in selected]
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            lines = pool.imap(_compile_job, work)
            for line in lines:
                if verbose:
                    print(line, flush=True)
    else:
        for job in work:
            line = _compile_job(job)
            if verbose:
                print(line, flush=True)
    return len(work)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities to compile for (default: 80 90 100)")
    parser.add_argument("--every", type=int, default=1, help="compile every N-th variant of each covering set")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    count = compile_all(tuple(GPUTarget("cuda", arch, 32) for arch in args.arch), args.every, not args.quiet,
                        args.jobs)
    print(f"{count} kernel variants compiled for {', '.join(f'sm_{a}' for a in args.arch)} with triton "
          f"{triton.__version__} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
