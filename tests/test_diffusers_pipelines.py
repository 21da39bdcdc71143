"""fastddim's schedulers in diffusers' own pipelines, checked call by call against diffusers' schedulers.

Every pipeline is built from configs with tiny randomly initialised components (no download; prompts enter as
`prompt_embeds`, so no tokenizer or text encoder runs). Each case runs twice:
1. with diffusers' schedulers, recording every scheduler call (`set_timesteps`, `step`, `add_noise`,
   `batch_step_no_noise`, `_get_variance`): its inputs, the generator's state before it and its outputs. Each call is
   replayed on fastddim's scheduler of the same config with the same inputs (and noise) and must agree with
   diffusers' output within float32 rounding, and with a float64 transcription of diffusers' formulas
   (conftest.truth_step) within conftest's float32 tolerance;
2. with fastddim's schedulers assigned to the pipeline (`from_config` of diffusers' configs), for the same few
   steps: the final images must match diffusers' within float32 rounding amplified along the run.
Both on the torch path and on the Triton kernels (under the interpreter without a GPU): the `backend` fixture.
Everything runs on conftest's DEVICE (the GPU where there is one, with TF32 off so rounding stays float32's).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
    StableDiffusionDiffEditPipeline,
)
from diffusers.pipelines.deprecated.stable_diffusion_variants.pipeline_stable_diffusion_paradigms import (
    StableDiffusionParadigmsPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

import fastddim
from conftest import DEVICE, TOLERANCES, max_error_ratio, truth_alphas, truth_step

NUM_INFERENCE_STEPS = 4
BATCH_SIZE = 2
EMBED_DIM = 8  # cross-attention width of the tiny UNet, i.e. the width of the prompt embeddings

# Stable Diffusion v1's scheduler config (no clipping, alpha_cumprod[0] as the final alpha, steps_offset 1).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)

# Per-call agreement. Both libraries compute a step in float32 from the same inputs, so they differ by float32
# rounding: conftest's float32 tolerance relative to the result, plus a few float32 ulps of the step's largest
# intermediate magnified by the division that forms x0 (1 / sqrt(alpha_t) for epsilon prediction, ~14 at the
# noisiest timestep of Stable Diffusion's schedule), where a relative bound alone cannot hold (see conftest).
INTERMEDIATE_ULPS = 4
FLOAT32_ULP = 2.0**-23

# Whole runs: each step's rounding difference (~1e-7 on latents of order 1) is passed through the next UNet
# calls, the x0 division and the VAE decoder; over the few steps here the images (in [0, 1]) differ by up to a
# few 1e-6 (measured on both backends: at most 2.4e-6, DiffEdit's inversion and reconstruction). 2e-5 leaves room
# for other CPUs and stays far below a real fault: a wrong coefficient, timestep, eta or noise draw moves pixels by
# 1e-3 or more (test_options_under_test_change_the_images).
IMAGE_ATOL = 2e-5


# --------------------------------------------------------------------------------------------------------------
# Tiny components


def tiny_condition_unet(in_channels: int = 4) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMBED_DIM, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_vae() -> diffusers.AutoencoderKL:
    # One block: no downsampling, so 8x8 images have 8x8 latents.
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
        sample_size=8,
    ).eval()


def tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(2)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


def stable_diffusion(pipeline_class, unet_in_channels: int = 4, **extra):
    components = dict(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_condition_unet(unet_in_channels),
                      scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)
    pipe = pipeline_class(**components, **extra).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(seed: int) -> torch.Tensor:
    return torch.randn(BATCH_SIZE, 5, EMBED_DIM, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def image(channels: int = 3, seed: int = 3) -> torch.Tensor:
    return torch.rand(BATCH_SIZE, channels, 8, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def embeds_and_seed(guidance_scale: float = 7.5) -> dict:
    return dict(prompt_embeds=prompt_embeds(10), negative_prompt_embeds=prompt_embeds(11),
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                num_inference_steps=NUM_INFERENCE_STEPS, output_type="np")


# --------------------------------------------------------------------------------------------------------------
# The cases: how to build each pipeline, run it, and which of its schedulers to compare


@dataclasses.dataclass
class Case:
    build: Callable
    run: Callable  # (pipe) -> images as a numpy array
    schedulers: tuple = ("scheduler",)


def run_text_to_image(eta: float):
    return lambda pipe: pipe(eta=eta, guidance_rescale=0.7, **embeds_and_seed()).images


def run_image_to_image(pipe):
    return pipe(image=image(), strength=0.6, eta=1.0, **embeds_and_seed()).images


def run_inpaint(pipe):
    mask = (image(channels=1, seed=4) > 0.5).float()
    return pipe(image=image(), mask_image=mask, strength=0.75, height=8, width=8, eta=1.0,
                **embeds_and_seed()).images


def run_inversion_then_reconstruction(pipe):
    """DiffEdit's DDIM inversion (DDIMInverseScheduler, no guidance) of an image to noise, then its
    reconstruction from the inverted latents with DDIMScheduler (mask all ones: nothing kept from the image)."""
    embeds = prompt_embeds(10)
    inverted = pipe.invert(image=image(), prompt_embeds=embeds, inpaint_strength=1.0, guidance_scale=1.0,
                           num_inference_steps=NUM_INFERENCE_STEPS, generator=torch.Generator().manual_seed(0),
                           output_type="np").latents
    mask = np.ones((BATCH_SIZE, 8, 8), dtype=np.float32)
    return pipe(mask_image=mask, image_latents=inverted, inpaint_strength=1.0, guidance_scale=1.0,
                prompt_embeds=embeds, num_inference_steps=NUM_INFERENCE_STEPS, output_type="np").images


def unconditional(pipeline_class, **scheduler_config):
    def build():
        pipe = pipeline_class(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(**scheduler_config)).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return build


def run_unconditional(**call_kwargs):
    return lambda pipe: pipe(batch_size=BATCH_SIZE, generator=torch.Generator().manual_seed(0),
                             num_inference_steps=NUM_INFERENCE_STEPS, output_type="np", **call_kwargs).images


def build_paradigms():
    pipe = stable_diffusion(StableDiffusionParadigmsPipeline)
    pipe.scheduler = diffusers.DDIMParallelScheduler.from_config(pipe.scheduler.config)
    return pipe


def run_paradigms(pipe):
    # A window of 3 of the 6 steps and a tolerance that makes the window slide after a few Picard iterations.
    return pipe(parallel=3, tolerance=0.05, **{**embeds_and_seed(), "num_inference_steps": 6}).images


CASES = {
    "sd-cfg-rescale-eta0": Case(functools.partial(stable_diffusion, diffusers.StableDiffusionPipeline),
                                run_text_to_image(0.0)),
    "sd-cfg-rescale-eta1": Case(functools.partial(stable_diffusion, diffusers.StableDiffusionPipeline),
                                run_text_to_image(1.0)),
    "img2img": Case(functools.partial(stable_diffusion, diffusers.StableDiffusionImg2ImgPipeline),
                    run_image_to_image),
    "inpaint": Case(functools.partial(stable_diffusion, diffusers.StableDiffusionInpaintPipeline, 9), run_inpaint),
    "inversion": Case(functools.partial(stable_diffusion, StableDiffusionDiffEditPipeline,
                                        inverse_scheduler=diffusers.DDIMInverseScheduler(**SD_SCHEDULER)),
                      run_inversion_then_reconstruction, schedulers=("inverse_scheduler", "scheduler")),
    "ddpm-pipeline": Case(unconditional(diffusers.DDPMPipeline), run_unconditional()),
    "ddim-pipeline": Case(unconditional(diffusers.DDIMPipeline), run_unconditional(eta=1.0,
                                                                                   use_clipped_model_output=True)),
    "paradigms": Case(build_paradigms, run_paradigms),
}


# --------------------------------------------------------------------------------------------------------------
# Recording and replaying scheduler calls

RECORDED_METHODS = ("set_timesteps", "step", "add_noise", "batch_step_no_noise", "_get_variance")


@dataclasses.dataclass
class Call:
    method: str
    arguments: dict  # bound to the method's parameters, tensors cloned at call time
    generator_state: torch.Tensor | None
    num_inference_steps: int | None
    outputs: tuple  # the tensors returned (cloned): (prev_sample, pred_original_sample); set_timesteps: (timesteps,)
    unet_output: torch.Tensor | None = None  # the UNet's last output before a step (for guided_step)


def snapshot(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def output_tensors(result) -> tuple:
    if isinstance(result, torch.Tensor):
        return (result,)
    if isinstance(result, tuple):
        return result
    return (result.prev_sample, result.pred_original_sample)


def record(scheduler, unet_outputs: list | None = None) -> list[Call]:
    """Wrap the scheduler's methods (on the instance) to record every call from outside into the returned list
    (not the scheduler's calls of its own methods, e.g. diffusers' step calling _get_variance)."""
    calls = []
    depth = [0]
    for method in RECORDED_METHODS:
        original = getattr(scheduler, method, None)
        if original is None:
            continue

        # functools.wraps keeps the signature visible: pipelines pass eta and generator only to a step whose
        # signature names them.
        @functools.wraps(original)
        def wrapper(*args, __original=original, __method=method, **kwargs):
            bound = inspect.signature(__original).bind(*args, **kwargs)
            arguments = {name: snapshot(value) for name, value in bound.arguments.items()}
            generator = arguments.get("generator")
            state = generator.get_state() if isinstance(generator, torch.Generator) else None
            depth[0] += 1
            try:
                result = __original(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0]:
                return result
            if __method == "set_timesteps":
                outputs = (snapshot(scheduler.timesteps),)
            else:
                outputs = tuple(snapshot(t) for t in output_tensors(result))
            unet_output = unet_outputs[-1] if unet_outputs and __method == "step" else None
            calls.append(Call(__method, arguments, state, scheduler.num_inference_steps, outputs, unet_output))
            return result

        setattr(scheduler, method, wrapper)
    return calls


def record_unet_outputs(unet) -> list:
    outputs = []
    unet.register_forward_hook(lambda module, args, output: outputs.append(snapshot(output[0])))
    return outputs


@functools.lru_cache(maxsize=None)
def diffusers_run(case_name: str):
    """Run a case with diffusers' schedulers once per session: (images, {scheduler name: (scheduler, calls)})."""
    case = CASES[case_name]
    pipe = case.build()
    unet_outputs = record_unet_outputs(pipe.unet)
    recorded = {name: (getattr(pipe, name), record(getattr(pipe, name), unet_outputs)) for name in case.schedulers}
    with torch.no_grad():
        images = case.run(pipe)
    return images, recorded


