"""Exact dynamic thresholding on the Triton backend: the per-sample threshold s of the thresholded step.

s = clamp(quantile(|x0|, ratio), 1, sample_max_value), with torch.quantile's "linear" interpolation, bit for bit,
for any number of elements per sample (torch.quantile stops at 2**24), computed without ever storing x0: every
pass recomputes x0 from the step's inputs with the step kernel's own helpers (kernels/ddim.py).

Why it is cheap: only order statistics inside the window [1, sample_max_value) need to be known exactly. Below
the window s is 1, above it s is sample_max_value, whatever their values. So

1. one streaming pass per sample counts the |x0| below 1, in the window, at or above sample_max_value (finite),
   infinite and NaN, keeps the largest |x0| below 1 and the smallest at or above sample_max_value (the order
   statistics next to the window), and histograms the top RADIX_BITS bits of the window's bit patterns (as
   integers, non-negative floats sort like their bit patterns);
2. a one-program-per-sample select kernel finds where the two order statistics torch.quantile interpolates fall,
   and the histogram bin of each that falls inside the window (their indices and the weight, from rank =
   ratio * (n - 1) in the math dtype, are computed by torch's own ops, never by a kernel the compiler could
   contract: see `_quantile_indices_on_host`);
3. further histogram passes (only over elements whose high bits match a selected bin, and only for samples that
   still need one) refine those bins RADIX_BITS bits at a time, each followed by a select, until the bit
   patterns of both order statistics are known exactly;
4. torch.lerp and torch.clamp, the very ops torch.quantile and diffusers apply, turn the two order statistics and
   the interpolation weight into s on the device (no host synchronisation), and the step kernel applies
   clamp(x0, -s, s) / s in its single pass.

Histograms are accumulated per program in registers (tl.histogram, so a sample whose elements all share one value
costs what any other does) and flushed with one atomic add per non-empty bin. All counts are integers, so the
result is deterministic and independent of the launch grid. For a sample sharded across processes, a `reduce`
hook all-reduces the counts between the passes (sums of the counts and histograms, maxima of the encoded
extremes), so every process finds the threshold of the whole sample.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastddim.schedule import as_table
from fastddim.threshold import quantile_indices, radix_levels, window_bits

from .ddim import (
    BLOCK_SIZE, GUIDANCE_CFG, GUIDANCE_NONE, GUIDANCE_RESCALED, LAUNCH_OPTIONS, PREDICTION_CODES,
    TIMESTEP_PER_SAMPLE, TIMESTEP_SCALAR, TIMESTEP_TENSOR, _predicted_x0_eps, _step_coefficients,
    _strided_offset, _unravel, allocate_outputs,
    float64_bits, guidance_std_ratio, kernel_sizes, kernel_strides, needs_int64, programs_per_sample,
)
from .launch import DirectLauncher

RADIX_BITS = 10
NUM_BINS = 1 << RADIX_BITS
PASS_BLOCK = BLOCK_SIZE
# Per sample: counts of |x0| below 1, in the window, at or above the window (finite), infinite, NaN.
COUNT_WIDTH = 5
# Per sample, written by the select kernel: (prefix, rank) of the lower and upper order statistic (rank -1:
# known without the window's histograms), then the bit patterns of both once known.
STATE_WIDTH = 6
# Globals read inside a @triton.jit function must be constexpr (the interpreter does not enforce it; GPUs do).
_RADIX = tl.constexpr(RADIX_BITS)
_COUNT_WIDTH = tl.constexpr(COUNT_WIDTH)
_STATE_WIDTH = tl.constexpr(STATE_WIDTH)
# Bit patterns of +inf and of a quiet NaN, and the largest non-negative integer, of float32 and float64.
_INF32, _NAN32, _MAX32 = tl.constexpr(0x7F800000), tl.constexpr(0x7FC00000), tl.constexpr(0x7FFFFFFF)
_INF64 = tl.constexpr(0x7FF0000000000000)
_NAN64 = tl.constexpr(0x7FF8000000000000)
_MAX64 = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_HALF32, _HALF64 = tl.constexpr(0x3F000000), tl.constexpr(0x3FE0000000000000)  # 0.5: where lerp switches formula


@triton.jit
def _abs_bits(x0, MATH_FP64: tl.constexpr):
    """The bit pattern of |x0| as a non-negative integer (sign bit cleared, NaN payload kept)."""
    if MATH_FP64:
        return x0.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return x0.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit(do_not_specialize=["timestep", "guidance_scale_bits", "guidance_rescale_bits", "per_sample",
                               "batch_stride", "window_lo", "window_hi", "shift"])
def _threshold_pass_kernel(
    model_output_ptr, uncond_ptr, sample_ptr, table_ptr, timestep_ptr, stats_ptr,
    hist_ptr, counts_ptr, extremes_ptr, state_ptr,
    timestep, num_train_timesteps, guidance_scale_bits, guidance_rescale_bits,
    per_sample, batch_stride,
    size_1, size_2, size_3, size_4,
    m_stride_0, m_stride_1, m_stride_2, m_stride_3, m_stride_4,
    u_stride_0, u_stride_1, u_stride_2, u_stride_3, u_stride_4,
    x_stride_0, x_stride_1, x_stride_2, x_stride_3, x_stride_4,
    window_lo, window_hi, shift,
    PREDICTION: tl.constexpr,
    TIMESTEP_MODE: tl.constexpr,
    GUIDANCE: tl.constexpr,
    STRIDED: tl.constexpr,
    INT64: tl.constexpr,
    MATH_FP64: tl.constexpr,
    FIRST: tl.constexpr,  # counts, extremes and the top-digit histogram; else refine the selected bins
    HISTOGRAM: tl.constexpr,  # the window holds more than one bit pattern
    NUM_BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One streaming pass over one sample's elements (grid: batch x programs per sample), x0 recomputed from
    the inputs. hist_ptr holds two histograms of NUM_BINS per sample: of the digit `(d >> shift) % NUM_BINS`
    of d = bits(|x0|) - window_lo, over the window elements whose higher digits equal the selected prefix of
    the lower (histogram 0) and the upper (histogram 1) order statistic. The first pass has no prefix yet and
    fills histogram 0 only."""
    b = tl.program_id(0)
    program = tl.program_id(1)
    programs = tl.num_programs(1)
    if INT64:
        b = b.to(tl.int64)
    if MATH_FP64:
        bits_dtype = tl.int64
        inf_bits: tl.constexpr = _INF64
        max_bits: tl.constexpr = _MAX64
    else:
        bits_dtype = tl.int32
        inf_bits: tl.constexpr = _INF32
        max_bits: tl.constexpr = _MAX32
    lo = window_lo.to(bits_dtype)
    hi = window_hi.to(bits_dtype)
    n_chunks = tl.cdiv(per_sample, BLOCK)
    if INT64:
        count_dtype = tl.int64
    else:
        count_dtype = tl.int32

    if FIRST:
        prefix0 = 0
        prefix1 = 0
        want0 = True
        want1 = False
    else:
        state = state_ptr + b * _STATE_WIDTH
        prefix0 = tl.load(state + 0)
        want0 = tl.load(state + 1) >= 0
        prefix1 = tl.load(state + 2)
        want1 = tl.load(state + 3) >= 0
        # Both order statistics in one bin: histogram 0 serves both (the select kernel knows).
        want1 = want1 & ~(want0 & (prefix0 == prefix1))
        # Nothing left to refine in this sample (its threshold is a clamp bound, or both statistics are known).
        n_chunks = tl.where(want0 | want1, n_chunks, 0)

    # The sample's coefficients, once per program (float64 scalars).
    coefficients = _step_coefficients(table_ptr, timestep_ptr, timestep, num_train_timesteps, 0.0, b,
                                      TIMESTEP_MODE, MATH_FP64)
    sqrt_alpha_t = coefficients[0]
    sqrt_beta_t = coefficients[1]
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    low = zero
    window = zero
    high = zero
    inf = zero
    nan = zero
    max_low = tl.full([BLOCK], -1, bits_dtype)
    min_high = tl.full([BLOCK], max_bits, bits_dtype)
    hist0 = tl.zeros([NUM_BINS], dtype=count_dtype)
    hist1 = tl.zeros([NUM_BINS], dtype=count_dtype)
    # A while loop: Triton's interpreter cannot run a `for` over runtime bounds with numpy >= 2.
    chunk = program
    while chunk < n_chunks:
        if INT64:
            within = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            within = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = within < per_sample
        if STRIDED:
            i1, i2, i3, i4 = _unravel(within, size_2, size_3, size_4)
            m_offsets = _strided_offset(b, i1, i2, i3, i4, m_stride_0, m_stride_1, m_stride_2, m_stride_3, m_stride_4)
            u_offsets = _strided_offset(b, i1, i2, i3, i4, u_stride_0, u_stride_1, u_stride_2, u_stride_3, u_stride_4)
            x_offsets = _strided_offset(b, i1, i2, i3, i4, x_stride_0, x_stride_1, x_stride_2, x_stride_3, x_stride_4)
        else:
            # A dense layout with the batch outermost: each sample fills one span of memory (in any order).
            m_offsets = b * batch_stride + within
            u_offsets = m_offsets
            x_offsets = m_offsets
        x0, _, _ = _predicted_x0_eps(model_output_ptr, uncond_ptr, sample_ptr, stats_ptr, m_offsets, u_offsets,
                                     x_offsets, b, mask, sqrt_alpha_t, sqrt_beta_t, guidance_scale_bits,
                                     guidance_rescale_bits, PREDICTION, GUIDANCE, MATH_FP64)
        bits = _abs_bits(x0, MATH_FP64)
        in_window = mask & (bits >= lo) & (bits < hi)
        d = bits - lo
        if FIRST:
            is_low = mask & (bits < lo)
            is_high = mask & (bits >= hi) & (bits < inf_bits)
            low += is_low.to(tl.int32)
            window += in_window.to(tl.int32)
            high += is_high.to(tl.int32)
            inf += (mask & (bits == inf_bits)).to(tl.int32)
            nan += (mask & (bits > inf_bits)).to(tl.int32)
            max_low = tl.maximum(max_low, tl.where(is_low, bits, -1))
            min_high = tl.minimum(min_high, tl.where(is_high, bits, max_bits))
            if HISTOGRAM:
                digit = (d >> shift).to(tl.int32)
                hist0 += tl.histogram(digit, NUM_BINS, mask=in_window).to(count_dtype)
        else:
            digit = ((d >> shift) & (NUM_BINS - 1)).to(tl.int32)
            above = d >> (shift + _RADIX)
            hist0 += tl.histogram(digit, NUM_BINS, mask=in_window & want0 & (above == prefix0)).to(count_dtype)
            hist1 += tl.histogram(digit, NUM_BINS, mask=in_window & want1 & (above == prefix1)).to(count_dtype)
        chunk += programs

    bins = tl.arange(0, NUM_BINS)
    sample_hist = hist_ptr + b * (2 * NUM_BINS)
    if FIRST:
        counts = counts_ptr + b * _COUNT_WIDTH
        tl.atomic_add(counts + 0, tl.sum(low.to(tl.int64), axis=0))
        tl.atomic_add(counts + 1, tl.sum(window.to(tl.int64), axis=0))
        tl.atomic_add(counts + 2, tl.sum(high.to(tl.int64), axis=0))
        tl.atomic_add(counts + 3, tl.sum(inf.to(tl.int64), axis=0))
        tl.atomic_add(counts + 4, tl.sum(nan.to(tl.int64), axis=0))
        # Both extremes as maxima of non-negative int64 (0: none), so one zero-filled buffer and one all-reduce
        # op serve both: max_low + 1 and max_bits - min_high (written tensor first: triton 3.9's interpreter
        # cannot subtract a tensor from a constexpr).
        extremes = extremes_ptr + b * 2
        tl.atomic_max(extremes + 0, tl.max(max_low, axis=0).to(tl.int64) + 1)
        tl.atomic_max(extremes + 1, -tl.min(min_high, axis=0).to(tl.int64) + max_bits)
        if HISTOGRAM:
            tl.atomic_add(sample_hist + bins, hist0.to(tl.int64), mask=hist0 != 0)
    else:
        tl.atomic_add(sample_hist + bins, hist0.to(tl.int64), mask=hist0 != 0)
        tl.atomic_add(sample_hist + NUM_BINS + bins, hist1.to(tl.int64), mask=hist1 != 0)


