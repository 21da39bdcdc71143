"""Step options and step plans: what a DDIM step fixes once, so that a call only swaps data.

A step's settings (eta, prediction type, clipping, thresholding, guidance weights, which outputs to write) are one
frozen `StepOptions`, which every layer (`fastddim.ops`, `fastddim.reference`, the Triton launcher) passes on
as it is. A `StepPlan` holds everything that does not change between timesteps for one (options, backend, shapes,
dtypes, strides, devices) combination: the checks already done, the backend, and the prepared launch (constexprs,
grid, scalar kernel arguments). `PlanCache` keys plans on all of that, read from the tensors at every call (a
few attribute reads), so a call with anything different builds, and checks, a new plan: nothing is trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_real(name: str, value, minimum: float | None = None) -> float:
    """`value` as a float; a TypeError unless it is a real number, a ValueError unless finite and >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Every setting of one DDIM step that is not a tensor: the one place the step's parameters are written out.

    Args:
        eta (`float`, defaults to 0.0): noise weight, >= 0; the noise term is `eta * sqrt(variance) * noise`.
        prediction_type (`str`, defaults to `"epsilon"`): "epsilon", "sample" or "v_prediction".
        clip_sample (`bool`, defaults to `False`): clamp the predicted x0 to [-clip_sample_range, clip_sample_range].
        clip_sample_range (`float`, defaults to 1.0): the clipping bound.
        thresholding (`bool`, defaults to `False`): dynamic thresholding of x0 (takes precedence over clipping, as
            in diffusers).
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of |x0| thresholding uses, in (0, 1].
        sample_max_value (`float`, defaults to 1.0): the largest threshold, > 0 (below 1, the threshold itself).
        use_clipped_model_output (`bool`, defaults to `False`): re-derive the noise prediction from the clipped x0.
        guidance_scale (`float`, defaults to 1.0): with an unconditional output, the model output used is
            `uncond + guidance_scale * (model_output - uncond)`.
        guidance_rescale (`float`, defaults to 0.0): weight of diffusers' `rescale_noise_cfg`, >= 0.
        write_prev_sample (`bool`, defaults to `True`), write_pred_original_sample (`bool`, defaults to `True`):
            which outputs the step writes (an output not written is returned as None).
    """

    eta: float = 0.0
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_clipped_model_output: bool = False
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    write_prev_sample: bool = True
    write_pred_original_sample: bool = True

    def __post_init__(self):
        # Plans are keyed on options at every step: hash the fields once, not per lookup.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self))))

    def __hash__(self) -> int:
        return self._hash

    def checked(self, guided: bool) -> "StepOptions":
        """These options with clear errors for bad values, numbers as floats and flags as bools. The guidance
        weights are checked only for a guided step (`guided`), the thresholding values only when thresholding."""
        eta = check_real("eta", self.eta, minimum=0.0)
        if not self.write_prev_sample and not self.write_pred_original_sample:
            raise ValueError("write_prev_sample and write_pred_original_sample are both False: a step writes at "
                             "least one of its outputs")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        guidance_scale, guidance_rescale = self.guidance_scale, self.guidance_rescale
        if guided:
            guidance_scale = check_real("guidance_scale", guidance_scale)
            guidance_rescale = check_real("guidance_rescale", guidance_rescale, minimum=0.0)
        ratio, max_value = self.dynamic_thresholding_ratio, self.sample_max_value
        if self.thresholding:
            ratio = check_real("dynamic_thresholding_ratio", ratio)
            if not 0 < ratio <= 1:
                raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
            max_value = check_real("sample_max_value", max_value)
            if not max_value > 0:  # below 1 it is the threshold itself, as in diffusers
                raise ValueError(f"sample_max_value must be a finite number > 0, got {max_value}")
        return StepOptions(
            eta=eta, prediction_type=self.prediction_type, clip_sample=bool(self.clip_sample),
            clip_sample_range=float(self.clip_sample_range), thresholding=bool(self.thresholding),
            dynamic_thresholding_ratio=float(ratio), sample_max_value=float(max_value),
            use_clipped_model_output=bool(self.use_clipped_model_output), guidance_scale=float(guidance_scale),
            guidance_rescale=float(guidance_rescale), write_prev_sample=bool(self.write_prev_sample),
            write_pred_original_sample=bool(self.write_pred_original_sample),
        )

    # The torch.compile custom op's schema takes no dataclass: the options cross it as (prediction_type, numbers).
    def op_arguments(self) -> tuple[str, list[float]]:
        """(prediction_type, the other fields as floats in field order) for the custom op; it writes both outputs."""
        values = [float(getattr(self, f.name)) for f in _NUMERIC_FIELDS]
        values[-2:] = [1.0, 1.0]
        return self.prediction_type, values

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_op_arguments(prediction_type: str, values: tuple[float, ...]) -> "StepOptions":
        """The inverse of `op_arguments` (flags back to bools)."""
        fields = {}
        for field, value in zip(_NUMERIC_FIELDS, values):
            fields[field.name] = bool(value) if field.type in (bool, "bool") else value
        return StepOptions(prediction_type=prediction_type, **fields)


_NUMERIC_FIELDS = tuple(f for f in dataclasses.fields(StepOptions) if f.name != "prediction_type")


def tensor_key(tensor) -> tuple | None:
    """What a plan bakes in about a tensor: dtype, shape, strides, device (None stays None). Raises
    AttributeError or TypeError for a non-tensor, which sends the caller to the checks that name it."""
    if tensor is None:
        return None
    return tensor.dtype, tensor.shape, tensor.stride(), tensor.device


@dataclasses.dataclass(frozen=True, eq=False)
class StepPlan:
    """A checked step for one key of `PlanCache`: call it with the step's tensors to run the step.

    Args:
        options (`StepOptions`): the checked options.
        backend (`str`): "torch" or "triton".
        run (`Callable`): `run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output)`
            returning `(prev_sample, pred_original_sample)`: the backend's prepared step.
        launcher (`fastddim.kernels.ddim.StepLauncher`, *optional*): the Triton backend's prepared launch (None
            on the torch path), which `fastddim.autograd` records when the inputs require grad.
    """

    options: StepOptions
    backend: str
    run: Callable
    launcher: object = None

    def __call__(self, model_output, sample, table, timestep, variance_noise=None, philox_state=None,
                 uncond_output=None):
        return self.run(model_output, sample, table, timestep, variance_noise, philox_state, uncond_output)


class PlanCache(dict):
    """A bounded map from plan keys to `StepPlan`s (a dict, so that the lookup at every step is a C call); when
    full, it is emptied (plans are cheap to rebuild, and a loop uses one or two).

    Args:
        capacity (`int`, defaults to 256): the most plans kept.
    """

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity = capacity
        self.builds = 0  # how many plans were built since the last clear (tests read it)

    def put(self, key, plan: StepPlan) -> StepPlan:
        if len(self) >= self.capacity:
            super().clear()
        self[key] = plan
        self.builds += 1
        return plan

    def clear(self) -> None:
        super().clear()
        self.builds = 0
