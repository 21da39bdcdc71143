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
  Under torch.compile the step is fastddim.ops' custom op, whose registered backward is the custom op
  torch.ops.fastddim.ddim_step_backward around the same kernel.

`fastddim.ops.dispatch` routes a step here only when grad mode is on and an input requires grad, so inference
pays one attribute check. The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastddim import threshold as _threshold
from fastddim.plan import StepOptions


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
    """The fused step kernel (forward, through the step plan's prepared launch) and the fused backward kernel."""

    @staticmethod
    def forward(ctx, model_output, sample, uncond_output, variance_noise, table, timestep, launcher, philox_state):
        from fastddim import kernels

        ctx.set_materialize_grads(False)
        options = launcher.options
        thresholds = order = None
        if options.thresholding:
            thresholds, order = kernels.sample_thresholds(
                model_output, sample, table, timestep, options.prediction_type, options.dynamic_thresholding_ratio,
                options.sample_max_value, uncond_output, options.guidance_scale, options.guidance_rescale,
                return_order_statistics=True)
        prev, x0 = launcher(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output,
                            thresholds=thresholds)
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
        rescaled = uncond_output is not None and options.guidance_rescale != 0
        grad_model, grad_sample, grad_uncond, grad_noise = ddim_step_backward(
            grad_prev, grad_x0, model_output, sample, table, timestep, eta=options.eta,
            prediction_type=options.prediction_type, clip_sample=options.clip_sample,
            clip_sample_range=options.clip_sample_range,
            use_clipped_model_output=options.use_clipped_model_output, uncond_output=uncond_output,
            guidance_scale=options.guidance_scale, guidance_rescale=options.guidance_rescale,
            thresholds=thresholds, order_statistics=order, sample_max_value=options.sample_max_value,
            needs_input_grad=(need_model, need_sample, need_uncond, need_noise and variance_noise is not None),
        )
        if rescaled:
            grad_model, grad_uncond = _rescaled_guidance_backward(grad_model, model_output, uncond_output,
                                                                  options.guidance_scale, options.guidance_rescale,
                                                                  need_model, need_uncond)
        if grad_noise is not None:
            grad_noise = grad_noise.to(variance_noise.dtype)
        return grad_model, grad_sample, grad_uncond, grad_noise, None, None, None, None


def _rescaled_guidance_backward(grad_guided, cond, uncond, guidance_scale, guidance_rescale, need_cond,
                                need_uncond):
    """Gradients of cond and uncond from that of diffusers' rescaled guidance (its std terms), by torch."""
    from fastddim import reference

    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(need) for t, need in ((cond, need_cond), (uncond, need_uncond))]
        guided = reference.guided_output(inputs[0], inputs[1], guidance_scale, guidance_rescale, grad_guided.dtype)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(guided, wanted, grad_guided) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


def triton_step(plan, model_output, sample, table, timestep, variance_noise=None, philox_state=None,
                uncond_output=None, process_group=None):
    """The Triton step of `plan` (a `fastddim.plan.StepPlan` with a launcher), recorded for autograd: the same
    outputs, with a fused backward."""
    if plan.options.thresholding and process_group is not None:
        raise _sharded_error()
    if isinstance(timestep, torch.Tensor) and timestep.device != sample.device:
        timestep = timestep.to(sample.device)
    return _TritonStep.apply(model_output, sample, uncond_output, variance_noise, table, timestep, plan.launcher,
                             philox_state)


