"""fastddim inside real diffusers pipelines, with a tiny seeded UNet: every step as diffusers' step formulas, and
the same images as diffusers' schedulers for short runs.

What diffusers' pipelines do with a fastddim scheduler (checked below, diffusers 0.42):
- `DDIMPipeline.__init__` converts whatever scheduler it gets into diffusers' own DDIMScheduler
  (`DDIMScheduler.from_config(scheduler.config)`, pipelines/ddim/pipeline_ddim.py), so *constructing* a
  DDIMPipeline with a fastddim scheduler silently runs diffusers' scheduler. Assigning afterwards,
  `pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)`, keeps fastddim's. For the same
  reason a saved DDIMPipeline reloads with diffusers' scheduler even when model_index.json names fastddim's.
- Pipelines whose `__init__` keeps the scheduler (e.g. DDPMPipeline, which works with any DDIM-compatible
  scheduler) save it under `scheduler/`, record `["fastddim", "DDIMScheduler"]` in model_index.json, and
  `DiffusionPipeline.from_pretrained` gives back a fastddim scheduler.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import diffusers
import numpy as np
import pytest
import torch

import fastddim
from conftest import truth_alphas, truth_step

# A UNet small enough for CPU tests (8x8 images, 8/16 channels), yet a real diffusers model.
TINY_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
)
NUM_INFERENCE_STEPS = 8
BATCH_SIZE = 2

# Scheduler configurations a DDIM pipeline meets: the class defaults (linear betas, x0 clipping on, so
# use_clipped_model_output matters) and a Stable-Diffusion-like latent setup (no clipping, alpha(0) as the end).
SCHEDULER_CONFIGS = {
    "defaults": {},
    "stable-diffusion": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1),
}

# Each step is checked against diffusers' step formulas evaluated in float64 on the very same inputs and noise
# (test_scheduler's oracle and its float32 bound). Whole runs are compared with diffusers' images only for short
# runs (NUM_INFERENCE_STEPS = 8): both libraries' float32 rounding is amplified along the way (the first steps
# start from noise, where x0 = (x - sqrt(1 - alpha) eps) / sqrt(alpha) divides by sqrt(alpha_T) ~ 0.04 for the
# linear schedule, and a random UNet passes differences on), and after about 20 eta=0 steps a one-ulp difference
# can grow into a different image (diffusers' own float32 and float64 runs part the same way). Measured 8-step
# differences reach ~7e-6 on images in [0, 1]; 5e-5 is still far below a real discrepancy (a wrong coefficient or
# a different noise draw moves pixels by 1e-2 or more).
IMAGE_ATOL = 5e-5


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def unet() -> diffusers.UNet2DModel:
    return tiny_unet()


@pytest.fixture(autouse=True)
def _one_thread(single_threaded_torch):
    """Every test here on one intra-op thread (conftest.single_threaded_torch)."""


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, **call_kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(batch_size=BATCH_SIZE, generator=torch.Generator().manual_seed(seed),
                    num_inference_steps=NUM_INFERENCE_STEPS, output_type="np", **call_kwargs).images


# --------------------------------------------------------------------------------------------------------------
# DDIMPipeline


def test_ddim_pipeline_constructor_converts_but_assignment_keeps_fastddim(unet):
    ours = fastddim.DDIMScheduler(**SCHEDULER_CONFIGS["stable-diffusion"])
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=ours)
    # Documented diffusers behaviour: DDIMPipeline.__init__ rebuilds the scheduler as diffusers' class.
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    assert public(pipe.scheduler.config) == public(ours.config)
    pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is fastddim.DDIMScheduler
    assert public(pipe.scheduler.config) == public(ours.config)
    # The pipeline's own record follows the assignment (this is what model_index.json will say).
    assert tuple(pipe.config["scheduler"]) == ("fastddim", "DDIMScheduler")


# use_clipped_model_output only matters where x0 is clipped, i.e. with the default clip_sample=True.
PIPELINE_CASES = [
    pytest.param("defaults", dict(eta=0.0), id="defaults-eta0"),
    pytest.param("defaults", dict(eta=1.0), id="defaults-eta1"),
    pytest.param("defaults", dict(eta=1.0, use_clipped_model_output=True), id="defaults-eta1-clipped-output"),
    pytest.param("stable-diffusion", dict(eta=0.0), id="sd-eta0"),
    pytest.param("stable-diffusion", dict(eta=1.0), id="sd-eta1"),
]


def record_steps(scheduler) -> list:
    """Wrap `scheduler.step` to record every call: inputs, the generator's state before the call, output."""
    calls = []
    step = scheduler.step

    def recording_step(model_output, timestep, sample, **kwargs):
        generator = kwargs.get("generator")
        state = generator.get_state() if generator is not None else None
        output = step(model_output, timestep, sample, **kwargs)
        calls.append((model_output, timestep, sample, kwargs, state, output.prev_sample))
        return output

    scheduler.step = recording_step
    return calls


