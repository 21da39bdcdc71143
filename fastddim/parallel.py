"""`DDIMParallelScheduler`: a drop-in replacement for diffusers' class of that name (ParaDiGMS parallel sampling).

It is `DDIMScheduler` (same constructor, config keys, `set_timesteps`, `step`, `add_noise`, `get_velocity`) plus
what ParaDiGMS (Shih et al., "Parallel Sampling of Diffusion Models", NeurIPS 2023) calls: `batch_step_no_noise`,
one fused step over a batch in which every sample has its own timestep, and the variance helpers
`_get_variance` / `_batch_get_variance` that size the pipeline's noise and tolerance.
"""

from __future__ import annotations

import numbers

import torch

from fastddim import ops
from fastddim.config import diffusers_bases
from fastddim.schedule import ddim_variance, step_table
from fastddim.scheduler import DDIMScheduler

_CPU = torch.device("cpu")


class DDIMParallelScheduler(DDIMScheduler, *diffusers_bases("scheduling_ddim_parallel", "DDIMParallelScheduler")):
    """DDIM with batched per-sample timesteps for parallel sampling: a drop-in for diffusers'
    `DDIMParallelScheduler`.

    Args:
        num_train_timesteps (`int`, defaults to 1000): the number of diffusion steps the model was trained with.
        beta_start (`float`, defaults to 0.0001): the first beta of the schedule.
        beta_end (`float`, defaults to 0.02): the last beta of the schedule.
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): betas to use instead of a schedule; one per
            training timestep.
        clip_sample (`bool`, defaults to `True`): clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
        set_alpha_to_one (`bool`, defaults to `True`): the alpha product after the last step of `step` is 1
            (otherwise the alpha product of timestep 0). `batch_step_no_noise` always ends at 1, as diffusers' does.
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

    `batch_step_no_noise` may be given any timesteps in [0, num_train_timesteps), on the `set_timesteps` grid or
    not: as in diffusers, each sample steps from its timestep t to t - num_train_timesteps // num_inference_steps,
    and past timestep 0 to an alpha product of 1 whatever `set_alpha_to_one` says.
    """

    # ParaDiGMS adds no noise of its own for an ODE scheduler (DDIM at eta 0).
    _is_ode_scheduler = True
    __module__ = "fastddim"  # public under fastddim's name, as DDIMScheduler

    def _get_variance(self, timestep, prev_timestep=None) -> torch.Tensor:
        """The DDIM variance between `timestep` and `prev_timestep` (float32, as diffusers computes it).

        Args:
            timestep (`int` or integer tensor): the current timestep(s), in [0, num_train_timesteps).
            prev_timestep (`int` or integer tensor, *optional*): the timestep(s) stepped to; defaults to
                `timestep - num_train_timesteps // num_inference_steps` (needs `set_timesteps`). Below 0, the alpha
                product is `final_alpha_cumprod`.
        """
        if prev_timestep is None:
            prev_timestep = self._default_prev_timestep(timestep)
        return self._variance(timestep, prev_timestep, self.final_alpha_cumprod)

    def _batch_get_variance(self, t: torch.Tensor, prev_t: torch.Tensor) -> torch.Tensor:
        """The DDIM variances between timesteps `t` and `prev_t`, elementwise (float32, as diffusers computes
        them); below timestep 0 the alpha product is 1, as in `batch_step_no_noise`.

        Args:
            t (`torch.Tensor`): integer timesteps, in [0, num_train_timesteps).
            prev_t (`torch.Tensor`): integer timesteps stepped to, of a shape that broadcasts with `t`.
        """
        return self._variance(t, prev_t, 1.0)

    def _default_prev_timestep(self, timestep):
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(num_inference_steps) first, or pass "
                             "prev_timestep")
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def _variance(self, timestep, prev_timestep, boundary_alpha_cumprod) -> torch.Tensor:
        num_train = self.config.num_train_timesteps
        for name, value, low in (("timestep", timestep, 0), ("prev_timestep", prev_timestep, None)):
            values = torch.as_tensor(value)
            if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
                raise TypeError(f"{name} must be an int or an integer tensor, got {values.dtype}")
            if values.numel() and (int(values.max()) >= num_train or (low is not None and int(values.min()) < low)):
                bounds = f"[0, {num_train})" if low is not None else f"(-inf, {num_train})"
                raise ValueError(f"{name} values must be in {bounds}, got {values.tolist()}")
        variance = ddim_variance(self.alphas_cumprod, timestep, prev_timestep, boundary_alpha_cumprod)
        return variance.to(timestep.device) if isinstance(timestep, torch.Tensor) else variance

    def batch_step_no_noise(
        self,
        model_output: torch.Tensor,
        timesteps: torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> torch.Tensor:
        """One noiseless DDIM step for a batch whose samples each have their own timestep (ParaDiGMS: the steps
        of a window of the sampling chain, as one batch). The pipeline draws and adds the noise itself.

        Sample i steps from `timesteps[i]` to `timesteps[i] - num_train_timesteps // num_inference_steps` (an alpha
        product of 1 below timestep 0), with the config's prediction type, clipping or thresholding, in one fused
        pass whose coefficients are gathered per sample from a step table (`fastddim.schedule.step_table`).

        Args:
            model_output (`torch.Tensor`): the direct output of the diffusion model, batch first.
            timesteps (`torch.Tensor` or `int`): one integer timestep per sample (any shape with `batch` elements,
                e.g. `(batch,)`), or one for all, in [0, num_train_timesteps). A device tensor is never read by the
                host (an out-of-range value there gives NaN samples).
            sample (`torch.Tensor`): the current samples, of the shape and device of `model_output`.
            eta (`float`, defaults to 0.0): must be 0: the step adds no noise (diffusers asserts the same).
            use_clipped_model_output (`bool`, defaults to `False`): re-derive the noise prediction from the clipped
                x0, as the DDIM paper's "corrected" model output.

        Returns:
            `torch.Tensor`: the samples at the previous timesteps, in the promoted dtype of the inputs.
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(num_inference_steps) before "
                             "batch_step_no_noise")
        if ops.check_eta(eta) != 0:
            raise ValueError(f"batch_step_no_noise adds no noise, so eta must be 0, got {eta}; use step for eta > 0")
        ops.check_step_inputs(model_output, sample)
        timesteps = self._resolve_batch_timesteps(timesteps, sample)
        thresholding = self.config.thresholding
        options = self._step_options(0.0, use_clipped_model_output, thresholding, 1.0, 0.0, False)
        prev_sample, _ = ops.dispatch(model_output, sample, self._no_noise_table_on(sample.device), timesteps,
                                      options, process_group=self.threshold_process_group if thresholding else None)
        return prev_sample

    def _resolve_batch_timesteps(self, timesteps, sample: torch.Tensor):
        """An int for one host timestep; a (batch,) tensor on the sample's device otherwise (checked unless it
        lives on an accelerator, which the host must not wait for)."""
        num_train = self.config.num_train_timesteps
        batch = sample.shape[0] if sample.dim() else 1
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dtype not in ops.INTEGER_DTYPES:
                raise TypeError(f"timesteps must be an integer tensor, got a {timesteps.dtype} tensor")
            if timesteps.numel() not in (1, batch):
                raise ValueError(f"timesteps must hold one timestep per sample ({batch}) or one for all, got "
                                 f"shape {tuple(timesteps.shape)}")
            if timesteps.device.type != "cpu" or torch.compiler.is_compiling():
                return timesteps.reshape(-1).to(sample.device)
            if not bool(((timesteps >= 0) & (timesteps < num_train)).all()):
                raise ValueError(f"timesteps values must be in [0, {num_train}), got {timesteps.tolist()}")
            if timesteps.numel() == 1:
                return int(timesteps.item())
            return timesteps.reshape(-1).to(sample.device)
        if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral):
            raise TypeError(f"timesteps must be an integer tensor or an int, got {type(timesteps).__name__}")
        if not 0 <= timesteps < num_train:
            raise ValueError(f"timesteps must be in [0, {num_train}), got {timesteps}")
        return int(timesteps)

    def _no_noise_table_on(self, device: torch.device) -> torch.Tensor:
        """The step table of `batch_step_no_noise`: `step`'s, except that past timestep 0 the alpha product is 1
        (diffusers' batch_step_no_noise ignores set_alpha_to_one). Built once per set_timesteps and device."""
        if float(self.final_alpha_cumprod) == 1.0:
            return self._table_on(device)
        cached = self.__dict__.get("_no_noise_tables")
        if cached is None or cached[0] is not self._table:
            host = step_table(self.alphas_cumprod, self.num_inference_steps, 1.0)
            cached = self._no_noise_tables = (self._table, {_CPU: host})
        tables = cached[1]
        table = tables.get(device)
        if table is None:
            table = tables[device] = tables[_CPU].to(device)
        return table