def fastddim_scheduler(theirs):
    ours = getattr(fastddim, type(theirs).__name__).from_config(theirs.config)
    assert type(ours).__module__.startswith("fastddim")
    return ours


def float32_allowance(scale: torch.Tensor, alpha_t, config, use_clipped_model_output=False) -> torch.Tensor:
    """INTERMEDIATE_ULPS float32 ulps of the step's largest intermediate (`scale`), magnified by its division."""
    alpha_t = torch.as_tensor(alpha_t, dtype=torch.float64, device=scale.device)
    amplification = torch.ones_like(alpha_t)
    if config.prediction_type == "epsilon":
        amplification = torch.maximum(amplification, alpha_t.rsqrt())
    if config.prediction_type == "sample" or use_clipped_model_output:
        amplification = torch.maximum(amplification, (1 - alpha_t).rsqrt())
    return INTERMEDIATE_ULPS * FLOAT32_ULP * scale * amplification


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, allowance: torch.Tensor, what: str) -> None:
    """|actual - expected| <= conftest's float32 tolerance (relative to `expected`) + `allowance`, everywhere."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == torch.float32 and expected.dtype in (torch.float32, torch.float64), (what, expected.dtype)
    tolerance = TOLERANCES[torch.float32]
    expected = expected.to(torch.float64)
    error = (actual.to(torch.float64) - expected).abs()
    bound = tolerance["atol"] + tolerance["rtol"] * expected.abs() + allowance
    assert torch.isfinite(error).all(), f"{what}: non-finite values"
    worst = float((error / bound).max())
    assert worst <= 1, f"{what}: error {float(error.max()):.3g}, {worst:.2f} times the float32 bound"


def step_truth(theirs, call: Call):
    """Float64 truth of a recorded step / batch_step_no_noise / add_noise, from diffusers' float32 alphas, and the
    float32 allowance for it: (truths, allowance)."""
    arguments, config = call.arguments, theirs.config
    num_train = config.num_train_timesteps
    if call.method == "add_noise":
        original, noise, timesteps = arguments["original_samples"], arguments["noise"], arguments["timesteps"]
        alpha = theirs.alphas_cumprod.cpu().to(torch.float64)[timesteps.reshape(-1).cpu()].view(-1, 1, 1, 1)
        alpha = alpha.to(original.device)
        truth = alpha.sqrt() * original.double() + (1 - alpha).sqrt() * noise.double()
        scale = original.double().abs() + noise.double().abs()
        return (truth,), INTERMEDIATE_ULPS * FLOAT32_ULP * scale
    model_output, sample = arguments["model_output"], arguments["sample"]
    options = dict(prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                   clip_sample_range=config.clip_sample_range, thresholding=config.get("thresholding", False),
                   dynamic_thresholding_ratio=config.get("dynamic_thresholding_ratio", 0.995),
                   sample_max_value=config.get("sample_max_value", 1.0),
                   use_clipped_model_output=arguments.get("use_clipped_model_output", False))
    if call.method == "batch_step_no_noise":
        # Per sample: t -> t - num_train // num_inference_steps, an alpha product of 1 below timestep 0.
        timesteps = arguments["timesteps"].reshape(-1).tolist()
        alphas = [truth_alphas(theirs.alphas_cumprod, 1.0, num_train, call.num_inference_steps, t) for t in timesteps]
        prev = torch.cat([truth_step(model_output[i:i + 1], sample[i:i + 1], *alphas[i], **options)[0]
                          for i in range(len(timesteps))])
        alpha_t = torch.tensor([a for a, _ in alphas], dtype=torch.float64, device=sample.device).view(-1, 1, 1, 1)
        scale = model_output.double().abs() + sample.double().abs()
        return (prev,), float32_allowance(scale, alpha_t, config, options["use_clipped_model_output"])
    inverse = isinstance(theirs, diffusers.DDIMInverseScheduler)
    boundary = theirs.initial_alpha_cumprod if inverse else theirs.final_alpha_cumprod
    alpha_t, alpha_prev = truth_alphas(theirs.alphas_cumprod, boundary, num_train, call.num_inference_steps,
                                       int(arguments["timestep"]), inverse=inverse)
    eta = arguments.get("eta", 0.0)
    noise = arguments.get("variance_noise")
    if eta > 0 and noise is None:
        noise = randn_tensor(model_output.shape, generator=torch.Generator().set_state(call.generator_state),
                             device=model_output.device, dtype=model_output.dtype)
    truths = truth_step(model_output, sample, alpha_t, alpha_prev, eta=eta, noise=noise, inverse=inverse,
                        **options)
    scale = model_output.double().abs() + sample.double().abs()
    if noise is not None and eta > 0:
        scale = scale + noise.double().abs()
    return truths, float32_allowance(scale, alpha_t, config, options["use_clipped_model_output"])


def replay_arguments(call: Call) -> dict:
    arguments = dict(call.arguments)
    arguments.pop("self", None)
    if call.generator_state is not None:
        arguments["generator"] = torch.Generator().set_state(call.generator_state)
    return arguments


def replay(theirs, calls: list[Call], guidance: dict | None = None) -> dict:
    """Replay diffusers' recorded calls on fastddim's scheduler of the same config; returns call counts."""
    ours = fastddim_scheduler(theirs)
    counts = {}
    for index, call in enumerate(calls):
        what = f"{type(ours).__name__}.{call.method} call {index}"
        counts[call.method] = counts.get(call.method, 0) + 1
        result = getattr(ours, call.method)(**replay_arguments(call))
        if call.method == "set_timesteps":
            assert torch.equal(ours.timesteps, call.outputs[0]), what
            continue
        if call.method == "_get_variance":
            # diffusers' float32 formula, reproduced operation for operation (ParaDiGMS sizes noise with it).
            assert torch.equal(result, call.outputs[0]), what
            continue
        ours_outputs = output_tensors(result)
        truths, allowance = step_truth(theirs, call)
        for name, got, expected, truth in zip(("prev_sample", "pred_original_sample"), ours_outputs, call.outputs,
                                              truths):
            assert_float32_close(got, expected, 2 * allowance, f"{what} {name} vs diffusers")
            assert_float32_close(got, truth, allowance, f"{what} {name} vs float64")
        if guidance is not None and call.method == "step":
            check_guided_step(ours, call, guidance, what)
    return counts


def check_guided_step(ours, call: Call, guidance: dict, what: str) -> None:
    """fastddim's guided_step on the UNet's raw (uncond, cond) outputs equals diffusers' pipeline guidance
    (noise_cfg, rescale_noise_cfg) followed by diffusers' step."""
    uncond, cond = call.unet_output.chunk(2)
    arguments = replay_arguments(call)
    arguments.pop("model_output")
    arguments.pop("return_dict", None)
    guided = ours.guided_step(uncond, cond, **guidance, **arguments)
    scale = (1 + 2 * guidance["guidance_scale"]) * (uncond.double().abs() + cond.double().abs())
    scale = scale + arguments["sample"].double().abs()
    alpha_t = float(ours.alphas_cumprod[int(arguments["timestep"])])
    allowance = float32_allowance(scale, alpha_t, ours.config)
    assert_float32_close(guided.prev_sample, call.outputs[0], 2 * allowance, f"{what} guided_step vs diffusers")