def replay_against_truth(calls, config):
    """Check every recorded step against diffusers' step formulas in float64 on the very same inputs and noise:
    within float32 rounding (conftest's float32 tolerance plus two float32 ulps of the step's largest
    intermediate, as in test_scheduler)."""
    from diffusers.utils.torch_utils import randn_tensor
    from test_scheduler import assert_close_to_truth, float32_slack, step_truth

    theirs = diffusers.DDIMScheduler.from_config(config)
    theirs.set_timesteps(NUM_INFERENCE_STEPS)
    for index, (model_output, timestep, sample, kwargs, state, prev_sample) in enumerate(calls):
        eta, use_clipped = kwargs.get("eta", 0.0), kwargs.get("use_clipped_model_output", False)
        noise = None
        if eta > 0:  # the draw diffusers' step makes with the same generator state
            noise = randn_tensor(model_output.shape, generator=torch.Generator().set_state(state),
                                 dtype=model_output.dtype)
        truth, _ = step_truth(theirs, timestep, model_output, sample, eta, noise, use_clipped)
        allowance = 2 * float32_slack(theirs, timestep, model_output, sample, noise, use_clipped)
        assert_close_to_truth(prev_sample, truth, torch.float32, f"step {index} (t={int(timestep)})", allowance)


@pytest.mark.parametrize("config_name, call_kwargs", PIPELINE_CASES)
def test_ddim_pipeline_images_match_diffusers(unet, backend, config_name, call_kwargs):
    scheduler = diffusers.DDIMScheduler(**SCHEDULER_CONFIGS[config_name])
    pipe = quiet(diffusers.DDIMPipeline(unet=unet, scheduler=scheduler))
    expected = generate(pipe, **call_kwargs)

    pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
    calls = record_steps(pipe.scheduler)
    got = generate(pipe, **call_kwargs)
    assert type(pipe.scheduler) is fastddim.DDIMScheduler  # the run really used fastddim's step
    assert len(calls) == NUM_INFERENCE_STEPS
    assert got.shape == expected.shape == (BATCH_SIZE, 8, 8, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=IMAGE_ATOL)
    replay_against_truth(calls, pipe.scheduler.config)


def test_pipeline_options_under_test_change_the_images(unet):
    # Guards the comparison above: eta, the generator and use_clipped_model_output each change the output,
    # so agreeing on them is evidence that fastddim handles them, not that they were ignored.
    pipe = quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()))
    pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
    base = generate(pipe, eta=1.0)
    assert np.abs(base - generate(pipe, eta=0.0)).max() > 1e-3
    assert np.abs(base - generate(pipe, eta=1.0, seed=1)).max() > 1e-3
    assert np.abs(base - generate(pipe, eta=1.0, use_clipped_model_output=True)).max() > 1e-3
    # ...and a rerun with the same seed is identical: the scheduler keeps no state between calls.
    np.testing.assert_array_equal(base, generate(pipe, eta=1.0))


# --------------------------------------------------------------------------------------------------------------
# Saving and loading pipelines that hold a fastddim scheduler


def test_ddpm_pipeline_save_and_load_keeps_fastddim_scheduler(tmp_path, unet):
    scheduler = fastddim.DDIMScheduler(**SCHEDULER_CONFIGS["stable-diffusion"])
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=scheduler))
    assert pipe.scheduler is scheduler  # DDPMPipeline keeps what it is given
    expected = generate(pipe)

    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["fastddim", "DDIMScheduler"]
    assert index["_class_name"] == "DDPMPipeline"

    loaded = quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path))
    assert type(loaded) is diffusers.DDPMPipeline
    assert type(loaded.scheduler) is fastddim.DDIMScheduler
    assert public(loaded.scheduler.config) == public(scheduler.config)
    # Same weights, same scheduler, same seed: the same images, bit for bit.
    np.testing.assert_array_equal(generate(loaded), expected)
    # And the same images as the pipeline run with diffusers' DDIMScheduler.
    theirs = diffusers.DDIMScheduler.from_config(scheduler.config)
    reference = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=theirs))
    np.testing.assert_allclose(expected, generate(reference), rtol=0, atol=IMAGE_ATOL)


def test_ddim_pipeline_saves_fastddim_scheduler_but_reloads_it_as_diffusers(tmp_path, unet):
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(steps_offset=1))
    pipe.scheduler = fastddim.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["fastddim", "DDIMScheduler"]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and saved["steps_offset"] == 1
    # diffusers loads the fastddim scheduler, then DDIMPipeline.__init__ converts it (see the module docstring).
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)


