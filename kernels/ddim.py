"""Fused DDIM step: Triton kernels and their launcher.

One pass reads model_output (or the two guidance predictions), sample and the noise once, and writes
prev_sample and pred_original_sample once. Math is float32 (float64 for float64 outputs), rounded once. The
step coefficients come from `fastddim.schedule.step_table` in device memory, indexed by the timestep, which may
itself live on the device (one per batch or one per sample): no timestep ever has to be read by the host, so the
step can be captured in a CUDA graph and replayed for every timestep. Arguments are trusted here:
`fastddim.ops` checks them.
"""

from __future__ import annotations

import math
import operator
import struct

import torch
import triton
import triton.language as tl

from fastddim.plan import StepOptions
from fastddim.schedule import ROW_WIDTH, as_table

from .launch import DirectLauncher

PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
TIMESTEP_SCALAR, TIMESTEP_TENSOR, TIMESTEP_PER_SAMPLE = 0, 1, 2
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
GUIDANCE_NONE, GUIDANCE_CFG, GUIDANCE_RESCALED = 0, 1, 2
MAX_RANK = 5
BLOCK_SIZE = 1024
STATS_BLOCK_SIZE = 1024
INT32_LIMIT = 2**31 - 1
# CUDA's limit on grid axes 1 and 2 (axis 0 takes 2**31 - 1 programs).
MAX_GRID_AXIS = 65535
# Options of every launch (and of kernels/compile_check.py): no floating-point contraction. Triton fuses a * b + c
# into one fma by default, whose unrounded product no torch op reproduces (and whose use can differ from kernel
# to kernel); without it every operation rounds as written, so the same formula gives the same bits in every
# kernel and variant: the thresholding passes see exactly the x0 of the step they threshold.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
# Globals read inside a @triton.jit function must be constexpr (the interpreter does not enforce it; GPUs do).
TABLE_ROW_WIDTH = tl.constexpr(ROW_WIDTH)
PHILOX_ROWS_PER_PASS = tl.constexpr(1024)  # generator rows the last program advances per vector atomic


