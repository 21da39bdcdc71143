"""Noise schedules, inference timesteps and per-timestep step coefficients.

This module is the one place that turns a timestep into the numbers a DDIM step needs. Everything here
reproduces diffusers' float32 schedule bit for bit (same ops, same order), then derives the step coefficients
from those float32 values in float64, so the step itself is as accurate as its inputs allow.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
INVERSE_TIMESTEP_SPACINGS = ("leading", "trailing")

# Columns of a step-coefficient row (see `step_table`). A row is padded to 8 float64 values (64 bytes) so a
# view of one row is always 16-byte aligned, which keeps a Triton kernel from compiling one variant per alignment.
SQRT_ALPHA_T, SQRT_BETA_T, SQRT_ALPHA_PREV, BETA_PREV, VARIANCE = range(5)
ROW_WIDTH = 8


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine ("squaredcos_cap_v2") schedule of Nichol & Dhariwal, as diffusers computes them."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 as diffusers does."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 betas for a scheduler configuration (arguments as in `DDIMScheduler`)."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def inference_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int = 0,
    inverse: bool = False,
) -> np.ndarray:
    """The int64 timesteps of a sampling run, in the order they are visited.

    `inverse=False` gives DDIMScheduler's descending timesteps, `inverse=True` DDIMInverseScheduler's ascending
    ones (which support only "leading" and "trailing" spacing, as in diffusers).
    """
    spacings = INVERSE_TIMESTEP_SPACINGS if inverse else TIMESTEP_SPACINGS
    if timestep_spacing not in spacings:
        raise ValueError(f"timestep_spacing must be one of {spacings}, got {timestep_spacing!r}")
    if timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round().astype(np.int64)
        timesteps += steps_offset
        return timesteps if inverse else timesteps[::-1].copy()
    step_ratio = num_train_timesteps / num_inference_steps
    timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    return timesteps[::-1].copy() if inverse else timesteps


def step_table(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    boundary_alpha_cumprod: float,
    inverse: bool = False,
) -> torch.Tensor:
    """Step coefficients for every training timestep, as a float64 (num_train_timesteps, ROW_WIDTH) table.

    Row `t` holds what a step called with `timestep=t` needs, following diffusers' indexing exactly:
    - forward (DDIMScheduler): alpha_t = alphas_cumprod[t], alpha_prev = alphas_cumprod[t - T // n], or the
      boundary value (`final_alpha_cumprod`) where that index is negative;
    - inverse (DDIMInverseScheduler): alpha_prev = alphas_cumprod[t] is the target, and the source is
      alpha_t = alphas_cumprod[min(t - T // n, T - 1)], or the boundary value (`initial_alpha_cumprod`) where
      that index is negative; the inverse step has no noise, so its variance column is 0.

    Columns: sqrt(alpha_t), sqrt(1 - alpha_t), sqrt(alpha_prev), 1 - alpha_prev and the DDIM variance
    (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev); the rest is zero padding. The values are
    float64 arithmetic on diffusers' float32 alphas_cumprod, so IEEE inf/nan appear where diffusers' would.
    """
    num_train_timesteps = alphas_cumprod.shape[0]
    ratio = num_train_timesteps // num_inference_steps
    table_alphas = alphas_cumprod.to(torch.float64)
    boundary = torch.tensor(float(boundary_alpha_cumprod), dtype=torch.float64)
    t = torch.arange(num_train_timesteps)
    other = t - ratio
    if inverse:
        source = other.clamp(max=num_train_timesteps - 1)
        alpha_t = torch.where(source >= 0, table_alphas[source.clamp(min=0)], boundary)
        alpha_prev = table_alphas
    else:
        alpha_t = table_alphas
        alpha_prev = torch.where(other >= 0, table_alphas[other.clamp(min=0)], boundary)
    beta_t = 1 - alpha_t
    beta_prev = 1 - alpha_prev
    table = torch.zeros(num_train_timesteps, ROW_WIDTH, dtype=torch.float64)
    table[:, SQRT_ALPHA_T] = alpha_t.sqrt()
    table[:, SQRT_BETA_T] = beta_t.sqrt()
    table[:, SQRT_ALPHA_PREV] = alpha_prev.sqrt()
    table[:, BETA_PREV] = beta_prev
    if not inverse:
        table[:, VARIANCE] = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
    return table


def ddim_variance(alphas_cumprod: torch.Tensor, timestep, prev_timestep, boundary_alpha_cumprod) -> torch.Tensor:
    """The DDIM variance (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev) between `timestep` and
    `prev_timestep`, in float32 exactly as diffusers' `_get_variance` / `_batch_get_variance` compute it (pipelines
    such as ParaDiGMS size their noise with it). Elementwise over integer tensors; alpha_prev is
    `boundary_alpha_cumprod` where `prev_timestep` is negative. Indices are trusted (the caller checks them)."""
    timestep = torch.as_tensor(timestep).to(alphas_cumprod.device)
    prev_timestep = torch.as_tensor(prev_timestep).to(alphas_cumprod.device)
    boundary = torch.as_tensor(boundary_alpha_cumprod, dtype=alphas_cumprod.dtype).to(alphas_cumprod.device)
    alpha_t = alphas_cumprod[timestep]
    alpha_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], boundary)
    beta_t = 1 - alpha_t
    beta_prev = 1 - alpha_prev
    return (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)


def as_table(table: torch.Tensor, timestep):
    """Accept a single coefficient row with no timestep as a one-row table at timestep 0, so the functional
    APIs take either `(table, timestep)` or one `step_table(...)[t]` row."""
    if timestep is None:
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (ROW_WIDTH,):
            raise ValueError(f"without a timestep, pass one step_table row of shape ({ROW_WIDTH},) as the table")
        return table.view(1, ROW_WIDTH), 0
    return table, timestep


def noise_scales(row, eta: float) -> tuple[float, float]:
    """(std_dev_t, direction coefficient) of a step with noise weight `eta`, from a table row (host floats).

    std = eta * sqrt(variance) and direction = sqrt(1 - alpha_prev - std^2), as in diffusers. For eta <= 1 the
    radicand is non-negative in exact arithmetic, so a negative one is rounding and is taken as 0 (diffusers'
    float32 turns it into NaN, e.g. at zero terminal SNR with eta = 1); above 1 a negative radicand is real and
    gives NaN, as in diffusers (the scheduler raises a ValueError for it first).
    NaN coefficients of a degenerate schedule propagate. The Triton kernel derives the same two numbers from
    the same row in float64 (kernels/ddim.py); keep the two in step.
    """
    std = eta * _sqrt(row[VARIANCE])
    radicand = row[BETA_PREV] - std * std
    return std, _sqrt(max(radicand, 0.0) if eta <= 1 else radicand)


def _sqrt(value: float) -> float:
    return math.sqrt(value) if value >= 0 else math.nan