# --------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(autouse=True, scope="module")
def float32_convolutions_on_gpu():
    # TF32 would round the UNet's inputs to 10 bits, turning the libraries' float32 rounding differences into
    # 1e-3 ones; the comparisons here are about float32.
    if DEVICE != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _one_thread(single_threaded_torch):
    """Every test here on one intra-op thread (conftest.single_threaded_torch)."""


@pytest.mark.parametrize("case_name", CASES)
def test_every_scheduler_call_matches_diffusers(case_name, backend):
    _, recorded = diffusers_run(case_name)
    guidance = dict(guidance_scale=7.5, guidance_rescale=0.7) if case_name.startswith("sd-cfg") else None
    for name, (theirs, calls) in recorded.items():
        counts = replay(theirs, calls, guidance)
        # The run really went through the scheduler calls this case is about.
        stepping = "batch_step_no_noise" if case_name == "paradigms" else "step"
        assert counts.get(stepping, 0) >= 2, (name, counts)
    if case_name in ("img2img", "inpaint"):
        assert recorded["scheduler"][1] and any(c.method == "add_noise" for c in recorded["scheduler"][1])


@pytest.mark.parametrize("case_name", CASES)
def test_pipeline_images_match_diffusers(case_name, backend):
    expected, recorded = diffusers_run(case_name)
    case = CASES[case_name]
    pipe = case.build()
    calls = {}
    for name in case.schedulers:
        setattr(pipe, name, fastddim_scheduler(getattr(pipe, name)))
        calls[name] = record(getattr(pipe, name))
    with torch.no_grad():
        images = case.run(pipe)
    for name in case.schedulers:
        assert type(getattr(pipe, name)).__module__.startswith("fastddim")  # the run really used fastddim
        assert [c.method for c in calls[name]] == [c.method for c in recorded[name][1]], name
    assert images.shape == expected.shape and images.shape[0] == BATCH_SIZE
    np.testing.assert_allclose(images, expected, rtol=0, atol=IMAGE_ATOL)


