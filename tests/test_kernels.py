"""The fused Triton DDIM step through its functional API, `fastddim.kernels.ddim_step`.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1 before
fastddim is imported); on a GPU the same tests run on CUDA tensors, because every tensor is made on `DEVICE`.

Every result is checked twice: against the torch reference step (`fastddim.reference.ddim_step`, the kernel's
oracle, which must agree with it) and against conftest's float64 transcription of diffusers' step, whose alphas
come from diffusers' own `alphas_cumprod` (independent of fastddim's coefficient table). Every call also checks
that the inputs are left unchanged and that the outputs are fresh tensors.
"""

from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch
from conftest import DEVICE, TOLERANCES, arguments_by_name, assert_same_nonfinite, truth_alphas, truth_step
from diffusers import DDIMInverseScheduler as DiffusersDDIMInverseScheduler
from diffusers import DDIMScheduler as DiffusersDDIMScheduler

from fastddim import reference
from fastddim.kernels import INTERPRETED, ddim_step, is_dense
from fastddim.schedule import step_table

# Triton's interpreter runs the kernel in numpy, which warns on inf - inf, 0 / 0 and the like: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.*")

# The launcher module itself: the tests replace its kernel object with a recorder and its INT32_LIMIT.
ddim_module = importlib.import_module("fastddim.kernels.ddim")

NUM_INFERENCE_STEPS = 10  # step ratio 100: timestep t steps to t - 100
# Clips some x0 entries of N(0, 1) inputs at every timestep and leaves others alone; not a float32 number, so
# float64 steps show whether the range keeps its float64 value.
CLIP_RANGE = 1.3
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)

# diffusers' configurations the coefficient rows come from: its defaults (final alpha 1), and Stable Diffusion's
# (final alpha = alphas_cumprod[0], since set_alpha_to_one=False).
SCHEDULES = {
    "linear": {},
    "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False),
}


# ---------------------------------------------------------------------------------------------------------------
# Coefficient rows and their float64 truth
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def diffusers_schedule(name: str, inverse: bool):
    """(alphas_cumprod, boundary alpha) of a diffusers scheduler: final_alpha_cumprod, or initial_alpha_cumprod
    for the inverse scheduler."""
    if inverse:
        scheduler = DiffusersDDIMInverseScheduler(**SCHEDULES[name])
        return scheduler.alphas_cumprod, float(scheduler.initial_alpha_cumprod)
    scheduler = DiffusersDDIMScheduler(**SCHEDULES[name])
    return scheduler.alphas_cumprod, float(scheduler.final_alpha_cumprod)


def step_row(schedule: str, timestep: int, inverse: bool = False):
    """A row of fastddim's coefficient table on DEVICE, and (alpha_t, alpha_prev) from diffusers in float64."""
    alphas_cumprod, boundary = diffusers_schedule(schedule, inverse)
    return row_from_alphas(alphas_cumprod, boundary, timestep, inverse)


def row_from_alphas(alphas_cumprod, boundary, timestep, inverse=False):
    table = step_table(alphas_cumprod, NUM_INFERENCE_STEPS, boundary, inverse=inverse)
    alphas = truth_alphas(alphas_cumprod, boundary, alphas_cumprod.shape[0], NUM_INFERENCE_STEPS, timestep, inverse)
    return table[timestep].to(DEVICE), alphas


# Forward rows: the first timestep of "leading" (900) and "trailing" (999) spacing, one in the middle, the last
# one whose previous index is 0, the first whose previous index is negative (99 - 100 = -1: final alpha), and the
# last timestep of a run (0) under both final alphas.
FORWARD_ROWS = {
    "linear-t900-first": ("linear", 900),
    "linear-t999-first-trailing": ("linear", 999),
    "linear-t500": ("linear", 500),
    "linear-t100-prev-index-0": ("linear", 100),
    "linear-t99-prev-index-negative": ("linear", 99),
    "linear-t0-last": ("linear", 0),
    "sd-t0-last-final-alpha-is-alphas0": ("sd", 0),
}
# Inverse rows: a source index below zero (initial alpha), the middle, and the last (source 899, target 999).
INVERSE_ROWS = {
    "inverse-linear-t0-initial-alpha": ("linear", 0),
    "inverse-linear-t500": ("linear", 500),
    "inverse-sd-t999-last": ("sd", 999),
    "inverse-sd-t0-initial-is-alphas0": ("sd", 0),
}


# ---------------------------------------------------------------------------------------------------------------
# Inputs and layouts
# ---------------------------------------------------------------------------------------------------------------


