"""The checked entry point of the DDIM step math: argument checks, then the torch or Triton backend.

Backend per call: `FASTDDIM_BACKEND=torch|triton` forces one; otherwise CUDA tensors use Triton, and CPU tensors
use Triton only under `TRITON_INTERPRET=1` (Triton's interpreter, used to test the kernels without a GPU), the
torch reference path otherwise. Thresholded steps take the torch path on every backend for now.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch

from fastddim import reference
from fastddim.schedule import ROW_WIDTH

BACKENDS = ("torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from fastddim import kernels  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True if the kernels run in Triton's interpreter, which Triton decides when they are imported: set
    TRITON_INTERPRET=1 before importing fastddim to run them on CPU tensors."""
    if not triton_available():
        return False
    from fastddim import kernels

    return kernels.INTERPRETED


def select_backend(device: torch.device) -> str:
    """The backend a step on `device` uses now ("torch" or "triton"), honouring FASTDDIM_BACKEND."""
    forced = os.environ.get("FASTDDIM_BACKEND", "").strip().lower()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"FASTDDIM_BACKEND must be one of {BACKENDS} or 'auto', got {forced!r}")
        if forced == "triton":
            if not triton_available():
                raise RuntimeError("FASTDDIM_BACKEND=triton, but triton cannot be imported")
            if device.type != "cuda" and not triton_interpreting():
                raise ValueError(
                    f"FASTDDIM_BACKEND=triton needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
                    "importing fastddim to run the Triton kernels on CPU tensors"
                )
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and triton_interpreting():
        return "triton"
    return "torch"


def check_step_inputs(model_output, sample, variance_noise=None) -> None:
    """Clear errors for step inputs: tensors, floating dtypes, one shape, one device."""
    for name, value in (("model_output", model_output), ("sample", sample)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output and sample must have the same shape, got {tuple(model_output.shape)} and "
            f"{tuple(sample.shape)}"
        )
    if model_output.device != sample.device:
        raise ValueError(f"model_output and sample must be on one device, got {model_output.device} and {sample.device}")
    if variance_noise is not None:
        if not isinstance(variance_noise, torch.Tensor):
            raise TypeError(f"variance_noise must be a torch.Tensor or None, got {type(variance_noise).__name__}")
        if variance_noise.dtype not in FLOAT_DTYPES:
            raise TypeError(f"variance_noise must have a floating dtype, got {variance_noise.dtype}")
        if variance_noise.shape != sample.shape:
            raise ValueError(
                f"variance_noise must have the shape of sample {tuple(sample.shape)}, got {tuple(variance_noise.shape)}"
            )
        if variance_noise.device != sample.device:
            raise ValueError(f"variance_noise must be on the device of sample ({sample.device}), got {variance_noise.device}")


def check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a real number >= 0, got {type(eta).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0 is DDIM, 1 is DDPM-like), got {eta}")
    return eta


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: torch.Tensor,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    variance_noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step, checked and dispatched; returns `(prev_sample, pred_original_sample)`.

    Args:
        model_output (`torch.Tensor`): the denoiser's output (noise, x0 or v, per `prediction_type`).
        sample (`torch.Tensor`): the current sample x_t, same shape and device.
        coefficients (`torch.Tensor`): a float64 row of `fastddim.schedule.step_table` (any device; the
            Triton backend moves it to the sample's device if needed, which costs a copy).
        eta (`float`): noise weight, >= 0; noise is added only with `variance_noise`.
        prediction_type (`str`): "epsilon", "sample" or "v_prediction".
        clip_sample (`bool`), clip_sample_range (`float`): clamp x0 to [-range, range].
        thresholding (`bool`), dynamic_thresholding_ratio (`float`), sample_max_value (`float`): dynamic
            thresholding of x0 (takes precedence over clipping, as in diffusers).
        use_clipped_model_output (`bool`): re-derive the noise prediction from the clipped x0.
        variance_noise (`torch.Tensor`, *optional*): standard normal noise of the sample's shape.
        backend (`str`, *optional*): "torch" or "triton"; chosen by `select_backend` when None.
    """
    check_step_inputs(model_output, sample, variance_noise)
    eta = check_eta(eta)
    if prediction_type not in reference.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}")
    if not isinstance(coefficients, torch.Tensor) or coefficients.dtype != torch.float64 or coefficients.shape != (
        ROW_WIDTH,
    ):
        raise TypeError(f"coefficients must be a float64 tensor of shape ({ROW_WIDTH},), a row of step_table")
    if backend is None:
        backend = select_backend(sample.device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    if backend == "torch" or thresholding:
        return reference.ddim_step(
            model_output, sample, coefficients, eta=eta, prediction_type=prediction_type,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            use_clipped_model_output=use_clipped_model_output, variance_noise=variance_noise,
        )
    from fastddim import kernels

    if coefficients.device != sample.device:
        coefficients = coefficients.to(sample.device)
    return kernels.ddim_step(
        model_output, sample, coefficients, eta=eta, prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
        variance_noise=variance_noise,
    )
