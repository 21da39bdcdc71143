"""Exact dynamic thresholding: fastddim's threshold s = clamp(quantile(|x0|, ratio), 1, sample_max_value) must be
torch.quantile's (what diffusers' `_threshold_sample` computes), bit for bit, on any input.

The oracle is torch.quantile(..., interpolation="linear") + torch.clamp on the same float32 / float64 values, and
above 2**24 elements per sample (where torch.quantile refuses) a transcription of torch.quantile's algorithm on
torch.sort. Covered: the torch path (`fastddim.threshold`: counts + torch.kthvalue, and the radix select that
the sharded variant runs), the Triton kernels (`fastddim.kernels.sample_thresholds`, in Triton's interpreter
without a GPU) on the step's own x0, and whole thresholded steps and loops against diffusers.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from conftest import DEVICE, assert_same_nonfinite
from hypothesis import given
from hypothesis import strategies as st

import fastddim
from fastddim import kernels, ops, reference
from fastddim import threshold as th
from fastddim.plan import StepOptions
from fastddim.schedule import step_table

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

RATIOS = [0.995, 0.5, 1.0, 0.001, 0.75, 1 / 3]
# 1.1 is not a float32; 1e39 is past float32's range (its float32 bound is +inf: no float32 reaches it).
MAX_VALUES = [1.0, 1.1, 3.0, 20.0, 1e39]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def expected_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """diffusers' s: torch.quantile of |x0| per sample, clamped to [1, max_value] by torch.clamp."""
    q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), ratio, dim=1)
    if x0.dtype == torch.float32 and max_value > FLOAT32_MAX:
        # torch.clamp refuses a float32 bound past float32's range; no float32 below +inf reaches it.
        return q.clamp(min=1).clamp(max=math.inf)
    return q.clamp(min=1, max=max_value)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}\n{m}")


def next_after(value: float, toward: float, dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(toward, dtype=dtype)))


