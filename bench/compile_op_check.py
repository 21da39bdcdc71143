"""GPU check of how torch.compile should call the step kernel: the opaque custom op or a `triton_op`.

    python bench/compile_op_check.py            # needs CUDA (the interpreter cannot be traced: wrap_triton
                                                # returns interpreted kernels unwrapped)

fastddim registers its Triton step as the opaque custom op `torch.ops.fastddim.ddim_step` (fastddim/ops.py):
under torch.compile, Inductor calls it, and the op launches the kernel through its step plan. The alternative is
`torch.library.triton_op` with `wrap_triton`: Inductor traces into the op and launches the kernel itself from
its generated code. This script registers that alternative for the plain step (0-d timestep tensor, eta 0,
both outputs), reusing `StepLauncher` for every argument with only the launch replaced, and compares on one
device, side by side:

- bits: each route's outputs under torch.compile against the eager step, at three timesteps;
- recompiles across timesteps (there must be none);
- host time per call under the default mode and under mode="reduce-overhead" (CUDA graphs), interleaved with
  the eager step's (`fastddim.benchmark.time_host`; the GPU synchronised between batches only).

What we expect, and why fastddim keeps the custom op unless this shows otherwise: Inductor compiles a
user-defined kernel from its source with its own compile options, and in torch 2.11-2.13 those carry no
`enable_fp_fusion` (torch/_inductor/codegen/wrapper.py `define_user_defined_triton_kernel` builds triton_meta
from the signature, device, constants and configs only; wrap_triton moves only num_warps, num_stages, num_ctas
and the warp-specialization settings out of the call's keywords). The kernel would then be compiled with Triton's
default fp fusion, contracting `a * b + c` into fma, and its results would no longer be bit-identical to the eager
step and the torch reference (see kernels/ddim.py LAUNCH_OPTIONS). Under reduce-overhead both routes replay a CUDA
graph, so their host cost should be the same. Exits 1 if the custom op's route is not bit-identical to the eager
step or recompiles.
"""

from __future__ import annotations

import sys
import time

import torch
import torch._dynamo

import fastddim
from fastddim import benchmark
from fastddim.kernels import ddim
from fastddim.plan import StepOptions

SHAPES = ((1, 4, 64, 64),)
DTYPES = (torch.float16,)  # as pipelines run; each dtype costs four compiles
TIMESTEPS = (0, 10, 49)  # indices into scheduler.timesteps


class WrapTritonLauncher:
    """A stand-in for `ddim._step_launcher` inside the triton_op: the launch Inductor can trace (the runtime
    arguments, then the constexprs by name). JIT keywords other than the constexprs (enable_fp_fusion) cannot be
    passed this way."""

    @staticmethod
    def launch(kernel, grid, args, prepared) -> None:
        torch.library.wrap_triton(kernel)[grid](*prepared.runtime_arguments(args), **prepared.constexprs)


@torch.library.triton_op("fastddim_bench::ddim_step", mutates_args=())
def traced_step(model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor,
                prediction_type: str, options: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.fastddim.ddim_step`'s step (the same arguments, a tensor timestep) launched through wrap_triton."""
    step_options = StepOptions.from_op_arguments(prediction_type, tuple(options))
    launcher = ddim.StepLauncher(step_options, model_output, sample, table, timestep)
    step_launcher, ddim._step_launcher = ddim._step_launcher, WrapTritonLauncher
    try:
        return launcher(model_output, sample, table, timestep)
    finally:
        ddim._step_launcher = step_launcher


def triton_op_step(scheduler):
    """`scheduler`'s plain step (eta 0) as `fn(model_output, sample, timestep) -> (prev_sample, x0)` through the
    triton_op, with the options and table the scheduler's own step uses."""
    prediction_type, options = scheduler._step_options(0.0, False, False, 1.0, 0.0, True).op_arguments()

    def step(model_output, sample, timestep):
        table = scheduler._table_on(sample.device)
        return traced_step(model_output, sample, table, timestep, prediction_type, options)

    return step


def compare(expected: torch.Tensor, got: torch.Tensor) -> str:
    if torch.equal(expected, got):
        return "identical"
    differ = expected != got
    return (f"DIFFERS in {int(differ.sum())} of {differ.numel()} elements, max |diff| "
            f"{(expected.double() - got.double()).abs().max().item():.3g}")


def check_route(name: str, fn, mode: str, scheduler, m, x, eager) -> bool:
    """Compile `fn` in `mode`, compare its outputs with the eager step's at TIMESTEPS, time it beside the eager
    step, print one line; returns whether it gave the eager step's bits from one graph. A route that fails to
    compile or run prints why, and the others still run."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(fn, mode=mode, fullgraph=True)
        began = time.perf_counter()
        results = []
        for index in TIMESTEPS:
            t = scheduler.timesteps[index]
            prev, x0 = compiled(m, x, t)
            results.append((eager(m, x, t), (prev.clone(), x0.clone())))
        first = time.perf_counter() - began
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        verdicts = [compare(e, g) for (ev, gv) in results for e, g in zip(ev, gv)]
        t = scheduler.timesteps[TIMESTEPS[1]]
        # Side by side with the eager step, interleaved (the ratio is what carries across machines).
        contenders = {"compiled": lambda: compiled(m, x, t), "eager": lambda: eager(m, x, t)}
        host = benchmark.time_host(contenders, rounds=10, sync=torch.cuda.synchronize, max_calls=500)
    except Exception as error:  # noqa: BLE001 - a route that fails is a finding; the other routes still run
        print(f"{mode:15s} {name:9s}: FAILED {type(error).__name__}: {' '.join(str(error).split())[:300]}")
        return False
    same = all(v == "identical" for v in verdicts)
    bits = "identical" if same else next(v for v in verdicts if v != "identical")
    compiled_us, eager_us = host["compiled"]["median_us"], host["eager"]["median_us"]
    print(f"{mode:15s} {name:9s}: {bits}; graphs compiled {frames}; first calls {first:.1f} s; "
          f"host {compiled_us:.1f} us per call, eager step {eager_us:.1f}")
    return same and frames == 1


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    failed = False
    for shape in SHAPES:
        for dtype in DTYPES:
            scheduler = fastddim.DDIMScheduler()
            scheduler.set_timesteps(50, device="cuda")
            generator = torch.Generator("cuda").manual_seed(0)
            m, x = (torch.randn(shape, generator=generator, device="cuda").to(dtype) for _ in range(2))

            def eager(m, x, t):
                return scheduler.step(m, t, x, return_dict=False)

            custom_op = eager  # compiled, the scheduler's step calls torch.ops.fastddim.ddim_step
            triton_op = triton_op_step(scheduler)
            print(f"== {tuple(shape)} {dtype}")
            for mode in ("default", "reduce-overhead"):
                for name, fn in (("custom op", custom_op), ("triton_op", triton_op)):
                    passed = check_route(name, fn, mode, scheduler, m, x, eager)
                    failed |= name == "custom op" and not passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
