"""The DDIM step in plain torch: the CPU path and the Triton kernels' correctness oracle.

The same math as kernels/ddim.py, written for clarity and for few passes over memory: it computes in float32
(float64 for float64 inputs) and rounds once to the output dtype, where diffusers rounds every intermediate to
the input dtype. It never writes to its inputs.
"""

from __future__ import annotations

import torch

from fastddim.schedule import BETA_PREV, SQRT_ALPHA_PREV, SQRT_ALPHA_T, SQRT_BETA_T, noise_scales

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step math runs in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per sample, s = clamp(quantile(|x0|, ratio), 1, max_value);
    returns clamp(x0, -s, s) / s. `x0` is float32 or float64, with the batch as its first dimension."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    variance_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step; returns `(prev_sample, pred_original_sample)` in the promoted dtype of the inputs.

    `coefficients` is a row of `fastddim.schedule.step_table` (a float64 tensor or a sequence of floats).
    Arguments are trusted: `fastddim.ops.ddim_step` checks them.
    """
    row = coefficients.tolist() if isinstance(coefficients, torch.Tensor) else list(coefficients)
    sqrt_alpha_t, sqrt_beta_t, sqrt_alpha_prev = row[SQRT_ALPHA_T], row[SQRT_BETA_T], row[SQRT_ALPHA_PREV]
    std, direction = noise_scales(row, eta)
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    math_dtype = compute_dtype(out_dtype)
    m = model_output.to(math_dtype)
    x = sample.to(math_dtype)

    # Every tensor below is freshly allocated unless noted, so the in-place ops never touch an input.
    if prediction_type == "epsilon":
        x0 = torch.sub(x, m, alpha=sqrt_beta_t).div_(sqrt_alpha_t)
        eps = m
    elif prediction_type == "sample":
        x0 = m  # an input (or its upcast copy): only out-of-place ops on it below
        eps = torch.sub(x, m, alpha=sqrt_alpha_t).div_(sqrt_beta_t)
    elif prediction_type == "v_prediction":
        x0 = torch.mul(x, sqrt_alpha_t).sub_(m, alpha=sqrt_beta_t)
        eps = torch.mul(m, sqrt_alpha_t).add_(x, alpha=sqrt_beta_t)
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    if thresholding:
        x0 = threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    elif clip_sample:
        x0 = torch.clamp(x0, -clip_sample_range, clip_sample_range)

    if use_clipped_model_output:
        eps = torch.sub(x, x0, alpha=sqrt_alpha_t).div_(sqrt_beta_t)

    prev = torch.mul(x0, sqrt_alpha_prev).add_(eps, alpha=direction)
    if variance_noise is not None:
        prev.add_(variance_noise.to(math_dtype), alpha=std)

    if x0 is model_output:
        x0 = x0.clone()
    return prev.to(out_dtype), x0.to(out_dtype)
