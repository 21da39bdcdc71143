"""The DDIM step in plain torch: the CPU path and the Triton kernels' correctness oracle.

The same math as kernels/ddim.py, written for clarity and for few passes over memory: it computes in float32
(float64 for float64 inputs) and rounds once to the output dtype, where diffusers rounds every intermediate to
the input dtype. It never writes to its inputs. A host (Python int) timestep takes its coefficients as Python
floats from a CPU table; a tensor timestep (one, or one per sample) gathers them on the device, so the step
needs no host read and traces under torch.compile.
"""

from __future__ import annotations

import array
import math

import torch

from fastddim import threshold as _threshold
from fastddim.plan import PREDICTION_TYPES, StepOptions
from fastddim.schedule import (
    BETA_PREV, SQRT_ALPHA_PREV, SQRT_ALPHA_T, SQRT_BETA_T, VARIANCE, as_table, noise_scales,
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step math runs in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def threshold(x0: torch.Tensor, ratio: float, max_value: float, process_group=None) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max_value);
    returns clamp(x0, -s, s) / s. `x0` is float32 or float64, with the batch as its first dimension. s is
    torch.quantile's, bit for bit, for any size (see fastddim.threshold); `process_group`: the samples are
    sharded across its processes, s is that of the whole samples."""
    return _threshold.threshold(x0, ratio, max_value, process_group)


def guided_output(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Classifier-free guidance in `dtype`: uncond + scale * (cond - uncond), then diffusers' `rescale_noise_cfg`
    (per-sample std over all but the batch dimension, Bessel-corrected) when guidance_rescale > 0."""
    c = cond.to(dtype)
    u = uncond.to(dtype)
    guided = u + guidance_scale * (c - u)
    if guidance_rescale != 0:
        # Statistics in float64, as the kernel accumulates them.
        dims = list(range(1, guided.dim()))
        std_cond = c.to(torch.float64).std(dim=dims, keepdim=True)
        guided64 = u.to(torch.float64) + guidance_scale * (c.to(torch.float64) - u.to(torch.float64))
        std_cfg = guided64.std(dim=dims, keepdim=True)
        rescaled = guided * (std_cond / std_cfg).to(dtype)
        guided = guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided
    return guided