def randn(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def step_inputs(shape, dtype=torch.float32, seed=0, noise_dtype=None):
    """model_output, sample and variance_noise: independent standard normal draws."""
    return (randn(shape, dtype, seed), randn(shape, dtype, seed + 1), randn(shape, noise_dtype or dtype, seed + 2))


def _permutation(rank):
    """A storage order that keeps the batch outermost and moves every other dimension: odd dimensions, then
    even ones (rank 4: 0, 1, 3, 2 -> 0, 3, 1, 2 ...)."""
    rest = tuple(range(1, rank))
    return (0,) + rest[1::2] + rest[0::2]


# Layouts in which the elements fill their memory exactly once; "every_other" leaves gaps and "expanded" repeats
# elements. All but "reversed" keep the batch dimension outermost.
DENSE_LAYOUTS = ("contiguous", "channels_last", "channels_last_3d", "transposed", "permuted", "reversed",
                 "storage_offset")


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """`values` stored in `layout`: same shape and elements, except "expanded", which repeats values[:, :1]
    along dimension 1 (stride 0). Gaps and unused parts of bigger buffers hold NaN, so reading them shows."""
    shape, rank = values.shape, values.dim()
    if layout == "contiguous":
        return values.contiguous()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return values.contiguous(memory_format=torch.channels_last_3d)
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "reversed":
        order = tuple(reversed(range(rank)))
        return values.permute(order).contiguous().permute(order)
    if layout == "permuted":
        order = _permutation(rank)
        inverse = tuple(order.index(d) for d in range(rank))
        return values.permute(order).contiguous().permute(inverse)
    if layout == "every_other":
        wide = torch.full((*shape[:-1], 2 * shape[-1]), math.nan, dtype=values.dtype, device=values.device)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "storage_offset":
        # An odd offset into a bigger buffer: the data pointer is not 16-byte aligned.
        buffer = torch.full((values.numel() + 12,), math.nan, dtype=values.dtype, device=values.device)
        view = buffer[5 : 5 + values.numel()].view(shape)
        view.copy_(values)
        return view
    if layout == "expanded":
        return values[:, :1].expand(shape)
    raise ValueError(layout)


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def amplification(alphas, prediction_type, use_clipped_model_output):
    """How much the step magnifies the absolute rounding error of its intermediates: x0 = (x - ...) / sqrt(alpha_t)
    for epsilon, eps = (x - ...) / sqrt(1 - alpha_t) for sample and use_clipped_model_output. (At the first
    timesteps 1 / sqrt(alpha_t) is about 157, more than conftest's float32 rtol/ulp margin of 32 assumes.)"""
    alpha_t = alphas[0]
    factor = 1.0
    if prediction_type == "epsilon":
        factor = max(factor, 1 / math.sqrt(alpha_t) if alpha_t > 0 else math.inf)
    if prediction_type == "sample" or use_clipped_model_output:
        factor = max(factor, 1 / math.sqrt(1 - alpha_t) if alpha_t < 1 else math.inf)
    return factor


def assert_close(actual, expected, dtype, amplification_factor=1.0, what=""):
    """Same non-finite entries (after rounding `expected` to `dtype`); finite ones within conftest's tolerance
    for `dtype` (the output rounding) plus the compute precision's atol times `amplification_factor`
    (intermediates of size ~1 divided by a small square root)."""
    # A float64 truth that overflows the output dtype must be inf there too.
    assert_same_nonfinite(actual, expected.to(dtype))
    tol = TOLERANCES[dtype]
    math_atol = TOLERANCES[math_dtype(dtype)]["atol"]
    a = actual.to(torch.float64)
    e = expected.to(torch.float64)
    finite = torch.isfinite(expected.to(dtype))
    if not finite.any():
        return
    bound = tol["atol"] + amplification_factor * math_atol + tol["rtol"] * e[finite].abs()
    ratio = float(((a[finite] - e[finite]).abs() / bound).max())
    assert ratio <= 1, f"{what}: max error is {ratio:.3g} x the tolerance"


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg="an input was modified")


def storage_span(t: torch.Tensor):
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


def assert_no_alias(outputs, inputs):
    for i, out in enumerate(outputs):
        if out.numel() == 0:
            continue
        lo, hi = storage_span(out)
        for other in list(inputs) + list(outputs[:i]):
            if other.numel() == 0:
                continue
            other_lo, other_hi = storage_span(other)
            assert hi <= other_lo or other_hi <= lo, "an output shares memory with an input or the other output"


def check_step(model_output, sample, coefficients, alphas, *, eta=0.0, variance_noise=None,
               prediction_type="epsilon", clip_sample=False, clip_sample_range=CLIP_RANGE,
               use_clipped_model_output=False, inverse=False, compare_truth=True):
    """Run the kernel and check it against the reference step and the float64 truth; return its outputs."""
    kwargs = dict(eta=eta, prediction_type=prediction_type, clip_sample=clip_sample,
                  clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
                  variance_noise=variance_noise)
    inputs = [t for t in (model_output, sample, variance_noise) if t is not None]
    before = [t.clone() for t in inputs]

    prev, x0 = ddim_step(model_output, sample, coefficients, **kwargs)
    ref_prev, ref_x0 = reference.ddim_step(model_output, sample, coefficients, **kwargs)

    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    for out in (prev, x0):
        assert out.dtype == out_dtype
        assert out.shape == sample.shape
        assert out.device == sample.device
    assert_unchanged(before, inputs)
    assert_no_alias([prev, x0], inputs)

    factor = amplification(alphas, prediction_type, use_clipped_model_output)
    assert_close(prev, ref_prev, out_dtype, factor, "prev_sample vs reference")
    assert_close(x0, ref_x0, out_dtype, factor, "pred_original_sample vs reference")
    if compare_truth:
        truth_prev, truth_x0 = truth_step(
            model_output, sample, *alphas, eta=eta, noise=variance_noise, prediction_type=prediction_type,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            use_clipped_model_output=use_clipped_model_output, inverse=inverse,
        )
        for actual, truth, name in ((prev, truth_prev, "prev_sample"), (x0, truth_x0, "pred_original_sample")):
            assert_close(actual, truth, out_dtype, factor, f"kernel {name} vs float64 truth")
        for actual, truth, name in ((ref_prev, truth_prev, "prev_sample"), (ref_x0, truth_x0, "pred_original_sample")):
            assert_close(actual, truth, out_dtype, factor, f"reference {name} vs float64 truth")
    return prev, x0


class LaunchRecorder:
    """Stands in for the Triton kernel object in fastddim.kernels.ddim: records each launch's arguments by
    parameter name (the compile-time flags among them, passed by position or keyword) and its keyword options,
    then launches the real kernel unless `launch` is False."""

    def __init__(self, kernel, launch=True):
        self.kernel = kernel
        self.launch = launch
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append({**arguments_by_name(self.kernel.arg_names, args, kwargs), "grid": grid})
            if self.launch:
                return self.kernel[grid](*args, **kwargs)
            return None

        return run