def adversarial(kind: str, shape, dtype: torch.dtype, max_value: float, seed: int = 0) -> torch.Tensor:
    """x0 values of one `kind`; random signs throughout (thresholding looks at |x0|)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    bound = float(torch.tensor(min(max_value, FLOAT32_MAX if dtype == torch.float32 else max_value), dtype=dtype))
    tiny = float(torch.finfo(dtype).tiny)
    if kind == "normal":  # quantiles of |x0| spread across the window
        values = torch.randn(n, generator=g, dtype=torch.float64) * 4
    elif kind == "ties":  # few distinct values: the order statistics repeat
        values = torch.randint(-4, 5, (n,), generator=g).to(torch.float64)
    elif kind == "all_equal":
        values = torch.full((n,), 2.5, dtype=torch.float64)
    elif kind == "all_one":  # exactly at the window's lower edge
        values = torch.full((n,), 1.0, dtype=torch.float64)
    elif kind == "all_bound":  # exactly at the window's upper edge
        values = torch.full((n,), bound, dtype=torch.float64)
    elif kind == "zeros":
        values = torch.zeros(n, dtype=torch.float64)
        values[::2] = -0.0
    elif kind == "denormals":
        values = torch.rand(n, generator=g, dtype=torch.float64) * tiny
        values[::3] = 0.0
    elif kind == "edges":  # 1 and the bound and their neighbours one ulp away
        edges = [1.0, next_after(1.0, 0.0, dtype), next_after(1.0, 2.0, dtype), bound,
                 next_after(bound, 0.0, dtype), next_after(bound, math.inf, dtype), 0.0]
        values = torch.tensor(edges, dtype=torch.float64)[torch.randint(0, len(edges), (n,), generator=g)]
    elif kind == "ulp_neighbours":  # distinct values one ulp apart inside the window
        start = torch.tensor(1.5, dtype=dtype)
        ladder = [start]
        for _ in range(7):
            ladder.append(torch.nextafter(ladder[-1], torch.tensor(2.0, dtype=dtype)))
        values = torch.stack(ladder).to(torch.float64)[torch.randint(0, 8, (n,), generator=g)]
    elif kind == "huge":  # finite values near the dtype's maximum above a few window values
        values = torch.randn(n, generator=g, dtype=torch.float64) * 3
        values[::2] = float(torch.finfo(dtype).max) / 2
    elif kind == "inf_some":
        values = torch.randn(n, generator=g, dtype=torch.float64) * 4
        values[torch.randperm(n, generator=g)[: max(1, n // 20)]] = math.inf
    elif kind == "inf_most":
        values = torch.full((n,), -math.inf, dtype=torch.float64)
        values[: max(1, n // 3)] = 1.5
    elif kind == "nan":
        values = torch.randn(n, generator=g, dtype=torch.float64) * 4
        values[int(torch.randint(0, n, (1,), generator=g))] = math.nan
    elif kind == "nan_inf":
        values = torch.randn(n, generator=g, dtype=torch.float64)
        values[0], values[-1] = math.nan, math.inf
    else:
        raise ValueError(kind)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (values * signs).to(dtype).view(shape)


KINDS = ["normal", "ties", "all_equal", "all_one", "all_bound", "zeros", "denormals", "edges", "ulp_neighbours",
         "huge", "inf_some", "inf_most", "nan", "nan_inf"]


# ---------------------------------------------------------------------------------------------------------------
# The torch path (fastddim.threshold)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("radix", [False, True], ids=["local", "radix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_threshold_equals_torch_quantile(kind, dtype, radix):
    for seed, shape in enumerate([(3, 257), (1, 1), (2, 2), (4, 3, 5, 7)]):
        for max_value in MAX_VALUES:
            x0 = adversarial(kind, shape, dtype, max_value, seed)
            for ratio in RATIOS:
                got = th.threshold_scale(x0, ratio, max_value, radix=radix)
                assert_identical(got, expected_threshold(x0, ratio, max_value),
                                 f"{kind} {tuple(shape)} ratio={ratio} max={max_value}")


@pytest.mark.parametrize("values, ratio, expected", [
    ([1.0, math.inf], 1.0, math.nan),  # lerp(inf, inf, 0) = inf + 0 * nan
    ([1.0, math.inf], 0.5, math.nan),  # inf - inf * 0.5
    ([1.0, math.inf], 0.4, math.inf),  # 1 + 0.4 * inf
    ([math.inf, math.inf], 0.3, math.nan),
    ([2.0, math.nan, 3.0], 0.1, math.nan),  # a NaN anywhere in the row
])
def test_torch_quantile_nonfinite_cases(values, ratio, expected):
    """The reference's own answers in the inf/NaN corners (checked against torch first), clamped to [1, 50]."""
    x0 = torch.tensor([values])
    assert_identical(torch.quantile(x0.abs(), ratio, dim=1), torch.tensor([expected]))
    for radix in (False, True):
        assert_identical(th.threshold_scale(x0, ratio, 50.0, radix=radix),
                         torch.tensor([expected]).clamp(min=1, max=50.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_quantile_indices_reproduce_torch_quantile(dtype):
    """For every row length up to 600 and awkward ratios: torch.quantile of 0, 1, ..., n - 1 (whose order
    statistic i is i) is the lerp of the indices and the weight fastddim computes."""
    ratios = [0.995, 0.1, 0.3, 1 / 3, 0.7, 0.999999, 1e-7, 1.0]
    for n in range(1, 601):
        row = torch.arange(n, dtype=dtype).unsqueeze(0)
        expected = torch.quantile(row, torch.tensor(ratios, dtype=dtype), dim=1).squeeze(1)
        for i, ratio in enumerate(ratios):
            below, above, weight = th.quantile_indices(n, ratio, dtype)
            got = torch.lerp(below.to(dtype).view(1, 1), above.to(dtype).view(1, 1), weight.view(1, 1))
            assert_identical(got.view(()), expected[i], f"n={n} ratio={ratio}")


@pytest.mark.parametrize("sort_limit", [th.SORT_LIMIT, 1], ids=["sorted-bins", "kthvalue-bins"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_local_select_every_pair_of_order_statistics(dtype, sort_limit, monkeypatch):
    """The local path's bin search for every (k, k + 1) and (k, k) of rows with ties, bins of one value, and
    order statistics that open the next bin; small bins sorted, or searched by torch.kthvalue."""
    monkeypatch.setattr(th, "SORT_LIMIT", sort_limit)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(200, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, 6, (150,), generator=g).to(torch.float64) * 1.25,
            torch.tensor([1.0, 2.0, 2.0, 1e30, 0.0, 5e-324 if dtype == torch.float64 else 1e-45] * 7)]
    for values in rows:
        bits = th.abs_bits(values.to(dtype).unsqueeze(0))[0]
        ordered = torch.sort(bits).values
        top = bits >> th.TOP_SHIFT[dtype]
        cumulative = torch.bincount(top, minlength=th.TOP_BINS).cumsum(0)
        for k in range(bits.numel()):
            for above in {k, min(k + 1, bits.numel() - 1)}:
                lower, upper = th._row_select(bits, top, cumulative, k, above)
                assert (int(lower), int(upper)) == (int(ordered[k]), int(ordered[above]))


special_floats = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.5, 3.0, math.inf, -math.inf, math.nan, 1e-45, 2.0**-126,
                                  0.99999994, 1.0000001, 2.9999998, 3.0000002])


@given(values=st.lists(st.one_of(st.floats(-8, 8, width=32), special_floats), min_size=1, max_size=40),
       ratio=st.sampled_from(RATIOS + [0.9, 0.25]), max_value=st.sampled_from([1.0, 3.0, 7.5]),
       rows=st.integers(1, 3))
def test_torch_threshold_fuzz(values, ratio, max_value, rows):
    x0 = torch.tensor(values, dtype=torch.float32).repeat(rows, 1)
    x0[1:] = x0[1:].roll(1, dims=1) * 0.5  # rows differ
    expected = expected_threshold(x0, ratio, max_value)
    assert_identical(th.threshold_scale(x0, ratio, max_value), expected)
    assert_identical(th.threshold_scale(x0, ratio, max_value, radix=True), expected)


def test_thresholded_values_match_diffusers_threshold_sample():
    """The whole thresholding (clamp and divide too), against diffusers' helper on float32 x0."""
    theirs = diffusers.DDIMScheduler(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9)
    ours = fastddim.DDIMScheduler(thresholding=True, sample_max_value=3.0, dynamic_thresholding_ratio=0.9)
    for kind in ("normal", "ties", "edges", "inf_some", "nan"):
        x0 = adversarial(kind, (2, 3, 6, 6), torch.float32, 3.0)
        assert_identical(ours._threshold_sample(x0), theirs._threshold_sample(x0), kind)
        assert_identical(reference.threshold(x0, 0.9, 3.0), theirs._threshold_sample(x0), kind)


def sorted_quantile_oracle(sorted_abs: torch.Tensor, has_nan: torch.Tensor, ratio: float,
                           max_value: float) -> torch.Tensor:
    """torch.quantile's algorithm (sorted rows, rank = q * (n - 1) in float32, lerp) without its size limit, on
    the sorted |x0|; the rank that float32 rounds past 2**24 is kept within the row (q = 1 is the maximum)."""
    n = sorted_abs.shape[1]
    rank = np.float32(ratio) * np.float32(n - 1)
    below, above = min(int(rank), n - 1), min(math.ceil(rank), n - 1)
    weight = torch.tensor(rank - np.float32(int(rank)), dtype=torch.float32).expand(sorted_abs.shape[0], 1)
    q = torch.lerp(sorted_abs[:, below:below + 1], sorted_abs[:, above:above + 1], weight).view(-1)
    return torch.where(has_nan, math.nan, q).clamp(min=1, max=max_value)


def test_torch_threshold_beyond_torch_quantile_limit():
    """2**24 + 4 elements per sample: torch.quantile refuses; float32 rounds n - 1 = 2**24 + 3 up to 2**24 + 4."""
    n = 2**24 + 4
    x0 = torch.randn(1, n, generator=torch.Generator().manual_seed(7)) * 4
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x0.abs(), 0.5, dim=1)
    sorted_abs = torch.sort(x0.abs(), dim=1).values
    has_nan = torch.isnan(x0).any(1)
    for ratio in (0.995, 1.0, 0.5):
        expected = sorted_quantile_oracle(sorted_abs, has_nan, ratio, 40.0)
        assert 1 < float(expected) < 40  # inside the window: the exact order statistics decide s
        assert_identical(th.threshold_scale(x0, ratio, 40.0), expected, f"local ratio={ratio}")
    assert_identical(th.threshold_scale(x0, 0.995, 40.0, radix=True),
                     sorted_quantile_oracle(sorted_abs, has_nan, 0.995, 40.0), "radix")
    assert float(th.threshold_scale(x0, 1.0, 40.0)) == float(sorted_abs[0, -1])


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreted without a GPU) on the step's own x0
# ---------------------------------------------------------------------------------------------------------------