def test_options_under_test_change_the_images():
    """The image comparison can fail: eta, guidance_rescale and strength each move the images far beyond
    IMAGE_ATOL, so a scheduler that ignored one of them would be caught."""
    eta0, eta1 = diffusers_run("sd-cfg-rescale-eta0")[0], diffusers_run("sd-cfg-rescale-eta1")[0]
    assert np.abs(eta0 - eta1).max() > 100 * IMAGE_ATOL
    pipe = stable_diffusion(diffusers.StableDiffusionPipeline)
    with torch.no_grad():
        no_rescale = pipe(eta=0.0, guidance_rescale=0.0, **embeds_and_seed()).images
        other_strength = stable_diffusion(diffusers.StableDiffusionImg2ImgPipeline)(
            image=image(), strength=0.9, eta=1.0, **embeds_and_seed()).images
    assert np.abs(no_rescale - eta0).max() > 100 * IMAGE_ATOL
    assert np.abs(other_strength - diffusers_run("img2img")[0]).max() > 100 * IMAGE_ATOL


# --------------------------------------------------------------------------------------------------------------
# DDIMParallelScheduler beyond the pipeline


PARALLEL_CONFIGS = {
    "defaults": {},
    "stable-diffusion": SD_SCHEDULER,
    "v-trailing-clipped": dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample_range=0.8),
    "sample-thresholded": dict(prediction_type="sample", thresholding=True, sample_max_value=1.5),
}


