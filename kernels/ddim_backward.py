"""Fused backward of the DDIM step: Triton kernel and launcher.

One pass reads the gradients of prev_sample and pred_original_sample and the step's inputs (model_output, or the
two guidance predictions, and sample) and writes the gradients of model_output, uncond_output, sample and
variance_noise. The step is linear in its inputs except for clipping and thresholding, so the pass recomputes x0
with the forward's own helpers (kernels/ddim.py) only to evaluate torch.clamp's gradient mask (1 where
min <= x0 <= max, inclusive, else 0; NaN gets 0) and, with thresholding, the gradient of the per-sample threshold
s: diffusers' s = clamp(torch.quantile(|x0|, ratio), 1, sample_max_value) passes gradient into the two order
statistics the quantile interpolates. The pass accumulates d loss / d s per sample (float64 atomics) and finds the
order statistics' positions (the first element whose |x0| has their bit pattern: with ties torch's sort also
hands the gradient to one element); a few torch ops on (batch, 2) tensors then add their share to the two
elements. Math is float32 (float64 for float64 inputs); gradients take the dtype of their input. Arguments are
trusted here: `fastddim.autograd` calls this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddim.schedule import SQRT_ALPHA_T, SQRT_BETA_T, as_table
from fastddim.threshold import window_bits

from .ddim import (
    BLOCK_SIZE, GUIDANCE_CFG, GUIDANCE_NONE, GUIDANCE_RESCALED, LAUNCH_OPTIONS, PREDICTION_CODES,
    TIMESTEP_PER_SAMPLE, TIMESTEP_SCALAR, TIMESTEP_TENSOR, _clamp, _divide, _float64, _predicted_x0_eps,
    _step_coefficients, float64_bits,
    guidance_std_ratio,
)
from .threshold import _abs_bits

# Order statistic positions are stored as within-sample index * 4 + sign code (0 positive, 1 negative, 2 zero or
# NaN), so one atomic minimum keeps the first matching element together with the sign of its x0.
_NO_POSITION = torch.iinfo(torch.int64).max


@triton.jit(do_not_specialize=["timestep", "eta_bits", "clip_range_bits", "guidance_scale_bits",
                               "guidance_rescale_bits", "per_sample"])
def _ddim_step_backward_kernel(
    grad_prev_ptr, grad_x0_ptr, model_output_ptr, uncond_ptr, sample_ptr,
    grad_model_ptr, grad_uncond_ptr, grad_sample_ptr, grad_noise_ptr,
    table_ptr, timestep_ptr, stats_ptr, threshold_ptr, order_ptr, grad_threshold_ptr, position_ptr,
    timestep, num_train_timesteps, eta_bits, clip_range_bits, guidance_scale_bits, guidance_rescale_bits,
    per_sample, batch_size,
    PREDICTION: tl.constexpr,  # 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    TIMESTEP_MODE: tl.constexpr,  # as the step kernel
    GUIDANCE: tl.constexpr,  # as the step kernel; 2 (rescaled): grad_model_ptr gets the guided output's gradient
    THRESHOLD: tl.constexpr,
    HAS_GRAD_PREV: tl.constexpr,
    HAS_GRAD_X0: tl.constexpr,
    WRITE_MODEL: tl.constexpr,
    WRITE_UNCOND: tl.constexpr,
    WRITE_SAMPLE: tl.constexpr,
    WRITE_NOISE: tl.constexpr,
    INT64: tl.constexpr,
    MATH_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (chunks of a sample, batch): every program stays within one sample, so its share of d loss / d s is
    one sum. All tensors are contiguous."""
    eta = _float64(eta_bits)
    sample_index = tl.program_id(1)
    if INT64:
        within = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        offsets = sample_index.to(tl.int64) * per_sample + within
    else:
        within = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offsets = sample_index * per_sample + within
    mask = within < per_sample
    batch = within * 0 + sample_index

    sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev, direction, std = _step_coefficients(
        table_ptr, timestep_ptr, timestep, num_train_timesteps, eta, sample_index, TIMESTEP_MODE, MATH_FP64)
    if MATH_FP64:
        math_dtype = tl.float64
    else:
        math_dtype = tl.float32

    if HAS_GRAD_PREV:
        grad_prev = tl.load(grad_prev_ptr + offsets, mask=mask, other=0.0).to(math_dtype)
    else:
        grad_prev = tl.zeros([BLOCK], dtype=math_dtype)
    if HAS_GRAD_X0:
        grad_x0 = tl.load(grad_x0_ptr + offsets, mask=mask, other=0.0).to(math_dtype)
    else:
        grad_x0 = tl.zeros([BLOCK], dtype=math_dtype)

    # prev = sqrt_alpha_prev * x0 + direction * eps (+ std * noise), x0 clipped or thresholded.
    grad_clipped = grad_x0 + sqrt_alpha_prev * grad_prev
    grad_eps = direction * grad_prev
    grad_sample = tl.zeros([BLOCK], dtype=math_dtype)
    if USE_CLIPPED:
        # eps = (x - sqrt_alpha_t * clipped x0) / sqrt_beta_t replaces the model's eps.
        through = _divide(grad_eps, sqrt_beta_t, MATH_FP64)
        grad_sample = through
        grad_clipped = grad_clipped - sqrt_alpha_t * through
        grad_eps = tl.zeros([BLOCK], dtype=math_dtype)

    if CLIP or THRESHOLD:
        x0, _, _ = _predicted_x0_eps(model_output_ptr, uncond_ptr, sample_ptr, stats_ptr, offsets, offsets, offsets,
                                     sample_index, mask, sqrt_alpha_t, sqrt_beta_t, guidance_scale_bits,
                                     guidance_rescale_bits, PREDICTION, GUIDANCE, MATH_FP64)
        if THRESHOLD:
            # y = clamp(x0, -s, s) / s: torch's gradients of the division and of clamp with tensor bounds.
            s = tl.load(threshold_ptr + sample_index).to(math_dtype)
            thresholded = _divide(_clamp(x0, s), s, MATH_FP64)
            grad_clamped = _divide(grad_clipped, s, MATH_FP64)
            zero = tl.zeros([BLOCK], dtype=math_dtype)
            grad_s = (tl.where(x0 > s, grad_clamped, zero) - tl.where(x0 < -s, grad_clamped, zero)
                      - grad_clipped * _divide(thresholded, s, MATH_FP64))
            grad_s = tl.where(mask, grad_s, zero)
            tl.atomic_add(grad_threshold_ptr + sample_index, tl.sum(grad_s.to(tl.float64), axis=0))
            grad_raw = tl.where((x0 >= -s) & (x0 <= s), grad_clamped, zero)
            # The positions of the order statistics torch.quantile interpolates (their |x0| bit patterns).
            bits = _abs_bits(x0, MATH_FP64)
            lower_bits = _abs_bits(tl.load(order_ptr + sample_index).to(math_dtype), MATH_FP64)
            upper_bits = _abs_bits(tl.load(order_ptr + batch_size + sample_index).to(math_dtype), MATH_FP64)
            sign_code = tl.where(x0 > 0, 0, tl.where(x0 < 0, 1, 2))
            key = within.to(tl.int64) * 4 + sign_code
            tl.atomic_min(position_ptr + batch * 2, key, mask=mask & (bits == lower_bits))
            tl.atomic_min(position_ptr + batch * 2 + 1, key, mask=mask & (bits == upper_bits))
        else:
            limit = _float64(clip_range_bits).to(math_dtype)
            grad_raw = tl.where((x0 >= -limit) & (x0 <= limit), grad_clipped, tl.zeros([BLOCK], dtype=math_dtype))
    else:
        grad_raw = grad_clipped

    # The prediction-type algebra of kernels.ddim._predicted_x0_eps, transposed.
    if PREDICTION == 0:  # x0 = (x - sqrt_beta_t * m) / sqrt_alpha_t, eps = m
        through = _divide(grad_raw, sqrt_alpha_t, MATH_FP64)
        grad_sample = grad_sample + through
        grad_model = grad_eps - sqrt_beta_t * through
    elif PREDICTION == 1:  # x0 = m, eps = (x - sqrt_alpha_t * m) / sqrt_beta_t
        through = _divide(grad_eps, sqrt_beta_t, MATH_FP64)
        grad_sample = grad_sample + through
        grad_model = grad_raw - sqrt_alpha_t * through
    else:  # x0 = sqrt_alpha_t * x - sqrt_beta_t * m, eps = sqrt_alpha_t * m + sqrt_beta_t * x
        grad_sample = grad_sample + sqrt_alpha_t * grad_raw + sqrt_beta_t * grad_eps
        grad_model = sqrt_alpha_t * grad_eps - sqrt_beta_t * grad_raw

    if GUIDANCE == 1:  # m = uncond + scale * (cond - uncond)
        guidance_scale = _float64(guidance_scale_bits).to(math_dtype)
        grad_cond = guidance_scale * grad_model
        if WRITE_UNCOND:
            tl.store(grad_uncond_ptr + offsets, (grad_model - grad_cond).to(grad_uncond_ptr.dtype.element_ty),
                     mask=mask)
        grad_model = grad_cond
    if WRITE_MODEL:
        tl.store(grad_model_ptr + offsets, grad_model.to(grad_model_ptr.dtype.element_ty), mask=mask)
    if WRITE_SAMPLE:
        tl.store(grad_sample_ptr + offsets, grad_sample.to(grad_sample_ptr.dtype.element_ty), mask=mask)
    if WRITE_NOISE:
        tl.store(grad_noise_ptr + offsets, (std * grad_prev).to(grad_noise_ptr.dtype.element_ty),
                 mask=mask)


