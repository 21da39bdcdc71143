"""`DDIMScheduler` and `DDIMInverseScheduler`: drop-in replacements for diffusers' classes.

Same constructor arguments and defaults, attributes, methods and config files as diffusers 0.42; the step runs
through `fastddim.ops` (one fused Triton kernel on CUDA, a lean torch path elsewhere). Where diffusers accepts
input it cannot handle (a timestep outside the schedule, an unknown option, an eta that makes the step NaN),
fastddim raises a ValueError naming the argument instead.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from fastddim import ops, reference
from fastddim.config import SchedulerMixin, register_to_config
from fastddim.noise import PhiloxGenerator, randn_tensor
from fastddim.plan import StepOptions
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


class DDIMSchedulerOutput:
    """Output of a scheduler's `step`.

    Args:
        prev_sample (`torch.Tensor`): the sample x_{t-1} of the previous timestep, the next model input.
        pred_original_sample (`torch.Tensor`): the predicted denoised sample x_0 (after clipping or
            thresholding), for previews or guidance.

    On the Triton backend the step writes only `prev_sample`, and `pred_original_sample` is computed from the
    step's inputs when it is first read: most loops never read it, and skipping its write saves a quarter of the
    step's memory traffic. Reading it after one of the step's inputs was modified in place raises a RuntimeError
    (the inputs' version counters are checked); set `scheduler.lazy_pred_original_sample = False` to always
    compute it with the step. Like diffusers' output, it also behaves as a tuple and as a mapping.
    """

    def __init__(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None = None):
        self.prev_sample = prev_sample
        self._pred_original_sample = pred_original_sample
        self._deferred = None

    @classmethod
    def deferred(cls, prev_sample: torch.Tensor, compute, inputs: dict[str, torch.Tensor]) -> "DDIMSchedulerOutput":
        """An output whose pred_original_sample is `compute()`, run on first read if `inputs` are unchanged."""
        output = cls(prev_sample)
        output._deferred = (compute, [(name, tensor, tensor._version) for name, tensor in inputs.items()])
        return output

    @property
    def pred_original_sample(self) -> torch.Tensor | None:
        if self._deferred is not None:
            compute, inputs = self._deferred
            for name, tensor, version in inputs:
                if tensor._version != version:
                    raise RuntimeError(
                        f"pred_original_sample is computed from the step's inputs when first read, and {name} was "
                        "modified in place since the step: read it before changing the inputs, or set "
                        "scheduler.lazy_pred_original_sample = False"
                    )
            self._pred_original_sample = compute()
            self._deferred = None
        return self._pred_original_sample

    @pred_original_sample.setter
    def pred_original_sample(self, value: torch.Tensor | None) -> None:
        self._pred_original_sample = value
        self._deferred = None

    # diffusers' BaseOutput behaves as a tuple and a dict too; pipelines use all three.
    def keys(self):
        present = self._deferred is not None or self._pred_original_sample is not None
        return ["prev_sample", "pred_original_sample"] if present else ["prev_sample"]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return list(zip(self.keys(), self.values()))

    def to_tuple(self):
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self.keys())

    def __repr__(self):
        lazy = " (pred_original_sample not computed yet)" if self._deferred is not None else ""
        return f"DDIMSchedulerOutput(prev_sample={self.prev_sample!r}){lazy}"


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


class _DDIMBase(SchedulerMixin):
    """Schedule, timesteps and coefficient tables shared by the forward and inverse schedulers."""

    order = 1
    _inverse = False
    # Triton backend: write pred_original_sample only when it is read (see DDIMSchedulerOutput). Not a config key.
    lazy_pred_original_sample = True

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
        _check_choice("prediction_type", prediction_type, reference.PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing,
                      INVERSE_TIMESTEP_SPACINGS if self._inverse else TIMESTEP_SPACINGS)
        if isinstance(clip_sample_range, bool) or not (
            isinstance(clip_sample_range, numbers.Real) and math.isfinite(clip_sample_range) and clip_sample_range > 0
        ):
            raise ValueError(f"clip_sample_range must be a finite number > 0, got {clip_sample_range!r}")
        for name in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "thresholding"):
            value = self.config.get(name, False)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        steps_offset = self.config.steps_offset
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._table = None
        self._host_rows = None
        self._device_tables = {}
        self._device_alphas = {}

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
        num_train = self.config.num_train_timesteps
        num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
        if num_inference_steps > num_train:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot be larger than num_train_timesteps "
                f"({num_train}): the model was trained on {num_train} timesteps"
            )
        timesteps = inference_timesteps(num_train, num_inference_steps, self.config.timestep_spacing,
                                        self.config.steps_offset, inverse=self._inverse)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._table = step_table(self.alphas_cumprod, num_inference_steps, float(self._boundary_alpha_cumprod()),
                                 inverse=self._inverse)
        self._host_rows = self._table.tolist()  # the torch path's int timesteps read Python floats from here
        self._device_tables = {}
        if device is not None:
            self._table_on(torch.device(device))

    def _resolve_timestep(self, timestep, sample):
        """An int (checked against the table) for host timesteps; device tensors stay on the device unread (their
        dtype and shape are checked with the step's plan, see ops.dispatch)."""
        num_train = len(self._host_rows)
        if type(timestep) is int and 0 <= timestep < num_train:  # the common case, kept short
            return timestep
        if isinstance(timestep, torch.Tensor) and (not timestep.is_cpu or torch.compiler.is_compiling()):
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
        if device.type == "cpu":
            return self._table
        table = self._device_tables.get(device)
        if table is None:
            table = self._device_tables[device] = self._table.to(device)
        return table

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        cached = self._device_alphas.get(device)
        if cached is None:
            cached = self._device_alphas[device] = self.alphas_cumprod.to(device=device, dtype=torch.float64)
        return cached

    def _run_step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
                  variance_noise=None, philox_state=None, uncond_output=None, guidance_scale=1.0,
                  guidance_rescale=0.0, thresholding=False, return_dict=True, process_group=None):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(num_inference_steps) before step")
        timestep = self._resolve_timestep(timestep, sample)
        if eta > 1 and type(timestep) is int:
            row = self._host_rows[timestep]
            if row[BETA_PREV] - eta * eta * row[VARIANCE] < 0:
                raise ValueError(
                    f"eta={eta} is too large at timestep {timestep}: 1 - alpha_prev - eta^2 * variance < 0 "
                    "(diffusers would return NaN there); use eta <= 1"
                )
        process_group = process_group if thresholding else None
        # The kernel skips pred_original_sample unless it is read (not under torch.compile or CUDA-graph capture,
        # where the step must stay one static op, nor for a sharded thresholded step, whose collectives every
        # process must run at the same time).
        lazy = (
            return_dict and self.lazy_pred_original_sample and process_group is None
            and isinstance(sample, torch.Tensor) and not torch.compiler.is_compiling()
            and ops.select_backend(sample.device) == "triton"
            and not (sample.is_cuda and torch.cuda.is_current_stream_capturing())
        )
        options = self._step_options(eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
                                     not lazy)
        table = self._table if getattr(sample, "is_cpu", True) else self._table_on(sample.device)
        # The tensors are checked once per step plan (ops.dispatch); the options were checked above or at
        # construction.
        prev_sample, pred_original_sample = ops.dispatch(model_output, sample, table, timestep, options,
                                                         variance_noise, philox_state, uncond_output,
                                                         process_group=process_group)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        if lazy:
            inputs = {"model_output": model_output, "sample": sample}
            if uncond_output is not None:
                inputs["uncond_output"] = uncond_output
            if isinstance(timestep, torch.Tensor):
                inputs["timestep"] = timestep
            x0_options = self._step_options(eta, use_clipped_model_output, thresholding, guidance_scale,
                                            guidance_rescale, True, write_prev_sample=False)
            return DDIMSchedulerOutput.deferred(
                prev_sample, lambda: ops.dispatch(model_output, sample, table, timestep, x0_options, variance_noise,
                                                  philox_state, uncond_output)[1], inputs)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _step_options(self, eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
                      write_pred_original_sample, write_prev_sample=True) -> StepOptions:
        """The checked `StepOptions` of a step with these arguments and the config's settings, cached for as long
        as the config object stays the same (pipelines may replace it, e.g. to fix steps_offset)."""
        config = self.config
        cached = self.__dict__.get("_options_cache")
        if cached is None or cached[0] is not config:
            cached = self._options_cache = (config, {})
        key = (eta, use_clipped_model_output, thresholding, guidance_scale, guidance_rescale,
               write_pred_original_sample, write_prev_sample)
        options = cached[1].get(key)
        if options is None:
            if len(cached[1]) >= 64:  # e.g. an eta sweep: keep the cache small
                cached[1].clear()
            options = cached[1][key] = StepOptions(
                eta=eta, prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                clip_sample_range=config.clip_sample_range, thresholding=thresholding,
                dynamic_thresholding_ratio=config.get("dynamic_thresholding_ratio", 0.995),
                sample_max_value=config.get("sample_max_value", 1.0),
                use_clipped_model_output=use_clipped_model_output, guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale, write_prev_sample=write_prev_sample,
                write_pred_original_sample=write_pred_original_sample,
            ).checked(guided=True)
        return options

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __getattr__(self, name):
        # diffusers lets `scheduler.prediction_type` read the config; keep that working for user code.
        internal = self.__dict__.get("_internal_dict")
        if internal is not None and name in internal and not name.startswith("_"):
            return internal[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class DDIMScheduler(_DDIMBase):
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

    _compatibles = list(KARRAS_DIFFUSION_SCHEDULERS)
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
        if isinstance(dynamic_thresholding_ratio, bool) or not (
            isinstance(dynamic_thresholding_ratio, numbers.Real) and 0 < dynamic_thresholding_ratio <= 1
        ):
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio!r}")
        if isinstance(sample_max_value, bool) or not (
            isinstance(sample_max_value, numbers.Real) and 1 <= sample_max_value < math.inf
        ):
            raise ValueError(f"sample_max_value must be a finite number >= 1, got {sample_max_value!r}")
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def _boundary_alpha_cumprod(self) -> torch.Tensor:
        return self.final_alpha_cumprod

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
        return self._noisy_step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
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
        return self._noisy_step(noise_pred_cond, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict, uncond_output=noise_pred_uncond,
                                guidance_scale=ops.check_real("guidance_scale", guidance_scale),
                                guidance_rescale=ops.check_real("guidance_rescale", guidance_rescale, minimum=0.0),
                                process_group=process_group)

    def _noisy_step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise,
                    return_dict, process_group=None, **guidance):
        eta = ops.check_eta(eta)
        if generator is not None and variance_noise is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        philox_state = None
        if eta == 0:
            variance_noise = None  # diffusers draws no noise at eta 0 and ignores variance_noise
        elif isinstance(generator, PhiloxGenerator):
            if generator.device != getattr(sample, "device", generator.device):
                raise ValueError(f"generator lives on {generator.device}, the sample on {sample.device}")
            philox_state = generator.state
        elif variance_noise is None and isinstance(model_output, torch.Tensor):
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        result = self._run_step(model_output, timestep, sample, eta, use_clipped_model_output, variance_noise,
                                philox_state, thresholding=self.config.thresholding, return_dict=return_dict,
                                process_group=process_group if process_group is not None
                                else self.threshold_process_group, **guidance)
        if philox_state is not None:
            generator.advance()
        return result

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


class DDIMInverseScheduler(_DDIMBase):
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

    _inverse = True
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
        return self._run_step(model_output, timestep, sample, return_dict=return_dict)
