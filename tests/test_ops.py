"""`fastddim.ops`: backend selection, the argument checks of `ops.ddim_step`, and agreement of its two backends.

The torch backend is `fastddim.reference.ddim_step`, the Triton backend `fastddim.kernels.ddim_step` (in Triton's
interpreter on CPU tensors when there is no GPU). Dispatch is observed with recording wrappers around both, so a
test that compares the backends knows each result came from the backend it names. Results are also compared with
conftest's float64 transcription of diffusers' step, whose alphas come from diffusers' own `alphas_cumprod`.
"""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, TOLERANCES, assert_same_nonfinite, truth_alphas, truth_step
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import kernels, ops
from fastddim.schedule import step_table

# Triton's interpreter runs the kernel in numpy, which warns on inf - inf and the like: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.*")

NUM_INFERENCE_STEPS = 10
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SHAPE = (2, 3, 8, 8)

_diffusers = DiffusersDDIMScheduler()
ALPHAS_CUMPROD = _diffusers.alphas_cumprod
FINAL_ALPHA = float(_diffusers.final_alpha_cumprod)
TABLE = step_table(ALPHAS_CUMPROD, NUM_INFERENCE_STEPS, FINAL_ALPHA)


def row(timestep=500):
    """A coefficient row on DEVICE and (alpha_t, alpha_prev) from diffusers in float64."""
    alphas = truth_alphas(ALPHAS_CUMPROD, FINAL_ALPHA, 1000, NUM_INFERENCE_STEPS, timestep)
    return TABLE[timestep].to(DEVICE), alphas


def randn(shape=SHAPE, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def inputs(dtype=torch.float32, seed=0):
    return randn(SHAPE, dtype, seed), randn(SHAPE, dtype, seed + 1), randn(SHAPE, dtype, seed + 2)


def assert_close(actual, expected, dtype, amplification=1.0, what=""):
    """Same non-finite entries; finite ones within conftest's tolerance for `dtype` plus float32's atol times
    `amplification`: the step divides intermediates of size ~1 by sqrt(alpha_t) or sqrt(1 - alpha_t)."""
    assert_same_nonfinite(actual, expected.to(dtype))
    tol = TOLERANCES[dtype]
    math_atol = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]["atol"]
    finite = torch.isfinite(expected.to(dtype))
    a, e = actual.to(torch.float64)[finite], expected.to(torch.float64)[finite]
    if e.numel():
        ratio = float(((a - e).abs() / (tol["atol"] + amplification * math_atol + tol["rtol"] * e.abs())).max())
        assert ratio <= 1, f"{what}: max error is {ratio:.3g} x the tolerance"


def amplification(alphas, prediction_type, use_clipped_model_output):
    alpha_t = alphas[0]
    factor = 1.0
    if prediction_type == "epsilon":
        factor = max(factor, 1 / math.sqrt(alpha_t))
    if prediction_type == "sample" or use_clipped_model_output:
        factor = max(factor, 1 / math.sqrt(1 - alpha_t))
    return factor


# ---------------------------------------------------------------------------------------------------------------
# select_backend
# ---------------------------------------------------------------------------------------------------------------

SELECTIONS = [
    # (FASTDDIM_BACKEND or None for unset, device, kernels interpreted, expected backend)
    (None, "cpu", True, "triton"),
    (None, "cpu", False, "torch"),
    (None, "cuda", False, "triton"),
    (None, "meta", True, "torch"),
    ("", "cpu", False, "torch"),
    ("", "cpu", True, "triton"),
    ("auto", "cpu", True, "triton"),
    (" AUTO ", "cpu", False, "torch"),
    ("auto", "cuda", False, "triton"),
    ("torch", "cpu", True, "torch"),
    ("Torch", "cuda", False, "torch"),
    ("triton", "cpu", True, "triton"),
    (" TRITON ", "cuda", False, "triton"),
]