@pytest.mark.parametrize("config_name", PARALLEL_CONFIGS)
@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_batch_step_no_noise_matches_diffusers_off_the_grid(config_name, use_clipped_model_output, backend):
    """One timestep per sample, on and off the set_timesteps grid, including the last step (t < T // n, where
    diffusers' batch_step_no_noise steps to an alpha product of 1 even with set_alpha_to_one=False)."""
    config = PARALLEL_CONFIGS[config_name]
    theirs, ours = diffusers.DDIMParallelScheduler(**config), fastddim.DDIMParallelScheduler(**config)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    timesteps = torch.tensor([999, 901, 640, 333, 101, 99, 55, 7, 1, 0], device=DEVICE)
    generator = torch.Generator().manual_seed(5)
    model_output = torch.randn(len(timesteps), 4, 6, 6, generator=generator).to(DEVICE)
    sample = 2 * torch.randn(len(timesteps), 4, 6, 6, generator=generator).to(DEVICE)
    arguments = dict(model_output=model_output, timesteps=timesteps, sample=sample,
                     use_clipped_model_output=use_clipped_model_output)
    expected = theirs.batch_step_no_noise(**arguments)
    call = Call("batch_step_no_noise", arguments, None, 10, (expected,))
    got = ours.batch_step_no_noise(**arguments)
    (truth,), allowance = step_truth(theirs, call)
    assert_float32_close(got, expected, 2 * allowance, "batch_step_no_noise vs diffusers")
    assert_float32_close(got, truth, allowance, "batch_step_no_noise vs float64")
    # Each sample equals a single step at its own timestep where the two agree (not the last step when
    # final_alpha_cumprod != 1).
    step = ours.step(model_output, timesteps, sample, use_clipped_model_output=use_clipped_model_output)
    same = (timesteps >= 100) | (float(ours.final_alpha_cumprod) == 1.0)
    assert torch.equal(got[same], step.prev_sample[same])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_step_no_noise_half_precision_rounds_once(dtype, backend):
    """Half-precision inputs give a result of their dtype within about one ulp of the float64 truth (diffusers
    returns float32 here: its per-sample float32 coefficients promote the batch; fastddim keeps its rule that
    outputs have the inputs' dtype, as `step` has in both libraries)."""
    scheduler = fastddim.DDIMParallelScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(10)
    timesteps = torch.tensor([901, 501, 101, 1], device=DEVICE)
    generator = torch.Generator().manual_seed(6)
    model_output = torch.randn(4, 4, 6, 6, generator=generator).to(DEVICE, dtype)
    sample = torch.randn(4, 4, 6, 6, generator=generator).to(DEVICE, dtype)
    got = scheduler.batch_step_no_noise(model_output, timesteps, sample)
    assert got.dtype == dtype
    arguments = dict(model_output=model_output, timesteps=timesteps, sample=sample)
    (truth,), _ = step_truth(diffusers.DDIMParallelScheduler(**SD_SCHEDULER), Call("batch_step_no_noise", arguments,
                                                                                   None, 10, ()))
    assert max_error_ratio(got, truth, dtype) <= 1