scheduler = diffusers.DDIMScheduler()
TABLE = step_table(scheduler.alphas_cumprod, 10, float(scheduler.final_alpha_cumprod)).to(DEVICE)
TIMESTEPS = [900, 500, 100, 0]


def step_x0(model_output, sample, timestep, prediction_type, uncond_output=None, guidance_scale=1.0,
            guidance_rescale=0.0, table=TABLE):
    """The Triton step's unclipped x0 in its math dtype (float32, float64 for float64 inputs): half-precision
    inputs are widened exactly first, so the float32 x0 is not rounded to the output dtype."""
    def widen(t):
        return t if t is None or t.dtype == torch.float64 else t.float()

    model_output, sample, uncond_output = widen(model_output), widen(sample), widen(uncond_output)
    _, x0 = kernels.ddim_step(model_output, sample, table, timestep, prediction_type=prediction_type,
                              uncond_output=uncond_output, guidance_scale=guidance_scale,
                              guidance_rescale=guidance_rescale, write_prev_sample=False)
    return x0.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_threshold_equals_torch_quantile(kind, dtype):
    """prediction_type="sample" makes x0 the model output itself, so the adversarial values reach the kernel."""
    for shape, max_value, ratio in [((2, 3, 5, 7), 3.0, 0.995), ((1, 4, 33), 20.0, 0.5), ((3, 2, 2, 3, 4), 1.1, 1.0),
                                    ((2, 1, 1, 1), 1e39, 0.75)]:
        model_output = adversarial(kind, shape, dtype, max_value, seed=len(shape)).to(DEVICE)
        sample = randn(shape, dtype, seed=1)
        x0 = step_x0(model_output, sample, 500, "sample")
        got = kernels.sample_thresholds(model_output, sample, TABLE, 500, "sample", ratio, max_value)
        assert_identical(got, expected_threshold(x0, ratio, max_value), f"{kind} {shape} {max_value} {ratio}")