@pytest.mark.parametrize("env, device, interpreting, expected", SELECTIONS)
def test_select_backend(monkeypatch, env, device, interpreting, expected):
    if env is None:
        monkeypatch.delenv("FASTDDIM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTDDIM_BACKEND", env)
    monkeypatch.setattr(ops, "triton_interpreting", lambda: interpreting)
    assert ops.select_backend(torch.device(device)) == expected


@pytest.mark.parametrize("env", ["bogus", "cuda", "tritonn", "torch,triton", "none"])
def test_unknown_backend_in_the_environment_is_an_error_naming_the_variable(monkeypatch, env, calls_by_backend):
    monkeypatch.setenv("FASTDDIM_BACKEND", env)
    with pytest.raises(ValueError, match="FASTDDIM_BACKEND") as info:
        ops.select_backend(torch.device("cpu"))
    assert repr(env.strip().lower()) in str(info.value)
    model_output, sample, _ = inputs()
    with pytest.raises(ValueError, match="FASTDDIM_BACKEND"):
        ops.ddim_step(model_output, sample, row()[0])
    assert calls_by_backend == []


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_forcing_triton_off_cuda_without_the_interpreter_is_a_clear_error(monkeypatch, device, calls_by_backend):
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="FASTDDIM_BACKEND=triton.*CUDA.*TRITON_INTERPRET=1"):
        ops.select_backend(torch.device(device))
    if device == "cpu":
        model_output, sample, _ = inputs()
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ops.ddim_step(model_output.cpu(), sample.cpu(), row()[0].cpu())
        assert calls_by_backend == []


def test_forcing_triton_on_cuda_needs_no_interpreter(monkeypatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    assert ops.select_backend(torch.device("cuda")) == "triton"


def test_without_triton_auto_falls_back_to_torch_and_forcing_triton_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    monkeypatch.delenv("FASTDDIM_BACKEND", raising=False)
    assert ops.select_backend(torch.device("cuda")) == "torch"
    assert ops.select_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="triton"):
        ops.select_backend(torch.device("cuda"))


def test_real_interpreter_state_matches_the_kernels():
    """ops sees the kernels as they were decorated; without a GPU, conftest made that the interpreter."""
    assert ops.triton_available()
    assert ops.triton_interpreting() == kernels.INTERPRETED
    if not torch.cuda.is_available():
        assert kernels.INTERPRETED


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_environment_picks_the_implementation(backend, calls_by_backend):
    """With FASTDDIM_BACKEND set (conftest's `backend` fixture) and no backend argument, the step runs there."""
    model_output, sample, _ = inputs()
    ops.ddim_step(model_output, sample, row()[0])
    assert calls_by_backend == [backend]


@pytest.mark.parametrize("env, argument", [("torch", "triton"), ("triton", "torch"), ("auto", "torch")])
def test_backend_argument_overrides_the_environment(monkeypatch, calls_by_backend, env, argument):
    monkeypatch.setenv("FASTDDIM_BACKEND", env)
    model_output, sample, _ = inputs()
    ops.ddim_step(model_output, sample, row()[0], backend=argument)
    assert calls_by_backend == [argument]


