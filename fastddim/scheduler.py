"""`DDIMScheduler` and `DDIMInverseScheduler`: drop-in replacements for diffusers' classes.

Same constructor arguments and defaults, attributes, methods and config files as diffusers 0.42; the step runs
through `fastddim.ops` (one fused Triton kernel on CUDA, a lean torch path elsewhere). Where diffusers accepts
input it cannot handle (a timestep outside the schedule, an unknown option, an eta that makes the step NaN),
fastddim raises a ValueError naming the argument instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections import OrderedDict

import numpy as np
import torch

from fastddim import ops, reference
# diffusers' pipeline loader finds the base class named SchedulerMixin in the module a component comes from.
from fastddim.config import (  # noqa: F401
    DIFFUSERS_AVAILABLE, BaseOutput, SchedulerConfigMixin, SchedulerMixin, diffusers_bases, register_to_config,
)
from fastddim.noise import PhiloxGenerator, randn_tensor
from fastddim.plan import StepOptions, tensor_key
from fastddim.schedule import (
    BETA_PREV,
    BETA_SCHEDULES,
    INVERSE_TIMESTEP_SPACINGS,
    TIMESTEP_SPACINGS,
    VARIANCE,
    inference_timesteps,
    make_betas,
    step_table,
)

# The names diffusers lists as sharing DDIM's config (its KarrasDiffusionSchedulers).
KARRAS_DIFFUSION_SCHEDULERS = [
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
]


if DIFFUSERS_AVAILABLE:
    (_OutputFields,) = diffusers_bases("scheduling_ddim", "DDIMSchedulerOutput")
else:
    @dataclasses.dataclass
    class _OutputFields(BaseOutput):
        prev_sample: torch.Tensor
        pred_original_sample: torch.Tensor | None = None


class DDIMSchedulerOutput(_OutputFields):
    """Output of a scheduler's `step`: diffusers' `BaseOutput` (and its `DDIMSchedulerOutput`, where diffusers is
    installed), so attribute access, `out["prev_sample"]`, `out[0]`, `"pred_original_sample" in out`, item
    assignment, `to_tuple()` and torch pytrees all work as in diffusers.

    Args:
        prev_sample (`torch.Tensor`): the sample x_{t-1} of the previous timestep, the next model input.
        pred_original_sample (`torch.Tensor`, *optional*): the predicted denoised sample x_0 (after clipping or
            thresholding), for previews or guidance.

    `pred_original_sample` is None when the scheduler's `write_pred_original_sample` is False. Like diffusers'
    output, it also behaves as a tuple and as a mapping.
    """

    # Public under fastddim's name (as numpy does for its classes): pipelines record ["fastddim", class name].
    __module__ = "fastddim"

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None = None):
        # What the dataclass __init__ and BaseOutput.__post_init__ do, without their per-call cost (a step on
        # small tensors costs mostly Python).
        object.__setattr__(self, "prev_sample", prev_sample)
        object.__setattr__(self, "pred_original_sample", pred_original_sample)
        if pred_original_sample is None and isinstance(prev_sample, dict):
            for key, value in prev_sample.items():
                self[key] = value
            return
        if prev_sample is not None:
            OrderedDict.__setitem__(self, "prev_sample", prev_sample)
        if pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", pred_original_sample)


_is_compiling = torch.compiler.is_compiling  # traced by torch.compile as itself, whatever its name
_INFINITY = math.inf
_INT64 = torch.int64
_TENSOR = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_new_output = DDIMSchedulerOutput.__new__
_set_item = OrderedDict.__setitem__


def _step_output(prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None) -> DDIMSchedulerOutput:
    """`DDIMSchedulerOutput(prev_sample, pred_original_sample)` for a step's outputs (tensors or None), built
    field by field as its __init__ builds it, at half its cost: this runs at every step (outside torch.compile,
    which cannot trace OrderedDict.__setitem__)."""
    output = _new_output(DDIMSchedulerOutput)
    fields = output.__dict__
    fields["prev_sample"] = prev_sample
    fields["pred_original_sample"] = pred_original_sample
    if prev_sample is not None:
        _set_item(output, "prev_sample", prev_sample)
    if pred_original_sample is not None:
        _set_item(output, "pred_original_sample", pred_original_sample)
    return output


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_open_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def _check_trained_betas(trained_betas, num_train_timesteps: int) -> None:
    try:
        betas = np.asarray(trained_betas, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"trained_betas must be a sequence of numbers, got {type(trained_betas).__name__}") from None
    if betas.ndim != 1 or betas.size != num_train_timesteps:
        raise ValueError(f"trained_betas must be a 1-D sequence of num_train_timesteps={num_train_timesteps} values, "
                         f"got shape {betas.shape}")
    # A zero-terminal-SNR schedule ends in a beta of exactly 1 (alpha_cumprod 0), which v-prediction steps through.
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("trained_betas must all lie in (0, 1] (and be finite)")
    if np.any(np.diff(betas) < 0):
        raise ValueError("trained_betas must be non-decreasing (noise grows with the timestep)")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class _Snapshot:
    """Whether a value was replaced or changed in place since it was recorded: by torch's version counter for
    tensors, by value for tensors torch does not version (inference tensors); numbers cannot change."""

    __slots__ = ("value", "version", "copy")

    def __init__(self, value):
        self.value = value
        self.version = self.copy = None
        if isinstance(value, torch.Tensor):
            if value.is_inference():
                self.copy = value.detach().clone()
            else:
                self.version = value._version

    def changed(self, current) -> bool:
        if current is not self.value:
            return True
        if self.version is not None:
            return current._version != self.version
        return self.copy is not None and not torch.equal(current, self.copy)


def _schedule_attribute(name: str, check, doc: str) -> property:
    """A scheduler attribute the step table is derived from: assigning it (checked by `check(self, value)`)
    makes the next step, and add_noise, use the new value."""
    private = "_" + name

    def get(self):
        try:
            return self.__dict__[private]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, value):
        self.__dict__[private] = check(self, value)
        self.__dict__["_table_state"] = None

    return property(get, set, doc=doc)


def _check_alphas_cumprod(self, value):
    num_train = self.config.num_train_timesteps
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"alphas_cumprod must be a floating-point torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != (num_train,):
        raise ValueError(f"alphas_cumprod must have shape ({num_train},) (one per training timestep), "
                         f"got {tuple(value.shape)}")
    return value


def _check_boundary(self, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"the boundary alpha product must be one floating-point value, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"the boundary alpha product must be a number or a tensor, got {type(value).__name__}")
    return value


def _check_num_inference_steps(self, value):
    if value is None:
        return None
    value = _check_positive_int("num_inference_steps", value)
    num_train = self.config.num_train_timesteps
    if value > num_train:
        raise ValueError(f"num_inference_steps ({value}) cannot be larger than num_train_timesteps ({num_train}): "
                         f"the model was trained on {num_train} timesteps")
    return value


def _check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


# The config keys the betas and alphas_cumprod are built from, once, at construction.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr", "set_alpha_to_one")


def _same_value(a, b) -> bool:
    if a is None or b is None or isinstance(a, (str, bool, numbers.Number)):
        return a is b or (type(a) is type(b) and a == b)
    return np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


class _DDIMBase(SchedulerConfigMixin):
    """Schedule, timesteps and coefficient tables shared by the forward and inverse schedulers."""

    order = 1
    _inverse = False
    # False: step outputs carry pred_original_sample=None and the step skips writing it (a quarter of its memory
    # traffic on the Triton backend: 3 of 4 full-size tensor passes remain). Not a config key.
    write_pred_original_sample = True

    alphas_cumprod = _schedule_attribute(
        "alphas_cumprod", _check_alphas_cumprod,
        "The cumulative products of the alphas, one per training timestep; assigning a tensor of that shape (or "
        "changing it in place) makes the next step and add_noise use it.")
    num_inference_steps = _schedule_attribute(
        "num_inference_steps", _check_num_inference_steps,
        "The number of inference steps of `set_timesteps`; a step goes from t to t - num_train_timesteps // "
        "num_inference_steps, so assigning it changes the next step, as in diffusers.")

    def _build_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                        prediction_type, timestep_spacing, clip_sample_range, rescale_betas_zero_snr):
        _check_positive_int("num_train_timesteps", num_train_timesteps)
        if trained_betas is None:
            _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
            if beta_schedule != "squaredcos_cap_v2":
                _check_open_unit("beta_start", beta_start)
                _check_open_unit("beta_end", beta_end)
        else:
            _check_trained_betas(trained_betas, num_train_timesteps)
        for name in ("set_alpha_to_one", "rescale_betas_zero_snr"):
            _check_flag(name, self.config.get(name, False))
        self._check_options(self.config)
        # Normal tensors even under torch.inference_mode(): their version counters show in-place changes.
        with torch.inference_mode(False):
            self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                    rescale_betas_zero_snr)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._schedule_config = {k: self.config.get(k) for k in SCHEDULE_KEYS}
        self._num_train = num_train_timesteps  # alphas_cumprod keeps this length (checked when assigned)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._device_tables = {}
        self._device_alphas = None

    def __getstate__(self) -> dict:
        """The scheduler's state for pickle and copy.deepcopy, without the step memo: a cache of the last step's
        plan (a torch-path plan is a closure, which pickle cannot take), rebuilt by the copy's first step."""
        state = self.__dict__.copy()
        state.pop("_step_memo", None)
        return state

    def _check_options(self, config) -> None:
        """Check the config values that a step or set_timesteps reads (at construction, and again after the
        config was written to), and that the keys the betas were built from did not change."""
        _check_choice("prediction_type", config.get("prediction_type"), reference.PREDICTION_TYPES)
        _check_choice("timestep_spacing", config.get("timestep_spacing"),
                      INVERSE_TIMESTEP_SPACINGS if self._inverse else TIMESTEP_SPACINGS)
        clip_sample_range = config.get("clip_sample_range")
        if isinstance(clip_sample_range, bool) or not (
            isinstance(clip_sample_range, numbers.Real) and math.isfinite(clip_sample_range) and clip_sample_range > 0
        ):
            raise ValueError(f"clip_sample_range must be a finite number > 0, got {clip_sample_range!r}")
        _check_flag("clip_sample", config.get("clip_sample"))
        steps_offset = config.get("steps_offset")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
        built = self.__dict__.get("_schedule_config")
        for key in SCHEDULE_KEYS if built is not None else ():
            if not _same_value(config.get(key), built[key]):
                raise ValueError(
                    f"config.{key} was changed to {config.get(key)!r} after the scheduler was built with "
                    f"{key}={built[key]!r}, which fixed its betas and alphas_cumprod: build a new scheduler, "
                    f"{type(self).__name__}.from_config(scheduler.config)"
                )

    def _current_table(self):
        """(CPU step table, its rows as Python floats) for the current num_inference_steps, alphas_cumprod and
        boundary alpha product: rebuilt when one was assigned or changed in place since the last build. Device
        copies are updated in place, so a captured CUDA graph reads the new values too."""
        state = self.__dict__.get("_table_state")
        alphas, boundary = self.__dict__["_alphas_cumprod"], self._boundary_alpha_cumprod()
        # (A compiled step does not re-check version counters, which dynamo cannot guard on: it keeps its table
        # until an attribute is assigned again.)
        if state is not None and (torch.compiler.is_compiling()
                                  or not state[0].changed(alphas) and not state[1].changed(boundary)):
            return state[2], state[3]
        if self.num_inference_steps is None:
            return None, None
        with torch.inference_mode(False):
            table = step_table(alphas.detach().cpu(), self.num_inference_steps, float(boundary),
                               inverse=self._inverse)
            for device_table in self._device_tables.values():
                device_table.copy_(table)
        self._table_state = (_Snapshot(alphas), _Snapshot(boundary), table, table.tolist())
        return table, self._table_state[3]

    @property
    def _table(self):
        """The float64 step table of the current state, on the CPU."""
        return self._current_table()[0]

    @property
    def _host_rows(self):
        """The step table as lists of Python floats (the torch path's int timesteps read them)."""
        return self._current_table()[1]

    def _boundary_alpha_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Returns `sample` unchanged: DDIM needs no input scaling (kept for interchangeability).

        Args:
            sample (`torch.Tensor`): the input sample.
            timestep (`int`, *optional*): the current timestep (unused).
        """
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the timesteps of a sampling run (call before `step`).

        Args:
            num_inference_steps (`int`): the number of steps, from 1 to `num_train_timesteps`.
            device (`str` or `torch.device`, *optional*): where `timesteps` is placed.
        """
        self._config_options()  # the config may have been written to since
        num_train = self.config.num_train_timesteps
        num_inference_steps = _check_num_inference_steps(self, num_inference_steps)
        timesteps = inference_timesteps(num_train, num_inference_steps, self.config.timestep_spacing,
                                        self.config.steps_offset, inverse=self._inverse)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._current_table()
        if device is not None:
            self._table_on(torch.device(device))

    def _resolve_timestep(self, timestep, sample):
        """An int (checked against the table) for host timesteps; device tensors stay on the device unread (their
        dtype and shape are checked with the step's plan, see ops.dispatch)."""
        num_train = self.__dict__["_num_train"]
        if isinstance(timestep, torch.Tensor):
            if not timestep.is_cpu or _is_compiling():
                return timestep  # no host read: a timestep outside the table gives NaN (see kernels/ddim.py)
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() else 1
        timestep = ops.check_timestep(timestep, batch)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 1:
                timestep = int(timestep.item())
            else:
                if not bool(((timestep >= 0) & (timestep < num_train)).all()):
                    raise ValueError(f"timestep values must be in [0, {num_train}), got {timestep.tolist()}")
                return timestep.to(sample.device)
        if not 0 <= timestep < num_train:
            raise ValueError(f"timestep must be in [0, {num_train}), got {timestep}")
        return timestep

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """The step table on `device` (copied once per device and set_timesteps)."""
        table = self._table
        if device.type == "cpu":
            return table
        cached = self._device_tables.get(device)
        if cached is None:
            cached = self._device_tables[device] = table.to(device)
        return cached

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod in float64 on `device`, copied once per device while alphas_cumprod stays the same."""
        alphas = self.alphas_cumprod
        cached = self._device_alphas
        if cached is None or cached[0].changed(alphas):
            cached = self._device_alphas = (_Snapshot(alphas), {})
        on_device = cached[1].get(device)
        if on_device is None:
            on_device = cached[1][device] = alphas.detach().to(device=device, dtype=torch.float64)
        return on_device

    def _run_step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                  variance_noise=None, return_dict=True, uncond_output=None, guidance_scale=1.0, guidance_rescale=0.0,
                  process_group=None):
        """Every scheduler's step: `step` (with `uncond_output`, `guided_step`) of diffusers' arguments."""
        state = self.__dict__
        if state.get("_num_inference_steps") is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(num_inference_steps) before step")
        compiling = _is_compiling()
        num_train = state["_num_train"]
        if type(timestep) is not int or not 0 <= timestep < num_train:
            # A one-element int64 CPU tensor (pipelines pass a 0-d one) read in one call, item (the cheapest), as
            # the full check reads it; other timesteps take the full check.
            value = None
            if type(timestep) is _TENSOR and not compiling and timestep.is_cpu and timestep.dtype is _INT64:
                try:
                    value = timestep.item()
                except RuntimeError:  # not one element (per-sample timesteps, for one)
                    pass
            timestep = value if value is not None and 0 <= value < num_train else self._resolve_timestep(timestep,
                                                                                                           sample)
        if type(eta) is not float or not 0.0 <= eta < _INFINITY:  # a float in range needs no conversion or check
            eta = ops.check_eta(eta)
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        philox_state = None
        if eta == 0:
            variance_noise = None  # diffusers draws no noise at eta 0 and ignores variance_noise
        elif isinstance(generator, PhiloxGenerator):
            philox_state = generator.buffer  # the step draws from it and moves it on, in one launch (checked there)
        elif variance_noise is None and isinstance(model_output, torch.Tensor):
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        if eta > 1 and type(timestep) is int:
            row = self._host_rows[timestep]
            if row[BETA_PREV] - eta * eta * row[VARIANCE] < 0:
                raise ValueError(
                    f"eta={eta} is too large at timestep {timestep}: 1 - alpha_prev - eta^2 * variance < 0 "
                    "(diffusers would return NaN there); use eta <= 1"
                )
        config = state["_internal_dict"]
        thresholding = config.get("thresholding", False)
        if thresholding and process_group is None:
            process_group = self.threshold_process_group
        elif not thresholding:
            process_group = None
        write_x0 = self.write_pred_original_sample
        if write_x0 is not True and write_x0 is not False:
            raise TypeError(f"write_pred_original_sample must be True or False, got {write_x0!r}")
        key = None
        if not compiling:
            # The last step's plan and table serve this one while everything they were made from is the same: the
            # table's state (replaced when rebuilt or when an input is assigned) and its inputs' version counters
            # (in-place changes), the config (replaced, or counted when written), the arguments, the tensors'
            # dtypes, shapes, strides and devices, FASTDDIM_BACKEND: one tuple comparison. The table's inputs are
            # read from its state, which holds them (assigning one sets the state to None: rebuilt here).
            try:
                table_state = state.get("_table_state")
                if table_state is None:
                    self._current_table()
                    table_state = state["_table_state"]
                boundary = table_state[1].value
                key = (table_state, table_state[0].value._version,
                       boundary._version if isinstance(boundary, _TENSOR) else None,
                       config, config._writes, eta, use_clipped_model_output, thresholding, guidance_scale,
                       guidance_rescale, write_x0, process_group, ops.backend_setting_raw(),
                       int if type(timestep) is int else tensor_key(timestep),
                       model_output.dtype, model_output.shape, model_output.stride(), model_output.device,
                       sample.dtype, sample.shape, sample.stride(), sample.device,
                       None if variance_noise is None else tensor_key(variance_noise),
                       None if philox_state is None else tensor_key(philox_state),
                       # tensor_key(uncond_output), written out (guided steps call no function for it).
                       None if uncond_output is None else (uncond_output.dtype, uncond_output.shape,
                                                           uncond_output.stride(), uncond_output.device),
                       # autograd.requires_grad, written out (a call costs more): memos are made without grad.
                       _grad_enabled() and (
                           model_output.requires_grad or sample.requires_grad
                           or (uncond_output is not None and uncond_output.requires_grad)
                           or (variance_noise is not None and variance_noise.requires_grad)))
            except (AttributeError, TypeError, RuntimeError):
                # Not tensors (the checks of the full path name the argument), or inference tensors among the
                # table's inputs, which carry no version counter (the table state compares their values).
                key = None
            memo = state.get("_step_memo")
            if memo is not None and key == memo[0]:
                prev_sample, pred_original_sample = memo[1](model_output, sample, memo[2], timestep, variance_noise,
                                                            philox_state, uncond_output)
                if not return_dict:
                    return (prev_sample, pred_original_sample)
                return _step_output(prev_sample, pred_original_sample)
        if philox_state is not None and isinstance(sample, torch.Tensor):
            ops.check_philox_state(philox_state, sample, name="generator")
        options = self._step_options(eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
                                     write_x0)
        table = self._table if getattr(sample, "is_cpu", True) else self._table_on(sample.device)
        # The tensors are checked once per step plan (ops.plan_for); the options were checked above or at
        # construction.
        if key is None or key[-1]:  # compiling, not tensors, or recorded for autograd
            prev_sample, pred_original_sample = ops.dispatch(model_output, sample, table, timestep, options,
                                                             variance_noise, philox_state, uncond_output,
                                                             process_group=process_group)
        else:
            plan = ops.plan_for(model_output, sample, table, timestep, options, variance_noise, philox_state,
                                uncond_output, process_group=process_group)
            # Keyed on the table state as it is now (the table may have been rebuilt above, from the same inputs).
            self._step_memo = ((state["_table_state"], *key[1:]), plan.run, table)
            prev_sample, pred_original_sample = plan.run(model_output, sample, table, timestep, variance_noise,
                                                         philox_state, uncond_output)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        # The constructor, which torch.compile traces (it cannot trace _step_output's OrderedDict.__setitem__).
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _config_options(self) -> tuple:
        """(config, its write counter, the StepOptions cache): the config checked again, and the cache emptied,
        when it was written to or replaced since the last step."""
        config = self.__dict__["_internal_dict"]
        cached = self.__dict__.get("_options_cache")
        if cached is None or cached[0] is not config or cached[1] != config._writes:
            self._check_options(config)
            cached = self._options_cache = (config, config._writes, {})
        return cached

    def _step_options(self, eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
                      write_pred_original_sample, write_prev_sample=True) -> StepOptions:
        """The checked `StepOptions` of a step with these arguments and the config's settings, cached until the
        config is written to or replaced (pipelines replace it, e.g. to fix steps_offset; users set
        `scheduler.config.prediction_type = ...`)."""
        cached = self._config_options()
        config = cached[0]
        key = (eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
               write_pred_original_sample, write_prev_sample)
        # Traced by torch.compile, the options are built in the graph's Python: a cache lookup would add a guard on
        # the cache's contents, which the traced call itself changes (a recompile at the second step).
        compiling = torch.compiler.is_compiling()
        options = None if compiling else cached[2].get(key)
        if options is None:
            options = StepOptions(
                eta=eta, prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                clip_sample_range=config.clip_sample_range, thresholding=thresholding,
                dynamic_thresholding_ratio=config.get("dynamic_thresholding_ratio", 0.995),
                sample_max_value=config.get("sample_max_value", 1.0),
                use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale, write_prev_sample=write_prev_sample,
                write_pred_original_sample=write_pred_original_sample,
            ).checked(guided=True)
            if not compiling:
                if len(cached[2]) >= 64:  # e.g. an eta sweep: keep the cache small
                    cached[2].clear()
                cached[2][key] = options
        return options

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# The schedulers' steps call it as a function: an attribute of a scheduler is looked up through ConfigMixin's
# __getattr__ hook, which Python does not specialise (about 40 ns per lookup and bound method).
_run_step = _DDIMBase._run_step


class DDIMScheduler(_DDIMBase, *diffusers_bases("scheduling_ddim", "DDIMScheduler")):
    """Denoising diffusion implicit models (Song et al., 2021): a drop-in for diffusers' `DDIMScheduler`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the number of diffusion steps the model was trained with.
        beta_start (`float`, defaults to 0.0001): the first beta of the schedule.
        beta_end (`float`, defaults to 0.02): the last beta of the schedule.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): betas to use instead of a schedule; one per
            training timestep.
        clip_sample (`bool`, defaults to `True`): clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
        set_alpha_to_one (`bool`, defaults to `True`): the alpha product after the last step is 1 (otherwise the
            alpha product of timestep 0).
        steps_offset (`int`, defaults to 0): added to the inference timesteps ("leading" spacing).
        prediction_type (`str`, defaults to `"epsilon"`): what the model predicts: `"epsilon"` (noise),
            `"sample"` (x0) or `"v_prediction"` (velocity, Imagen Video section 2.4).
        thresholding (`bool`, defaults to `False`): dynamic thresholding of x0 (Imagen); unsuitable for latent
            diffusion models such as Stable Diffusion.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of |x0| used by thresholding.
        clip_sample_range (`float`, defaults to 1.0): the clipping bound of `clip_sample`.
        sample_max_value (`float`, defaults to 1.0): the largest threshold dynamic thresholding may use.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"`, `"trailing"` or `"linspace"` (Table 2 of
            "Common Diffusion Noise Schedules and Sample Steps are Flawed").
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale the betas to zero terminal SNR.

    Dynamic thresholding finds diffusers' threshold (torch.quantile of |x0|, clamped) bit for bit at any sample
    size (torch.quantile stops at 2**24 elements). For samples sharded across processes (each holds the whole
    batch and a part of every sample), set the attribute `threshold_process_group` (not a config key; `step`
    keeps diffusers' signature) to the `torch.distributed` group holding the shards, or pass `process_group=` to
    `guided_step`: the threshold is then that of the whole samples, identical on every process, and every
    process must run each step.
    """

    __module__ = "fastddim"  # public under fastddim's name: pipelines record it as ["fastddim", "DDIMScheduler"]
    _compatibles = list(KARRAS_DIFFUSION_SCHEDULERS)
    final_alpha_cumprod = _schedule_attribute(
        "final_alpha_cumprod", _check_boundary,
        "The alpha product after the last step (1, or alphas_cumprod[0]); assigning it changes the last step.")
    # The torch.distributed group across which thresholded samples are sharded (None: not sharded).
    threshold_process_group = None

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._build_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, timestep_spacing, clip_sample_range, rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def _boundary_alpha_cumprod(self) -> torch.Tensor:
        return self.final_alpha_cumprod

    def _check_options(self, config) -> None:
        super()._check_options(config)
        _check_flag("thresholding", config.get("thresholding"))
        ratio = config.get("dynamic_thresholding_ratio")
        if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) and 0 < ratio <= 1):
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio!r}")
        # Below 1 the clamp of diffusers' threshold, clamp(quantile, 1, sample_max_value), gives sample_max_value.
        max_value = config.get("sample_max_value")
        if isinstance(max_value, bool) or not (
            isinstance(max_value, numbers.Real) and 0 < max_value < math.inf
        ):
            raise ValueError(f"sample_max_value must be a finite number > 0, got {max_value!r}")

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """The DDIM variance between `timestep` and `prev_timestep` (diffusers' helper, kept for callers)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding of a predicted x0 with this scheduler's settings (diffusers' helper)."""
        upcast = sample.to(reference.compute_dtype(sample.dtype))
        out = reference.threshold(upcast, self.config.dynamic_thresholding_ratio, self.config.sample_max_value,
                                  self.threshold_process_group)
        return out.to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One reverse step x_t -> x_{t-1}.

        Args:
            model_output (`torch.Tensor`): the direct output of the diffusion model.
            timestep (`int` or one-element integer tensor): the current timestep, in [0, num_train_timesteps).
            sample (`torch.Tensor`): the current sample x_t, of the shape and device of `model_output`.
            eta (`float`, defaults to 0.0): the weight of the added noise, >= 0: 0 is DDIM (deterministic), 1 is
                DDPM-like. Values above 1 are accepted while 1 - alpha_prev - std^2 stays >= 0.
            use_clipped_model_output (`bool`, defaults to `False`): re-derive the noise prediction from the
                clipped x0, as the DDIM paper's "corrected" model output.
            generator (`torch.Generator` or list of them, *optional*): draws the noise when `eta > 0`, exactly as
                diffusers draws it.
            variance_noise (`torch.Tensor`, *optional*): the noise itself, instead of `generator` (e.g. for
                CycleDiffusion); same shape and device as `sample`.
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerOutput` rather than a tuple.

        Returns:
            `DDIMSchedulerOutput` or `tuple`: `(prev_sample, pred_original_sample)`.
        """
        return _run_step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                         variance_noise, return_dict)

    def guided_step(
        self,
        noise_pred_uncond: torch.Tensor,
        noise_pred_cond: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        process_group=None,
    ) -> DDIMSchedulerOutput | tuple:
        """Classifier-free guidance fused into the step: `step` on the guided model output.

        The model output used is `uncond + guidance_scale * (cond - uncond)`, rescaled as diffusers'
        `rescale_noise_cfg` when `guidance_rescale > 0` (per-sample std over all but the batch dimension), all
        in the same pass as the step on the Triton backend, so pipelines skip separate guidance kernels.

        Args:
            noise_pred_uncond (`torch.Tensor`): the model output without conditioning.
            noise_pred_cond (`torch.Tensor`): the model output with conditioning (diffusers' `noise_pred_text`).
            timestep, sample, eta, use_clipped_model_output, generator, variance_noise, return_dict: as in `step`.
            process_group (`torch.distributed.ProcessGroup`, *optional*): with thresholding, the group across which
                the samples are sharded (defaults to the attribute `threshold_process_group`).
            guidance_scale (`float`): the guidance weight (1 means no guidance).
            guidance_rescale (`float`, defaults to 0.0): the weight of the std-rescaled guidance, from
                "Common Diffusion Noise Schedules and Sample Steps are Flawed" (section 3.4).
        """
        # Floats are checked with the step's options (a NaN or inf fails there); other types here, with a clear error.
        if type(guidance_scale) is not float:
            guidance_scale = ops.check_real("guidance_scale", guidance_scale)
        if type(guidance_rescale) is not float:
            guidance_rescale = ops.check_real("guidance_rescale", guidance_rescale, minimum=0.0)
        return _run_step(self, noise_pred_cond, timestep, sample, eta, use_clipped_model_output, generator,
                         variance_noise, return_dict, noise_pred_uncond, guidance_scale, guidance_rescale,
                         process_group)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward diffusion: sqrt(alpha_t) * original_samples + sqrt(1 - alpha_t) * noise.

        Args:
            original_samples (`torch.Tensor`): clean samples, batch first.
            noise (`torch.Tensor`): noise of the same shape.
            timesteps (`torch.Tensor` or `int`): one timestep, or one per sample.
        """
        sqrt_alpha, sqrt_one_minus_alpha = self._forward_scales(original_samples, timesteps, "original_samples")
        return self._combine(sqrt_alpha, original_samples, sqrt_one_minus_alpha, noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target: sqrt(alpha_t) * noise - sqrt(1 - alpha_t) * sample.

        Args:
            sample (`torch.Tensor`): clean samples, batch first.
            noise (`torch.Tensor`): noise of the same shape.
            timesteps (`torch.Tensor` or `int`): one timestep, or one per sample.
        """
        sqrt_alpha, sqrt_one_minus_alpha = self._forward_scales(sample, timesteps, "sample")
        return self._combine(sqrt_alpha, noise, -sqrt_one_minus_alpha, sample)

    def _forward_scales(self, samples: torch.Tensor, timesteps, name: str):
        if not isinstance(samples, torch.Tensor) or samples.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if isinstance(timesteps, numbers.Integral) and not isinstance(timesteps, bool):
            timesteps = torch.tensor(int(timesteps))
        if not isinstance(timesteps, torch.Tensor) or timesteps.is_floating_point() or timesteps.dtype == torch.bool:
            raise TypeError("timesteps must be an int or an integer tensor")
        timesteps = timesteps.to(samples.device).flatten()
        num_train = self.config.num_train_timesteps
        if timesteps.numel() not in (1, samples.shape[0] if samples.dim() else 1):
            raise ValueError(f"timesteps must hold one timestep or one per sample ({samples.shape[0]}), "
                             f"got {timesteps.numel()}")
        alphas = self._alphas_cumprod_on(samples.device)
        if samples.device.type == "cpu" and not bool(((timesteps >= 0) & (timesteps < num_train)).all()):
            raise ValueError(f"timesteps must be in [0, {num_train}), got {timesteps.tolist()}")
        alpha = alphas[timesteps]
        view = (-1,) + (1,) * (samples.dim() - 1)
        dtype = reference.compute_dtype(samples.dtype)
        return alpha.sqrt().to(dtype).view(view), (1 - alpha).sqrt().to(dtype).view(view)

    @staticmethod
    def _combine(scale_a, a, scale_b, b):
        if a.shape != b.shape or a.device != b.device:
            raise ValueError(f"the two tensors must have one shape and device, got {tuple(a.shape)} on {a.device} "
                             f"and {tuple(b.shape)} on {b.device}")
        dtype = torch.promote_types(a.dtype, b.dtype)
        math_dtype = reference.compute_dtype(dtype)
        out = scale_a * a.to(math_dtype)
        out.addcmul_(scale_b, b.to(math_dtype))
        return out.to(dtype)


class DDIMInverseScheduler(_DDIMBase, *diffusers_bases("scheduling_ddim_inverse", "DDIMInverseScheduler")):
    """The inverse of `DDIMScheduler` (DDIM inversion, x_0 -> x_T): a drop-in for diffusers' class.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the number of diffusion steps the model was trained with.
        beta_start (`float`, defaults to 0.0001): the first beta of the schedule.
        beta_end (`float`, defaults to 0.02): the last beta of the schedule.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): betas to use instead of a schedule.
        clip_sample (`bool`, defaults to `True`): clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
        set_alpha_to_one (`bool`, defaults to `True`): the alpha product before the first step is 1 (otherwise
            the alpha product of timestep 0). The deprecated `set_alpha_to_zero` keyword sets the same thing.
        steps_offset (`int`, defaults to 0): added to the inference timesteps ("leading" spacing).
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"sample"` or `"v_prediction"`.
        clip_sample_range (`float`, defaults to 1.0): the clipping bound of `clip_sample`.
        timestep_spacing (`str`, defaults to `"leading"`): `"leading"` or `"trailing"`.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale the betas to zero terminal SNR.
    """

    __module__ = "fastddim"  # public under fastddim's name, as DDIMScheduler
    _inverse = True
    initial_alpha_cumprod = _schedule_attribute(
        "initial_alpha_cumprod", _check_boundary,
        "The alpha product before the first step (1, or alphas_cumprod[0]); assigning it changes the first step.")
    ignore_for_config = ["kwargs"]
    _deprecated_kwargs = ["set_alpha_to_zero"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        unknown = set(kwargs) - {"set_alpha_to_zero"}
        if unknown:
            raise TypeError(f"DDIMInverseScheduler got unexpected arguments {sorted(unknown)}")
        if kwargs.get("set_alpha_to_zero") is not None:
            warnings.warn("set_alpha_to_zero is deprecated; use set_alpha_to_one", FutureWarning, stacklevel=3)
            set_alpha_to_one = kwargs["set_alpha_to_zero"]
            # Recorded as chosen, not defaulted, so from_config of this config keeps it.
            defaulted = [k for k in self.config.get("_use_default_values", ()) if k != "set_alpha_to_one"]
            self.register_to_config(set_alpha_to_one=set_alpha_to_one, _use_default_values=defaulted)
        self._build_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                             prediction_type, timestep_spacing, clip_sample_range, rescale_betas_zero_snr)
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps).copy().astype(np.int64))

    def _boundary_alpha_cumprod(self) -> torch.Tensor:
        return self.initial_alpha_cumprod

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One inversion step x_{t-ratio} -> x_t (noise is never added).

        Args:
            model_output (`torch.Tensor`): the direct output of the diffusion model.
            timestep (`int` or one-element integer tensor): the timestep the step arrives at.
            sample (`torch.Tensor`): the current sample, of the shape and device of `model_output`.
            return_dict (`bool`, defaults to `True`): return a `DDIMSchedulerOutput` rather than a tuple.

        Returns:
            `DDIMSchedulerOutput` or `tuple`: `(prev_sample, pred_original_sample)`.
        """
        return _run_step(self, model_output, timestep, sample, return_dict=return_dict)