# Rows of five |x0| values and ratios that put torch.quantile's order statistics and weight (rank 4 * ratio) on
# each case of torch.lerp with an infinite upper order statistic: weight 0, in (0, 0.5), >= 0.5, 1; two infinities.
BOUND_ONLY_ROWS = [
    ([0.25, 0.5, 2.0, 3.0, math.inf], 0.8),   # lerp(3, inf, 0.2) = inf: s = bound
    ([0.25, 0.5, 2.0, 3.0, math.inf], 0.9),   # lerp(3, inf, 0.6) = inf - inf: NaN
    ([0.25, 0.5, 2.0, 3.0, math.inf], 1.0),   # lerp(inf, inf, 0) = NaN
    ([0.25, 0.5, 2.0, 3.0, math.inf], 0.75),  # lerp(3, 3, 0): s = bound
    ([0.25, 0.5, 2.0, math.inf, math.inf], 0.8),  # lerp(inf, inf, 0.2): NaN
    ([0.25, 0.5, 2.0, 3.0, math.inf], 0.76),  # lerp(3, inf, 0.04) = inf: s = bound
    ([0.25, 0.5, 2.0, 3.0, math.inf], 0.875),  # lerp(3, inf, 0.5): NaN
    ([0.25, 0.5, 0.5, 0.75, 0.875], 0.5),     # all below 1: s = bound
    ([0.25, math.nan, 2.0, 3.0, 4.0], 0.5),   # a NaN: NaN
    ([0.0, 0.0, 0.0, 0.0, 0.0], 0.995),
]