# Philox4x32-10 and Box-Muller exactly as Triton's tl.random does them (the kernels call those), in int64 torch.
_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant `a` and uint32 values `b` (in int64)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    part_hi, part_lo = a * b_hi, a * b_lo  # each < 2**48: no int64 overflow
    high = (part_hi + (part_lo >> 16)) >> 16
    low = (((part_hi & 0xFFFF) << 16) + part_lo) & _MASK32
    return high, low


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC 2011) on int64 tensors holding uint32 words; returns the 4 output words."""
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """A uint32 word to a float32 in [0, 1), as tl.random.uint_to_uniform_float (via its int32 bit pattern)."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_normal(philox_state: torch.Tensor, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The standard normal noise the kernel draws for a tensor of `shape` (batch first; a 0-d shape is one
    sample) from `philox_state`, an int64 (rows, 2) tensor of (seed, offset) rows, one per sample or one for the
    whole batch. Element i (row-major within its sample) of sample b gets Philox4x32-10(key = seed_b, counter block =
    (i_lo, i_hi, offset_lo, offset_hi)), whose first two words become one normal by Box-Muller in float32, as in
    `tl.randn`. With one row, sample b uses seed + b (64-bit wrap-around) and the row's offset."""
    shape = tuple(shape)
    batch = shape[0] if shape else 1
    per_sample = math.prod(shape[1:])
    seed, offset = philox_state[:, 0:1], philox_state[:, 1:2]
    if philox_state.shape[0] == 1:
        seed = seed + torch.arange(batch, device=philox_state.device, dtype=torch.int64)[:, None]
    index = torch.arange(per_sample, device=philox_state.device, dtype=torch.int64)[None, :]
    r0, r1, _, _ = philox4x32_10(
        index & _MASK32, (index >> 32) & _MASK32, offset & _MASK32, (offset >> 32) & _MASK32,
        seed & _MASK32, (seed >> 32) & _MASK32,
    )
    u1 = torch.clamp(_uniform(r0), min=1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform(r1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return (radius * torch.cos(theta)).to(dtype).reshape(shape)


def philox_step_noise(philox_state: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A step's noise from a generator buffer (`PhiloxGenerator.buffer`: the (seed, offset) rows, then the
    kernel's ticket row), after which every offset moves on by one, in place, as the kernel moves them."""
    rows = philox_state[:-1]
    noise = philox_normal(rows, shape, dtype)
    rows[:, 1].add_(1)
    return noise


def _coefficients(table: torch.Tensor, timestep, eta: float, ndim: int, dtype: torch.dtype):
    """(sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev, direction, std): Python floats for an int timestep, tensors
    shaped to broadcast over the batch for a tensor timestep (NaN for timesteps outside the table)."""
    if not isinstance(timestep, torch.Tensor):
        row = table[int(timestep)]
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        std, direction = noise_scales(row, eta)
        values = (row[SQRT_ALPHA_T], row[SQRT_BETA_T], row[SQRT_ALPHA_PREV], direction, std)
        # Rounded to the math dtype, as the tensor path and the kernel use them.
        return tuple(array.array("f" if dtype == torch.float32 else "d", values))
    t = timestep.reshape(-1).to(table.device)
    valid = (t >= 0) & (t < table.shape[0])
    rows = table[t.clamp(0, table.shape[0] - 1)]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=table.device)
    std = rows[:, VARIANCE].sqrt() * eta
    radicand = rows[:, BETA_PREV] - std * std
    direction = torch.where((radicand < 0) & (eta <= 1), torch.zeros_like(radicand), radicand).sqrt()
    columns = (torch.where(valid, rows[:, SQRT_ALPHA_T], nan), rows[:, SQRT_BETA_T],
               torch.where(valid, rows[:, SQRT_ALPHA_PREV], nan), direction, std)
    shape = (-1,) + (1,) * (ndim - 1)
    return tuple(c.to(dtype).view(shape) for c in columns)


def _sub_scaled(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """a - scale * b in one fused pass; a Python-number scale and a tensor one round identically."""
    if isinstance(scale, float):
        return torch.sub(a, b, alpha=scale)
    return torch.addcmul(a, b, -scale)


def _sub_scaled_(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """a - scale * b, in place on `a`, which must be a fresh tensor."""
    if isinstance(scale, float):
        return a.sub_(b, alpha=scale)
    return a.addcmul_(b, -scale)


def _add_scaled(a: torch.Tensor, b: torch.Tensor, scale) -> torch.Tensor:
    """a + scale * b, in place on `a`, which must be a fresh tensor."""
    if isinstance(scale, float):
        return a.add_(b, alpha=scale)
    return a.addcmul_(b, scale)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    table: torch.Tensor,
    timestep=None,
    options: StepOptions | None = None,
    variance_noise: torch.Tensor | None = None,
    philox_state: torch.Tensor | None = None,
    uncond_output: torch.Tensor | None = None,
    process_group=None,
    **option_values,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One DDIM step; returns `(prev_sample, pred_original_sample)` in the promoted dtype of the inputs (None for
    an output not asked for).

    Arguments as `fastddim.kernels.ddim_step` (the settings as `options`, a `fastddim.plan.StepOptions`, or as
    keywords); `table` is `fastddim.schedule.step_table`, on the CPU (or a list of its rows) for an int timestep,
    on the timestep's device otherwise. `process_group`: with thresholding, the samples are sharded across its
    processes. Arguments are trusted: `fastddim.ops.ddim_step` checks them.
    """
    if options is None:
        options = StepOptions(**option_values)
    elif option_values:
        raise TypeError("pass the step's settings either as options or as keywords, not both")
    eta, prediction_type, guidance_scale, guidance_rescale = (
        options.eta, options.prediction_type, options.guidance_scale, options.guidance_rescale)
    clip_sample, clip_sample_range, use_clipped_model_output = (
        options.clip_sample, options.clip_sample_range, options.use_clipped_model_output)
    thresholding, dynamic_thresholding_ratio, sample_max_value = (
        options.thresholding, options.dynamic_thresholding_ratio, options.sample_max_value)
    write_prev_sample, write_pred_original_sample = options.write_prev_sample, options.write_pred_original_sample
    table, timestep = as_table(table, timestep)
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    math_dtype = compute_dtype(out_dtype)
    sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev, direction, std = _coefficients(
        table, timestep, eta, sample.dim(), math_dtype)
    if uncond_output is not None:
        m = guided_output(model_output, uncond_output, guidance_scale, guidance_rescale, math_dtype)
    else:
        m = model_output if model_output.dtype == math_dtype else model_output.to(math_dtype)
    x = sample if sample.dtype == math_dtype else sample.to(math_dtype)

    # Every tensor below is freshly allocated unless noted, so the in-place ops never touch an input.
    if prediction_type == "epsilon":
        x0 = _sub_scaled(x, m, sqrt_beta_t).div_(sqrt_alpha_t)
        eps = m
    elif prediction_type == "sample":
        x0 = m  # may be an input (or its upcast copy): only out-of-place ops on it below
        eps = _sub_scaled(x, m, sqrt_alpha_t).div_(sqrt_beta_t)
    elif prediction_type == "v_prediction":
        x0 = _sub_scaled_(torch.mul(x, sqrt_alpha_t), m, sqrt_beta_t)
        eps = _add_scaled(torch.mul(m, sqrt_alpha_t), x, sqrt_beta_t)
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    if thresholding:
        x0 = threshold(x0, dynamic_thresholding_ratio, sample_max_value, process_group)
    elif clip_sample:
        if x0 is model_output:
            x0 = torch.clamp(x0, -clip_sample_range, clip_sample_range)
        else:
            x0 = x0.clamp_(-clip_sample_range, clip_sample_range)

    if not write_prev_sample:
        if philox_state is not None:
            philox_state[:-1, 1].add_(1)  # a step moves the stream on whatever it writes, as the kernel does
        return None, (x0.clone() if x0 is model_output else x0).to(out_dtype)

    if use_clipped_model_output:
        eps = _sub_scaled(x, x0, sqrt_alpha_t).div_(sqrt_beta_t)

    prev = _add_scaled(torch.mul(x0, sqrt_alpha_prev), eps, direction)
    if variance_noise is not None:
        prev = _add_scaled(prev, variance_noise.to(math_dtype), std)
    elif philox_state is not None:
        prev = _add_scaled(prev, philox_step_noise(philox_state, sample.shape, math_dtype), std)

    if prev.dtype != out_dtype:
        prev = prev.to(out_dtype)
    if not write_pred_original_sample:
        return prev, None
    if x0 is model_output:
        x0 = x0.clone()
    return prev, (x0 if x0.dtype == out_dtype else x0.to(out_dtype))
