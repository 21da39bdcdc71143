"""Gradients through the DDIM step on every backend, equal to those of diffusers' step.

diffusers' step is plain torch, so autograd differentiates it: gradients reach model_output, sample,
uncond_output (classifier-free guidance) and variance_noise, through torch.clamp (gradient 1 where
min <= x <= max, inclusive, else 0; NaN gets 0) and through dynamic thresholding, whose per-sample threshold
s = clamp(torch.quantile(|x0|, ratio), 1, sample_max_value) passes gradient into the two order statistics the
quantile interpolates (weights 1 - w and w of torch.lerp, times the sign of x0 there).

- Torch backend: fastddim.reference is torch ops, differentiated by autograd as they are, except for the
  threshold, which fastddim.threshold finds from bit patterns: `threshold_scale` here wraps it in an
  autograd.Function with torch.quantile's gradient.
- Triton backend: `triton_step` wraps the fused step kernel in an autograd.Function whose backward is the fused
  backward kernel (kernels/ddim_backward.py): one pass reads the output gradients and the inputs and writes every
  input gradient. The thresholded step keeps the order statistics its radix select found for the backward.
  guidance_rescale's per-sample std terms are differentiated by torch (fastddim.reference.guided_output).

`fastddim.ops.dispatch` routes a step here only when grad mode is on and an input requires grad, so inference
pays one attribute check. The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastddim import threshold as _threshold


def requires_grad(model_output, sample, uncond_output=None, variance_noise=None) -> bool:
    """True if grad mode is on and one of the step's tensors requires grad: the step must be recorded. (Runs
    on every step: a few attribute reads, no loop.)"""
    return torch.is_grad_enabled() and (
        model_output.requires_grad or sample.requires_grad
        or (uncond_output is not None and uncond_output.requires_grad)
        or (variance_noise is not None and variance_noise.requires_grad)
    )


def _sharded_error() -> NotImplementedError:
    return NotImplementedError(
        "gradients through a thresholded step sharded across processes (process_group) are not supported: the "
        "order statistics of the threshold may lie on another process"
    )


def _order_statistic_positions(flat: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, found) per row of `flat`: the first element whose |x| has the bit pattern of `value` (torch's sort
    also hands a tied order statistic's gradient to one of the tied elements)."""
    matches = _threshold.abs_bits(flat) == _threshold.abs_bits(value.unsqueeze(1))
    return matches.to(torch.uint8).argmax(1), matches.any(1)


class _ThresholdScale(torch.autograd.Function):
    """s = clamp(quantile(|x0|, ratio), 1, max_value) per sample, exact (fastddim.threshold), with the gradient
    torch.quantile and torch.clamp give it."""

    @staticmethod
    def forward(ctx, x0, ratio, max_value):
        s, (lower, upper, weight) = _threshold.threshold_scale(x0, ratio, max_value, return_order_statistics=True)
        ctx.save_for_backward(x0, lower, upper, weight)
        ctx.bound = _threshold.window_bits(max_value, x0.dtype)[2]
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s):
        x0, lower, upper, weight = ctx.saved_tensors
        batch = lower.shape[0]
        flat = x0.detach().reshape(batch, -1)
        q = torch.lerp(lower, upper, weight)
        grad_q = torch.where((q >= 1) & (q <= ctx.bound), grad_s, 0)
        grad = torch.zeros_like(flat)
        for value, share in ((lower, 1 - weight), (upper, weight)):
            index, found = _order_statistic_positions(flat, value)
            index = index.unsqueeze(1)
            at = flat.gather(1, index).squeeze(1)
            grad.scatter_add_(1, index, torch.where(found, grad_q * share * at.sgn(), 0).unsqueeze(1))
        return grad.view(x0.shape), None, None


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float, process_group=None) -> torch.Tensor:
    """`fastddim.threshold.threshold_scale`, differentiable with respect to x0 as diffusers' threshold is."""
    if process_group is not None:
        raise _sharded_error()
    batch = x0.shape[0] if x0.dim() else 1
    return _ThresholdScale.apply(x0.reshape(batch, -1), ratio, max_value)


