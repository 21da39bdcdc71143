"""Oracle helpers shared by the tests: a float64 transcription of diffusers' DDIM step, and tolerances.

The truth is computed independently of fastddim's code: from diffusers' own float32 `alphas_cumprod` (or the
scheduler attribute, which tests check is bit-identical to diffusers'), with every operation in float64,
following diffusers' formulas line by line.
"""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels are tested in Triton's interpreter on CPU tensors. Triton decides that when a
# kernel is decorated, so it must be set before fastddim is imported (this file is imported first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property-based tests: a fixed, derandomised profile for CI, and a long one to run by hand:
#   HYPOTHESIS_PROFILE=long python -m pytest tests/test_reliability.py
settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=3000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Where kernel tests put their tensors: the GPU when there is one, else the CPU (interpreted kernels).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Error bounds against the float64 truth, per output dtype, stated once. fastddim computes in float32 and rounds
# once, so a half-precision result is within about one unit in the last place (ulp) of the output dtype: 2**-10
# relative for float16 (10 mantissa bits), 2**-7 for bfloat16. float32 results carry a few float32 roundings
# (about 2**-24 each) of intermediates, hence 2**-18 relative to the result. That bound is relative to the
# result, so it cannot hold where the step divides a cancelling difference by a small sqrt(alpha_t) (epsilon
# prediction at the noisiest timesteps, ~1/0.0064 at t = 999): no float32 code can meet it there, diffusers
# included. Tests that reach those steps add a stated term proportional to the largest intermediate (see
# `float32_slack` in test_scheduler.py and the divisor-scaled bounds in test_kernels.py / test_reliability.py).
# float64 results use float64 coefficients: 1e-12. `atol` covers results near zero at each dtype's scale.
TOLERANCES = {
    torch.float16: dict(rtol=2**-10, atol=2**-14),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-10),
    torch.float32: dict(rtol=2**-18, atol=2**-20),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def truth_alphas(alphas_cumprod: torch.Tensor, final_alpha_cumprod, num_train_timesteps: int,
                 num_inference_steps: int, timestep: int, inverse: bool = False):
    """(alpha_t, alpha_prev) in float64, indexed as diffusers' step / inverse step index them."""
    ac = alphas_cumprod.to(torch.float64)
    final = float(final_alpha_cumprod)
    ratio = num_train_timesteps // num_inference_steps
    if inverse:
        source = min(timestep - ratio, num_train_timesteps - 1)
        alpha_t = float(ac[source]) if source >= 0 else final
        return alpha_t, float(ac[timestep])
    prev = timestep - ratio
    return float(ac[timestep]), (float(ac[prev]) if prev >= 0 else final)


def truth_step(model_output, sample, alpha_t, alpha_prev, eta=0.0, noise=None, prediction_type="epsilon",
               clip_sample=False, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
               sample_max_value=1.0, use_clipped_model_output=False, inverse=False):
    """diffusers' DDIMScheduler.step (or DDIMInverseScheduler.step) in float64; returns (prev, x0)."""
    m = model_output.to(torch.float64)
    x = sample.to(torch.float64)
    a_t = torch.tensor(alpha_t, dtype=torch.float64)
    a_p = torch.tensor(alpha_prev, dtype=torch.float64)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x - b_t.sqrt() * m) / a_t.sqrt()
        eps = m
    elif prediction_type == "sample":
        x0 = m
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        x0 = a_t.sqrt() * x - b_t.sqrt() * m
        eps = a_t.sqrt() * m + b_t.sqrt() * x
    if thresholding:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), dynamic_thresholding_ratio, dim=1).clamp(1, sample_max_value)[:, None]
        x0 = (torch.clamp(flat, -s, s) / s).reshape(x0.shape)
    elif clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    if inverse:
        return a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps, x0
    variance = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * variance.sqrt()
    if use_clipped_model_output:
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    radicand = 1 - a_p - std**2
    if eta <= 1:
        # Exactly >= 0 for eta <= 1: a negative value is rounding (e.g. zero terminal SNR at eta = 1, where
        # diffusers' float32 returns NaN); the truth is the exact value.
        radicand = radicand.clamp(min=0)
    prev = a_p.sqrt() * x0 + radicand.sqrt() * eps
    if eta > 0:
        prev = prev + std * noise.to(torch.float64)
    return prev, x0


def max_error_ratio(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """max |actual - truth| / (atol + rtol * |truth|) over finite entries; <= 1 passes."""
    tol = TOLERANCES[dtype]
    a = actual.to(torch.float64)
    finite = torch.isfinite(truth)
    if not finite.any():
        return 0.0
    err = (a[finite] - truth[finite]).abs() / (tol["atol"] + tol["rtol"] * truth[finite].abs())
    return float(err.max())


def arguments_by_name(names, args, kwargs) -> dict:
    """A recorded kernel launch's arguments by parameter name: the positional ones named in order by `names` (the
    kernel's `arg_names`, or a tail of them), then the keyword ones."""
    return {**dict(zip(names, args)), **kwargs}


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN in the same places, and +-inf in the same places with the same signs."""
    a = actual.to(torch.float64)
    e = expected.to(torch.float64)
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN placement differs"
    assert torch.equal(torch.isposinf(a), torch.isposinf(e)), "+inf placement differs"
    assert torch.equal(torch.isneginf(a), torch.isneginf(e)), "-inf placement differs"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once on each backend (FASTDDIM_BACKEND), on tensors placed on DEVICE."""
    monkeypatch.setenv("FASTDDIM_BACKEND", request.param)
    return request.param


@pytest.fixture
def calls_by_backend(monkeypatch):
    """Which implementation each step reached, in order: "torch" (fastddim.reference) or "triton" (a StepLauncher
    made after the fixture started: its plain launch function, or its general `launch`)."""
    from fastddim import reference
    from fastddim.kernels import ddim

    record = []
    real_reference = reference.ddim_step
    real_plain_launch, real_launch = ddim.StepLauncher.plain_launch, ddim.StepLauncher.launch

    def reference_step(*args, **kwargs):
        record.append("torch")
        return real_reference(*args, **kwargs)

    def plain_launch(self):
        run = real_plain_launch(self)

        def recorded_run(*args, **kwargs):
            record.append("triton")
            return run(*args, **kwargs)

        return recorded_run

    def launch(self, *args, **kwargs):
        record.append("triton")
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(reference, "ddim_step", reference_step)
    monkeypatch.setattr(ddim.StepLauncher, "plain_launch", plain_launch)
    monkeypatch.setattr(ddim.StepLauncher, "launch", launch)
    return record


@pytest.fixture
def single_threaded_torch():
    """One intra-op thread for the test: tiny convolutions take microseconds, and on a small shared machine
    waking a second thread for each costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
