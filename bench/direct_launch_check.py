"""GPU check of the direct launchers (kernels/launch.py): bit-identical results and host time per step call.

    python bench/direct_launch_check.py            # needs CUDA and a validated triton (3.6.0)

For several specializations (dtypes, unaligned views in several argument slots, channels_last, per-sample
timesteps, Philox noise, thresholding with one and with three radix levels) it runs each step twice through the
JIT launch (direct launches off) and twice through the launchers of the step and threshold kernels (the first call
of a new specialization takes the JIT launch, the second the direct one; compiled kernels are kept from case to
case, so a key that wrongly matched an earlier case would show) and requires identical outputs; then it prints
the host time per `scheduler.step` call at 1x4x8x8 (plain, guided, thresholded) with direct launches on and off
(perf_counter over back-to-back calls, the GPU synchronised between batches only). Exits 1 on a mismatch.
"""

from __future__ import annotations

import sys
import time

import torch

import fastddim
from fastddim import benchmark, ops
from fastddim.kernels import ddim, launch, threshold

LAUNCHERS = (ddim._step_launcher, threshold._pass_launcher, threshold._select_launcher)


def set_direct(enabled: bool) -> None:
    for launcher in LAUNCHERS:
        launcher.enabled = enabled


def cases():
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50, device="cuda")
    table = scheduler._table_on(torch.device("cuda"))
    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, device="cuda").to(dtype)

    yield "fp32 int timestep", (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501), {}
    yield "fp16 tensor timestep", (randn(2, 4, 16, 16, dtype=torch.float16), randn(2, 4, 16, 16,
                                   dtype=torch.float16), table, scheduler.timesteps[10]), {}
    unaligned = randn(2 * 4 * 16 * 16 + 1)[1:].view(2, 4, 16, 16)
    yield "unaligned model_output", (unaligned, randn(2, 4, 16, 16), table, 501), {}
    yield "unaligned sample", (randn(2, 4, 16, 16), unaligned, table, 501), {}
    yield "unaligned noise", (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501), dict(
        eta=1.0, variance_noise=unaligned)
    yield "channels_last", tuple(t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and
                                 t.dim() == 4 else t for t in (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501)), {}
    yield "per-sample timesteps", (randn(3, 4, 16, 16), randn(3, 4, 16, 16), table,
                                   torch.tensor([981, 501, 21], device="cuda")), {}
    yield "philox eta=1", (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501), dict(
        eta=1.0, philox_state=fastddim.PhiloxGenerator(7, device="cuda").buffer)
    yield "philox per-sample rows and timesteps", (randn(3, 4, 16, 16), randn(3, 4, 16, 16), table,
                                                   torch.tensor([981, 501, 21], device="cuda")), dict(
        eta=1.0, philox_state=fastddim.PhiloxGenerator(seeds=[7, 8, 9], device="cuda").buffer)
    yield "thresholded, 3 radix levels", (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501), dict(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    yield "thresholded, sample_max_value 1", (randn(2, 4, 16, 16), randn(2, 4, 16, 16), table, 501), dict(
        thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    yield "guided rescaled bf16", (randn(2, 4, 16, 16, dtype=torch.bfloat16), randn(2, 4, 16, 16,
                                   dtype=torch.bfloat16), table, 501), dict(
        uncond_output=randn(2, 4, 16, 16, dtype=torch.bfloat16), guidance_scale=7.5, guidance_rescale=0.7)


def host_time(fn) -> float:
    """Host microseconds per call (min over rounds of back-to-back calls; the GPU synchronised between rounds)."""
    return benchmark.time_host({"fn": fn}, rounds=5, sync=torch.cuda.synchronize, max_calls=2000)["fn"]["min_us"]


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    launcher = ddim._step_launcher
    print(f"triton {launch.triton.__version__}: direct launches {'on' if launcher.enabled else 'OFF (not validated)'}")
    failed = False
    # The compiled kernels are kept across cases: a case whose key wrongly equalled an earlier case's (say an
    # unaligned tensor keyed as aligned) would run that case's binary and show as a mismatch or a CUDA error.
    for each in LAUNCHERS:
        each.compiled.clear()
    for name, args, kwargs in cases():
        set_direct(False)
        ops.PLANS.clear()
        # A generator buffer moves on with every step: both runs start from the same state.
        saved = kwargs["philox_state"].clone() if "philox_state" in kwargs else None
        expected = [ops.ddim_step(*args, **kwargs) for _ in range(2)]
        if saved is not None:
            kwargs["philox_state"].copy_(saved)
        set_direct(launch.direct_launch_supported())
        ops.PLANS.clear()
        before = sum(len(each.compiled) for each in LAUNCHERS)
        got = [ops.ddim_step(*args, **kwargs) for _ in range(2)]
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for e, g in zip(expected, got) for a, b in zip(e, g) if a is not None)
        failed |= not same
        new = sum(len(each.compiled) for each in LAUNCHERS) - before
        print(f"{name}: {'identical' if same else 'MISMATCH'} ({new} new direct specializations)")
    m, x, u = (torch.randn(1, 4, 8, 8, device="cuda") for _ in range(3))
    for label, config in (("step", {}), ("thresholded step", dict(thresholding=True, sample_max_value=1.5))):
        scheduler = fastddim.DDIMScheduler(**config)
        scheduler.set_timesteps(50, device="cuda")
        t = scheduler.timesteps[10]
        for enabled in (False, launch.direct_launch_supported()):
            set_direct(enabled)
            print(f"host time per {label} call, direct launches {'on' if enabled else 'off'}: "
                  f"{host_time(lambda: scheduler.step(m, t, x)):.1f} us")
            if not config:
                print(f"host time per guided step call, direct launches {'on' if enabled else 'off'}: "
                      f"{host_time(lambda: scheduler.guided_step(u, m, t, x, 7.5)):.1f} us")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