# A fresh interpreter, so that the import order is the one under test (in this process diffusers is imported).
# Orders: "scheduler-before-diffusers" / "scheduler-after-diffusers": import fastddim first, build the scheduler
# before or after importing diffusers, then save a DDPMPipeline and load it back. "load-only": a process that
# loads a pipeline saved by the test, first without importing fastddim, then after importing it.
SAVE_AND_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    order, out_dir, scheduler_kwargs, unet_kwargs = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5])
    unet_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_kwargs.items()}
    result = {}
    if order != "load-only":
        import fastddim
        assert "diffusers" not in sys.modules, "this check needs fastddim imported before diffusers"
    if order == "scheduler-before-diffusers":
        scheduler = fastddim.DDIMScheduler(**scheduler_kwargs)
    import numpy as np, torch, diffusers
    if order == "scheduler-after-diffusers":
        scheduler = fastddim.DDIMScheduler(**scheduler_kwargs)
    if order == "load-only":
        try:
            diffusers.DiffusionPipeline.from_pretrained(out_dir)
        except Exception as error:
            result["error_without_fastddim"] = repr(error)[:1000]
        import fastddim
    else:
        torch.manual_seed(0)
        pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**unet_kwargs).eval(), scheduler=scheduler)
        pipe.save_pretrained(out_dir)
        result["model_index_scheduler"] = json.load(open(out_dir + "/model_index.json")).get("scheduler")
    try:
        loaded = diffusers.DiffusionPipeline.from_pretrained(out_dir)
        loaded.set_progress_bar_config(disable=True)
        result["loaded_scheduler"] = type(loaded.scheduler).__module__ + "." + type(loaded.scheduler).__name__
        result["loaded_config"] = {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")}
        with torch.no_grad():
            images = loaded(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                            output_type="np").images
        np.save(out_dir + "/images.npy", images)
    except Exception as error:
        result["error"] = repr(error)[:1000]
    print("RESULT " + json.dumps(result))
""")


def save_and_load_in_fresh_process(order: str, out_dir) -> dict:
    scheduler_kwargs = SCHEDULER_CONFIGS["stable-diffusion"]
    # The kernels have their own tests; here the torch path keeps the subprocess free of Triton's interpreter
    # (and one thread, see single_threaded_torch).
    env = {**os.environ, "FASTDDIM_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SAVE_AND_LOAD_SCRIPT, order, str(out_dir), json.dumps(scheduler_kwargs),
         json.dumps(TINY_UNET)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_round_trip_worked(result: dict, out_dir, unet):
    """The fresh process saved and reloaded a fastddim scheduler, and its images match this process's run."""
    assert "error" not in result, result.get("error")
    assert result.get("model_index_scheduler", ["fastddim", "DDIMScheduler"]) == ["fastddim", "DDIMScheduler"]
    assert result["loaded_scheduler"] == "fastddim.DDIMScheduler"
    expected_config = fastddim.DDIMScheduler(**SCHEDULER_CONFIGS["stable-diffusion"]).config
    assert result["loaded_config"] == json.loads(json.dumps(public(expected_config)))
    pipe = quiet(diffusers.DDPMPipeline(
        unet=unet, scheduler=diffusers.DDIMScheduler(**SCHEDULER_CONFIGS["stable-diffusion"])))
    np.testing.assert_allclose(np.load(out_dir / "images.npy"), generate(pipe), rtol=0, atol=IMAGE_ATOL)


def test_fresh_process_fastddim_imported_first_scheduler_built_after_diffusers(tmp_path, unet):
    result = save_and_load_in_fresh_process("scheduler-after-diffusers", tmp_path)
    assert_round_trip_worked(result, tmp_path, unet)


def test_fresh_process_loading_a_fastddim_pipeline_needs_fastddim_imported(tmp_path, unet):
    # diffusers 0.42 imports only the libraries it knows when loading, never one merely named in
    # model_index.json: a process must import fastddim before DiffusionPipeline.from_pretrained. Once it has,
    # diffusers finds it in sys.modules (model_index.json names "fastddim") and the pipeline loads.
    diffusers.DDPMPipeline(unet=unet, scheduler=fastddim.DDIMScheduler(**SCHEDULER_CONFIGS["stable-diffusion"])
                           ).save_pretrained(tmp_path)
    result = save_and_load_in_fresh_process("load-only", tmp_path)
    error = result.get("error_without_fastddim")
    assert error is None or "fastddim" in error, error  # refused (diffusers 0.42), naming what to import
    assert_round_trip_worked(result, tmp_path, unet)


def test_fresh_process_scheduler_built_before_diffusers_is_imported(tmp_path, unet):
    result = save_and_load_in_fresh_process("scheduler-before-diffusers", tmp_path)
    assert_round_trip_worked(result, tmp_path, unet)


# --------------------------------------------------------------------------------------------------------------
# DDIM inversion


def invert_then_regenerate(unet, inverse_step, forward_step, inverse_timesteps, forward_timesteps, dtype):
    """DDIM-invert a clean image to noise with the UNet, then denoise it back: (clean, latent, regenerated)."""
    generator = torch.Generator().manual_seed(1)
    clean = (torch.rand(BATCH_SIZE, 3, 8, 8, generator=generator) * 2 - 1).to(dtype)
    latent = clean
    with torch.no_grad():
        for t in inverse_timesteps:
            latent = inverse_step(unet(latent, t).sample, t, latent)
        regenerated = latent
        for t in forward_timesteps:
            regenerated = forward_step(unet(regenerated, t).sample, t, regenerated)
    return clean, latent, regenerated


def scheduler_loop(inverse_cls, forward_cls, unet, config):
    inverse, forward = inverse_cls(**config), forward_cls(**config)
    inverse.set_timesteps(NUM_INFERENCE_STEPS)
    forward.set_timesteps(NUM_INFERENCE_STEPS)
    return invert_then_regenerate(
        unet,
        lambda m, t, x: inverse.step(m, t, x).prev_sample,
        lambda m, t, x: forward.step(m, t, x).prev_sample,
        inverse.timesteps, forward.timesteps, torch.float32,
    )


def float64_truth_loop(unet, config):
    """The same loop in float64 throughout (model too), with conftest's oracle step on diffusers' alphas."""
    inverse, forward = diffusers.DDIMInverseScheduler(**config), diffusers.DDIMScheduler(**config)
    inverse.set_timesteps(NUM_INFERENCE_STEPS)
    forward.set_timesteps(NUM_INFERENCE_STEPS)
    num_train = inverse.config.num_train_timesteps
    clip = dict(clip_sample=inverse.config.clip_sample, clip_sample_range=inverse.config.clip_sample_range)

    def inverse_step(m, t, x):
        alphas = truth_alphas(inverse.alphas_cumprod, inverse.initial_alpha_cumprod, num_train,
                              NUM_INFERENCE_STEPS, int(t), inverse=True)
        return truth_step(m, x, *alphas, inverse=True, **clip)[0]

    def forward_step(m, t, x):
        alphas = truth_alphas(forward.alphas_cumprod, forward.final_alpha_cumprod, num_train,
                              NUM_INFERENCE_STEPS, int(t))
        return truth_step(m, x, *alphas, **clip)[0]

    return invert_then_regenerate(copy.deepcopy(unet).double(), inverse_step, forward_step,
                                  inverse.timesteps, forward.timesteps, torch.float64)


@pytest.mark.parametrize("config_name", SCHEDULER_CONFIGS)
def test_ddim_inversion_loop_matches_diffusers(unet, backend, config_name):
    config = SCHEDULER_CONFIGS[config_name]
    clean, latent, regenerated = scheduler_loop(fastddim.DDIMInverseScheduler, fastddim.DDIMScheduler, unet, config)
    _, expected_latent, expected_regenerated = scheduler_loop(
        diffusers.DDIMInverseScheduler, diffusers.DDIMScheduler, unet, config)
    # The loop must have done something (else agreement proves nothing).
    assert (latent - clean).abs().max() > 1e-2
    # Inversion (noise grows, predictions are not divided by small alphas): float32 rounding scale.
    torch.testing.assert_close(latent, expected_latent, rtol=1e-5, atol=1e-5)
    # Both loops against the float64 truth (UNet in float64 too). Regeneration starts at high noise, where
    # x0 = (x - sqrt(1 - alpha) eps) / sqrt(alpha) and a random UNet amplify every float32 rounding, the UNet's
    # own included: measured errors are at most 2e-6 for the latent and 8e-5 for the regenerated image (diffusers'
    # float32 loop is as far off). The bounds leave a factor of about 10 for other CPUs' UNet rounding; a wrong
    # coefficient or a skipped step moves values by 1e-2 or more.
    _, truth_latent, truth_regenerated = float64_truth_loop(unet, config)
    for what, ours, truth, bound in (("latent", latent, truth_latent, 2e-5),
                                     ("regenerated", regenerated, truth_regenerated, 1e-3)):
        error = (ours.double() - truth).abs().max().item()
        assert error <= bound, f"{what}: {error:.3g} from the float64 truth"