@pytest.mark.parametrize("max_value", [1.0, 0.5, next_after(1.0, 0.0, torch.float32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_threshold_with_a_bound_of_at_most_one(dtype, max_value):
    """sample_max_value <= 1 (diffusers' default is 1): s is the bound or NaN, written by the select kernel itself
    (no torch.lerp, no torch.clamp); NaN exactly where torch.quantile's lerp gives NaN."""
    from fastddim.kernels import threshold as kernel_threshold

    for values, ratio in BOUND_ONLY_ROWS:
        model_output = torch.tensor(values, dtype=torch.float64).to(dtype).view(1, 5).repeat(2, 1)
        model_output[1] = -model_output[1].flip(0)  # another order and sign: the same |x0| multiset
        model_output = model_output.to(DEVICE)
        sample = randn((2, 5), dtype, seed=3)
        table = TABLE
        x0 = step_x0(model_output, sample, 500, "sample")
        got, order = kernels.sample_thresholds(model_output, sample, table, 500, "sample", ratio, max_value,
                                               return_order_statistics=True)
        assert_identical(got, expected_threshold(x0, ratio, max_value), f"{values} {ratio} {max_value}")
        assert order.shape == (3, 2)  # the order statistics and weight, for autograd
    plan = kernel_threshold.ThresholdPlan(model_output, sample, TABLE, 0, "sample", 0.5, max_value,
                                          math_fp64=dtype == torch.float64)
    assert plan.bound_only and plan.levels == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_kernel_threshold_on_computed_x0(prediction_type, dtype):
    """x0 from the prediction algebra, its |x0| quantiles inside the window at some timesteps."""
    shape = (3, 4, 6, 6)
    model_output, sample = randn(shape, dtype, 2, scale=2.0), randn(shape, dtype, 3, scale=3.0)
    inside = 0
    for t in TIMESTEPS:
        x0 = step_x0(model_output, sample, t, prediction_type)
        for ratio, max_value in [(0.995, 20.0), (0.9, 3.0), (0.6, 1.5), (0.995, 1.0)]:
            expected = expected_threshold(x0, ratio, max_value)
            inside += int(((expected > 1) & (expected < max_value)).sum())
            got = kernels.sample_thresholds(model_output, sample, TABLE, t, prediction_type, ratio, max_value)
            assert_identical(got, expected, f"t={t} ratio={ratio} max={max_value}")
    assert inside > 0


@pytest.mark.parametrize("layout", ["channels_last", "strided", "rank3", "rank5", "timestep_tensor", "per_sample",
                                    "guidance", "guidance_rescale", "int64", "batch1", "batch7"])
def test_kernel_threshold_layouts_and_modes(layout):
    shape, timestep, guidance = (2, 3, 8, 8), 100, {}
    if layout == "rank3":
        shape = (3, 5, 17)
    elif layout == "rank5":
        shape = (2, 2, 3, 4, 5)
    elif layout == "batch1":
        shape = (1, 3, 40, 40)  # several programs per sample, each looping over blocks
    elif layout == "batch7":
        shape = (7, 1, 9, 9)
    model_output, sample = randn(shape, seed=4, scale=2.0), randn(shape, seed=5, scale=3.0)
    if layout == "channels_last":
        model_output = model_output.contiguous(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        model_output = randn((2, 3, 8, 16), seed=4, scale=2.0)[..., ::2]
        sample = randn((2, 8, 8, 3), seed=5, scale=3.0).permute(0, 3, 1, 2)
    elif layout == "timestep_tensor":
        timestep = torch.tensor(100, device=DEVICE)
    elif layout == "per_sample":
        timestep = torch.tensor([100, 800], device=DEVICE)
    elif layout in ("guidance", "guidance_rescale"):
        guidance = dict(uncond_output=randn(shape, seed=6), guidance_scale=7.5,
                        guidance_rescale=0.7 if layout == "guidance_rescale" else 0.0)
    x0 = step_x0(model_output, sample, timestep, "epsilon", **guidance)
    for ratio, max_value in [(0.995, 20.0), (0.8, 2.5)]:
        expected = expected_threshold(x0, ratio, max_value)
        got = kernels.sample_thresholds(model_output, sample, TABLE, timestep, "epsilon", ratio, max_value,
                                        int64=True if layout == "int64" else None, **guidance)
        assert_identical(got, expected, f"{layout} ratio={ratio} max={max_value}")


def run_select(counts, extremes, ratio, dtype, on_device=False):
    """The first select kernel alone, on given per-sample counts (no histogram: the order statistics lie outside
    the window), with the indices and weight as the launcher passes them (host arguments, or on the device as
    for a sharded sample): returns (lower, upper, weight) as it hands them to torch.lerp."""
    from fastddim.kernels import threshold as kt

    batch = counts.shape[0]
    hist = torch.zeros(batch * 2 * kt.NUM_BINS, dtype=torch.int64, device=DEVICE)
    state = torch.empty(batch, kt.STATE_WIDTH, dtype=torch.int64, device=DEVICE)
    values = torch.empty(3, batch, dtype=dtype, device=DEVICE)
    lo = int(torch.tensor(1.0, dtype=dtype).view(torch.int64 if dtype == torch.float64 else torch.int32))
    n = int(counts[0].sum())
    below, above, weight_bits = kt._quantile_indices_on_host(n, ratio, dtype == torch.float64)
    ranks = state
    if on_device:
        device_below, device_above, weight = th.quantile_indices(counts.sum(1).to(DEVICE), ratio, dtype, DEVICE)
        ranks = torch.stack([device_below, device_above])
        values[2].copy_(weight)
    kt._threshold_select_kernel[(batch,)](hist, counts.to(DEVICE).flatten(), extremes.to(DEVICE).flatten(), state,
                                          values, ranks, batch, below, above, weight_bits, lo, lo,
                                          MATH_FP64=dtype == torch.float64, FIRST=True, SELECT=False, LAST=True,
                                          RANKS_ON_DEVICE=on_device, BOUND_ONLY=False, NUM_BINS=kt.NUM_BINS)
    return values


@pytest.mark.parametrize("n", [4 * 64 * 64, 2**24, 2**24 + 4])
def test_select_indices_match_torch_quantile_at_adversarial_sizes(n):
    """The indices and weight the select kernel reads (computed on the host by torch's ops) against an
    independent float32 computation (numpy) and, within its limit, torch.quantile of 0, 1, ..., n - 1 itself.
    A kernel computing them was contracted to an fma on sm_90: weight 0.08508 instead of 0.08496 at 0.995 over
    4x64x64, -0.020 instead of 0 at 2**24 + 4."""
    from fastddim.kernels import threshold as kt

    for ratio in (0.995, 0.9, 1 / 3):
        below, above, weight_bits = kt._quantile_indices_on_host(n, ratio, False)
        rank = np.float32(ratio) * np.float32(n - 1)
        weight = np.array(weight_bits, dtype=np.int32).view(np.float32)
        assert (below, above) == (min(int(rank), n - 1), min(math.ceil(rank), n - 1)), f"ratio={ratio}"
        assert weight == rank - np.float32(int(rank)), f"ratio={ratio}"
        if n <= 2**24:
            expected = torch.quantile(torch.arange(n, dtype=torch.float32), ratio)
            got = torch.lerp(torch.tensor([float(below)]), torch.tensor([float(above)]), torch.tensor([float(weight)]))
            assert_identical(got.view(()), expected, f"n={n} ratio={ratio}")
    weight_bits = kt._quantile_indices_on_host(n, 0.995, False)[2]
    weight = float(np.array(weight_bits, dtype=np.int32).view(np.float32))
    if n == 4 * 64 * 64:
        assert abs(weight - 0.08496) < 1e-4
    if n == 2**24 + 4:
        assert weight == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n", [2**24 + 4, 2**31 + 7, 3 * 2**31 + 1, 10**12 + 3])
@pytest.mark.parametrize("on_device", [False, True], ids=["host-indices", "device-indices"])
def test_kernel_rank_arithmetic_for_huge_samples(n, dtype, on_device):
    """The select kernel's order statistics and weight for sizes no test can allocate (counts given directly):
    rank = ratio * (n - 1) and the weight as torch computes them in the dtype, and the order statistic's
    category from the counts, with the indices from the host and (sharded samples) from the device."""
    int_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    below_one = int(torch.tensor(0.75, dtype=dtype).view(int_dtype))
    at_least_bound = int(torch.tensor(40.0, dtype=dtype).view(int_dtype))
    max_bits = torch.iinfo(int_dtype).max
    # Sample 0: all n below 1; sample 1: all at or above the bound; sample 2: half and half.
    counts = torch.tensor([[n, 0, 0, 0, 0], [0, 0, n, 0, 0], [n // 2, 0, n - n // 2, 0, 0]])
    extremes = torch.tensor([[below_one + 1, 0], [0, max_bits - at_least_bound],
                             [below_one + 1, max_bits - at_least_bound]])
    for ratio in (0.995, 0.5, 1.0, 1e-9):
        values = run_select(counts, extremes, ratio, dtype, on_device)
        below, above, weight = th.quantile_indices(n, ratio, dtype)
        assert_identical(values[2], weight.expand(3).to(DEVICE), f"weight ratio={ratio}")
        assert 0 <= int(below) <= int(above) <= n - 1
        lower_expected = [0.75, 40.0, 0.75 if int(below) < n // 2 else 40.0]
        upper_expected = [0.75, 40.0, 0.75 if int(above) < n // 2 else 40.0]
        assert values[0].tolist() == lower_expected and values[1].tolist() == upper_expected


# ---------------------------------------------------------------------------------------------------------------
# Whole steps and loops
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_thresholded_step_backends_agree(prediction_type):
    """Both backends threshold their own x0 exactly; with prediction_type="sample" (x0 = model_output exactly
    on both) their pred_original_sample is bit for bit the same."""
    shape = (2, 3, 8, 8)
    model_output, sample = randn(shape, seed=8, scale=2.5), randn(shape, seed=9, scale=3.0)
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0,
                  prediction_type=prediction_type)
    table = TABLE.cpu()
    torch_out = ops.ddim_step(model_output.cpu(), sample.cpu(), table, 100, backend="torch", **kwargs)
    triton_out = ops.ddim_step(model_output, sample, TABLE, 100, backend="triton", **kwargs)
    for ours, theirs in zip(triton_out, torch_out):
        assert_same_nonfinite(ours.cpu(), theirs)
        torch.testing.assert_close(ours.cpu(), theirs, rtol=2**-18, atol=2**-18)
    if prediction_type == "sample":
        assert_identical(triton_out[1].cpu(), torch_out[1])


def test_thresholded_step_under_torch_compile_matches_eager():
    """The custom op carries the thresholding arguments (torch.compile of a thresholded Triton step)."""
    shape = (2, 3, 8, 8)
    model_output, sample = randn(shape, seed=10, scale=2.0), randn(shape, seed=11, scale=3.0)
    kwargs = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0, backend="triton")
    eager = ops.ddim_step(model_output, sample, TABLE, torch.tensor(100, device=DEVICE), **kwargs)
    compiled = torch.compile(lambda m, x, t: ops.ddim_step(m, x, TABLE, t, **kwargs), backend="eager",
                             fullgraph=True)(model_output, sample, torch.tensor(100, device=DEVICE))
    for a, b in zip(compiled, eager):
        assert_identical(a, b)
    options = StepOptions(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0).op_arguments()
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default,
                          (model_output, sample, TABLE, torch.tensor(100, device=DEVICE), 0, None, None, None,
                           *options))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_thresholded_loop_matches_diffusers(prediction_type, backend):
    """A 10-step float32 loop with the threshold inside the window at most steps: each step against diffusers
    from the same input (same x0 up to float32 rounding of the step, so the same threshold up to it), and the
    thresholds against torch.quantile of fastddim's own x0 exactly."""
    config = dict(thresholding=True, sample_max_value=4.0, dynamic_thresholding_ratio=0.95,
                  prediction_type=prediction_type, clip_sample=False)
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    sample = randn((2, 3, 8, 8), seed=12, scale=3.0)
    inside = 0
    for i, t in enumerate(ours.timesteps.tolist()):
        model_output = randn((2, 3, 8, 8), seed=13 + i, scale=2.0)
        ours_out = ours.step(model_output, t, sample)
        theirs_out = theirs.step(model_output.cpu(), t, sample.cpu())
        for name in ("prev_sample", "pred_original_sample"):
            a, b = getattr(ours_out, name).cpu(), getattr(theirs_out, name)
            assert_same_nonfinite(a, b)
            torch.testing.assert_close(a, b, rtol=2**-16, atol=2**-16, msg=f"step {i} {name}")
        if backend == "triton":
            table = ours._table_on(sample.device)
            x0 = step_x0(model_output, sample, t, prediction_type, table=table)
            s = kernels.sample_thresholds(model_output, sample, table, t, prediction_type, 0.95, 4.0)
            assert_identical(s, expected_threshold(x0, 0.95, 4.0))
            inside += int(((s > 1) & (s < 4)).sum())
        sample = ours_out.prev_sample
    assert backend == "torch" or inside > 0


def test_thresholded_step_without_pred_original_sample():
    ours = fastddim.DDIMScheduler(thresholding=True, sample_max_value=3.0)
    ours.set_timesteps(10)
    model_output, sample = randn((2, 3, 8, 8), seed=30, scale=2.0), randn((2, 3, 8, 8), seed=31, scale=3.0)
    full = ours.step(model_output, 500, sample)
    ours.write_pred_original_sample = False
    skipped = ours.step(model_output, 500, sample)
    assert_identical(skipped.prev_sample, full.prev_sample)
    assert skipped.pred_original_sample is None and full.pred_original_sample is not None

