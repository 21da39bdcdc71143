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

import functools
import math
import numbers
import os

import torch

from fastddim import autograd, reference, threshold
from fastddim.plan import PlanCache, StepOptions, StepPlan, check_real, tensor_key
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


# FASTDDIM_BACKEND is read at every step; os.environ.get encodes and decodes on each read, its mapping does not.
_ENVIRON = getattr(os.environ, "_data", None)
_BACKEND_VARIABLE = os.environ.encodekey("FASTDDIM_BACKEND") if _ENVIRON is not None else None


def backend_setting():
    """FASTDDIM_BACKEND as set now (None when unset), cheaply: it is read at every step."""
    if _ENVIRON is None:
        return os.environ.get("FASTDDIM_BACKEND")
    value = _ENVIRON.get(_BACKEND_VARIABLE)
    return value if value is None else os.environ.decodevalue(value)


# FASTDDIM_BACKEND as it is stored (bytes on POSIX), read without a Python frame: what step memos key on.
backend_setting_raw = functools.partial(_ENVIRON.get, _BACKEND_VARIABLE) if _ENVIRON is not None else backend_setting


def select_backend(device: torch.device) -> str:
    """The backend a step on `device` uses now ("torch" or "triton"), honouring FASTDDIM_BACKEND."""
    forced = backend_setting()
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
    options: StepOptions | None = None,
    variance_noise: torch.Tensor | None = None,
    philox_state: torch.Tensor | None = None,
    uncond_output: torch.Tensor | None = None,
    backend: str | None = None,
    process_group=None,
    **option_values,
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
        options (`fastddim.plan.StepOptions`, *optional*): the step's settings: eta (>= 0), prediction_type,
            clip_sample / clip_sample_range, thresholding / dynamic_thresholding_ratio / sample_max_value (dynamic
            thresholding of x0, which takes precedence over clipping, as in diffusers), use_clipped_model_output,
            guidance_scale / guidance_rescale, write_prev_sample / write_pred_original_sample. Or pass those as
            keywords (`option_values`), with StepOptions' defaults.
        variance_noise (`torch.Tensor`, *optional*): standard normal noise of the sample's shape.
        philox_state (`torch.Tensor`, *optional*): instead, a `PhiloxGenerator.buffer` on the sample's device
            (one (seed, offset) row per sample or one for the batch, then a ticket row): the noise is drawn in the
            kernel, and the same step adds 1 to every offset (see `fastddim.noise.PhiloxGenerator`). With eta > 0
            and neither, the step returns the mean of x_{t-1}: its noise term is left out (the schedulers always
            pass noise, drawn from their `generator`, as diffusers does).
        uncond_output (`torch.Tensor`, *optional*): the unconditional prediction; fuses classifier-free
            guidance `uncond + guidance_scale * (model_output - uncond)`, rescaled by `guidance_rescale` as
            diffusers' `rescale_noise_cfg`.
        backend (`str`, *optional*): "torch" or "triton"; chosen by `select_backend` when None.
        process_group (`torch.distributed.ProcessGroup`, *optional*): with thresholding, the samples are sharded
            across the processes of this group (each holds the whole batch and a part of every sample): the
            threshold is that of the whole samples, the same on every process (its counts are all-reduced).
            Every process of the group must make the call. Not traceable by torch.compile.

    The settings are checked at every call; the tensors' properties once per step plan (`dispatch`).
    """
    if options is None:
        options = StepOptions(**option_values)
    elif option_values:
        raise TypeError("pass the step's settings either as options or as keywords, not both")
    table, timestep = as_table(table, timestep)
    options = options.checked(guided=uncond_output is not None)
    # A host timestep is checked at every call (a plan keys on its type only); a tensor is never read by the host.
    if type(timestep) is int and isinstance(table, torch.Tensor) and table.dim() == 2 and (
        not 0 <= timestep < table.shape[0]
    ):
        raise ValueError(f"timestep must be in [0, {table.shape[0]}) (the table's rows), got {timestep}")
    return dispatch(model_output, sample, table, timestep, options, variance_noise, philox_state, uncond_output,
                    backend, process_group)


def check_step(model_output, sample, table, timestep, options: StepOptions, variance_noise=None,
               philox_state=None, uncond_output=None, backend: str | None = None) -> str:
    """Every check of a step's tensors, timestep and backend (clear TypeError / ValueError naming the argument);
    returns the backend. `options` must be `StepOptions.checked` already."""
    check_step_inputs(model_output, sample, variance_noise, uncond_output)
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
    if backend is None:
        backend = select_backend(sample.device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    elif backend == "triton" and sample.device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {sample.device.type}); set TRITON_INTERPRET=1 before importing "
            "fastddim to run the Triton kernels on CPU tensors"
        )
    if backend == "triton" and table.device != sample.device:
        raise ValueError(f"table must be on the device of sample ({sample.device}) for the triton backend")
    return backend


def build_plan(model_output, sample, table, timestep, options: StepOptions, variance_noise=None, philox_state=None,
               uncond_output=None, backend: str | None = None, process_group=None) -> StepPlan:
    """A `StepPlan` for steps whose tensors have the properties of these (after `check_step`): the torch path, or
    the Triton launch prepared once (`fastddim.kernels.ddim.StepLauncher`)."""
    backend = check_step(model_output, sample, table, timestep, options, variance_noise, philox_state,
                         uncond_output, backend)
    process_group = process_group if options.thresholding else None
    if backend == "torch":
        host_rows = _HostRows()

        def run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output):
            if not isinstance(timestep, torch.Tensor):
                table = host_rows(table)
            return reference.ddim_step(model_output, sample, table, timestep, options, variance_noise, philox_state,
                                       uncond_output, process_group)

        return StepPlan(options, backend, run)
    move_timestep = isinstance(timestep, torch.Tensor) and timestep.device != sample.device
    if move_timestep:
        timestep = timestep.to(sample.device)
    launcher = _kernels.ddim.StepLauncher(
        options, model_output, sample, table, timestep, variance_noise, philox_state, uncond_output,
        threshold.all_reduce_hook(process_group) if process_group is not None else None,
    )
    if move_timestep:
        def run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output):
            return launcher(model_output, sample, table, timestep.to(sample.device), variance_noise, philox_state,
                            uncond_output)

        return StepPlan(options, backend, run, launcher)
    return StepPlan(options, backend, launcher.run, launcher)


class _HostRows:
    """The rows of a CPU step table as Python floats (what the torch path's int timesteps read), converted once
    per table and kept while the table is the same tensor, unmodified (its version counter)."""

    def __init__(self):
        self.table = self.version = self.rows = None

    def __call__(self, table):
        if not isinstance(table, torch.Tensor) or table.device.type != "cpu":
            return table
        if table is not self.table or table._version != self.version:
            self.table, self.version, self.rows = table, table._version, table.tolist()
        return self.rows


PLANS = PlanCache()


def plan_for(model_output, sample, table, timestep, options: StepOptions, variance_noise=None, philox_state=None,
             uncond_output=None, backend: str | None = None, process_group=None) -> StepPlan:
    """The cached `StepPlan` for a step with these tensors and checked options, built (and checked) on first use.
    Keyed on the options, the backend argument, FASTDDIM_BACKEND, every tensor's dtype, shape, strides and device,
    the timestep's kind and the process group; arguments that cannot be keyed go to the checks uncached."""
    try:
        # tensor_key written out for the three tensors every step has: this runs at every step.
        key = (options, backend, backend_setting_raw(),
               model_output.dtype, model_output.shape, model_output.stride(), model_output.device,
               sample.dtype, sample.shape, sample.stride(), sample.device,
               table.dtype, table.shape, table.stride(), table.device,
               tensor_key(timestep) if isinstance(timestep, torch.Tensor) else type(timestep),
               None if variance_noise is None else tensor_key(variance_noise),
               None if philox_state is None else tensor_key(philox_state),
               None if uncond_output is None else tensor_key(uncond_output), process_group)
        plan = PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable: the checks name the argument
        return build_plan(model_output, sample, table, timestep, options, variance_noise, philox_state,
                          uncond_output, backend, process_group)
    if plan is None:
        plan = PLANS.put(key, build_plan(model_output, sample, table, timestep, options, variance_noise,
                                         philox_state, uncond_output, backend, process_group))
    return plan


def dispatch(model_output, sample, table, timestep, options: StepOptions, variance_noise=None, philox_state=None,
             uncond_output=None, backend: str | None = None, process_group=None):
    """`ddim_step` for checked `options` (the schedulers keep theirs): the step through its cached plan, whose
    checks ran when it was built. A Triton step whose inputs require grad (grad mode on) is recorded for autograd
    (`fastddim.autograd`); the torch path is differentiated by torch itself."""
    if torch.compiler.is_compiling() and not (process_group is not None and options.thresholding):
        backend = check_step(model_output, sample, table, timestep, options, variance_noise, philox_state,
                             uncond_output, backend)
        if backend == "torch":
            return reference.ddim_step(model_output, sample, table, timestep, options, variance_noise, philox_state,
                                       uncond_output, process_group)
        if isinstance(timestep, torch.Tensor) and timestep.device != sample.device:
            timestep = timestep.to(sample.device)
        tensor_timestep = isinstance(timestep, torch.Tensor)
        args = (model_output, sample, table, timestep if tensor_timestep else None, 0 if tensor_timestep else
                int(timestep), variance_noise, philox_state, uncond_output, *options.op_arguments())
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
        return (prev if options.write_prev_sample else None), (x0 if options.write_pred_original_sample else None)
    plan = plan_for(model_output, sample, table, timestep, options, variance_noise, philox_state, uncond_output,
                    backend, process_group)
    if plan.launcher is not None and autograd.requires_grad(model_output, sample, uncond_output, variance_noise):
        return autograd.triton_step(plan, model_output, sample, table, timestep, variance_noise, philox_state,
                                    uncond_output, process_group)
    return plan.run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output)