@pytest.fixture
def launches(monkeypatch):
    recorder = LaunchRecorder(ddim_module._ddim_step_kernel)
    monkeypatch.setattr(ddim_module, "_ddim_step_kernel", recorder)
    return recorder


# ---------------------------------------------------------------------------------------------------------------
# The step's options, at several timesteps
# ---------------------------------------------------------------------------------------------------------------

ETA_CASES = {"eta0-no-noise": (0.0, False), "eta0.5-noise": (0.5, True), "eta1-noise": (1.0, True)}


@pytest.mark.parametrize("eta_case", list(ETA_CASES), ids=list(ETA_CASES))
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["eps-as-predicted", "eps-from-clipped"])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("row", list(FORWARD_ROWS), ids=list(FORWARD_ROWS))
def test_step_options_match_reference_and_truth(row, prediction_type, clip_sample, use_clipped_model_output,
                                                eta_case):
    coefficients, alphas = step_row(*FORWARD_ROWS[row])
    eta, with_noise = ETA_CASES[eta_case]
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=len(row))
    check_step(model_output, sample, coefficients, alphas, eta=eta, variance_noise=noise if with_noise else None,
               prediction_type=prediction_type, clip_sample=clip_sample,
               use_clipped_model_output=use_clipped_model_output)


@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("row", list(INVERSE_ROWS), ids=list(INVERSE_ROWS))
def test_inverse_rows_match_diffusers_inverse_step(row, prediction_type, clip_sample):
    coefficients, alphas = step_row(*INVERSE_ROWS[row], inverse=True)
    model_output, sample, _ = step_inputs((2, 3, 8, 8), seed=3)
    check_step(model_output, sample, coefficients, alphas, prediction_type=prediction_type, clip_sample=clip_sample,
               inverse=True)


def test_inverse_row_has_no_noise_term():
    """The inverse table's variance column is 0, so even eta = 1 with noise leaves the inverse step unchanged."""
    coefficients, alphas = step_row("linear", 500, inverse=True)
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=4)
    with_noise, _ = ddim_step(model_output, sample, coefficients, eta=1.0, variance_noise=noise)
    check_step(model_output, sample, coefficients, alphas, inverse=True)
    without_noise, _ = ddim_step(model_output, sample, coefficients)
    torch.testing.assert_close(with_noise, without_noise, rtol=0, atol=0)


@pytest.mark.parametrize("timestep", [999, 500, 0])
def test_table_and_timestep_equal_the_row(timestep):
    """The other form of the API: the whole table and an int timestep give the same bits as that row alone."""
    alphas_cumprod, final = diffusers_schedule("linear", False)
    table = step_table(alphas_cumprod, NUM_INFERENCE_STEPS, final).to(DEVICE)
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=timestep)
    kwargs = dict(eta=0.5, variance_noise=noise, clip_sample=True, clip_sample_range=CLIP_RANGE)
    from_table = ddim_step(model_output, sample, table, timestep, **kwargs)
    from_row = ddim_step(model_output, sample, table[timestep], **kwargs)
    for a, b in zip(from_table, from_row):
        assert torch.equal(a, b)


def test_noise_with_eta_zero_adds_nothing():
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=5)
    check_step(model_output, sample, coefficients, alphas, eta=0.0, variance_noise=noise)


def test_eta_above_one_agrees_with_reference_and_diffusers():
    """eta = 3 makes 1 - alpha_prev - std^2 negative: diffusers returns NaN (the scheduler rejects such an eta;
    the functional APIs must still agree with each other)."""
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=6)
    check_step(model_output, sample, coefficients, alphas, eta=3.0, variance_noise=noise)


def test_eta_above_one_is_fine_where_the_radicand_stays_positive():
    """eta = 1.2 at t = 500 keeps 1 - alpha_prev - std^2 > 0: an ordinary step."""
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=6)
    check_step(model_output, sample, coefficients, alphas, eta=1.2, variance_noise=noise)


# ---------------------------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------------------------

DTYPE_ROWS = {"t999-first": ("linear", 999), "t500": ("linear", 500), "t0-last": ("linear", 0)}
CLIP_CASES = {"no-clip": (False, False), "clip": (True, False), "clip-use-clipped": (True, True)}


def dtype_cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for prediction_type in PREDICTION_TYPES:
            for clip_case, (clip, use_clipped) in CLIP_CASES.items():
                marks = []
                yield pytest.param(dtype, prediction_type, clip_case, marks=marks,
                                   id=f"{str(dtype)[6:]}-{prediction_type}-{clip_case}")


@pytest.mark.parametrize("row", list(DTYPE_ROWS))
@pytest.mark.parametrize("dtype, prediction_type, clip_case", list(dtype_cases()))
def test_dtypes_match_reference_and_truth(dtype, prediction_type, clip_case, row):
    coefficients, alphas = step_row(*DTYPE_ROWS[row])
    clip, use_clipped = CLIP_CASES[clip_case]
    model_output, sample, noise = step_inputs((2, 3, 8, 8), dtype, seed=7)
    check_step(model_output, sample, coefficients, alphas, eta=0.5, variance_noise=noise,
               prediction_type=prediction_type, clip_sample=clip, use_clipped_model_output=use_clipped)


MIXED_DTYPES = [
    # (model_output, sample, noise) -> output dtype, as torch's type promotion gives it
    (torch.float16, torch.float32, torch.float16, torch.float32),
    (torch.float32, torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32, torch.float16),
    (torch.float16, torch.float64, torch.float16, torch.float64),
]


def mixed_cases():
    for m_dtype, x_dtype, n_dtype, out_dtype in MIXED_DTYPES:
        for prediction_type in PREDICTION_TYPES:
            marks = []
            name = "-".join(str(d)[6:] for d in (m_dtype, x_dtype, n_dtype))
            yield pytest.param(m_dtype, x_dtype, n_dtype, out_dtype, prediction_type, marks=marks,
                               id=f"{name}-{prediction_type}")