def test_backend_argument_triton_off_cuda_without_the_interpreter_is_a_clear_error(monkeypatch, calls_by_backend):
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    model_output, sample, _ = inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.ddim_step(model_output.cpu(), sample.cpu(), row()[0].cpu(), backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# The two backends agree
# ---------------------------------------------------------------------------------------------------------------


def run_both(calls_by_backend, *args, **kwargs):
    results = {}
    for name in ("torch", "triton"):
        calls_by_backend.clear()
        results[name] = ops.ddim_step(*args, backend=name, **kwargs)
        assert calls_by_backend == [name]
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1-noise"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["eps-as-predicted", "eps-from-clipped"])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_torch_and_triton_backends_agree(calls_by_backend, prediction_type, clip_sample, use_clipped_model_output, eta,
                                        dtype):
    coefficients, alphas = row(900)
    model_output, sample, noise = inputs(dtype, seed=1)
    noise = noise if eta > 0 else None
    kwargs = dict(eta=eta, prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=1.3,
                  use_clipped_model_output=use_clipped_model_output, variance_noise=noise)
    results = run_both(calls_by_backend, model_output, sample, coefficients, **kwargs)
    truth = truth_step(model_output, sample, *alphas, eta=eta, noise=noise, prediction_type=prediction_type,
                       clip_sample=clip_sample, clip_sample_range=1.3,
                       use_clipped_model_output=use_clipped_model_output)
    factor = amplification(alphas, prediction_type, use_clipped_model_output)
    for index, name in enumerate(("prev_sample", "pred_original_sample")):
        torch_out, triton_out = results["torch"][index], results["triton"][index]
        assert torch_out.dtype == triton_out.dtype == dtype
        assert_close(triton_out, torch_out, dtype, factor, f"triton vs torch {name}")
        assert_close(torch_out, truth[index], dtype, factor, f"torch {name} vs float64 truth")
        assert_close(triton_out, truth[index], dtype, factor, f"triton {name} vs float64 truth")


def test_backends_agree_on_channels_last_and_keep_it(calls_by_backend):
    coefficients, alphas = row(500)
    model_output, sample, noise = (t.contiguous(memory_format=torch.channels_last) for t in inputs(seed=2))
    results = run_both(calls_by_backend, model_output, sample, coefficients, eta=0.5, variance_noise=noise)
    for index in range(2):
        assert results["torch"][index].is_contiguous(memory_format=torch.channels_last)
        assert results["triton"][index].is_contiguous(memory_format=torch.channels_last)
        assert_close(results["triton"][index], results["torch"][index], torch.float32, 1 / math.sqrt(alphas[0]))