def test_batch_step_no_noise_boundary_differs_from_step_as_in_diffusers():
    """With set_alpha_to_one=False the last step of batch_step_no_noise ends at alpha 1, that of step at
    alphas_cumprod[0]: both libraries, so the test pins diffusers' behaviour, not an accident of fastddim."""
    for library in (diffusers, fastddim):
        scheduler = library.DDIMParallelScheduler(**SD_SCHEDULER)
        scheduler.set_timesteps(10)
        model_output = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
        t = scheduler.timesteps[-1:]
        batched = scheduler.batch_step_no_noise(model_output, t, sample)
        single = scheduler.step(model_output, int(t), sample).prev_sample
        assert (batched - single).abs().max() > 1e-3, library.__name__


def test_parallel_scheduler_config_and_helpers_match_diffusers(tmp_path):
    theirs = diffusers.DDIMParallelScheduler(**SD_SCHEDULER)
    ours = fastddim.DDIMParallelScheduler.from_config(theirs.config)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(theirs.config)
    assert set(inspect.signature(ours.batch_step_no_noise).parameters) == set(
        inspect.signature(theirs.batch_step_no_noise).parameters)
    assert ours._is_ode_scheduler is theirs._is_ode_scheduler is True
    ours.save_pretrained(tmp_path)
    assert public(diffusers.DDIMParallelScheduler.from_pretrained(tmp_path).config) == public(theirs.config)
    for scheduler in (theirs, ours):
        scheduler.set_timesteps(7)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for t in theirs.timesteps:
        assert torch.equal(ours._get_variance(t), theirs._get_variance(t))
        assert torch.equal(ours._get_variance(int(t), int(t) - 30), theirs._get_variance(int(t), int(t) - 30))
    t = torch.tensor([999, 500, 120, 3])
    assert torch.equal(ours._batch_get_variance(t, t - 142), theirs._batch_get_variance(t, t - 142))
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    samples = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.add_noise(samples, noise, t), theirs.add_noise(samples, noise, t))
    torch.testing.assert_close(ours.get_velocity(samples, noise, t), theirs.get_velocity(samples, noise, t))


