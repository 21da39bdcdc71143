"""The checked entry point of the DDIM step math: argument checks, then the torch or Triton backend.

Backend per call: `FASTDDIM_BACKEND=torch|triton` forces one; otherwise CUDA tensors use Triton, and CPU tensors
use Triton only when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before fastddim is
imported; used to test the kernels without a GPU), the torch reference path otherwise. Thresholded steps find
their exact per-sample threshold with the radix-select kernels of kernels/threshold.py on the Triton backend,
with fastddim.threshold (torch.kthvalue, no torch.quantile) on the torch one. Under torch.compile the Triton
step is the custom op `torch.ops.fastddim.ddim_step`, so a compiled loop has no graph break; the torch path is
traced as it is.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from fastddim import autograd, reference, threshold
from fastddim.schedule import ROW_WIDTH, as_table

BACKENDS = ("torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


try:  # imported once, here: lazy state would make torch.compile guard on it and recompile
    from fastddim import kernels as _kernels
except ImportError:  # no triton (e.g. macOS, Windows): the torch path serves every device
    _kernels = None


def triton_available() -> bool:
    return _kernels is not None


def triton_interpreting() -> bool:
    """True if the kernels run in Triton's interpreter, which Triton decides when they are imported: set
    TRITON_INTERPRET=1 before importing fastddim to run them on CPU tensors."""
    return _kernels is not None and _kernels.INTERPRETED


def select_backend(device: torch.device) -> str:
    """The backend a step on `device` uses now ("torch" or "triton"), honouring FASTDDIM_BACKEND."""
    forced = os.environ.get("FASTDDIM_BACKEND")
    if forced is None:  # the common case, kept short: this runs on every step
        if device.type == "cuda" and triton_available() or device.type == "cpu" and triton_interpreting():
            return "triton"
        return "torch"
    forced = forced.strip().lower()
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


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {value.dtype}")


def check_step_inputs(model_output, sample, variance_noise=None, uncond_output=None) -> None:
    """Clear errors for step inputs: tensors, floating dtypes, one shape, one device."""
    _check_float_tensor("model_output", model_output)
    _check_float_tensor("sample", sample)
    for name, other in (("model_output", model_output), ("variance_noise", variance_noise),
                        ("uncond_output", uncond_output)):
        if other is None:
            continue
        _check_float_tensor(name, other)
        if other.shape != sample.shape:
            raise ValueError(f"{name} must have the shape of sample {tuple(sample.shape)}, got {tuple(other.shape)}")
        if other.device != sample.device:
            raise ValueError(f"{name} must be on the device of sample ({sample.device}), got {other.device}")


def check_real(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


def check_eta(eta) -> float:
    """eta as a float; it must be finite and >= 0 (0 is DDIM, 1 is DDPM-like)."""
    if type(eta) is float and 0.0 <= eta < math.inf:  # the common case, kept short
        return eta
    return check_real("eta", eta, minimum=0.0)


def check_timestep(timestep, batch: int):
    """An int, a one-element integer tensor, or a (batch,) integer tensor (one timestep per sample)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.dtype not in INTEGER_DTYPES:
            raise TypeError(f"timestep must be an int or an integer tensor, got a {timestep.dtype} tensor")
        if timestep.numel() != 1 and tuple(timestep.shape) != (batch,):
            raise ValueError(
                f"timestep must be one timestep or one per sample (shape ({batch},)), got shape {tuple(timestep.shape)}"
            )
        return timestep
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
    return int(timestep)