def test_backends_agree_on_nonfinite_inputs(calls_by_backend):
    coefficients, alphas = row(500)
    model_output, sample, noise = (t.clone() for t in inputs(seed=3))
    model_output[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    sample[1, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    results = run_both(calls_by_backend, model_output, sample, coefficients, eta=1.0, variance_noise=noise,
                       clip_sample=True)
    for index in range(2):
        assert not torch.isfinite(results["torch"][index]).all()
        assert_close(results["triton"][index], results["torch"][index], torch.float32, 1 / math.sqrt(alphas[0]))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_thresholding_runs_on_the_selected_backend(backend, calls_by_backend, prediction_type):
    """At t = 100, x0 has |x0| quantiles inside [1, sample_max_value = 3], so the threshold is a real quantile.
    Thresholded steps run on the selected backend (the Triton one finds the threshold with its own kernels)."""
    coefficients, alphas = row(100)
    model_output, sample, _ = inputs(seed=4)
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    prev, x0 = ops.ddim_step(model_output, sample, coefficients, prediction_type=prediction_type, **kwargs)
    assert calls_by_backend == [backend]
    calls_by_backend.clear()
    forced = ops.ddim_step(model_output, sample, coefficients, prediction_type=prediction_type, backend="triton",
                           **kwargs)
    assert calls_by_backend == ["triton"]
    truth_prev, truth_x0 = truth_step(model_output, sample, *alphas, prediction_type=prediction_type, **kwargs)
    _, raw_x0 = truth_step(model_output, sample, *alphas, prediction_type=prediction_type)
    s = torch.quantile(raw_x0.abs().flatten(1), 0.9, dim=1)
    assert ((s > 1) & (s < 3)).all()  # the threshold is a quantile, not one of the clamp bounds
    factor = amplification(alphas, prediction_type, False)
    for (p, x), name in (((prev, x0), backend), (forced, "triton")):
        assert_close(p, truth_prev, torch.float32, factor, f"{name}: thresholded prev_sample vs float64 truth")
        assert_close(x, truth_x0, torch.float32, factor, f"{name}: thresholded pred_original_sample vs float64 truth")


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------


def bad_arguments():
    """name: (changes to valid arguments, error type, pattern the message must match)."""
    m = lambda **kw: torch.zeros(SHAPE, device=DEVICE, **kw)  # noqa: E731
    return {
        "model_output-list": (dict(model_output=[0.0] * 4), TypeError, "model_output must be a torch.Tensor"),
        "model_output-numpy": (dict(model_output=np.zeros(SHAPE, np.float32)), TypeError, "model_output"),
        "sample-float": (dict(sample=1.0), TypeError, "sample must be a torch.Tensor"),
        "model_output-int32": (dict(model_output=m(dtype=torch.int32)), TypeError, "model_output.*floating"),
        "sample-int64": (dict(sample=m(dtype=torch.int64)), TypeError, "sample.*floating"),
        "model_output-bool": (dict(model_output=m(dtype=torch.bool)), TypeError, "model_output.*floating"),
        "sample-uint8": (dict(sample=m(dtype=torch.uint8)), TypeError, "sample.*floating"),
        "sample-complex": (dict(sample=m(dtype=torch.complex64)), TypeError, "sample.*floating"),
        "model_output-shape": (dict(model_output=torch.zeros(2, 3, 8, 7, device=DEVICE)), ValueError,
                               r"model_output.*shape.*\(2, 3, 8, 8\).*\(2, 3, 8, 7\)"),
        "model_output-broadcastable": (dict(model_output=torch.zeros(1, 3, 8, 8, device=DEVICE)), ValueError,
                                       "model_output.*shape"),
        "model_output-device": (dict(model_output=torch.zeros(SHAPE, device="meta")), ValueError,
                                "model_output.*device"),
        "sample-device": (dict(sample=torch.zeros(SHAPE, device="meta")), ValueError, "device"),
        "variance_noise-list": (dict(variance_noise=[0.0]), TypeError, "variance_noise"),
        "variance_noise-int": (dict(variance_noise=m(dtype=torch.int32)), TypeError, "variance_noise.*floating"),
        "variance_noise-shape": (dict(variance_noise=torch.zeros(2, 3, 8, device=DEVICE)), ValueError,
                                 "variance_noise.*shape"),
        "variance_noise-device": (dict(variance_noise=torch.zeros(SHAPE, device="meta")), ValueError,
                                  "variance_noise.*device"),
        "eta-negative": (dict(eta=-0.5), ValueError, "eta"),
        "eta-tiny-negative": (dict(eta=-1e-300), ValueError, "eta"),
        "eta-nan": (dict(eta=math.nan), ValueError, "eta"),
        "eta-inf": (dict(eta=math.inf), ValueError, "eta"),
        "eta-minus-inf": (dict(eta=-math.inf), ValueError, "eta"),
        "eta-true": (dict(eta=True), TypeError, "eta"),
        "eta-false": (dict(eta=False), TypeError, "eta"),
        "eta-string": (dict(eta="0.5"), TypeError, "eta"),
        "eta-none": (dict(eta=None), TypeError, "eta"),
        "eta-tensor": (dict(eta=torch.tensor(0.5)), TypeError, "eta"),
        "eta-complex": (dict(eta=0.5j), TypeError, "eta"),
        "prediction_type-unknown": (dict(prediction_type="noise"), ValueError, "prediction_type.*'noise'"),
        "prediction_type-case": (dict(prediction_type="Epsilon"), ValueError, "prediction_type"),
        "prediction_type-none": (dict(prediction_type=None), ValueError, "prediction_type"),
        "table-row-float32": (dict(table=TABLE[500].float().to(DEVICE)), TypeError, "table.*float64"),
        "table-row-int64": (dict(table=TABLE[500].long().to(DEVICE)), TypeError, "table.*float64"),
        "table-row-too-short": (dict(table=TABLE[500, :5].to(DEVICE)), ValueError, "table"),
        "table-whole-without-timestep": (dict(table=TABLE.to(DEVICE)), ValueError, "table"),
        "table-list": (dict(table=TABLE[500].tolist()), ValueError, "table"),
        "table-row-with-timestep": (dict(table=TABLE[500].to(DEVICE), timestep=500), TypeError, "table"),
        "table-too-narrow": (dict(table=TABLE[:, :5].to(DEVICE), timestep=500), TypeError, "table"),
        "timestep-float": (dict(table=TABLE.to(DEVICE), timestep=500.0), TypeError, "timestep"),
        "timestep-bool": (dict(table=TABLE.to(DEVICE), timestep=True), TypeError, "timestep"),
        "timestep-float-tensor": (dict(table=TABLE.to(DEVICE), timestep=torch.tensor(500.0)), TypeError,
                                  "timestep"),
        "timestep-wrong-count": (dict(table=TABLE.to(DEVICE), timestep=torch.tensor([500, 400, 300])), ValueError,
                                 "timestep"),
        "backend-unknown": (dict(backend="cuda"), ValueError, "backend"),
        "no-output": (dict(write_prev_sample=False, write_pred_original_sample=False), ValueError,
                      "write_prev_sample and write_pred_original_sample"),
    }


@pytest.mark.parametrize("case", list(bad_arguments()))
def test_bad_arguments_raise_before_any_step(backend, calls_by_backend, case):
    changes, error, pattern = bad_arguments()[case]
    model_output, sample, noise = inputs()
    arguments = dict(model_output=model_output, sample=sample, table=row()[0], variance_noise=noise, eta=0.5)
    arguments.update(changes)
    with pytest.raises(error, match=pattern):
        ops.ddim_step(**arguments)
    assert calls_by_backend == []


def test_triton_backend_needs_the_table_on_the_sample_device(calls_by_backend):
    model_output, sample, _ = inputs()
    with pytest.raises(ValueError, match="table.*device"):
        ops.ddim_step(model_output, sample, torch.zeros(8, dtype=torch.float64, device="meta"), backend="triton")
    assert calls_by_backend == []


@pytest.mark.parametrize("eta", [0, 1, np.float64(0.5), np.float32(0.5), fractions.Fraction(1, 2)],
                         ids=["int0", "int1", "np.float64", "np.float32", "Fraction"])
def test_real_numbers_of_any_type_are_valid_etas(backend, eta):
    coefficients, _ = row(500)
    model_output, sample, noise = inputs(seed=5)
    got = ops.ddim_step(model_output, sample, coefficients, eta=eta, variance_noise=noise)
    expected = ops.ddim_step(model_output, sample, coefficients, eta=float(eta), variance_noise=noise)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_eta_without_noise_gives_the_steps_mean(backend, eta):
    """The functional step with eta > 0 and no noise (neither variance_noise nor philox_state) returns the mean of
    x_{t-1}: diffusers' step with its noise set to zero (its direction term keeps the eta-reduced weight)."""
    coefficients, (alpha_t, alpha_prev) = row(500)
    model_output, sample, _ = inputs(seed=7)
    prev, x0 = ops.ddim_step(model_output, sample, coefficients, eta=eta)
    truth_prev, truth_x0 = truth_step(model_output, sample, alpha_t, alpha_prev, eta=eta,
                                      noise=torch.zeros(SHAPE, dtype=torch.float64))
    assert_close(prev, truth_prev, torch.float32, what="prev")
    assert_close(x0, truth_x0, torch.float32, what="x0")
    deterministic, _ = ops.ddim_step(model_output, sample, coefficients)
    assert not torch.allclose(prev, deterministic)  # the eta-reduced direction term: not the eta = 0 step


def test_valid_arguments_leave_inputs_unchanged(backend):
    coefficients, _ = row(500)
    model_output, sample, noise = inputs(seed=6)
    before = [t.clone() for t in (model_output, sample, noise, coefficients)]
    prev, x0 = ops.ddim_step(model_output, sample, coefficients, eta=1.0, variance_noise=noise,
                             prediction_type="sample", clip_sample=True)
    for a, b in zip((model_output, sample, noise, coefficients), before):
        assert torch.equal(a, b)
    for out in (prev, x0):
        for t in (model_output, sample, noise):
            assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
