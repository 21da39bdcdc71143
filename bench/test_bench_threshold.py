"""Benchmarks of the thresholded DDIM step (dynamic thresholding on) on the CPU, one thread: fastddim's torch path
against diffusers, at several sizes, including one past torch.quantile's 2**24 elements per sample, where
diffusers cannot run at all.

    python -m pytest bench/test_bench_threshold.py --benchmark-enable

(The project's pytest configuration disables benchmarks by default and collects tests/ only.) Each case feeds
both schedulers the same model output and sample at a timestep where the 0.995 quantile of |x0| lies inside
[1, sample_max_value), so the exact order statistics are needed (the costly case; when the threshold is a clamp
bound fastddim needs only counts). The Triton kernels are not measured here: there is no GPU on CI.
"""

from __future__ import annotations


import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("pytest_benchmark")

import fastddim  # noqa: E402
from fastddim import threshold as fastddim_threshold  # noqa: E402

CONFIG = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=20.0, clip_sample=False)
# (name, shape): an image, a batch of larger images, a video latent (rank 5), one sample past 2**24 elements.
SHAPES = {
    "1x3x256x256": (1, 3, 256, 256),
    "4x3x512x512": (4, 3, 512, 512),
    "1x4x16x64x64": (1, 4, 16, 64, 64),
    "1x3x2400x2400": (1, 3, 2400, 2400),  # 17.3M elements per sample > 2**24: torch.quantile refuses
}
TOO_LARGE_FOR_DIFFUSERS = {"1x3x2400x2400"}


@pytest.fixture(autouse=True)
def one_thread_torch_backend(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    yield
    torch.set_num_threads(threads)


def step_inputs(shape):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator) * 3
    model_output = torch.randn(shape, generator=generator)
    return model_output, sample


def schedulers():
    ours, theirs = fastddim.DDIMScheduler(**CONFIG), diffusers.DDIMScheduler(**CONFIG)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    timestep = int(ours.timesteps[-3])  # x0 close to the sample: |x0| quantile ~ 8.5, inside [1, 20)
    return ours, theirs, timestep


def run(benchmark, step, size):
    if size in ("1x3x256x256", "1x4x16x64x64"):
        return benchmark(step)
    return benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("size", list(SHAPES))
def test_bench_fastddim_thresholded_step(benchmark, size):
    ours, _, timestep = schedulers()
    model_output, sample = step_inputs(SHAPES[size])
    benchmark.group = f"thresholded step {size}"
    out = run(benchmark, lambda: ours.step(model_output, timestep, sample), size)
    assert torch.isfinite(out.prev_sample).all()


@pytest.mark.parametrize("size", list(SHAPES))
def test_bench_diffusers_thresholded_step(benchmark, size):
    _, theirs, timestep = schedulers()
    model_output, sample = step_inputs(SHAPES[size])
    benchmark.group = f"thresholded step {size}"
    if size in TOO_LARGE_FOR_DIFFUSERS:
        with pytest.raises(RuntimeError, match="too large"):
            theirs.step(model_output, timestep, sample)
        pytest.skip("diffusers cannot threshold samples of more than 2**24 elements (torch.quantile refuses)")
    run(benchmark, lambda: theirs.step(model_output, timestep, sample), size)


@pytest.mark.parametrize("size", ["1x3x256x256", "1x3x2400x2400"])
def test_bench_fastddim_threshold_only(benchmark, size):
    """The threshold alone (s per sample from x0), fastddim's exact order statistics."""
    x0 = step_inputs(SHAPES[size])[1]
    benchmark.group = f"threshold only {size}"
    s = run(benchmark, lambda: fastddim_threshold.threshold_scale(x0, 0.995, 20.0), size)
    assert (s > 1).all() and (s < 20).all()


@pytest.mark.parametrize("size", ["1x3x256x256"])
def test_bench_torch_quantile_threshold_only(benchmark, size):
    """diffusers' threshold alone: torch.quantile of |x0| per sample, then the clamp."""
    x0 = step_inputs(SHAPES[size])[1]
    benchmark.group = f"threshold only {size}"
    flat = x0.reshape(x0.shape[0], -1)
    run(benchmark, lambda: torch.quantile(flat.abs(), 0.995, dim=1).clamp(1, 20.0), size)