# Under torch.compile the Triton step is the custom op torch.ops.fastddim.ddim_step (fastddim.ops), whose backward
# is this second custom op: the same fused backward kernel, opaque to the tracer. (A thresholded step finds its
# order statistics again here: the forward op's schema returns only the step's two outputs.)
@torch.library.custom_op("fastddim::ddim_step_backward", mutates_args=())
def _triton_step_backward_op(
    grad_prev: torch.Tensor | None, grad_x0: torch.Tensor | None, model_output: torch.Tensor, sample: torch.Tensor,
    table: torch.Tensor, timestep_tensor: torch.Tensor | None, timestep_value: int, eta: float, prediction_type: str,
    clip_sample: bool, clip_sample_range: float, use_clipped_model_output: bool, uncond_output: torch.Tensor | None,
    guidance_scale: float, guidance_rescale: float, thresholding: bool, dynamic_thresholding_ratio: float,
    sample_max_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastddim import kernels
    from fastddim.kernels.ddim_backward import ddim_step_backward

    timestep = timestep_tensor if timestep_tensor is not None else timestep_value
    thresholds = order = None
    if thresholding:
        thresholds, order = kernels.sample_thresholds(
            model_output, sample, table, timestep, prediction_type, dynamic_thresholding_ratio, sample_max_value,
            uncond_output, guidance_scale, guidance_rescale, return_order_statistics=True)
    grads = ddim_step_backward(
        grad_prev, grad_x0, model_output, sample, table, timestep, eta=eta, prediction_type=prediction_type,
        clip_sample=clip_sample, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output, uncond_output=uncond_output,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, thresholds=thresholds,
        order_statistics=order, sample_max_value=sample_max_value, needs_input_grad=(True, True, True, True))
    # Custom ops return tensors: an empty one stands for "no uncond gradient".
    return tuple(g if g is not None else sample.new_empty(0) for g in grads)


@_triton_step_backward_op.register_fake
def _(grad_prev, grad_x0, model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type,
      clip_sample, clip_sample_range, use_clipped_model_output, uncond_output, guidance_scale, guidance_rescale,
      thresholding, dynamic_thresholding_ratio, sample_max_value):
    out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
    math_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    rescaled = uncond_output is not None and guidance_rescale != 0
    grad_model = torch.empty(sample.shape, dtype=math_dtype if rescaled else model_output.dtype, device=sample.device)
    grad_uncond = (torch.empty(sample.shape, dtype=uncond_output.dtype, device=sample.device)
                   if uncond_output is not None and not rescaled else sample.new_empty(0))
    return (grad_model, torch.empty(sample.shape, dtype=sample.dtype, device=sample.device), grad_uncond,
            torch.empty(sample.shape, dtype=out_dtype, device=sample.device))


def _setup_step_op_context(ctx, inputs, output):
    (model_output, sample, table, timestep_tensor, timestep_value, variance_noise, _, uncond_output,
     prediction_type, options) = inputs
    ctx.save_for_backward(model_output, sample, table, timestep_tensor, uncond_output)
    ctx.timestep_value = timestep_value
    ctx.options = StepOptions.from_op_arguments(prediction_type, tuple(options))
    ctx.noise_dtype = variance_noise.dtype if variance_noise is not None else None


def _step_op_backward(ctx, grad_prev, grad_x0):
    model_output, sample, table, timestep_tensor, uncond_output = ctx.saved_tensors
    options = ctx.options
    grad_model, grad_sample, grad_uncond, grad_noise = _triton_step_backward_op(
        grad_prev, grad_x0, model_output, sample, table, timestep_tensor, ctx.timestep_value, options.eta,
        options.prediction_type, options.clip_sample, options.clip_sample_range, options.use_clipped_model_output,
        uncond_output, options.guidance_scale, options.guidance_rescale, options.thresholding,
        options.dynamic_thresholding_ratio, options.sample_max_value)
    if uncond_output is None:
        grad_uncond = None
    elif options.guidance_rescale != 0:
        grad_model, grad_uncond = _rescaled_guidance_backward(grad_model, model_output, uncond_output,
                                                              options.guidance_scale, options.guidance_rescale,
                                                              True, True)
    grad_noise = grad_noise.to(ctx.noise_dtype) if ctx.noise_dtype is not None else None
    return grad_model, grad_sample, None, None, None, grad_noise, None, grad_uncond, None, None


def register_step_op_autograd(step_op) -> None:
    """Give fastddim.ops' custom op torch.ops.fastddim.ddim_step its fused backward (for torch.compile)."""
    step_op.register_autograd(_step_op_backward, setup_context=_setup_step_op_context)