@pytest.mark.parametrize("m_dtype, x_dtype, n_dtype, out_dtype, prediction_type", list(mixed_cases()))
def test_mixed_dtypes_promote_like_torch(m_dtype, x_dtype, n_dtype, out_dtype, prediction_type):
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = randn((2, 3, 5, 7), m_dtype, 8), randn((2, 3, 5, 7), x_dtype, 9), randn(
        (2, 3, 5, 7), n_dtype, 10)
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=1.0, variance_noise=noise,
                          prediction_type=prediction_type, clip_sample=True)
    assert prev.dtype == x0.dtype == out_dtype


@pytest.mark.parametrize("prediction_type, use_clipped", [("epsilon", False), ("sample", False),
                                                          ("v_prediction", True)])
def test_float64_steps_that_divide(prediction_type, use_clipped):
    """Each float64 division (tl.math.div_rn takes only float32, so float64 needs its own path)."""
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, _ = step_inputs((4, 8), torch.float64, seed=11)
    check_step(model_output, sample, coefficients, alphas, prediction_type=prediction_type,
               use_clipped_model_output=use_clipped)


def test_float64_clip_range_is_exact():
    coefficients, _ = step_row("linear", 500)
    model_output, sample, _ = step_inputs((4, 8), torch.float64, seed=12)
    _, x0 = ddim_step(4 * model_output, sample, coefficients, prediction_type="v_prediction", clip_sample=True,
                      clip_sample_range=0.7)
    assert x0.abs().max().item() == 0.7


def test_float64_eta_keeps_float64_precision():
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = step_inputs((4, 8), torch.float64, seed=13)
    check_step(model_output, sample, coefficients, alphas, eta=0.3, variance_noise=noise,
               prediction_type="v_prediction")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.xfail(
    INTERPRETED, strict=True,
    reason="Triton's interpreter truncates float32 -> bfloat16 casts (runtime/interpreter.py cast_impl passes no "
    "rounding mode); compiled kernels round to nearest even"))])
def test_half_precision_outputs_are_rounded_to_nearest(dtype):
    """x0 = sqrt(alpha_t) * x - sqrt(1 - alpha_t) * m is exact in float32 for m = 0 and sqrt(alpha_t) = 0.75,
    so the kernel's x0 must be exactly torch's round-to-nearest-even of the float64 truth."""
    alphas_cumprod = DiffusersDDIMScheduler().alphas_cumprod.clone()
    alphas_cumprod[500] = 0.5625
    coefficients, alphas = row_from_alphas(alphas_cumprod, 1.0, 500)
    sample = randn((4096,), dtype, 14)
    model_output = torch.zeros_like(sample)
    _, x0 = ddim_step(model_output, sample, coefficients, prediction_type="v_prediction")
    _, truth_x0 = truth_step(model_output, sample, *alphas, prediction_type="v_prediction")
    assert torch.equal(x0, truth_x0.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Ranks and sizes
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [
    (),  # rank 0
    (1,),  # a single element
    (7,),
    (1023,),  # one block (BLOCK_SIZE is 1024) minus one, exactly one, plus one
    (1024,),
    (1025,),
    (3, 5),
    (3, 5, 7),
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (2, 4, 16, 16),  # 2048: two full blocks
    (2, 3, 5, 7, 9),
    (2, 1, 3, 2, 5, 3),  # rank 6: beyond the kernel's 5 strided dimensions
]




def shape_cases():
    for shape in SHAPES:
        layouts = ["contiguous"]
        if len(shape) >= 1:
            layouts.append("every_other")
        if len(shape) >= 2:
            layouts.append("reversed")
        for layout in layouts:
            yield pytest.param(shape, layout, marks=[],
                               id=f"{'x'.join(map(str, shape)) or 'scalar'}-{layout}")


@pytest.mark.parametrize("shape, layout", list(shape_cases()))
def test_ranks_and_sizes(shape, layout):
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = (laid_out(t, layout) for t in step_inputs(shape, seed=15))
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=0.5, variance_noise=noise,
                          clip_sample=True, use_clipped_model_output=True)
    assert_layout((prev, x0), expected_output_strides(shape, layout, layout, layout, sample))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)], ids=["fp32", "fp16-fp32", "bf16"])
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 4, 8, 8)], ids=["0", "2x0x3", "0x4x8x8"])
def test_empty_tensors(shape, dtypes):
    coefficients, _ = step_row("linear", 500)
    model_output = torch.empty(shape, dtype=dtypes[0], device=DEVICE)
    sample = torch.empty(shape, dtype=dtypes[1], device=DEVICE)
    noise = torch.empty(shape, dtype=dtypes[1], device=DEVICE)
    prev, x0 = ddim_step(model_output, sample, coefficients, eta=1.0, variance_noise=noise, clip_sample=True)
    for out in (prev, x0):
        assert out.shape == shape
        assert out.dtype == torch.promote_types(*dtypes)
        assert out.device == sample.device


# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------

RANK4_LAYOUTS = ["contiguous", "channels_last", "transposed", "permuted", "every_other", "storage_offset",
                 "expanded"]
RANK5_LAYOUTS = ["contiguous", "channels_last_3d", "transposed", "permuted", "every_other", "storage_offset",
                 "expanded"]
LAYOUT_SHAPES = {4: (2, 3, 5, 7), 5: (2, 3, 4, 5, 3)}


def assert_layout(outputs, expected_strides):
    """Outputs have the expected strides, compared where they mean something (dimensions of size > 1)."""
    for out in outputs:
        strides = [st for n, st in zip(out.shape, out.stride()) if n != 1]
        assert strides == [st for n, st in zip(out.shape, expected_strides) if n != 1]