@triton.jit
def _standard_normal(seed, counter, index):
    """N(0, 1) noise for element `index` (within its sample) of draw number `counter`: Philox4x32-10 keyed by
    `seed` with the counter block (index_lo, index_hi, counter_lo, counter_hi), then Box-Muller as in `tl.randn`.
    The torch path draws the same stream (fastddim.reference.philox_normal)."""
    index = index.to(tl.int64)
    zero = (index * 0).to(tl.uint32)
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + (counter & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, _, _ = tl.random.philox(seed, c0, c1, c2, c3)
    u1 = tl.random.uint_to_uniform_float(r0)
    u2 = tl.random.uint_to_uniform_float(r1)
    normal, _ = tl.random.pair_uniform_to_normal(u1, u2)
    return normal


@triton.jit
def _unravel(index, size_2, size_3, size_4):
    """(i1, i2, i3, i4) of a row-major index into (*, size_2, size_3, size_4): i1 is left unbounded, so a caller
    that unravels a whole tensor splits it further into (batch, i1)."""
    i4 = index % size_4
    rest = index // size_4
    i3 = rest % size_3
    rest = rest // size_3
    i2 = rest % size_2
    return rest // size_2, i2, i3, i4


@triton.jit
def _strided_offset(batch, i1, i2, i3, i4, stride_0, stride_1, stride_2, stride_3, stride_4):
    return batch * stride_0 + i1 * stride_1 + i2 * stride_2 + i3 * stride_3 + i4 * stride_4


@triton.jit
def _float64(bits):
    """A float64 scalar passed as its int64 bit pattern: Triton hands Python floats to kernels as float32 (and
    its interpreter ignores float64 annotations), which would round eta or a clip range for float64 outputs."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _divide(numerator, denominator, MATH_FP64: tl.constexpr):
    """IEEE division (correctly rounded): div_rn in float32, where plain `/` may be approximate; float64 `/`
    is already exact and div_rn does not take float64."""
    if MATH_FP64:
        return numerator / denominator
    else:
        return tl.math.div_rn(numerator, denominator)


@triton.jit
def _step_coefficients(table_ptr, timestep_ptr, timestep, num_train_timesteps, eta, sample,
                       TIMESTEP_MODE: tl.constexpr, MATH_FP64: tl.constexpr):
    """(sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev, direction, std) for the `timestep` argument (mode 0),
    timestep_ptr[0] (mode 1) or timestep_ptr[sample] (mode 2, `sample` being the index of the one sample the
    calling program works on): computed in float64 once per program, never per element, and rounded once to the
    math dtype (float32, or float64 with MATH_FP64)."""
    if TIMESTEP_MODE == 0:
        t = timestep
    elif TIMESTEP_MODE == 1:
        t = tl.load(timestep_ptr)
    else:
        t = tl.load(timestep_ptr + sample)
    # A timestep outside the table has no coefficients: its results are NaN, never a neighbour's numbers.
    valid = (t >= 0) & (t < num_train_timesteps)
    row = table_ptr + tl.where(valid, t, 0).to(tl.int64) * TABLE_ROW_WIDTH
    nan = float("nan")
    # Coefficients in float64 (columns as in fastddim.schedule), the eta terms as fastddim.schedule.noise_scales.
    sqrt_alpha_t64 = tl.where(valid, tl.load(row + 0), nan)
    sqrt_beta_t64 = tl.load(row + 1)
    sqrt_alpha_prev64 = tl.where(valid, tl.load(row + 2), nan)
    beta_prev64 = tl.load(row + 3)
    variance64 = tl.load(row + 4)
    std64 = tl.sqrt(variance64) * eta
    radicand = beta_prev64 - std64 * std64
    # Below zero is rounding when eta <= 1; with eta > 1 it is a true NaN, as in diffusers.
    direction64 = tl.sqrt(tl.where(radicand < 0.0, tl.where(eta <= 1.0, 0.0, radicand), radicand))
    if MATH_FP64:
        math_dtype = tl.float64
    else:
        math_dtype = tl.float32
    return (sqrt_alpha_t64.to(math_dtype), sqrt_beta_t64.to(math_dtype), sqrt_alpha_prev64.to(math_dtype),
            direction64.to(math_dtype), std64.to(math_dtype))


@triton.jit
def _clamp(x, limit):
    """clamp(x, -limit, limit) for limit >= 0, NaN propagating as torch.clamp. Not tl.clamp: with
    propagate_nan=ALL it lowers to LLVM intrinsics the NVPTX backend lacks for some dtypes and versions (a tensor
    limit on triton 3.6, float64 on sm_90/sm_100 with triton 3.9); maximum-then-minimum is the same clamp."""
    return tl.minimum(tl.maximum(x, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _predicted_x0_eps(model_output_ptr, uncond_ptr, sample_ptr, stats_ptr, m_offsets, u_offsets, x_offsets,
                      sample, mask, sqrt_alpha_t, sqrt_beta_t, guidance_scale_bits, guidance_rescale_bits,
                      PREDICTION: tl.constexpr, GUIDANCE: tl.constexpr, MATH_FP64: tl.constexpr):
    """(x0, eps, x) of each element in the math dtype, before clipping or thresholding: the loads of the model
    output (guided when GUIDANCE != 0) and the sample, and the prediction-type algebra. Shared by the step
    kernel and the thresholding passes (kernels/threshold.py), so both see the same x0 bit for bit (all
    launched without contraction: LAUNCH_OPTIONS). With GUIDANCE == 2, `sample` is the index of the one sample
    the calling program works on."""
    if MATH_FP64:
        math_dtype = tl.float64
    else:
        math_dtype = tl.float32
    m = tl.load(model_output_ptr + m_offsets, mask=mask).to(math_dtype)
    x = tl.load(sample_ptr + x_offsets, mask=mask).to(math_dtype)
    if GUIDANCE != 0:
        # model_output holds the conditional prediction, uncond the unconditional one.
        u = tl.load(uncond_ptr + u_offsets, mask=mask).to(math_dtype)
        m = u + _float64(guidance_scale_bits).to(math_dtype) * (m - u)
        if GUIDANCE == 2:
            # The sample's float64 statistics, divided once per program.
            stats = stats_ptr + sample * 2
            rescaled = m * (tl.load(stats) / tl.load(stats + 1)).to(math_dtype)
            rescale = _float64(guidance_rescale_bits).to(math_dtype)
            m = rescale * rescaled + (1.0 - rescale) * m

    if PREDICTION == 0:
        x0 = _divide(x - sqrt_beta_t * m, sqrt_alpha_t, MATH_FP64)
        eps = m
    elif PREDICTION == 1:
        x0 = m
        eps = _divide(x - sqrt_alpha_t * m, sqrt_beta_t, MATH_FP64)
    else:
        x0 = sqrt_alpha_t * x - sqrt_beta_t * m
        eps = sqrt_alpha_t * m + sqrt_beta_t * x
    return x0, eps, x


@triton.jit
def _philox_noise(rng_ptr, rng_rows, batch, within, mask):
    """Each element's N(0, 1) noise from the generator buffer at rng_ptr: rng_rows (seed, offset) rows, one per
    sample or one for the whole batch (sample b then keys with seed + b), then the ticket row. The last program of
    the launch to get here adds 1 to every offset and puts the ticket back to 0, so the step needs no second launch
    to move the stream on."""
    batch = within * 0 + batch  # a program of one sample (SAMPLE_PROGRAMS) passes its index as a scalar
    shared = rng_rows == 1
    row = rng_ptr + tl.where(shared, 0, batch).to(tl.int64) * 2
    seed = tl.load(row, mask=mask, other=0) + tl.where(shared, batch, 0).to(tl.int64)
    offset = tl.load(row + 1, mask=mask, other=0)
    noise = _standard_normal(seed, offset, within)
    # Every thread of this program has loaded its offsets before the ticket is taken (the barrier), and every
    # program takes its ticket after its loads (acq_rel atomics), so the last ticket holder writes after all reads.
    tl.debug_barrier()
    ticket = rng_ptr + rng_rows.to(tl.int64) * 2
    programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
    if tl.atomic_add(ticket, 1) == programs - 1:
        rows = tl.arange(0, PHILOX_ROWS_PER_PASS)
        while tl.min(rows) < rng_rows:  # not range(): Triton 3.6's interpreter cannot range() over an argument
            tl.atomic_add(rng_ptr + rows.to(tl.int64) * 2 + 1, 1, mask=rows < rng_rows)
            rows += PHILOX_ROWS_PER_PASS
        tl.atomic_xchg(ticket, 0)
    return noise


@triton.jit(do_not_specialize=["timestep", "eta_bits", "x0_bound_bits", "guidance_scale_bits",
                               "guidance_rescale_bits", "rng_rows"])
def _ddim_step_kernel(
    model_output_ptr, uncond_ptr, sample_ptr, noise_ptr, prev_ptr, x0_ptr,
    table_ptr, timestep_ptr, rng_ptr, stats_ptr, threshold_ptr,
    timestep, num_train_timesteps, rng_rows,
    # x0_bound_bits: with CLIP, clip_sample_range; with THRESHOLD, the upper bound of the threshold s
    # (sample_max_value in the math dtype), which clamps the s the threshold passes found
    eta_bits, x0_bound_bits, guidance_scale_bits, guidance_rescale_bits,
    n_elements, batch_stride,  # batch_stride: elements per sample (the outputs' batch stride)
    size_1, size_2, size_3, size_4,
    m_stride_0, m_stride_1, m_stride_2, m_stride_3, m_stride_4,
    u_stride_0, u_stride_1, u_stride_2, u_stride_3, u_stride_4,
    x_stride_0, x_stride_1, x_stride_2, x_stride_3, x_stride_4,
    n_stride_0, n_stride_1, n_stride_2, n_stride_3, n_stride_4,
    PREDICTION: tl.constexpr,  # 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    TIMESTEP_MODE: tl.constexpr,  # 0 the `timestep` argument, 1 timestep_ptr[0], 2 timestep_ptr[batch index]
    NOISE: tl.constexpr,  # 0 none, 1 noise_ptr, 2 in-kernel Philox from the generator buffer at rng_ptr
    GUIDANCE: tl.constexpr,  # 0 none, 1 uncond + scale * (cond - uncond), 2 that rescaled by stats_ptr
    STRIDED: tl.constexpr,  # False: all tensors share one dense layout, index memory directly
    SAMPLE_PROGRAMS: tl.constexpr,  # each program covers a chunk of one sample (see sample_programs)
    INT64: tl.constexpr,  # offsets can pass 2**31 - 1
    MATH_FP64: tl.constexpr,
    WRITE_PREV: tl.constexpr,
    WRITE_X0: tl.constexpr,  # False when the caller computes pred_original_sample only if it is read
    THRESHOLD: tl.constexpr,  # clamp/divide x0 by the per-sample threshold_ptr[sample] (precedes CLIP)
    BLOCK: tl.constexpr,
):
    tl.static_assert(SAMPLE_PROGRAMS or (TIMESTEP_MODE != 2 and GUIDANCE != 2 and not THRESHOLD),
                     "per-sample values are read once per program: they need SAMPLE_PROGRAMS")
    eta = _float64(eta_bits)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    if SAMPLE_PROGRAMS:
        # Program pid covers chunk pid % chunks of sample pid // chunks (the last chunk of each sample masked),
        # so the sample's timestep, guidance statistics and threshold are scalars of the program.
        chunks = tl.cdiv(batch_stride, BLOCK)
        sample = pid // chunks
        within = (pid - sample * chunks) * BLOCK + tl.arange(0, BLOCK)
        mask = within < batch_stride
        offsets = sample * batch_stride + within
    else:
        sample = 0
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements

    if STRIDED:
        # Logical index (i0, ..., i4) of each element, then each input's own strides; outputs are contiguous.
        if SAMPLE_PROGRAMS:
            i1, i2, i3, i4 = _unravel(within, size_2, size_3, size_4)
            batch = sample
        else:
            rest, i2, i3, i4 = _unravel(offsets, size_2, size_3, size_4)
            i1 = rest % size_1
            batch = rest // size_1
        m_offsets = _strided_offset(batch, i1, i2, i3, i4, m_stride_0, m_stride_1, m_stride_2, m_stride_3, m_stride_4)
        u_offsets = _strided_offset(batch, i1, i2, i3, i4, u_stride_0, u_stride_1, u_stride_2, u_stride_3, u_stride_4)
        x_offsets = _strided_offset(batch, i1, i2, i3, i4, x_stride_0, x_stride_1, x_stride_2, x_stride_3, x_stride_4)
        n_offsets = _strided_offset(batch, i1, i2, i3, i4, n_stride_0, n_stride_1, n_stride_2, n_stride_3, n_stride_4)
        within = offsets - batch * (size_1 * size_2 * size_3 * size_4)  # the element's index within its sample
    else:
        m_offsets = offsets
        u_offsets = offsets
        x_offsets = offsets
        n_offsets = offsets
        # A dense layout whose batch dimension is outermost: sample b fills memory [b, b + 1) * batch_stride. The
        # launcher only takes this path for Philox noise when the layout is contiguous (logical == memory). Only
        # the Philox noise reads batch and within: elsewhere the compiler drops them.
        if SAMPLE_PROGRAMS:
            batch = sample
        else:
            batch = offsets // batch_stride
            within = offsets - batch * batch_stride

    sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev, direction, std = _step_coefficients(
        table_ptr, timestep_ptr, timestep, num_train_timesteps, eta, sample, TIMESTEP_MODE, MATH_FP64)
    if MATH_FP64:
        math_dtype = tl.float64
    else:
        math_dtype = tl.float32

    x0, eps, x = _predicted_x0_eps(model_output_ptr, uncond_ptr, sample_ptr, stats_ptr, m_offsets, u_offsets,
                                   x_offsets, sample, mask, sqrt_alpha_t, sqrt_beta_t, guidance_scale_bits,
                                   guidance_rescale_bits, PREDICTION, GUIDANCE, MATH_FP64)

    if THRESHOLD:
        # s from kernels/threshold.py, clamped here to [1, bound] as diffusers' torch.clamp does (comparisons
        # only: exact, NaN kept, which makes the whole sample NaN, as in torch; a threshold clamped before stays
        # as it is), then clamp(x0, -s, s) / s, the IEEE division as torch's.
        s = tl.load(threshold_ptr + sample).to(math_dtype)
        s = tl.where(s < 1.0, 1.0, s)
        bound = _float64(x0_bound_bits).to(math_dtype)
        s = tl.where(s > bound, bound, s)
        x0 = _divide(_clamp(x0, s), s, MATH_FP64)
    elif CLIP:
        x0 = _clamp(x0, _float64(x0_bound_bits).to(math_dtype))

    if USE_CLIPPED:
        eps = _divide(x - sqrt_alpha_t * x0, sqrt_beta_t, MATH_FP64)

    prev = sqrt_alpha_prev * x0 + direction * eps
    if NOISE == 1:
        noise = tl.load(noise_ptr + n_offsets, mask=mask).to(math_dtype)
        prev = prev + std * noise
    elif NOISE == 2:
        noise = _philox_noise(rng_ptr, rng_rows, batch, within, mask).to(math_dtype)
        prev = prev + std * noise

    if WRITE_PREV:
        tl.store(prev_ptr + offsets, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guidance_stats_kernel(
    cond_ptr, uncond_ptr, sums_ptr, guidance_scale_bits, per_sample,
    c_stride_0, c_stride_1, c_stride_2, c_stride_3, c_stride_4,
    u_stride_0, u_stride_1, u_stride_2, u_stride_3, u_stride_4,
    size_1, size_2, size_3, size_4,
    INT64: tl.constexpr,  # offsets can pass 2**31 - 1
    BLOCK: tl.constexpr,
):
    """Per-sample sums of cond, cond^2, cfg and cfg^2 (cfg = uncond + scale * (cond - uncond)) in float64 over a
    (batch, programs per sample) grid: each program accumulates every programs-th chunk of its sample in
    registers and adds its four sums with atomics. The std of each follows from its two sums."""
    sample = tl.program_id(0)
    program = tl.program_id(1)
    programs = tl.num_programs(1)
    if INT64:
        sample = sample.to(tl.int64)
    scale = _float64(guidance_scale_bits)
    n_chunks = tl.cdiv(per_sample, BLOCK)
    c_sum = tl.zeros([BLOCK], dtype=tl.float64)
    c_squares = tl.zeros([BLOCK], dtype=tl.float64)
    cfg_sum = tl.zeros([BLOCK], dtype=tl.float64)
    cfg_squares = tl.zeros([BLOCK], dtype=tl.float64)
    # A while loop: Triton's interpreter cannot run a `for` over runtime bounds with numpy >= 2.
    chunk = program
    while chunk < n_chunks:
        if INT64:
            within = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            within = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = within < per_sample
        i1, i2, i3, i4 = _unravel(within, size_2, size_3, size_4)
        c_offsets = _strided_offset(sample, i1, i2, i3, i4, c_stride_0, c_stride_1, c_stride_2, c_stride_3,
                                    c_stride_4)
        u_offsets = _strided_offset(sample, i1, i2, i3, i4, u_stride_0, u_stride_1, u_stride_2, u_stride_3,
                                    u_stride_4)
        c = tl.load(cond_ptr + c_offsets, mask=mask, other=0.0).to(tl.float64)
        u = tl.load(uncond_ptr + u_offsets, mask=mask, other=0.0).to(tl.float64)
        cfg = u + scale * (c - u)
        c_sum += c
        c_squares += c * c
        cfg_sum += cfg
        cfg_squares += cfg * cfg
        chunk += programs
    out = sums_ptr + sample * 4
    tl.atomic_add(out + 0, tl.sum(c_sum, axis=0))
    tl.atomic_add(out + 1, tl.sum(c_squares, axis=0))
    tl.atomic_add(out + 2, tl.sum(cfg_sum, axis=0))
    tl.atomic_add(out + 3, tl.sum(cfg_squares, axis=0))


# Whether Triton decorated the kernel for its interpreter (TRITON_INTERPRET=1 when this module was imported):
# only then can it run on CPU tensors.
INTERPRETED = type(_ddim_step_kernel).__name__ == "InterpretedFunction"


def is_dense(tensor: torch.Tensor) -> bool:
    """True if the tensor's elements fill its memory span exactly once (any dimension order, no gaps)."""
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(tensor.shape, tensor.stride()) if s != 1), key=lambda p: p[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _padded(values, fill):
    """Sizes or strides of a rank <= MAX_RANK tensor as MAX_RANK values, padding after the batch dimension (so
    the kernel's first index stays the batch index); a 0-d tensor counts as one sample."""
    values = tuple(values) or (fill,)
    return values[:1] + (fill,) * (MAX_RANK - len(values)) + values[1:]


def kernel_sizes(tensor, strided: bool) -> tuple:
    """A tensor's sizes as the kernels take them: MAX_RANK values (`_padded`) when they index it by strides
    (`strided`), ones otherwise (a flat offset indexes every tensor)."""
    return _padded(tensor.shape, 1) if strided else (1,) * MAX_RANK


def kernel_strides(tensor, strided: bool) -> tuple:
    """A tensor's strides as the kernels take them: MAX_RANK values (`_padded`) when they index it by strides
    (`strided`), zeros otherwise or for an absent tensor (None)."""
    return _padded(tensor.stride(), 0) if tensor is not None and strided else (0,) * MAX_RANK


def float64_bits(value: float) -> int:
    """The int64 bit pattern of a float64 (what the kernels' float64 scalar arguments take)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _max_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def needs_int64(n_elements: int, tensors) -> bool:
    """Whether element or memory offsets (plus a block of masked lanes) can pass the int32 range."""
    return max([n_elements - 1] + [_max_offset(t) for t in tensors]) > INT32_LIMIT - BLOCK_SIZE


def programs_per_sample(per_sample: int, batch: int, device: torch.device, block: int) -> int:
    """Programs per sample (grid axis 1) of the kernels that loop over a sample's chunks of `block` elements:
    enough to fill the GPU, at most one per chunk and at most CUDA's MAX_GRID_AXIS."""
    chunks = triton.cdiv(per_sample, block)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 3  # the interpreter: a few programs, so the per-program loops and the atomics are exercised
    return max(1, min(chunks, triton.cdiv(target, max(batch, 1)), MAX_GRID_AXIS))


def sample_programs(timestep_mode: int, guidance_mode: int, thresholding: bool) -> bool:
    """Whether the step kernel runs one sample per program (SAMPLE_PROGRAMS): whenever a per-sample value
    (timestep, guidance statistics, threshold) enters the math, so that it is loaded, and the coefficients are
    computed, once per program (float64 scalars) rather than per element."""
    return timestep_mode == TIMESTEP_PER_SAMPLE or guidance_mode == GUIDANCE_RESCALED or bool(thresholding)


def guidance_std_ratio(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """(std(cond), std(cfg)) per sample as a (batch, 2) float64 tensor, std over all but the batch dimension with
    Bessel's correction, as diffusers' `rescale_noise_cfg` takes it."""
    batch = cond.shape[0]
    per_sample = math.prod(cond.shape[1:])
    if cond.dim() > MAX_RANK:
        cond, uncond = cond.reshape(batch, per_sample), uncond.reshape(batch, per_sample)
    sums = torch.zeros(batch, 4, dtype=torch.float64, device=cond.device)
    sizes = _padded(cond.shape, 1)
    grid = (batch, programs_per_sample(per_sample, batch, cond.device, STATS_BLOCK_SIZE))
    _guidance_stats_kernel[grid](
        cond, uncond, sums, float64_bits(guidance_scale), per_sample,
        *_padded(cond.stride(), 0), *_padded(uncond.stride(), 0), *sizes[1:],
        INT64=needs_int64(cond.numel(), [cond, uncond]), BLOCK=STATS_BLOCK_SIZE, **LAUNCH_OPTIONS,
    )
    mean = sums[:, 0::2] / per_sample
    variance = (sums[:, 1::2] - per_sample * mean * mean) / (per_sample - 1)
    return variance.clamp(min=0).sqrt()


def output_layout(model_output, sample, uncond_output=None, variance_noise=None, philox=False) -> tuple[bool, bool]:
    """(shared_dense, needs_contiguous): whether the kernel may index all tensors by one flat memory offset (the
    outputs then take the inputs' layout), and whether the inputs must first be made contiguous (their rank
    exceeds what the strided indexing handles)."""
    present = [t for t in (model_output, sample, uncond_output, variance_noise) if t is not None]
    batch = sample.shape[0] if sample.dim() else 1
    shared_dense = (
        sample.dim() > 0
        and is_dense(sample)
        and all(t.stride() == sample.stride() for t in present)
        and (batch <= 1 or sample.stride(0) == math.prod(sample.shape[1:]))
        # The Philox stream is indexed by logical position, which equals the memory offset only when contiguous.
        and (not philox or sample.is_contiguous())
    )
    needs_contiguous = sample.dim() > MAX_RANK and not shared_dense
    return shared_dense or needs_contiguous, needs_contiguous


def allocate_outputs(model_output, sample, uncond_output=None, variance_noise=None, philox=False, write_prev=True,
                     write_x0=True):
    """The step's two outputs (None for one not written), whether the kernel may index all tensors by one flat
    memory offset, and the inputs (made contiguous when their rank exceeds what the strided indexing handles).
    Shared with the torch.compile fake implementation, so traced and real outputs have the same strides."""
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    inputs = [model_output, sample, uncond_output, variance_noise]
    shared_dense, needs_contiguous = output_layout(model_output, sample, uncond_output, variance_noise, philox)
    if needs_contiguous:
        inputs = [t.contiguous() if t is not None else None for t in inputs]
        sample = inputs[1]

    def allocate():
        if shared_dense:
            return torch.empty_like(sample, dtype=out_dtype)
        return torch.empty(sample.shape, dtype=out_dtype, device=sample.device)

    return (allocate() if write_prev else None, allocate() if write_x0 else None), shared_dense, inputs


class StepLauncher:
    """The fused step's launch for one specialization, prepared once: grid, constexprs and every scalar kernel
    argument that depends only on the options and the tensors' dtypes, shapes, strides and devices. A call
    allocates the outputs, fills in the data pointers and the timestep, and launches.

    Args:
        options (`fastddim.plan.StepOptions`): the step's settings (checked by the caller).
        model_output, sample, table, timestep, variance_noise, philox_state, uncond_output: tensors (and the
            timestep) with the properties of every later call's; see `ddim_step`. Only their dtypes, shapes,
            strides and devices are read here, and whether the timestep is an int, one timestep or one per sample.
        threshold_reduce (`Callable`, *optional*): for a thresholded sample sharded across processes, see
            `ddim_step`.

    Call it as `launcher(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output)` with
    tensors that have those properties (`fastddim.plan.PlanCache` keys on them); returns `(prev, x0)`. With
    thresholding, `thresholds=` takes per-sample thresholds already found (see `ddim_step`).
    """

    def __init__(self, options, model_output, sample, table, timestep, variance_noise=None, philox_state=None,
                 uncond_output=None, threshold_reduce=None):
        self.options = options
        self.threshold_reduce = threshold_reduce
        self.out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
        self.shared_dense, self.needs_contiguous = output_layout(model_output, sample, uncond_output,
                                                                 variance_noise, philox_state is not None)
        if self.needs_contiguous:
            model_output, sample, uncond_output, variance_noise = (
                t.contiguous() if t is not None else None for t in (model_output, sample, uncond_output,
                                                                     variance_noise))
        self.n_elements = n_elements = sample.numel()
        batch = sample.shape[0] if sample.dim() else 1
        # Elements per sample (the outputs' batch stride when the layout is shared and dense).
        self.per_sample = n_elements // batch if batch else 0
        self.int64 = needs_int64(n_elements, [t for t in (model_output, sample, uncond_output, variance_noise)
                                              if t is not None])
        self.math_fp64 = self.out_dtype == torch.float64
        if isinstance(timestep, torch.Tensor):
            self.timestep_mode = TIMESTEP_PER_SAMPLE if timestep.numel() > 1 else TIMESTEP_TENSOR
        else:
            self.timestep_mode = TIMESTEP_SCALAR
        self.noise_mode = (NOISE_TENSOR if variance_noise is not None else NOISE_PHILOX if philox_state is not None
                           else NOISE_NONE)
        self.guidance_mode = GUIDANCE_NONE
        if uncond_output is not None:
            self.guidance_mode = GUIDANCE_RESCALED if options.guidance_rescale != 0 else GUIDANCE_CFG

        strided = not self.shared_dense
        sizes = kernel_sizes(sample, strided)
        # Thresholded: the threshold passes, prepared once; the step kernel clamps their s to [1, bound] itself.
        self.threshold_plan = None
        x0_bound = options.clip_sample_range
        if options.thresholding:
            from .threshold import ThresholdPlan  # threshold.py builds on this module's helpers

            self.threshold_plan = ThresholdPlan(
                model_output, sample, table, self.timestep_mode, options.prediction_type,
                options.dynamic_thresholding_ratio, options.sample_max_value, uncond_output=uncond_output,
                guidance_mode=self.guidance_mode, guidance_scale=options.guidance_scale,
                guidance_rescale=options.guidance_rescale, shared_dense=self.shared_dense, int64=self.int64,
                math_fp64=self.math_fp64, reduce=threshold_reduce,
            )
            x0_bound = self.threshold_plan.bound
        # The kernel's scalar arguments after `timestep`, in parameter order.
        scalar_arguments = (
            table.shape[0], philox_state.shape[0] - 1 if philox_state is not None else 0,
            float64_bits(options.eta), float64_bits(x0_bound),
            float64_bits(options.guidance_scale), float64_bits(options.guidance_rescale),
            n_elements, self.per_sample, *sizes[1:], *kernel_strides(model_output, strided),
            *kernel_strides(uncond_output, strided), *kernel_strides(sample, strided),
            *kernel_strides(variance_noise, strided),
        )
        self.sample_programs = sample_programs(self.timestep_mode, self.guidance_mode, options.thresholding)
        if self.sample_programs:
            self.grid = (batch * triton.cdiv(self.per_sample, BLOCK_SIZE),)
        else:
            self.grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
        self.constexprs = dict(
            PREDICTION=PREDICTION_CODES[options.prediction_type],
            CLIP=bool(options.clip_sample),
            USE_CLIPPED=bool(options.use_clipped_model_output),
            TIMESTEP_MODE=self.timestep_mode,
            NOISE=self.noise_mode,
            GUIDANCE=self.guidance_mode,
            STRIDED=not self.shared_dense,
            SAMPLE_PROGRAMS=self.sample_programs,
            INT64=self.int64,
            MATH_FP64=self.math_fp64,
            WRITE_PREV=bool(options.write_prev_sample),
            WRITE_X0=bool(options.write_pred_original_sample),
            THRESHOLD=bool(options.thresholding),
            BLOCK=BLOCK_SIZE,
        )
        self.sources = self.argument_sources()
        # A launch's leading arguments, gathered in one C call from (model_output, uncond_output, sample,
        # variance_noise, prev, x0, table, timestep, philox_state, stats, threshold, timestep value, 0).
        self.gather = operator.itemgetter(*self.sources)
        self.prepared_launch = _step_launcher.prepare(self.constexprs, STEP_TENSORS, varying=(STEP_TENSORS,),
                                                      distinct=self.distinct_tensors())
        # Every argument after the gathered ones: the scalars, then the constexpr values (one tuple, passed on
        # as it is: a launch that unpacked two would cost about 0.25 us more).
        self.trailing_arguments = scalar_arguments + self.prepared_launch.constexpr_values
        # Nothing to do before the launch, outputs like the sample: `__call__`'s short path.
        self.plain = (self.shared_dense and not self.needs_contiguous and self.out_dtype == sample.dtype
                      and n_elements > 0 and not options.thresholding and self.guidance_mode != GUIDANCE_RESCALED)
        # What a step plan calls at every step: a function, which costs less to call than this object.
        self.run = self.plain_launch() if self.plain else self.launch

    def argument_sources(self) -> tuple[int, ...]:
        """Where each of the kernel's STEP_TENSORS + 1 leading arguments comes from: its position in the tuple a
        launch gathers, `(model_output, uncond_output, sample, variance_noise, prev, x0, table, timestep,
        philox_state, stats, threshold, timestep value, 0)`, which is the kernel's parameter order. An input the
        plan does not have takes a placeholder the kernel never reads: the sample for uncond and noise, each
        output for the other, the table for the rest; the timestep value is 0 when the timestep is a tensor."""
        options = self.options
        return (
            0,
            1 if self.guidance_mode != GUIDANCE_NONE else 2,
            2,
            3 if self.noise_mode == NOISE_TENSOR else 2,
            4 if options.write_prev_sample else 5,
            5 if options.write_pred_original_sample else 4,
            6,
            6 if self.timestep_mode == TIMESTEP_SCALAR else 7,
            8 if self.noise_mode == NOISE_PHILOX else 6,
            9 if self.guidance_mode == GUIDANCE_RESCALED else 6,
            10 if options.thresholding else 6,
            11 if self.timestep_mode == TIMESTEP_SCALAR else 12,
        )

    def distinct_tensors(self) -> tuple[int, ...]:
        """The positions, among the kernel's STEP_TENSORS leading arguments, of the tensors this plan's launches
        pass in their own right; every other position repeats one of them as a placeholder (`argument_sources`),
        so the direct launcher reads the alignment of these alone."""
        return tuple(slot for slot, source in enumerate(self.sources[:STEP_TENSORS]) if source == slot)

    def allocate(self, sample: torch.Tensor) -> torch.Tensor:
        if self.shared_dense:
            return torch.empty_like(sample, dtype=self.out_dtype)
        return torch.empty(sample.shape, dtype=self.out_dtype, device=sample.device)

    def __call__(self, model_output, sample, table, timestep, variance_noise=None, philox_state=None,
                 uncond_output=None, thresholds=None):
        if self.plain:
            return self.run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output)
        return self.launch(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output,
                           thresholds)

    def plain_launch(self):
        """`launch` for a plan with nothing to do before the launch and outputs like the sample (`plain`), as a
        function of the step's tensors holding everything else: the common case, kept short (it runs at every
        step)."""
        gather, trailing_arguments = self.gather, self.trailing_arguments
        grid, prepared = self.grid, self.prepared_launch
        write_prev, write_x0 = self.options.write_prev_sample, self.options.write_pred_original_sample
        scalar_timestep = self.timestep_mode == TIMESTEP_SCALAR
        empty_like = torch.empty_like

        def run(model_output, sample, table, timestep, variance_noise=None, philox_state=None, uncond_output=None):
            prev = empty_like(sample) if write_prev else None
            x0 = empty_like(sample) if write_x0 else None
            arguments = gather((model_output, uncond_output, sample, variance_noise, prev, x0, table, timestep,
                                philox_state, table, table, int(timestep) if scalar_timestep else 0, 0))
            # The launcher and the kernel are looked up per call: ones replaced at run time (a test's launch
            # recorder) are the ones used.
            _step_launcher.launch(_ddim_step_kernel, grid, arguments + trailing_arguments, prepared)
            return prev, x0

        return run

    def launch(self, model_output, sample, table, timestep, variance_noise=None, philox_state=None,
               uncond_output=None, thresholds=None):
        """Every case of `__call__`: inputs made contiguous, outputs in another dtype or layout, an empty sample,
        the guidance statistics and the threshold found first."""
        options = self.options
        if self.needs_contiguous:
            model_output, sample, uncond_output, variance_noise = (
                t.contiguous() if t is not None else None for t in (model_output, sample, uncond_output,
                                                                     variance_noise))
        prev = self.allocate(sample) if options.write_prev_sample else None
        x0 = self.allocate(sample) if options.write_pred_original_sample else None
        if self.timestep_mode == TIMESTEP_SCALAR:
            timestep_arg, timestep_ptr = int(timestep), table
        else:
            timestep_arg, timestep_ptr = 0, timestep
        if self.n_elements == 0:
            if philox_state is not None:
                philox_state[:-1, 1].add_(1)  # a step moves the stream on even when it has nothing to draw
            if options.thresholding and self.threshold_reduce is not None:
                # An empty shard still takes part in the collectives of the other shards' thresholds.
                from .threshold import sample_thresholds

                sample_thresholds(model_output, sample, table, timestep, options.prediction_type,
                                  options.dynamic_thresholding_ratio, options.sample_max_value, uncond_output,
                                  options.guidance_scale, options.guidance_rescale, reduce=self.threshold_reduce)
            return prev, x0
        stats = table
        if self.guidance_mode == GUIDANCE_RESCALED:
            stats = guidance_std_ratio(model_output, uncond_output, options.guidance_scale)
        threshold = table
        if options.thresholding and thresholds is not None:
            threshold = thresholds
        elif options.thresholding:
            threshold = self.threshold_plan(model_output, sample, table, timestep_arg, timestep_ptr, uncond_output,
                                            stats, clamped=False)
        arguments = self.gather((model_output, uncond_output, sample, variance_noise, prev, x0, table, timestep_ptr,
                                 philox_state, stats, threshold, timestep_arg, 0)) + self.trailing_arguments
        # The kernel is looked up per call: one replaced at run time (a test's launch recorder) is launched.
        _step_launcher.launch(_ddim_step_kernel, self.grid, arguments, self.prepared_launch)
        return prev, x0


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep=None, options=None,
              variance_noise: torch.Tensor | None = None, philox_state: torch.Tensor | None = None,
              uncond_output: torch.Tensor | None = None, threshold_reduce=None, thresholds: torch.Tensor | None = None,
              **option_values) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fused DDIM step on the Triton kernel; returns `(prev_sample, pred_original_sample)`.

    Args:
        model_output, sample: tensors of one shape and device; float16, bfloat16, float32 or float64, any
            strides. Outputs take their promoted dtype and, when the inputs share one dense layout with the batch
            outermost (contiguous, channels_last, ...), that layout; otherwise they are contiguous.
        table: the float64 `fastddim.schedule.step_table` on the tensors' device.
        timestep: an int, a one-element integer tensor on the device, or a (batch,) integer tensor on the device
            (one timestep per sample). Timesteps outside the table give NaN. None: `table` is one table row.
        options (`fastddim.plan.StepOptions`, *optional*): the step's settings (eta, prediction_type, clip_sample,
            clip_sample_range, use_clipped_model_output, guidance_scale, guidance_rescale, thresholding,
            dynamic_thresholding_ratio, sample_max_value, write_prev_sample, write_pred_original_sample); or
            pass those as keywords (`option_values`). With thresholding, the per-sample threshold is found exactly
            by the radix-select passes of `kernels/threshold.py` (which read the inputs again, never a stored x0).
        variance_noise: standard normal noise of the sample's shape, or None (with philox_state None too, a step
            with eta > 0 returns the mean of x_{t-1}: no noise term).
        philox_state: instead of variance_noise, a `PhiloxGenerator.buffer` on the device: an int64 tensor of
            (rows + 1, 2): (seed, offset) rows, one per sample or one for the batch, then a ticket row of zeros. The
            kernel draws the noise itself (see `fastddim.reference.philox_normal`) and, in the same launch, adds 1
            to every offset.
        uncond_output: classifier-free guidance fused into the step: the model output used is
            uncond + scale * (model_output - uncond), rescaled as diffusers' `rescale_noise_cfg` when
            guidance_rescale > 0.
        threshold_reduce: for a sample sharded across processes, `reduce(tensor, op)` all-reduces ("sum" or
            "max") the threshold's per-sample counts in place (see `kernels.threshold.ThresholdPlan`).
        thresholds: with thresholding, the per-sample thresholds `sample_thresholds` already found for these
            inputs (the autograd forward keeps its order statistics for the backward); None: found here.
    """
    if options is None:
        options = StepOptions(**option_values)
    elif option_values:
        raise TypeError("pass the step's settings either as options or as keywords, not both")
    table, timestep = as_table(table, timestep)
    launcher = StepLauncher(options, model_output, sample, table, timestep, variance_noise, philox_state,
                            uncond_output, threshold_reduce)
    return launcher(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output,
                    thresholds=thresholds)


_step_launcher = DirectLauncher(_ddim_step_kernel, LAUNCH_OPTIONS)
# The step kernel's leading tensor arguments (model_output ... threshold_ptr): their dtypes are fixed per step
# plan, so the direct launcher keys a plan's launches on their alignment alone (see DirectLauncher.launch_key);
# the argument after them, the timestep, is the only other one that changes between a plan's launches.
STEP_TENSORS = 11