def _x0_weights(prediction_type: str, sqrt_alpha_t: torch.Tensor, sqrt_beta_t: torch.Tensor):
    """(d x0 / d m, d x0 / d sample) per sample, for the unclipped x0 of `prediction_type`."""
    if prediction_type == "epsilon":
        return -sqrt_beta_t / sqrt_alpha_t, 1 / sqrt_alpha_t
    if prediction_type == "sample":
        return torch.ones_like(sqrt_alpha_t), torch.zeros_like(sqrt_alpha_t)
    return -sqrt_beta_t, sqrt_alpha_t


def _add_order_statistic_gradients(grads, grad_threshold, positions, order_statistics, table, timestep, batch,
                                   prediction_type, sample_max_value, guidance_scale, guidance_mode, math_dtype):
    """torch.quantile's gradient: d loss / d s, through clamp(q, 1, sample_max_value) (1 where 1 <= q <= max)
    and q = lerp(lower, upper, weight), into |x0| of the two order statistics, then into the inputs there."""
    grad_model, grad_uncond, grad_sample = grads
    lower, upper, weight = order_statistics
    q = torch.lerp(lower, upper, weight)
    bound = window_bits(sample_max_value, math_dtype)[2]
    grad_q = torch.where((q >= 1) & (q <= bound), grad_threshold.to(math_dtype), 0)
    found = positions != _NO_POSITION
    keys = torch.where(found, positions, 0)
    signs = torch.tensor([1.0, -1.0, 0.0], dtype=math_dtype, device=keys.device)[keys % 4]
    shares = torch.stack([1 - weight, weight.expand(batch)], dim=1)
    grad_abs = torch.where(found, grad_q.unsqueeze(1) * shares * signs, 0)  # (batch, 2)
    if isinstance(timestep, torch.Tensor):
        rows = table[timestep.reshape(-1).clamp(0, table.shape[0] - 1)].expand(batch, -1)
    else:
        rows = table[int(timestep)].expand(batch, -1)
    weight_model, weight_sample = _x0_weights(prediction_type, rows[:, SQRT_ALPHA_T].to(math_dtype),
                                              rows[:, SQRT_BETA_T].to(math_dtype))
    index = (torch.arange(batch, device=keys.device).unsqueeze(1).expand(batch, 2), keys // 4)
    if grad_sample is not None:
        grad_sample.view(batch, -1).index_put_(index, (grad_abs * weight_sample.unsqueeze(1)).to(grad_sample.dtype),
                                              accumulate=True)
    grad_m = grad_abs * weight_model.unsqueeze(1)
    if guidance_mode == GUIDANCE_CFG:
        grad_cond = guidance_scale * grad_m
        if grad_uncond is not None:
            grad_uncond.view(batch, -1).index_put_(index, (grad_m - grad_cond).to(grad_uncond.dtype), accumulate=True)
        grad_m = grad_cond
    if grad_model is not None:
        grad_model.view(batch, -1).index_put_(index, grad_m.to(grad_model.dtype), accumulate=True)


def ddim_step_backward(
    grad_prev_sample: torch.Tensor | None,
    grad_pred_original_sample: torch.Tensor | None,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    table: torch.Tensor,
    timestep=None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    thresholds: torch.Tensor | None = None,
    order_statistics: torch.Tensor | None = None,
    sample_max_value: float = 1.0,
    needs_input_grad=(True, True, True, True),
):
    """Gradients of `kernels.ddim.ddim_step`'s outputs with respect to its inputs, in one fused pass.

    Args:
        grad_prev_sample, grad_pred_original_sample: the gradients of the step's two outputs (None: zero).
        model_output, sample, table, timestep, eta, prediction_type, clip_sample, clip_sample_range,
            use_clipped_model_output, uncond_output, guidance_scale, guidance_rescale: the step's arguments, as
            `kernels.ddim.ddim_step` took them.
        thresholds, order_statistics: for a thresholded step, the per-sample s and the (3, batch) lower order
            statistic, upper order statistic and interpolation weight that `sample_thresholds(...,
            return_order_statistics=True)` returned for these inputs (None: no thresholding).
        sample_max_value: the thresholding bound (clamp(q, 1, sample_max_value) passes gradient where inclusive).
        needs_input_grad: which of (model_output, sample, uncond_output, variance_noise) need a gradient.

    Returns:
        `(grad_model_output, grad_sample, grad_uncond_output, grad_variance_noise)`, None where not needed; each
        contiguous, in its input's dtype (the noise's in the promoted dtype of model_output and sample). With
        guidance_rescale > 0, the first is the gradient of the guided, rescaled model output instead, in the math
        dtype (its std terms are left to torch: see `fastddim.autograd`), and the third is None.
    """
    table, timestep = as_table(table, timestep)
    need_model, need_sample, need_uncond, need_noise = needs_input_grad
    rescaled = uncond_output is not None and guidance_rescale != 0
    guidance_mode = GUIDANCE_NONE if uncond_output is None else (GUIDANCE_RESCALED if rescaled else GUIDANCE_CFG)
    need_uncond = need_uncond and guidance_mode == GUIDANCE_CFG
    need_model = need_model or rescaled
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    math_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    model_output, sample = model_output.contiguous(), sample.contiguous()
    uncond_output = uncond_output.contiguous() if uncond_output is not None else None
    grad_prev = grad_prev_sample.contiguous() if grad_prev_sample is not None else None
    grad_x0 = grad_pred_original_sample.contiguous() if grad_pred_original_sample is not None else None

    def allocate(needed, like):
        return torch.empty(sample.shape, dtype=like.dtype, device=sample.device) if needed else None

    grad_model = allocate(need_model, model_output) if not rescaled else torch.empty(
        sample.shape, dtype=math_dtype, device=sample.device)
    grad_sample = allocate(need_sample, sample)
    grad_uncond = allocate(need_uncond, uncond_output)
    grad_noise = torch.empty(sample.shape, dtype=out_dtype, device=sample.device) if need_noise else None
    batch = sample.shape[0] if sample.dim() else 1
    per_sample = sample.numel() // batch if batch else 0
    if grad_noise is not None and grad_prev is None:
        grad_noise.zero_()  # the noise reaches prev_sample only
    if sample.numel() == 0 or (grad_prev is None and grad_x0 is None):
        zeros = [t.zero_() if t is not None else None for t in (grad_model, grad_sample, grad_uncond, grad_noise)]
        return zeros[0], zeros[1], zeros[2], zeros[3]

    if isinstance(timestep, torch.Tensor):
        timestep_mode = TIMESTEP_PER_SAMPLE if timestep.numel() > 1 else TIMESTEP_TENSOR
        timestep_arg, timestep_ptr = 0, timestep
    else:
        timestep_mode, timestep_arg, timestep_ptr = TIMESTEP_SCALAR, int(timestep), table
    stats = table
    if rescaled and (thresholds is not None or clip_sample):
        stats = guidance_std_ratio(model_output, uncond_output, guidance_scale)
    thresholding = thresholds is not None
    grad_threshold = torch.zeros(batch, dtype=torch.float64, device=sample.device) if thresholding else table
    positions = (torch.full((batch, 2), _NO_POSITION, dtype=torch.int64, device=sample.device) if thresholding
                 else table)
    int64 = sample.numel() > 2**31 - 1 - BLOCK_SIZE
    placeholder = sample
    grid = (triton.cdiv(per_sample, BLOCK_SIZE), batch)
    _ddim_step_backward_kernel[grid](
        grad_prev if grad_prev is not None else placeholder, grad_x0 if grad_x0 is not None else placeholder,
        model_output, uncond_output if uncond_output is not None else sample, sample,
        grad_model if grad_model is not None else placeholder, grad_uncond if grad_uncond is not None else placeholder,
        grad_sample if grad_sample is not None else placeholder,
        grad_noise if grad_noise is not None else placeholder,
        table, timestep_ptr, stats, thresholds if thresholding else table,
        order_statistics if thresholding else table, grad_threshold, positions,
        timestep_arg, table.shape[0], float64_bits(eta), float64_bits(clip_sample_range),
        float64_bits(guidance_scale), float64_bits(guidance_rescale), per_sample, batch,
        PREDICTION=PREDICTION_CODES[prediction_type],
        CLIP=bool(clip_sample),
        USE_CLIPPED=bool(use_clipped_model_output),
        TIMESTEP_MODE=timestep_mode,
        GUIDANCE=guidance_mode,
        THRESHOLD=thresholding,
        HAS_GRAD_PREV=grad_prev is not None,
        HAS_GRAD_X0=grad_x0 is not None,
        WRITE_MODEL=grad_model is not None,
        WRITE_UNCOND=grad_uncond is not None,
        WRITE_SAMPLE=grad_sample is not None,
        WRITE_NOISE=grad_noise is not None and grad_prev is not None,
        INT64=int64,
        MATH_FP64=math_dtype == torch.float64,
        BLOCK=BLOCK_SIZE,
        **LAUNCH_OPTIONS,  # x0 recomputed bit for bit as the forward computed it (clamp masks, order statistics)
    )
    if thresholding:
        _add_order_statistic_gradients(
            (grad_model, grad_uncond, grad_sample), grad_threshold, positions, order_statistics, table, timestep,
            batch, prediction_type, sample_max_value, guidance_scale, guidance_mode, math_dtype)
    return grad_model, grad_sample, grad_uncond, grad_noise