def expected_output_strides(shape, model_output_layout, sample_layout, noise_layout, sample):
    """The documented contract: outputs keep a dense layout that all inputs share and whose batch dimension is
    outermost (contiguous, channels_last, ...), and are contiguous otherwise."""
    batch_outermost = sample.dim() > 0 and (shape[0] == 1 or sample.stride(0) == sample[0].numel())
    if model_output_layout == sample_layout == noise_layout and sample_layout in DENSE_LAYOUTS and batch_outermost:
        return sample.stride()
    return torch.empty(shape).stride()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("rank, layout", [(4, layout) for layout in RANK4_LAYOUTS]
                         + [(5, layout) for layout in RANK5_LAYOUTS])
def test_layouts_shared_by_all_inputs(rank, layout, prediction_type):
    shape = LAYOUT_SHAPES[rank]
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = (laid_out(t, layout) for t in step_inputs(shape, seed=16))
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=1.0, variance_noise=noise,
                          prediction_type=prediction_type, clip_sample=True)
    assert_layout((prev, x0), expected_output_strides(shape, layout, layout, layout, sample))
    if layout == "channels_last":
        assert prev.is_contiguous(memory_format=torch.channels_last)
        assert x0.is_contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        assert prev.is_contiguous(memory_format=torch.channels_last_3d)
        assert x0.is_contiguous(memory_format=torch.channels_last_3d)


MIXED_LAYOUTS = [
    # (model_output, sample, noise)
    ("contiguous", "channels_last", "contiguous"),
    ("channels_last", "channels_last", "contiguous"),  # only the noise differs
    ("channels_last", "channels_last", "every_other"),
    ("expanded", "every_other", "transposed"),
    ("storage_offset", "contiguous", "channels_last"),
    ("permuted", "transposed", "storage_offset"),
    ("every_other", "expanded", "expanded"),
]


@pytest.mark.parametrize("layouts", MIXED_LAYOUTS, ids=["-".join(case) for case in MIXED_LAYOUTS])
def test_inputs_in_different_layouts(layouts):
    shape = LAYOUT_SHAPES[4]
    coefficients, alphas = step_row("linear", 900)
    model_output, sample, noise = (laid_out(t, layout) for t, layout in zip(step_inputs(shape, seed=17), layouts))
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=0.5, variance_noise=noise,
                          clip_sample=True, use_clipped_model_output=True)
    assert_layout((prev, x0), expected_output_strides(shape, *layouts, sample))


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("reversed", "reversed"),
                                     ("every_other", "every_other"), ("contiguous", "expanded"),
                                     ("permuted", "contiguous")], ids=lambda case: "-".join(case))
def test_rank6_layouts(layouts):
    """Rank 6 is beyond the kernel's five strided dimensions: a shared dense layout runs as is, anything else
    is made contiguous first."""
    shape = (2, 3, 2, 3, 2, 5)
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = step_inputs(shape, seed=18)
    model_output, sample, noise = laid_out(model_output, layouts[0]), laid_out(sample, layouts[1]), laid_out(
        noise, layouts[1])
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=1.0, variance_noise=noise,
                          clip_sample=True, use_clipped_model_output=True)
    assert_layout((prev, x0), expected_output_strides(shape, layouts[0], layouts[1], layouts[1], sample))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "permuted", "every_other",
                                    "storage_offset", "expanded"])
def test_is_dense_matches_its_definition(layout):
    """is_dense(t): the elements' memory offsets are exactly 0 .. numel - 1 in some order."""
    t = laid_out(torch.zeros(2, 3, 5, 7, device=DEVICE), layout)
    index = torch.stack(torch.meshgrid(*(torch.arange(n) for n in t.shape), indexing="ij"), dim=-1)
    offsets = (index * torch.tensor(t.stride())).sum(-1).flatten().sort().values
    assert is_dense(t) == torch.equal(offsets, torch.arange(t.numel()))


# ---------------------------------------------------------------------------------------------------------------
# 64-bit indexing
# ---------------------------------------------------------------------------------------------------------------


def test_int32_limit_is_the_int32_maximum():
    assert ddim_module.INT32_LIMIT == 2**31 - 1


def test_small_tensors_use_int32_offsets(launches):
    coefficients, alphas = step_row("linear", 500)
    check_step(*step_inputs((2, 3, 8, 8))[:2], coefficients, alphas)
    assert [launch["INT64"] for launch in launches.launches] == [False]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "every_other", "expanded"])
def test_int64_variant_matches_int32_variant(layout, launches, monkeypatch):
    """Lowering INT32_LIMIT makes the launcher pick the INT64 variant for small tensors; it must compute the
    same values as the INT32 variant, bit for bit."""
    coefficients, alphas = step_row("linear", 900)
    model_output, sample, noise = (laid_out(t, layout) for t in step_inputs((2, 3, 5, 7), seed=19))
    kwargs = dict(eta=0.5, variance_noise=noise, clip_sample=True, clip_sample_range=CLIP_RANGE,
                  use_clipped_model_output=True)
    prev32, x0_32 = ddim_step(model_output, sample, coefficients, **kwargs)
    monkeypatch.setattr(ddim_module, "INT32_LIMIT", 16)
    prev64, x0_64 = check_step(model_output, sample, coefficients, alphas, **kwargs)
    assert [launch["INT64"] for launch in launches.launches] == [False, True]
    assert torch.equal(prev64, prev32) and torch.equal(x0_64, x0_32)


def meta(shape, strides=None):
    if strides is None:
        return torch.empty(shape, device="meta")
    return torch.empty_strided(shape, strides, device="meta")