class _TritonStep(torch.autograd.Function):
    """The fused step kernel (forward) and the fused backward kernel."""

    @staticmethod
    def forward(ctx, model_output, sample, uncond_output, variance_noise, table, timestep, options):
        from fastddim import kernels

        ctx.set_materialize_grads(False)
        thresholds = order = None
        if options["thresholding"]:
            thresholds, order = kernels.sample_thresholds(
                model_output, sample, table, timestep, options["prediction_type"],
                options["dynamic_thresholding_ratio"], options["sample_max_value"], uncond_output,
                options["guidance_scale"], options["guidance_rescale"], return_order_statistics=True)
        prev, x0 = kernels.ddim_step(model_output, sample, table, timestep, variance_noise=variance_noise,
                                     uncond_output=uncond_output, thresholds=thresholds, **options)
        timestep_tensor = timestep if isinstance(timestep, torch.Tensor) else None
        ctx.save_for_backward(model_output, sample, uncond_output, variance_noise, table, timestep_tensor,
                              thresholds, order)
        ctx.timestep = None if timestep_tensor is not None else timestep
        ctx.options = options
        return prev, x0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_prev, grad_x0):
        from fastddim.kernels.ddim_backward import ddim_step_backward

        model_output, sample, uncond_output, variance_noise, table, timestep, thresholds, order = ctx.saved_tensors
        timestep = timestep if timestep is not None else ctx.timestep
        options = ctx.options
        need_model, need_sample, need_uncond, need_noise = ctx.needs_input_grad[:4]
        rescaled = uncond_output is not None and options["guidance_rescale"] != 0
        grad_model, grad_sample, grad_uncond, grad_noise = ddim_step_backward(
            grad_prev, grad_x0, model_output, sample, table, timestep, eta=options["eta"],
            prediction_type=options["prediction_type"], clip_sample=options["clip_sample"],
            clip_sample_range=options["clip_sample_range"],
            use_clipped_model_output=options["use_clipped_model_output"], uncond_output=uncond_output,
            guidance_scale=options["guidance_scale"], guidance_rescale=options["guidance_rescale"],
            thresholds=thresholds, order_statistics=order, sample_max_value=options["sample_max_value"],
            needs_input_grad=(need_model, need_sample, need_uncond, need_noise and variance_noise is not None),
        )
        if rescaled:
            grad_model, grad_uncond = _rescaled_guidance_backward(grad_model, model_output, uncond_output, options,
                                                                  need_model, need_uncond)
        if grad_noise is not None:
            grad_noise = grad_noise.to(variance_noise.dtype)
        return grad_model, grad_sample, grad_uncond, grad_noise, None, None, None


def _rescaled_guidance_backward(grad_guided, cond, uncond, options, need_cond, need_uncond):
    """Gradients of cond and uncond from that of diffusers' rescaled guidance (its std terms), by torch."""
    from fastddim import reference

    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in ((cond, need_cond), (uncond, need_uncond))]
        guided = reference.guided_output(inputs[0], inputs[1], options["guidance_scale"],
                                         options["guidance_rescale"], grad_guided.dtype)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(guided, wanted, grad_guided) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


def triton_step(model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type, clip_sample,
                clip_sample_range, use_clipped_model_output, variance_noise, philox_state, uncond_output,
                guidance_scale, guidance_rescale, thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, write_prev_sample=True, write_pred_original_sample=True, process_group=None):
    """`fastddim.ops._triton_step`, recorded for autograd: the same outputs, with a fused backward."""
    if thresholding and process_group is not None:
        raise _sharded_error()
    options = dict(eta=eta, prediction_type=prediction_type, clip_sample=clip_sample,
                   clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
                   philox_state=philox_state, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                   thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                   sample_max_value=sample_max_value, write_prev_sample=write_prev_sample,
                   write_pred_original_sample=write_pred_original_sample)
    timestep = timestep_tensor if timestep_tensor is not None else timestep_value
    return _TritonStep.apply(model_output, sample, uncond_output, variance_noise, table, timestep, options)
