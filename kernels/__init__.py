"""fastddim's Triton kernels (installed as `fastddim.kernels`): the functional API for kernel engineers.

    from fastddim.kernels import ddim_step
    prev, x0 = ddim_step(model_output, sample, coefficients, eta=0.0, prediction_type="epsilon")

`coefficients` is a row of `fastddim.schedule.step_table(...)` on the tensors' device. With thresholding=True
the step finds diffusers' dynamic threshold exactly (kernels/threshold.py); `sample_thresholds` returns it.
These functions trust their arguments; `fastddim.ops.ddim_step` is the checked entry point that also picks the backend.
"""

from .ddim import INTERPRETED, ddim_step, is_dense
from .threshold import sample_thresholds

__all__ = ["INTERPRETED", "ddim_step", "is_dense", "sample_thresholds"]