@triton.jit
def _select_bin(hist, rank, NUM_BINS: tl.constexpr):
    """(bin, rank within the bin) of the element of 0-based `rank` in the histogram `hist`."""
    bins = tl.arange(0, NUM_BINS)
    cumulative = tl.cumsum(hist, axis=0)
    bin = tl.sum((cumulative <= rank).to(tl.int64), axis=0)
    before = tl.sum(tl.where(bins < bin, hist, 0), axis=0)
    return bin, rank - before


@triton.jit
def _locate(index, n_low, n_window, n_high, n_inf, max_low_bits, min_high_bits, inf_bits, nan_bits):
    """Where the order statistic `index` lies: (its bit pattern, -1) outside the window, (0, its rank among the
    window's elements) inside it."""
    window_start = n_low
    high_start = window_start + n_window
    inf_start = high_start + n_high
    nan_start = inf_start + n_inf
    bits = tl.where(index < window_start, max_low_bits,
                    tl.where(index < high_start, 0,
                             tl.where(index < inf_start, min_high_bits,
                                      tl.where(index < nan_start, inf_bits, nan_bits))))
    rank = tl.where((index >= window_start) & (index < high_start), index - window_start, -1)
    return bits, rank


@triton.jit(do_not_specialize=["below", "above", "weight_bits", "window_lo", "bound_bits"])
def _threshold_select_kernel(
    hist_ptr, counts_ptr, extremes_ptr, state_ptr, values_ptr, ranks_ptr,
    batch_size, below, above, weight_bits, window_lo, bound_bits,
    MATH_FP64: tl.constexpr,
    FIRST: tl.constexpr,  # place the order statistics (and select in the first histogram)
    SELECT: tl.constexpr,  # there is a histogram to select in
    LAST: tl.constexpr,  # write the order statistics to values_ptr
    RANKS_ON_DEVICE: tl.constexpr,  # the indices are ranks_ptr[b], ranks_ptr[batch_size + b], not below, above
    BOUND_ONLY: tl.constexpr,  # the clamp bound (bits bound_bits) is <= 1: write s itself to values_ptr[3]
    NUM_BINS: tl.constexpr,
):
    """One program per sample: select the histogram bins holding the two order statistics torch.quantile
    interpolates, then clear the histograms for the next pass. No floating-point arithmetic: the indices of the
    order statistics and the weight come from `fastddim.threshold.quantile_indices` (torch's own ops), as
    arguments (`below`, `above`, the weight's bit pattern, stored to values_ptr[2]) or, for a sharded sample
    whose size only the all-reduced counts know, from ranks_ptr (the weight already in values_ptr[2]).

    With BOUND_ONLY (sample_max_value <= 1, so the window is empty and this is the one, first and last, select),
    s = clamp(lerp(lower, upper, weight), 1, bound) is `bound` or NaN, and which one does not depend on how lerp
    rounds or contracts: NaN exactly where torch.lerp gives NaN (a NaN order statistic, or an infinite upper one
    with an infinite lower one, a weight of 0, or a weight >= 0.5, where lerp computes inf * 0 or inf - inf).
    The step then needs neither torch.lerp nor torch.clamp (two launches)."""
    tl.static_assert(not BOUND_ONLY or (FIRST and LAST and not SELECT))
    b = tl.program_id(0).to(tl.int64)
    if MATH_FP64:
        inf_bits: tl.constexpr = _INF64
        nan_bits: tl.constexpr = _NAN64
        max_bits: tl.constexpr = _MAX64
    else:
        inf_bits: tl.constexpr = _INF32
        nan_bits: tl.constexpr = _NAN32
        max_bits: tl.constexpr = _MAX32
    state = state_ptr + b * _STATE_WIDTH
    sample_hist = hist_ptr + b * (2 * NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    if FIRST:
        counts = counts_ptr + b * _COUNT_WIDTH
        n_low = tl.load(counts + 0)
        n_window = tl.load(counts + 1)
        n_high = tl.load(counts + 2)
        n_inf = tl.load(counts + 3)
        n_nan = tl.load(counts + 4)
        if RANKS_ON_DEVICE:
            below_index = tl.load(ranks_ptr + b)
            above_index = tl.load(ranks_ptr + batch_size + b)
        else:
            below_index = below
            above_index = above
            if MATH_FP64:
                weight = weight_bits.to(tl.int64).to(tl.float64, bitcast=True)
            else:
                weight = weight_bits.to(tl.int32).to(tl.float32, bitcast=True)
            tl.store(values_ptr + 2 * batch_size + b, weight)
        max_low_bits = tl.load(extremes_ptr + b * 2) - 1
        min_high_bits = -tl.load(extremes_ptr + b * 2 + 1) + max_bits
        bits0, rank0 = _locate(below_index, n_low, n_window, n_high, n_inf, max_low_bits, min_high_bits, inf_bits,
                               nan_bits)
        bits1, rank1 = _locate(above_index, n_low, n_window, n_high, n_inf, max_low_bits, min_high_bits, inf_bits,
                               nan_bits)
        # torch.quantile's answer for a row holding a NaN is NaN.
        has_nan = n_nan > 0
        bits0 = tl.where(has_nan, nan_bits, bits0)
        bits1 = tl.where(has_nan, nan_bits, bits1)
        rank0 = tl.where(has_nan, -1, rank0)
        rank1 = tl.where(has_nan, -1, rank1)
        prefix0 = rank0 * 0
        prefix1 = rank1 * 0
        if SELECT:
            hist = tl.load(sample_hist + bins)
            bin0, within0 = _select_bin(hist, rank0, NUM_BINS)
            bin1, within1 = _select_bin(hist, rank1, NUM_BINS)
            prefix0 = tl.where(rank0 >= 0, bin0, 0)
            prefix1 = tl.where(rank1 >= 0, bin1, 0)
            rank0 = tl.where(rank0 >= 0, within0, -1)
            rank1 = tl.where(rank1 >= 0, within1, -1)
    else:
        prefix0 = tl.load(state + 0)
        rank0 = tl.load(state + 1)
        prefix1 = tl.load(state + 2)
        rank1 = tl.load(state + 3)
        bits0 = tl.load(state + 4)
        bits1 = tl.load(state + 5)
        shared = (rank0 >= 0) & (rank1 >= 0) & (prefix0 == prefix1)
        hist0 = tl.load(sample_hist + bins)
        hist1 = tl.load(sample_hist + tl.where(shared, 0, NUM_BINS) + bins)
        bin0, within0 = _select_bin(hist0, rank0, NUM_BINS)
        bin1, within1 = _select_bin(hist1, rank1, NUM_BINS)
        prefix0 = tl.where(rank0 >= 0, (prefix0 << _RADIX) | bin0, prefix0)
        prefix1 = tl.where(rank1 >= 0, (prefix1 << _RADIX) | bin1, prefix1)
        rank0 = tl.where(rank0 >= 0, within0, -1)
        rank1 = tl.where(rank1 >= 0, within1, -1)

    if LAST:
        # Every digit is known: the prefix is the whole offset of the bit pattern from the window's start.
        bits0 = tl.where(rank0 >= 0, window_lo.to(tl.int64) + prefix0, bits0)
        bits1 = tl.where(rank1 >= 0, window_lo.to(tl.int64) + prefix1, bits1)
        if MATH_FP64:
            value0 = bits0.to(tl.float64, bitcast=True)
            value1 = bits1.to(tl.float64, bitcast=True)
        else:
            value0 = bits0.to(tl.int32).to(tl.float32, bitcast=True)
            value1 = bits1.to(tl.int32).to(tl.float32, bitcast=True)
        tl.store(values_ptr + b, value0)
        tl.store(values_ptr + batch_size + b, value1)
        if BOUND_ONLY:
            # On bit patterns only, as the rest of this kernel (non-negative floats order as their patterns).
            if MATH_FP64:
                if RANKS_ON_DEVICE:
                    w_bits = tl.load(values_ptr + 2 * batch_size + b).to(tl.int64, bitcast=True)
                else:
                    w_bits = weight_bits.to(tl.int64)
                half_bits: tl.constexpr = _HALF64
            else:
                if RANKS_ON_DEVICE:
                    w_bits = tl.load(values_ptr + 2 * batch_size + b).to(tl.int32, bitcast=True)
                else:
                    w_bits = weight_bits.to(tl.int32)
                half_bits: tl.constexpr = _HALF32
            lerp_nan = (bits0 > inf_bits) | (bits1 > inf_bits) | (
                (bits1 == inf_bits) & ((bits0 == inf_bits) | (w_bits == 0) | (w_bits >= half_bits)))
            s_bits = tl.where(lerp_nan, nan_bits, bound_bits.to(tl.int64))
            if MATH_FP64:
                s = s_bits.to(tl.float64, bitcast=True)
            else:
                s = s_bits.to(tl.int32).to(tl.float32, bitcast=True)
            tl.store(values_ptr + 3 * batch_size + b, s)
    else:
        tl.store(state + 0, prefix0)
        tl.store(state + 1, rank0)
        tl.store(state + 2, prefix1)
        tl.store(state + 3, rank1)
        tl.store(state + 4, bits0)
        tl.store(state + 5, bits1)
        # The next pass accumulates into cleared histograms.
        tl.store(sample_hist + bins, tl.zeros([NUM_BINS], dtype=tl.int64))
        tl.store(sample_hist + NUM_BINS + bins, tl.zeros([NUM_BINS], dtype=tl.int64))


def _bit_pattern(value: torch.Tensor) -> int:
    """The bit pattern of a 0-d float32 or float64 tensor, as the select kernel takes its float arguments."""
    return int(value.view(torch.int64 if value.dtype == torch.float64 else torch.int32))


@functools.lru_cache(maxsize=64)
def _quantile_indices_on_host(n: int, ratio: float, math_fp64: bool) -> tuple[int, int, int]:
    """(below, above, bit pattern of the weight) of torch.quantile over `n` elements, computed by torch's own
    ops on the host (`fastddim.threshold.quantile_indices`): the select kernel only reads them, so no compiler
    contraction can change the rank or the weight (fused, ratio * (n - 1) - floor(rank) loses the rounding of
    the product)."""
    dtype = torch.float64 if math_fp64 else torch.float32
    below, above, weight = quantile_indices(max(n, 1), ratio, dtype)
    return int(below), int(above), _bit_pattern(weight)


class ThresholdPlan:
    """The threshold passes of one step plan, prepared once: window, radix levels, quantile indices, grid and every
    scalar and constexpr argument that depends only on the settings and the tensors' dtypes, shapes, strides and
    devices. Calling it with the tensors of one step returns the per-sample threshold s (shape (batch,), the math
    dtype): what diffusers' `_threshold_sample` computes from the step's x0, exactly.

    Args:
        model_output, sample: tensors with the properties of every later call's (only dtypes, shapes, strides and
            the device are read), as `kernels.ddim.StepLauncher` prepares them.
        table: the step table (its number of rows is read).
        timestep_mode (`int`): TIMESTEP_SCALAR, TIMESTEP_TENSOR or TIMESTEP_PER_SAMPLE (kernels/ddim.py).
        prediction_type (`str`), ratio (`float`), max_value (`float`): the step's prediction type,
            dynamic_thresholding_ratio and sample_max_value.
        uncond_output, guidance_mode, guidance_scale, guidance_rescale: the step's classifier-free guidance.
        shared_dense, int64, math_fp64 (`bool`): the step kernel's layout, index width and math dtype.
        reduce (`Callable`, *optional*): for samples sharded across processes, `reduce(tensor, op)` all-reduces
            `tensor` in place with op "sum" or "max" (the counts, then the extremes).
    """

    def __init__(self, model_output, sample, table, timestep_mode, prediction_type, ratio, max_value,
                 uncond_output=None, guidance_mode=0, guidance_scale=1.0, guidance_rescale=0.0, shared_dense=True,
                 int64=False, math_fp64=False, reduce=None):
        self.ratio = float(ratio)
        self.math_dtype = torch.float64 if math_fp64 else torch.float32
        self.reduce = reduce
        self.batch = batch = sample.shape[0] if sample.dim() else 1
        per_sample = math.prod(sample.shape[1:]) if sample.dim() else 1
        lo, hi, self.bound = window_bits(max_value, self.math_dtype)
        # A bound of at most 1 makes s that bound or NaN: the select kernel writes it (no lerp, no clamp).
        self.bound_only = self.bound <= 1
        self.bound_bits = _bit_pattern(torch.tensor(self.bound, dtype=self.math_dtype))
        self.levels = levels = radix_levels(lo, hi, RADIX_BITS)
        top = levels * RADIX_BITS
        # One zero-filled buffer per call: the histograms and counts (all-reduced by sum), then the extremes (max).
        self.buffer_parts = (batch * 2 * NUM_BINS, batch * COUNT_WIDTH, batch * 2)
        self.buffer_size = sum(self.buffer_parts)
        # Indices of the order statistics and the weight: on the host from the sample size when this process
        # holds whole samples, else (sharded) on the device from the all-reduced counts, after the first pass.
        self.below, self.above, self.weight_bits = _quantile_indices_on_host(per_sample, self.ratio, math_fp64)
        strided = not shared_dense
        sizes = kernel_sizes(sample, strided)
        uncond = uncond_output if uncond_output is not None else sample
        batch_stride = sample.stride(0) if sample.dim() and batch > 1 else per_sample
        self.pass_grid = (batch, programs_per_sample(per_sample, batch, sample.device, PASS_BLOCK))
        # The pass kernel's scalar arguments after `timestep`, up to the window; then the shift of each pass.
        pass_scalars = (
            table.shape[0], float64_bits(guidance_scale), float64_bits(guidance_rescale), per_sample, batch_stride,
            *sizes[1:], *kernel_strides(model_output, strided), *kernel_strides(uncond, strided),
            *kernel_strides(sample, strided), lo, hi,
        )
        shifts = [max(top - RADIX_BITS, 0)] + [top - level * RADIX_BITS for level in range(2, levels + 1)]
        pass_constexprs = dict(
            PREDICTION=PREDICTION_CODES[prediction_type], TIMESTEP_MODE=timestep_mode, GUIDANCE=guidance_mode,
            STRIDED=not shared_dense, INT64=int64, MATH_FP64=math_fp64, HISTOGRAM=levels > 0, NUM_BINS=NUM_BINS,
            BLOCK=PASS_BLOCK,
        )
        # The leading tensors a launch passes in their own right (`__call__`): the others repeat the sample (uncond),
        # the table (timestep, stats) or the state (ranks), so the direct launchers read the alignment of these alone.
        pass_distinct = [0, 2, 3, 6, 7, 8, 9]  # model_output, sample, table, hist, counts, extremes, state
        if guidance_mode != GUIDANCE_NONE:
            pass_distinct.append(1)  # uncond_output
        if timestep_mode != TIMESTEP_SCALAR:
            pass_distinct.append(4)  # the timestep tensor
        if guidance_mode == GUIDANCE_RESCALED:
            pass_distinct.append(5)  # the guidance statistics
        select_distinct = (0, 1, 2, 3, 4, 5) if reduce is not None else (0, 1, 2, 3, 4)  # ranks from the counts
        # One prepared launch of each kernel per level (their constexprs or shift differ); the timestep is the
        # only argument after the tensors that changes between a plan's launches.
        self.pass_launches = [_pass_launcher.prepare({**pass_constexprs, "FIRST": level == 1}, PASS_TENSORS,
                                                     varying=(PASS_TENSORS,), distinct=tuple(sorted(pass_distinct)))
                              for level in range(1, max(levels, 1) + 1)]
        self.select_launches = [
            _select_launcher.prepare(dict(MATH_FP64=math_fp64, FIRST=level == 1, SELECT=levels > 0,
                                          LAST=level == max(levels, 1), RANKS_ON_DEVICE=reduce is not None,
                                          BOUND_ONLY=self.bound_only, NUM_BINS=NUM_BINS), SELECT_TENSORS,
                                     distinct=select_distinct)
            for level in range(1, max(levels, 1) + 1)
        ]
        # Every argument after the leading ones, per level: the scalars, then the constexpr values (one tuple per
        # launch, as StepLauncher.trailing_arguments).
        self.pass_trailing = [(*pass_scalars, shift, *launch.constexpr_values)
                              for shift, launch in zip(shifts, self.pass_launches)]
        self.select_trailing = [(batch, self.below, self.above, self.weight_bits, lo, self.bound_bits,
                                 *launch.constexpr_values) for launch in self.select_launches]
        # An empty shard of a sharded sample skips the passes but takes part in the collectives (and the selects,
        # which find the threshold of the whole sample from the reduced counts).
        self.passes = batch > 0 and per_sample > 0

    def __call__(self, model_output, sample, table, timestep_arg, timestep_ptr, uncond_output=None, stats=None,
                 return_order_statistics=False, clamped=True):
        """s per sample for these tensors (`stats`: the guidance statistics when rescaled); with
        `return_order_statistics`, also the (3, batch) tensor (lower order statistic, upper one, weight) that s
        interpolates; with `clamped=False`, torch.lerp's result before diffusers' clamp to [1, sample_max_value],
        which the step kernel applies itself (one launch fewer)."""
        batch, device, reduce = self.batch, sample.device, self.reduce
        buffer = torch.zeros(self.buffer_size, dtype=torch.int64, device=device)
        hist, counts, extremes = buffer.split_with_sizes(self.buffer_parts)
        state = torch.empty(batch, STATE_WIDTH, dtype=torch.int64, device=device)
        # (lower order statistic, upper one, weight) per sample, then s itself when the select kernel writes it.
        values = torch.empty(4 if self.bound_only else 3, batch, dtype=self.math_dtype, device=device)
        ranks = state
        pass_arguments = (
            model_output, uncond_output if uncond_output is not None else sample, sample, table, timestep_ptr,
            stats if stats is not None else table, hist, counts, extremes, state, timestep_arg,
        )
        select_arguments = (hist, counts, extremes, state, values)
        for level, (pass_launch, pass_trailing, select_launch, select_trailing) in enumerate(zip(
                self.pass_launches, self.pass_trailing, self.select_launches, self.select_trailing)):
            if self.passes:
                _pass_launcher.launch(_threshold_pass_kernel, self.pass_grid, pass_arguments + pass_trailing,
                                      pass_launch)
            if reduce is not None and level == 0:
                reduce(buffer[:hist.numel() + counts.numel()], "sum")
                reduce(extremes, "max")
                if batch:
                    device_below, device_above, device_weight = quantile_indices(
                        counts.view(batch, COUNT_WIDTH).sum(1), self.ratio, self.math_dtype, device)
                    ranks = torch.stack([device_below, device_above])
                    values[2].copy_(device_weight)
            elif reduce is not None:
                reduce(hist, "sum")
            if batch:
                _select_launcher.launch(_threshold_select_kernel, (batch,),
                                        (*select_arguments, ranks) + select_trailing, select_launch)

        if self.bound_only:
            s = values[3]
            if return_order_statistics:
                values = values[:3]
        else:
            # torch.quantile's interpolation and diffusers' clamp, by the same torch ops (elementwise: the rows'
            # shape, (batch,) here, (batch, 1) in torch.quantile, does not change a result).
            lower, upper, weight = values.unbind(0)
            s = torch.lerp(lower, upper, weight)
            bound = self.bound
            if clamped:
                s = s.clamp_(min=1, max=bound) if math.isfinite(bound) else s.clamp_(min=1)
        return (s, values) if return_order_statistics else s


# The kernels' launches, direct once a specialization ran (kernels/launch.py), and their leading tensor arguments.
_pass_launcher = DirectLauncher(_threshold_pass_kernel, LAUNCH_OPTIONS)
_select_launcher = DirectLauncher(_threshold_select_kernel, LAUNCH_OPTIONS)
PASS_TENSORS, SELECT_TENSORS = 10, 6


def sample_thresholds(model_output, sample, table, timestep=None, prediction_type="epsilon",
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0, uncond_output=None,
                      guidance_scale=1.0, guidance_rescale=0.0, reduce=None, int64=None,
                      return_order_statistics=False):
    """The per-sample thresholds s (shape (batch,), float32, float64 for float64 inputs) that `ddim_step` with
    thresholding applies to these inputs: clamp(torch.quantile(|x0|, ratio), 1, sample_max_value) of the step's
    x0, bit for bit. Arguments as `kernels.ddim.ddim_step`; `int64` forces (True) the 64-bit index path that
    samples of 2**31 elements take (None: chosen from the sizes)."""
    table, timestep = as_table(table, timestep)
    _, shared_dense, inputs = allocate_outputs(model_output, sample, uncond_output, write_prev=False,
                                               write_x0=False)
    model_output, sample, uncond_output, _ = inputs
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    if isinstance(timestep, torch.Tensor):
        mode = TIMESTEP_PER_SAMPLE if timestep.numel() > 1 else TIMESTEP_TENSOR
        timestep_arg, timestep_ptr = 0, timestep
    else:
        mode, timestep_arg, timestep_ptr = TIMESTEP_SCALAR, int(timestep), table
    guidance_mode, stats = GUIDANCE_NONE, table
    if uncond_output is not None:
        guidance_mode = GUIDANCE_CFG
        if guidance_rescale != 0:
            guidance_mode = GUIDANCE_RESCALED
            if sample.numel():
                stats = guidance_std_ratio(model_output, uncond_output, guidance_scale)
    if int64 is None:
        int64 = needs_int64(sample.numel(), [t for t in (model_output, sample, uncond_output) if t is not None])
    plan = ThresholdPlan(model_output, sample, table, mode, prediction_type, dynamic_thresholding_ratio,
                         sample_max_value, uncond_output=uncond_output, guidance_mode=guidance_mode,
                         guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, shared_dense=shared_dense,
                         int64=int64, math_fp64=out_dtype == torch.float64, reduce=reduce)
    return plan(model_output, sample, table, timestep_arg, timestep_ptr, uncond_output, stats,
                return_order_statistics=return_order_statistics)