def int64_decision_cases():
    limit, block = 2**31 - 1, ddim_module.BLOCK_SIZE
    # n elements: the last block's offsets reach n - 1 + block - 1, which must stay <= limit for int32.
    at_limit = limit - block + 1
    return {
        "small": (meta((2, 3, 8, 8)), meta((2, 3, 8, 8)), None, False),
        "numel-at-the-limit": (meta((at_limit,)), meta((at_limit,)), None, False),
        "numel-one-past": (meta((at_limit + 1,)), meta((at_limit + 1,)), None, True),
        "few-elements-huge-stride": (meta((2, 3), (2**31, 1)), meta((2, 3), (2**31, 1)), None, True),
        "only-model-output-far": (meta((2, 3), (2**31, 1)), meta((2, 3)), None, True),
        "only-noise-far": (meta((2, 3)), meta((2, 3)), meta((2, 3), (3, 2**31)), True),
        "expanded-2**31-elements": (meta((1,)).expand(2**31), meta((1,)).expand(2**31), None, True),
        "channels-last-small": (meta((2, 3, 8, 8)).contiguous(memory_format=torch.channels_last),
                                meta((2, 3, 8, 8)).contiguous(memory_format=torch.channels_last), None, False),
    }


@pytest.mark.parametrize("case", list(int64_decision_cases()))
def test_int64_decision(case, monkeypatch):
    """Which index type the launcher picks, from shapes and strides alone: meta tensors, nothing launched."""
    recorder = LaunchRecorder(ddim_module._ddim_step_kernel, launch=False)
    monkeypatch.setattr(ddim_module, "_ddim_step_kernel", recorder)
    model_output, sample, noise, expect_int64 = int64_decision_cases()[case]
    coefficients = torch.zeros(8, dtype=torch.float64, device="meta")
    ddim_step(model_output, sample, coefficients, eta=1.0 if noise is not None else 0.0, variance_noise=noise)
    assert [launch["INT64"] for launch in recorder.launches] == [expect_int64]


def test_offsets_past_int32_are_read_correctly(launches):
    """Views whose second row starts 2**31 + 8 elements into their storage. The 4 GiB buffer is never
    touched except at the 18 elements used, so on the CPU it costs no physical memory (pages are mapped lazily)."""
    try:
        buffer = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve a 4 GiB buffer here")
    stride = 2**31 + 8
    views = [buffer.as_strided((2, 3), (stride, 1), offset) for offset in (0, 16, 32)]
    for view, values in zip(views, step_inputs((2, 3), torch.float16, seed=20)):
        view.copy_(values)
    model_output, sample, noise = views
    coefficients, alphas = step_row("linear", 500)
    check_step(model_output, sample, coefficients, alphas, eta=1.0, variance_noise=noise, clip_sample=True)
    assert [launch["INT64"] for launch in launches.launches] == [True]
    del views, model_output, sample, noise, buffer


# ---------------------------------------------------------------------------------------------------------------
# NaN and infinities
# ---------------------------------------------------------------------------------------------------------------


def with_nonfinite(shape, dtype, seed):
    """Step inputs with NaN, +inf and -inf in each of model_output, sample and noise, alone and together."""
    model_output, sample, noise = (t.clone() for t in step_inputs(shape, dtype, seed))
    specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype, device=DEVICE)
    model_output[0, 0, 0, :3] = specials
    sample[0, 1, 0, :3] = specials
    noise[1, 0, 0, :3] = specials
    model_output[1, 1, 1, :3] = specials  # both inputs non-finite at once: inf - inf, inf + inf, ...
    sample[1, 1, 1, :3] = specials.flip(0)
    model_output[1, 2, 2, :2] = math.inf
    sample[1, 2, 2, :2] = math.inf
    return model_output, sample, noise


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["eps-as-predicted", "eps-from-clipped"])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_nonfinite_inputs_propagate_like_reference(prediction_type, clip_sample, use_clipped_model_output, eta,
                                                   dtype):
    """NaN and infinities land where the reference puts them, through clipping too (clamp keeps NaN and maps
    +-inf to +-range). The float64 truth agrees too when eta > 0; with eta = 0 diffusers never reads the noise,
    while a noise tensor handed to the kernel is added with weight 0 (as in the reference), so NaN noise
    still makes NaN (the scheduler passes no noise when eta = 0)."""
    coefficients, alphas = step_row("linear", 500)
    model_output, sample, noise = with_nonfinite((2, 3, 4, 5), dtype, seed=21)
    prev, x0 = check_step(model_output, sample, coefficients, alphas, eta=eta, variance_noise=noise,
                          prediction_type=prediction_type, clip_sample=clip_sample,
                          use_clipped_model_output=use_clipped_model_output, compare_truth=eta > 0)
    assert not torch.isfinite(prev).all()
    if clip_sample:
        assert not (x0.abs() > CLIP_RANGE).any()
        assert torch.isnan(x0).any()  # clamp kept the NaN of NaN inputs


def test_float16_overflow_becomes_inf_like_reference():
    """At t = 999, x0 = (x - sqrt(1 - alpha_t) m) / 0.0064: inputs near float16's maximum overflow it."""
    coefficients, alphas = step_row("linear", 999)
    model_output, sample, _ = step_inputs((4, 8), torch.float16, seed=22)
    sample[0] = 60000.0
    model_output[0] = -60000.0
    _, x0 = check_step(model_output, sample, coefficients, alphas)
    assert torch.isposinf(x0[0]).all()