def check_philox_state(philox_state, sample: torch.Tensor, name: str = "philox_state") -> None:
    """A `PhiloxGenerator.buffer` fit for `sample`: int64, on its device, one (seed, offset) row per sample or one
    row for the batch, plus the ticket row."""
    batch = sample.shape[0] if sample.dim() else 1
    if not isinstance(philox_state, torch.Tensor) or philox_state.dtype != torch.int64 or philox_state.dim() != 2 or (
        philox_state.shape[1] != 2 or not philox_state.is_contiguous()
    ):
        raise ValueError(f"{name} must be a PhiloxGenerator's buffer: a contiguous int64 tensor of shape (rows + 1, 2)")
    if philox_state.device != sample.device:
        raise ValueError(f"{name} lives on {philox_state.device}, the sample on {sample.device}")
    rows = philox_state.shape[0] - 1
    if rows not in (1, batch):
        raise ValueError(f"{name} holds {rows} (seed, offset) rows; a batch of {batch} samples takes 1 or {batch}")


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    table: torch.Tensor,
    timestep=None,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    variance_noise: torch.Tensor | None = None,
    philox_state: torch.Tensor | None = None,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    backend: str | None = None,
    write_prev_sample: bool = True,
    write_pred_original_sample: bool = True,
    process_group=None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One DDIM step, checked and dispatched; returns `(prev_sample, pred_original_sample)`, None for an output
    not asked for.

    Args:
        model_output (`torch.Tensor`): the denoiser's output (noise, x0 or v, per `prediction_type`); with
            `uncond_output`, the conditional prediction of classifier-free guidance.
        sample (`torch.Tensor`): the current sample x_t, same shape and device.
        table (`torch.Tensor`): the float64 `fastddim.schedule.step_table`. The Triton backend needs it on the
            sample's device; the torch backend on the CPU for an int timestep, else on the timestep's device.
        timestep (`int` or integer `torch.Tensor`): one timestep, or one per sample (shape `(batch,)`). A tensor
            is never read by the host; timesteps outside the table give NaN. None: `table` is one table row.
        eta (`float`): noise weight, >= 0.
        prediction_type (`str`): "epsilon", "sample" or "v_prediction".
        clip_sample (`bool`), clip_sample_range (`float`): clamp x0 to [-range, range].
        thresholding (`bool`), dynamic_thresholding_ratio (`float`), sample_max_value (`float`): dynamic
            thresholding of x0 (takes precedence over clipping, as in diffusers).
        use_clipped_model_output (`bool`): re-derive the noise prediction from the clipped x0.
        variance_noise (`torch.Tensor`, *optional*): standard normal noise of the sample's shape.
        philox_state (`torch.Tensor`, *optional*): instead, a `PhiloxGenerator.buffer` on the sample's device
            (one (seed, offset) row per sample or one for the batch, then a ticket row): the noise is drawn in the
            kernel, and the same step adds 1 to every offset (see `fastddim.noise.PhiloxGenerator`).
        uncond_output (`torch.Tensor`, *optional*): the unconditional prediction; fuses classifier-free
            guidance `uncond + guidance_scale * (model_output - uncond)`, rescaled by `guidance_rescale` as
            diffusers' `rescale_noise_cfg`.
        backend (`str`, *optional*): "torch" or "triton"; chosen by `select_backend` when None.
        process_group (`torch.distributed.ProcessGroup`, *optional*): with thresholding, the samples are sharded
            across the processes of this group (each holds the whole batch and a part of every sample): the
            threshold is that of the whole samples, the same on every process (its counts are all-reduced).
            Every process of the group must make the call. Not traceable by torch.compile.
    """
    table, timestep = as_table(table, timestep)
    check_step_inputs(model_output, sample, variance_noise, uncond_output)
    eta = check_eta(eta)
    if prediction_type not in reference.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}")
    if not isinstance(table, torch.Tensor) or table.dtype != torch.float64 or table.dim() != 2 or (
        table.shape[1] != ROW_WIDTH
    ):
        raise TypeError(f"table must be a float64 tensor of shape (num_train_timesteps, {ROW_WIDTH}): a step_table")
    timestep = check_timestep(timestep, sample.shape[0] if sample.dim() else 1)
    num_train = table.shape[0]
    # An int timestep is checked as scheduler.step checks it; a tensor is never read by the host (NaN outputs).
    if isinstance(timestep, int) and not 0 <= timestep < num_train:
        raise ValueError(f"timestep must be in [0, {num_train}) (the table's rows), got {timestep}")
    if variance_noise is not None and philox_state is not None:
        raise ValueError("pass either variance_noise or philox_state, not both")
    if philox_state is not None:
        check_philox_state(philox_state, sample)
    if uncond_output is not None:
        guidance_scale = check_real("guidance_scale", guidance_scale)
        guidance_rescale = check_real("guidance_rescale", guidance_rescale, minimum=0.0)
    if backend is None:
        backend = select_backend(sample.device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    elif backend == "triton" and sample.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {sample.device.type}); set TRITON_INTERPRET=1 before importing "
            "fastddim to run the Triton kernels on CPU tensors"
        )
    if thresholding:
        dynamic_thresholding_ratio = check_real("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        sample_max_value = check_real("sample_max_value", sample_max_value)
        if not sample_max_value > 0:  # below 1 it is the threshold itself, as in diffusers
            raise ValueError(f"sample_max_value must be a finite number > 0, got {sample_max_value}")
    if backend == "triton" and table.device != sample.device:
        raise ValueError(f"table must be on the device of sample ({sample.device}) for the triton backend")
    return dispatch(
        model_output, sample, table, timestep, eta=eta, prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=clip_sample_range, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output, variance_noise=variance_noise, philox_state=philox_state,
        uncond_output=uncond_output, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        backend=backend, write_prev_sample=write_prev_sample, write_pred_original_sample=write_pred_original_sample,
        process_group=process_group,
    )


def dispatch(model_output, sample, table, timestep, *, eta, prediction_type, clip_sample, clip_sample_range,
             thresholding, dynamic_thresholding_ratio, sample_max_value, use_clipped_model_output, backend,
             variance_noise=None, philox_state=None, uncond_output=None, guidance_scale=1.0, guidance_rescale=0.0,
             write_prev_sample=True, write_pred_original_sample=True, process_group=None):
    """`ddim_step` without its checks, for callers that checked the same things already (the schedulers: the
    per-call cost of a step on small tensors is mostly Python). `table` may also be a host table as a list of
    rows (`step_table(...).tolist()`) for an int timestep on the torch path."""
    if backend == "torch":
        return reference.ddim_step(
            model_output, sample, table, timestep, eta=eta, prediction_type=prediction_type,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            use_clipped_model_output=use_clipped_model_output, variance_noise=variance_noise,
            philox_state=philox_state, uncond_output=uncond_output, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, write_prev_sample=write_prev_sample,
            write_pred_original_sample=write_pred_original_sample, process_group=process_group,
        )
    if isinstance(timestep, torch.Tensor) and timestep.device != sample.device:
        timestep = timestep.to(sample.device)
    args = (model_output, sample, table, timestep if isinstance(timestep, torch.Tensor) else None,
            timestep if not isinstance(timestep, torch.Tensor) else 0, eta, prediction_type, bool(clip_sample),
            float(clip_sample_range), bool(use_clipped_model_output), variance_noise, philox_state, uncond_output,
            float(guidance_scale), float(guidance_rescale), bool(thresholding), float(dynamic_thresholding_ratio),
            float(sample_max_value))
    if autograd.requires_grad(model_output, sample, uncond_output, variance_noise) and (
        not torch.compiler.is_compiling()
    ):
        return autograd.triton_step(*args, write_prev_sample=write_prev_sample,
                                    write_pred_original_sample=write_pred_original_sample, process_group=process_group)
    if process_group is not None and thresholding:
        return _triton_step(*args, write_prev_sample=write_prev_sample,
                            write_pred_original_sample=write_pred_original_sample, process_group=process_group)
    if torch.compiler.is_compiling():
        # The custom ops always return both outputs (their schema has two tensors); drop the one not asked for.
        if philox_state is None:
            prev, x0 = _triton_step_op(*args)
        elif autograd.requires_grad(model_output, sample, uncond_output, variance_noise):
            raise NotImplementedError(
                "gradients through a compiled step that draws PhiloxGenerator noise are not supported: pass "
                "variance_noise (or a torch.Generator) instead, or run the step eagerly"
            )
        else:
            prev, x0 = _triton_step_philox_op(*args)
        return (prev if write_prev_sample else None), (x0 if write_pred_original_sample else None)
    return _triton_step(*args, write_prev_sample=write_prev_sample,
                        write_pred_original_sample=write_pred_original_sample)


def _triton_step(model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type, clip_sample,
                 clip_sample_range, use_clipped_model_output, variance_noise, philox_state, uncond_output,
                 guidance_scale, guidance_rescale, thresholding=False, dynamic_thresholding_ratio=0.995,
                 sample_max_value=1.0, write_prev_sample=True, write_pred_original_sample=True, process_group=None):
    return _kernels.ddim_step(
        model_output, sample, table, timestep_tensor if timestep_tensor is not None else timestep_value, eta=eta,
        prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output, variance_noise=variance_noise, philox_state=philox_state,
        uncond_output=uncond_output, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        write_prev_sample=write_prev_sample, write_pred_original_sample=write_pred_original_sample,
        thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value,
        threshold_reduce=threshold.all_reduce_hook(process_group) if process_group is not None else None,
    )


# Two custom ops: torch.library registers autograd formulas only for functional ops, and the Philox variant
# moves its generator's offsets on in place (no second launch), so it declares that mutation and has no formula.
@torch.library.custom_op("fastddim::ddim_step", mutates_args=())
def _triton_step_op(
    model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep_tensor: torch.Tensor | None,
    timestep_value: int, eta: float, prediction_type: str, clip_sample: bool, clip_sample_range: float,
    use_clipped_model_output: bool, variance_noise: torch.Tensor | None, philox_state: torch.Tensor | None,
    uncond_output: torch.Tensor | None, guidance_scale: float, guidance_rescale: float, thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if philox_state is not None:
        raise ValueError("fastddim::ddim_step draws no noise in the kernel: use fastddim::ddim_step_philox")
    return _triton_step(model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type,
                        clip_sample, clip_sample_range, use_clipped_model_output, variance_noise, None,
                        uncond_output, guidance_scale, guidance_rescale, thresholding, dynamic_thresholding_ratio,
                        sample_max_value)


@torch.library.custom_op("fastddim::ddim_step_philox", mutates_args=("philox_state",))
def _triton_step_philox_op(
    model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep_tensor: torch.Tensor | None,
    timestep_value: int, eta: float, prediction_type: str, clip_sample: bool, clip_sample_range: float,
    use_clipped_model_output: bool, variance_noise: torch.Tensor | None, philox_state: torch.Tensor,
    uncond_output: torch.Tensor | None, guidance_scale: float, guidance_rescale: float, thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_step(model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type,
                        clip_sample, clip_sample_range, use_clipped_model_output, variance_noise, philox_state,
                        uncond_output, guidance_scale, guidance_rescale, thresholding, dynamic_thresholding_ratio,
                        sample_max_value)


def _fake_step(model_output, sample, table, timestep_tensor, timestep_value, eta, prediction_type, clip_sample,
               clip_sample_range, use_clipped_model_output, variance_noise, philox_state, uncond_output,
               guidance_scale, guidance_rescale, thresholding=False, dynamic_thresholding_ratio=0.995,
               sample_max_value=1.0):
    from fastddim.kernels.ddim import allocate_outputs

    outputs, _, _ = allocate_outputs(model_output, sample, uncond_output, variance_noise, philox_state is not None)
    return outputs


_triton_step_op.register_fake(_fake_step)
_triton_step_philox_op.register_fake(_fake_step)
autograd.register_step_op_autograd(_triton_step_op)