# Two custom ops: torch.library registers autograd formulas only for functional ops, and the Philox variant
# moves its generator's offsets on in place (no second launch), so it declares that mutation and has no formula.
@torch.library.custom_op("fastddim::ddim_step", mutates_args=())
def _triton_step_op(
    model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep_tensor: torch.Tensor | None,
    timestep_value: int, variance_noise: torch.Tensor | None, philox_state: torch.Tensor | None,
    uncond_output: torch.Tensor | None, prediction_type: str, options: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    step_options = StepOptions.from_op_arguments(prediction_type, tuple(options))
    if philox_state is not None:
        raise ValueError("fastddim::ddim_step draws no noise in the kernel: use fastddim::ddim_step_philox")
    return _run_step_op(model_output, sample, table, timestep_tensor, timestep_value, variance_noise, None,
                        uncond_output, step_options)


@torch.library.custom_op("fastddim::ddim_step_philox", mutates_args=("philox_state",))
def _triton_step_philox_op(
    model_output: torch.Tensor, sample: torch.Tensor, table: torch.Tensor, timestep_tensor: torch.Tensor | None,
    timestep_value: int, variance_noise: torch.Tensor | None, philox_state: torch.Tensor,
    uncond_output: torch.Tensor | None, prediction_type: str, options: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    step_options = StepOptions.from_op_arguments(prediction_type, tuple(options))
    return _run_step_op(model_output, sample, table, timestep_tensor, timestep_value, variance_noise, philox_state,
                        uncond_output, step_options)


def _run_step_op(model_output, sample, table, timestep_tensor, timestep_value, variance_noise, philox_state,
                 uncond_output, options: StepOptions):
    timestep = timestep_tensor if timestep_tensor is not None else timestep_value
    return plan_for(model_output, sample, table, timestep, options, variance_noise, philox_state, uncond_output,
                    "triton").run(model_output, sample, table, timestep, variance_noise, philox_state,
                                  uncond_output)


def _fake_step(model_output, sample, table, timestep_tensor, timestep_value, variance_noise, philox_state,
               uncond_output, prediction_type, options):
    from fastddim.kernels.ddim import allocate_outputs

    outputs, _, _ = allocate_outputs(model_output, sample, uncond_output, variance_noise, philox_state is not None)
    return outputs


_triton_step_op.register_fake(_fake_step)
_triton_step_philox_op.register_fake(_fake_step)
autograd.register_step_op_autograd(_triton_step_op)