DEGENERATE_ROWS = {
    # name: (index of alphas_cumprod set to `value`, value, timestep)
    "alpha_t-0": (999, 0.0, 999),  # epsilon divides by sqrt(alpha_t) = 0
    "alpha_t-1": (0, 1.0, 0),  # sample / use_clipped divide by sqrt(1 - alpha_t) = 0; variance is 0 / 0
    "alpha_prev-0": (399, 0.0, 499),  # variance = ... (1 - alpha_t / 0) = -inf
}


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
@pytest.mark.parametrize("use_clipped_model_output", [False, True], ids=["eps-as-predicted", "eps-from-clipped"])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("degenerate", list(DEGENERATE_ROWS))
def test_degenerate_rows_propagate_like_reference_and_truth(degenerate, prediction_type, clip_sample,
                                                            use_clipped_model_output, eta):
    index, value, timestep = DEGENERATE_ROWS[degenerate]
    alphas_cumprod = DiffusersDDIMScheduler().alphas_cumprod.clone()
    alphas_cumprod[index] = value
    coefficients, alphas = row_from_alphas(alphas_cumprod, 1.0, timestep)
    model_output, sample, noise = step_inputs((2, 3, 4, 4), seed=23)
    sample[0, 0, 0, 0] = model_output[0, 0, 0, 0]  # x - m = 0 exactly: 0 / 0 for epsilon at alpha_t = 1 - 1
    check_step(model_output, sample, coefficients, alphas, eta=eta, variance_noise=noise,
               prediction_type=prediction_type, clip_sample=clip_sample,
               use_clipped_model_output=use_clipped_model_output)


# ---------------------------------------------------------------------------------------------------------------
# In-kernel Philox noise: per-sample streams, any layout and rank, the offsets moved on by the launch itself
# ---------------------------------------------------------------------------------------------------------------


def philox_buffer(rows):
    """A PhiloxGenerator-style buffer: (seed, offset) rows, then the zero ticket row."""
    buffer = torch.zeros(len(rows) + 1, 2, dtype=torch.int64, device=DEVICE)
    buffer[:-1] = torch.tensor(rows, dtype=torch.int64)
    return buffer


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "every_other", "storage_offset"])
def test_philox_noise_follows_the_logical_index_in_any_layout(layout):
    """The strided path (any layout) and the dense path (contiguous) give every element the same noise: it is
    indexed by the element's logical position within its sample, never by its memory offset."""
    coefficients, _ = step_row("linear", 500)
    model_output, sample, _ = step_inputs((3, 5, 7, 11), seed=31)
    rows = [(5, 2), (-1, 0), (2**40, 7)]
    dense, _ = ddim_step(model_output, sample, coefficients, eta=1.0, philox_state=philox_buffer(rows))
    strided, _ = ddim_step(laid_out(model_output, layout), laid_out(sample, layout), coefficients, eta=1.0,
                           philox_state=philox_buffer(rows))
    assert torch.equal(dense, strided)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 1000), (2, 3, 4, 5, 6), (2, 1, 1, 2, 3, 4)],
                         ids=["0-d", "1", "7", "3x1000", "rank5", "rank6"])
def test_philox_noise_matches_the_torch_path_at_every_rank(shape):
    coefficients, _ = step_row("linear", 500)
    model_output, sample, _ = step_inputs(shape, seed=32)
    batch = shape[0] if shape else 1
    for rows in ([(9, 3)], [(9 + b, 3 + b) for b in range(batch)]):
        on_kernel, on_torch = philox_buffer(rows), philox_buffer(rows).cpu()
        prev, _ = ddim_step(model_output, sample, coefficients, eta=1.0, philox_state=on_kernel)
        expected, _ = reference.ddim_step(model_output.cpu(), sample.cpu(), coefficients.cpu(), eta=1.0,
                                          philox_state=on_torch)
        torch.testing.assert_close(prev.cpu(), expected, rtol=1e-5, atol=1e-5)
        assert on_kernel.tolist() == on_torch.tolist() == [[s, o + 1] for s, o in rows] + [[0, 0]]


@pytest.mark.parametrize("outputs", ["x0-only", "empty"])
def test_philox_step_advances_once_whatever_it_writes(outputs):
    """A step given a Philox state moves it on by one on both paths, also when it writes no prev_sample or has
    no elements, so a stream's position counts steps."""
    coefficients, _ = step_row("linear", 500)
    shape = (2, 0, 4) if outputs == "empty" else (2, 3, 4)
    model_output, sample, _ = step_inputs(shape, seed=33)
    on_kernel, on_torch = philox_buffer([(1, 0), (2, 5)]), philox_buffer([(1, 0), (2, 5)]).cpu()
    ddim_step(model_output, sample, coefficients, eta=1.0, philox_state=on_kernel,
              write_prev_sample=outputs == "empty")
    reference.ddim_step(model_output.cpu(), sample.cpu(), coefficients.cpu(), eta=1.0, philox_state=on_torch,
                        write_prev_sample=outputs == "empty")
    assert on_kernel.tolist() == on_torch.tolist() == [[1, 1], [2, 6], [0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# Per-sample values once per program, guidance statistics at any size, launch options
# ---------------------------------------------------------------------------------------------------------------


def full_table(schedule="linear"):
    alphas_cumprod, boundary = diffusers_schedule(schedule, False)
    return step_table(alphas_cumprod, NUM_INFERENCE_STEPS, boundary).to(DEVICE)


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 3, 20, 20), (4, 1)], ids=["385-per-sample",
                                                                                "1200-per-sample", "1-per-sample"])
