"""CPU step benchmarks: fastddim's DDIMScheduler.step (torch path) against diffusers', one torch thread.

    python -m pytest bench/ --benchmark-enable                 # tables grouped by case, fastddim beside diffusers
    python -m pytest bench/ --benchmark-enable -k 1x4x128x128  # one shape

The project's pytest configuration disables benchmarks (`--benchmark-disable`: each runs once, as a test) and
collects tests/ only, so CI never spends time here. Cases, inputs and the correctness check come from
`fastddim.benchmark`, which `bench/run.py` and `fastddim bench` time the same way.
"""

from __future__ import annotations

import pytest
import torch

from fastddim import benchmark as fb

pytest.importorskip("diffusers")

CONTENDERS = ("fastddim", "diffusers")


@pytest.fixture(scope="module", autouse=True)
def single_thread_torch_path():
    """One torch thread and fastddim's torch path (FASTDDIM_BACKEND=torch) for the module, restored after."""
    with fb.torch_threads(1), fb.forced_backend("torch"):
        yield


@pytest.fixture(scope="module")
def prepared():
    """Each case prepared (and checked against the float64 truth) once, on first use."""
    cache = {}

    def get(case: fb.Case) -> fb.Prepared:
        if case not in cache:
            cache[case] = fb.prepare(case, "cpu")
        return cache[case]

    return get


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", fb.CPU_CASES, ids=str)
def test_step(benchmark, prepared, case, contender):
    step = prepared(case).steps[contender]  # raises if either contender is off the truth
    benchmark.group = case.name
    benchmark.extra_info.update(shape=list(case.shape), dtype=str(case.dtype), backend="torch", threads=1)
    output = benchmark(step)
    assert output.prev_sample.shape == case.shape


def test_report_acceptance_speedup(request, record_property):
    """fastddim's speed-up over diffusers at 1x4x128x128 fp32 in interleaved rounds (medians), printed and recorded
    (the `speedup` and `target_speedup` properties) beside the ACCEPTANCE_SPEEDUP target. A timing depends on
    the machine and its load, so it is reported, not asserted; what is asserted is that both steps are right
    (prepare checks them against the float64 truth). Runs only with --benchmark-enable."""
    config = request.config
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        pytest.skip("a timing: run with --benchmark-enable")
    steps = fb.prepare(fb.ACCEPTANCE_CASE, "cpu").steps
    timings = fb.time_host(steps, rounds=40)
    speedup = timings["diffusers"]["median_us"] / timings["fastddim"]["median_us"]
    record_property("speedup", speedup)
    record_property("target_speedup", fb.ACCEPTANCE_SPEEDUP)
    met = "meets" if speedup >= fb.ACCEPTANCE_SPEEDUP else "is below"
    print(f"\n{fb.ACCEPTANCE_CASE.name}: fastddim {timings['fastddim']['median_us']:.1f} us, "
          f"diffusers {timings['diffusers']['median_us']:.1f} us: {speedup:.2f}x ({met} the "
          f"{fb.ACCEPTANCE_SPEEDUP:g}x target on this machine)")


def test_a_wrong_step_is_caught_before_timing(monkeypatch):
    """The check in `prepare` fails a contender whose output is off the truth (here by one part in 1e5)."""
    true_step = fb.fastddim.DDIMScheduler.step

    def slightly_wrong_step(self, *args, **kwargs):
        output = true_step(self, *args, **kwargs)
        return type(output)(output.prev_sample * (1 + 1e-5), output.pred_original_sample)

    monkeypatch.setattr(fb.fastddim.DDIMScheduler, "step", slightly_wrong_step)
    with pytest.raises(AssertionError, match="fastddim is wrong at step 1x4x64x64 fp32: prev_sample"):
        fb.prepare(fb.Case((1, 4, 64, 64)), "cpu")