def test_batch_step_no_noise_rejects_bad_input():
    scheduler = fastddim.DDIMParallelScheduler()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.batch_step_no_noise(x, torch.tensor([10, 20]), x)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta must be 0"):
        scheduler.batch_step_no_noise(x, torch.tensor([10, 20]), x, eta=0.5)
    with pytest.raises(ValueError, match=r"timesteps values must be in \[0, 1000\)"):
        scheduler.batch_step_no_noise(x, torch.tensor([10, 1000]), x)
    with pytest.raises(ValueError, match=r"timesteps values must be in \[0, 1000\)"):
        scheduler.batch_step_no_noise(x, torch.tensor([-1, 20]), x)
    with pytest.raises(ValueError, match="one timestep per sample"):
        scheduler.batch_step_no_noise(x, torch.tensor([1, 2, 3]), x)
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        scheduler.batch_step_no_noise(x, torch.tensor([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="shape"):
        scheduler.batch_step_no_noise(x, torch.tensor([1, 2]), x[:1])
    with pytest.raises(ValueError, match=r"timestep values must be in \[0, 1000\)"):
        scheduler._get_variance(1000)
    inputs = (x.clone(), x.clone())
    scheduler.batch_step_no_noise(inputs[0], torch.tensor([10, 20]), inputs[1])
    assert torch.equal(inputs[0], x) and torch.equal(inputs[1], x)  # never modified in place