@pytest.mark.parametrize("layout", ["contiguous", "every_other", "int64"])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7], ids=["cfg", "cfg-rescaled"])
def test_per_sample_timesteps_equal_each_sample_alone(shape, layout, guidance_rescale, launches, monkeypatch):
    """One program per chunk of one sample (SAMPLE_PROGRAMS): samples whose size is no multiple of BLOCK, or
    above it, strided and 64-bit; every sample's outputs equal that sample stepped alone with its timestep, bit
    for bit, and the grid has batch x chunks-per-sample programs."""
    if layout == "int64":
        monkeypatch.setattr(ddim_module, "INT32_LIMIT", 16)
    table = full_table()
    batch = shape[0]
    timesteps = [900, 500, 100, 0][:batch] + [500] * max(batch - 4, 0)
    model_output, sample, noise = (laid_out(t, "every_other" if layout == "every_other" else "contiguous")
                                   for t in step_inputs(shape, seed=31))
    uncond = randn(shape, seed=35)
    kwargs = dict(eta=0.6, variance_noise=noise, uncond_output=uncond, guidance_scale=4.0,
                  guidance_rescale=guidance_rescale, use_clipped_model_output=True, clip_sample=True,
                  clip_sample_range=CLIP_RANGE)
    prev, x0 = ddim_step(model_output, sample, table, torch.tensor(timesteps, device=DEVICE), **kwargs)
    per_sample = math.prod(shape[1:])
    assert launches.launches[0]["SAMPLE_PROGRAMS"] is True
    assert launches.launches[0]["grid"] == (batch * -(-per_sample // ddim_module.BLOCK_SIZE),)
    assert launches.launches[0]["INT64"] is (layout == "int64")
    for b, t in enumerate(timesteps):
        alone = ddim_step(model_output[b:b + 1], sample[b:b + 1], table, t, eta=0.6, variance_noise=noise[b:b + 1],
                          uncond_output=uncond[b:b + 1], guidance_scale=4.0, guidance_rescale=guidance_rescale,
                          use_clipped_model_output=True, clip_sample=True, clip_sample_range=CLIP_RANGE)
        for batched, single in ((prev, alone[0]), (x0, alone[1])):
            # (one element per sample with rescaling: the std of one value is NaN, in both)
            torch.testing.assert_close(batched[b:b + 1], single, rtol=0, atol=0, equal_nan=True, msg=f"sample {b}")


def test_every_launch_disables_floating_point_contraction(monkeypatch):
    """Exactness (the thresholds, the same x0 in every kernel) rests on LAUNCH_OPTIONS reaching every launch;
    the compiled PTX without contraction is checked in test_kernels_compile.py."""
    from fastddim.kernels import threshold as threshold_module

    recorders = {}
    for module, name in [(ddim_module, "_ddim_step_kernel"), (ddim_module, "_guidance_stats_kernel"),
                         (threshold_module, "_threshold_pass_kernel"), (threshold_module, "_threshold_select_kernel")]:
        recorders[name] = LaunchRecorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])
    model_output, sample, noise = step_inputs((2, 3, 8, 8), seed=41)
    ddim_step(model_output * 3, sample, full_table(), torch.tensor([900, 100], device=DEVICE), eta=1.0,
              variance_noise=noise, uncond_output=randn((2, 3, 8, 8), seed=42), guidance_scale=5.0,
              guidance_rescale=0.5, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    for name, recorder in recorders.items():
        assert recorder.launches, f"{name} was not launched"
        assert all(launch.get("enable_fp_fusion") is False for launch in recorder.launches), name


def std_truth(cond, uncond, scale):
    c = cond.to(torch.float64).reshape(cond.shape[0], -1)
    cfg = uncond.to(torch.float64).reshape(c.shape) + scale * (c - uncond.to(torch.float64).reshape(c.shape))
    return torch.stack([c.std(1), cfg.std(1)], dim=1)


@pytest.mark.parametrize("shape", [(3, 5000), (2, 3, 7, 9), (1, 2, 3, 4, 5, 6)])
def test_guidance_statistics_match_float64(shape):
    """Several chunks per program (the programs loop over their sample's chunks), ranks 2 to 6."""
    cond, uncond = randn(shape, seed=43), randn(shape, seed=44)
    torch.testing.assert_close(ddim_module.guidance_std_ratio(cond, uncond, 6.5), std_truth(cond, uncond, 6.5),
                               rtol=1e-12, atol=0)


def test_guidance_statistics_offsets_past_int32():
    """A (33, 2) view whose rows are 2**26 elements apart: batch * stride passes 2**31 (the 32-bit kernel read
    outside the buffer and crashed). The 4 GiB buffer is touched only at the 132 elements used."""
    try:
        buffer = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve a 4 GiB buffer here")
    cond, uncond = (buffer.as_strided((33, 2), (2**26, 1), offset) for offset in (0, 8))
    cond.copy_(randn((33, 2), torch.float16, seed=45))
    uncond.copy_(randn((33, 2), torch.float16, seed=46))
    recorder = LaunchRecorder(ddim_module._guidance_stats_kernel)
    try:
        ddim_module._guidance_stats_kernel = recorder
        got = ddim_module.guidance_std_ratio(cond, uncond, 3.0)
    finally:
        ddim_module._guidance_stats_kernel = recorder.kernel
    assert recorder.launches[0]["INT64"] is True
    torch.testing.assert_close(got, std_truth(cond, uncond, 3.0), rtol=1e-12, atol=0)
    del cond, uncond, buffer


@pytest.mark.parametrize("batch", [1, 70000])
def test_guidance_statistics_grid_stays_within_cuda_limits(batch, monkeypatch):
    """2**27 elements per sample (131072 chunks), or 70000 samples: no grid axis past CUDA's limits (65535 on
    axes 1 and 2); meta tensors, nothing launched."""
    recorder = LaunchRecorder(ddim_module._guidance_stats_kernel, launch=False)
    monkeypatch.setattr(ddim_module, "_guidance_stats_kernel", recorder)
    per_sample = 2**27 if batch == 1 else 3
    cond = torch.empty(1, 1, device="meta").expand(batch, per_sample)
    ddim_module.guidance_std_ratio(cond, cond, 2.0)
    grid = recorder.launches[0]["grid"]
    assert grid[0] <= 2**31 - 1 and all(axis <= 65535 for axis in grid[1:]), grid
