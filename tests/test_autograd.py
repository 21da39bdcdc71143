"""Gradients through the step on every backend: equal to diffusers' (its step is torch, differentiated by autograd)
within float32 rounding, and equal to finite differences in float64 (torch.autograd.gradcheck).

Inputs are drawn so that nothing sits on a kink: no x0 at a clip bound or at the threshold, no tied order
statistics. Thresholded cases use a sample_max_value above the quantile (so gradient flows into s through
torch.quantile's order statistics) and one below it (s is the bound: no gradient into s).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastddim  # noqa: E402
from fastddim import ops  # noqa: E402
from fastddim.schedule import step_table  # noqa: E402

SHAPE = (2, 3, 4, 4)
TIMESTEP = 501  # a 50-step "leading" schedule with steps_offset 1: alpha_t about 0.28
OPTIONS = {
    "plain": {},
    "clip": dict(clip_sample=True, clip_sample_range=2.0),
    "clip_use_clipped": dict(clip_sample=True, clip_sample_range=2.0, use_clipped_model_output=True),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=50.0),
    "threshold_use_clipped": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=50.0,
                                  use_clipped_model_output=True),
    "threshold_at_bound": dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5),
}


def _config(option: str, prediction_type: str) -> dict:
    options = OPTIONS[option]
    config = dict(prediction_type=prediction_type, steps_offset=1, clip_sample=options.get("clip_sample", False),
                  clip_sample_range=options.get("clip_sample_range", 1.0))
    for key in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
        if key in options:
            config[key] = options[key]
    return config


def _inputs(seed: int, dtype=torch.float32, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(5)]


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def _assert_grads_close(actual, expected, name):
    assert actual is not None, f"no gradient for {name}"
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=2**-16, atol=2**-18 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_step_gradients_match_diffusers(prediction_type, option, eta, backend):
    config = _config(option, prediction_type)
    ours = fastddim.DDIMScheduler(**config)
    theirs = diffusers.DDIMScheduler(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    model_output, sample, noise, weight_prev, weight_x0 = _inputs(7)
    use_clipped = OPTIONS[option].get("use_clipped_model_output", False)

    grads = []
    for scheduler in (ours, theirs):
        m, x, n = _leaves(model_output, sample, noise)
        out = scheduler.step(m, TIMESTEP, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=n)
        loss = (out.prev_sample * weight_prev).sum() + (out.pred_original_sample * weight_x0).sum()
        loss.backward()
        grads.append((m.grad, x.grad, n.grad if eta else None))
    for name, actual, expected in zip(("model_output", "sample", "variance_noise"), *grads):
        if expected is not None:
            _assert_grads_close(actual, expected, name)


def test_threshold_gradient_reaches_the_order_statistics(backend):
    """Not vacuous: diffusers' gradient differs from the one with s held fixed exactly at the two order
    statistics of each sample (sample_max_value above the quantile), and fastddim's equals diffusers'."""
    config = _config("threshold", "sample")
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    model_output, sample, _, weight, _ = _inputs(3)
    model_output = 2 * model_output  # the quantile of |x0| (about 2.6) lies inside [1, sample_max_value]
    grads = []
    for scheduler in (ours, theirs):
        m = model_output.clone().requires_grad_(True)
        (scheduler.step(m, TIMESTEP, sample).prev_sample * weight).sum().backward()
        grads.append(m.grad)
    _assert_grads_close(grads[0], grads[1], "model_output")

    # With s fixed: prev = sqrt(a_prev) clamp(m, -s, s) / s + sqrt(1 - a_prev) (x - sqrt(a_t) m) / sqrt(1 - a_t).
    alphas = theirs.alphas_cumprod.double()
    a_t, a_prev = alphas[TIMESTEP], alphas[TIMESTEP - 20]
    flat = model_output.double().reshape(2, -1)
    s = torch.quantile(flat.abs(), 0.8, dim=1, keepdim=True).clamp(1, 50)
    inside = (flat.abs() <= s).double()
    fixed = weight.double().reshape(2, -1) * (a_prev.sqrt() * inside / s
                                               - (1 - a_prev).sqrt() * a_t.sqrt() / (1 - a_t).sqrt())
    differs = (grads[1].double().reshape(2, -1) - fixed).abs() > 1e-4
    order = flat.abs().argsort(dim=1)[:, 37:39]  # ratio 0.8 of 48 elements: ranks 37.6 -> 37 and 38
    expected = torch.zeros_like(differs).scatter_(1, order, True)
    assert torch.equal(differs, expected)


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
@pytest.mark.parametrize("option", ["plain", "clip", "threshold"])
def test_guided_step_gradients_match_diffusers(option, guidance_rescale, backend):
    """fastddim's guided_step against diffusers' step on diffusers' guidance (and rescale_noise_cfg)."""
    config = _config(option, "epsilon")
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    cond, uncond, sample, noise, weight_prev = _inputs(11)
    scale = 4.0
    c, u, x, n = _leaves(cond, uncond, sample, noise)
    (ours.guided_step(u, c, TIMESTEP, x, guidance_scale=scale, guidance_rescale=guidance_rescale, eta=1.0,
                      variance_noise=n).prev_sample * weight_prev).sum().backward()
    c2, u2, x2, n2 = _leaves(cond, uncond, sample, noise)
    guided = u2 + scale * (c2 - u2)
    if guidance_rescale:
        guided = rescale_noise_cfg(guided, c2, guidance_rescale=guidance_rescale)
    (theirs.step(guided, TIMESTEP, x2, eta=1.0, variance_noise=n2).prev_sample * weight_prev).sum().backward()
    for name, actual, expected in (("cond", c.grad, c2.grad), ("uncond", u.grad, u2.grad), ("sample", x.grad, x2.grad),
                                   ("variance_noise", n.grad, n2.grad)):
        _assert_grads_close(actual, expected, name)


@pytest.mark.parametrize("option", ["clip", "threshold"])
def test_gradients_flow_through_a_loop(option, backend):
    """A tiny differentiable denoiser, three steps, a loss on the final sample: gradients of its parameter and of
    the initial latents equal diffusers'."""
    config = _config(option, "epsilon")
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(3)
    theirs.set_timesteps(3)
    latents, target, noise, _, _ = _inputs(5)
    grads = []
    for scheduler in (ours, theirs):
        weight = torch.tensor(0.8, requires_grad=True)
        x = latents.clone().requires_grad_(True)
        current = x
        for t in scheduler.timesteps:
            model_output = torch.tanh(weight * current + 0.01 * float(t))
            current = scheduler.step(model_output, t, current, eta=0.5, variance_noise=noise).prev_sample
        ((current - target) ** 2).mean().backward()
        grads.append((weight.grad, x.grad))
    _assert_grads_close(grads[0][0], grads[1][0], "denoiser parameter")
    _assert_grads_close(grads[0][1], grads[1][1], "initial latents")


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    """diffusers' `rescale_noise_cfg` (pipelines/stable_diffusion), transcribed: its module needs transformers."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def _table():
    scheduler = fastddim.DDIMScheduler(steps_offset=1)
    scheduler.set_timesteps(50)
    return step_table(scheduler.alphas_cumprod, 50, float(scheduler.final_alpha_cumprod))


GRADCHECK_CASES = {
    "epsilon eta=1": dict(eta=1.0),
    "v clip use_clipped": dict(prediction_type="v_prediction", clip_sample=True, use_clipped_model_output=True),
    "sample threshold": dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.7,
                             sample_max_value=50.0),
    "epsilon threshold use_clipped": dict(thresholding=True, dynamic_thresholding_ratio=0.7, sample_max_value=50.0,
                                          use_clipped_model_output=True, eta=1.0),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64(backend_name, case):
    table = _table()
    model_output, sample, noise, _, _ = _inputs(13, torch.float64, (2, 2, 3, 3))
    options = GRADCHECK_CASES[case]
    timesteps = torch.tensor([501, 301])  # one per sample

    def step(m, x, n):
        return ops.ddim_step(m, x, table, timesteps, variance_noise=n if options.get("eta") else None,
                             backend=backend_name, **options)

    assert torch.autograd.gradcheck(step, _leaves(model_output, sample, noise), fast_mode=True)


@pytest.mark.parametrize("options", [dict(guidance_rescale=0.0), dict(guidance_rescale=0.7),
                                     dict(guidance_rescale=0.7, thresholding=True, dynamic_thresholding_ratio=0.7,
                                          sample_max_value=50.0)], ids=["cfg", "rescaled", "rescaled threshold"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_gradcheck_float64_guided(backend_name, options):
    table = _table()
    cond, uncond, sample, _, _ = _inputs(17, torch.float64, (2, 2, 3, 3))

    def step(c, u, x):
        return ops.ddim_step(c, x, table, 401, uncond_output=u, guidance_scale=3.0, backend=backend_name, **options)

    assert torch.autograd.gradcheck(step, _leaves(cond, uncond, sample), fast_mode=True)


def test_no_graph_without_grad(backend):
    """Inference is untouched: no grad_fn when no input requires grad or under no_grad."""
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample, _, _, _ = _inputs(1)
    assert scheduler.step(model_output, TIMESTEP, sample).prev_sample.grad_fn is None
    leaf = model_output.clone().requires_grad_(True)
    with torch.no_grad():
        assert scheduler.step(leaf, TIMESTEP, sample).prev_sample.grad_fn is None
    assert scheduler.step(leaf, TIMESTEP, sample).prev_sample.grad_fn is not None


def test_gradient_of_only_some_inputs_and_outputs(backend):
    """A step whose loss reads only pred_original_sample, with only sample requiring grad, in float16."""
    scheduler = fastddim.DDIMScheduler(clip_sample=True)
    scheduler.set_timesteps(50)
    model_output, sample, _, weight, _ = _inputs(2)
    x = sample.to(torch.float16).requires_grad_(True)
    m = model_output.to(torch.float16)
    (scheduler.step(m, TIMESTEP, x).pred_original_sample.float() * weight).sum().backward()
    # x0 = (x - sqrt(beta_t) m) / sqrt(alpha_t), clamped to [-1, 1]: d x0 / d x = 1 / sqrt(alpha_t) inside.
    alpha_t = float(scheduler.alphas_cumprod[TIMESTEP])
    x0 = (x.detach().double() - (1 - alpha_t) ** 0.5 * m.double()) / alpha_t**0.5
    expected = torch.where(x0.abs() <= 1, weight.double() / alpha_t**0.5, 0)
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad.double(), expected, rtol=2**-10, atol=2**-10)


@pytest.mark.parametrize("option", ["plain", "clip", "threshold"])
def test_nan_input_gradients_match_diffusers(option, backend):
    """A NaN in one sample's model output: torch.clamp passes no gradient through NaN (its masks compare false),
    and a thresholded sample whose quantile is NaN passes none through x0 or s; the other sample is unaffected."""
    config = _config(option, "epsilon")
    ours, theirs = fastddim.DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    model_output, sample, _, weight_prev, weight_x0 = _inputs(19)
    model_output[1, 0, 2, 3] = float("nan")
    grads = []
    for scheduler in (ours, theirs):
        m, x = _leaves(model_output, sample)
        out = scheduler.step(m, TIMESTEP, x)
        (torch.nan_to_num(out.prev_sample) * weight_prev + torch.nan_to_num(out.pred_original_sample) * weight_x0
         ).sum().backward()
        grads.append((m.grad, x.grad))
    for name, actual, expected in zip(("model_output", "sample"), *grads):
        scale = float(expected.nan_to_num().abs().max())
        torch.testing.assert_close(actual, expected, rtol=2**-16, atol=2**-18 * scale, equal_nan=True, msg=name)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inverse_step_gradients_match_diffusers(prediction_type, backend):
    ours = fastddim.DDIMInverseScheduler(prediction_type=prediction_type, clip_sample=True, clip_sample_range=3.0)
    theirs = diffusers.DDIMInverseScheduler(prediction_type=prediction_type, clip_sample=True, clip_sample_range=3.0)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    model_output, sample, _, weight_prev, _ = _inputs(23)
    grads = []
    for scheduler in (ours, theirs):
        m, x = _leaves(model_output, sample)
        (scheduler.step(m, 481, x).prev_sample * weight_prev).sum().backward()
        grads.append((m.grad, x.grad))
    for name, actual, expected in zip(("model_output", "sample"), *grads):
        _assert_grads_close(actual, expected, name)


@pytest.mark.parametrize("options", [dict(clip_sample=True, variance_noise=True),
                                     dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=50.0,
                                          guidance_rescale=0.5)], ids=["clip noise", "threshold rescaled"])
def test_compiled_triton_step_gradients_match_eager(options):
    """Under torch.compile the Triton step is the custom op torch.ops.fastddim.ddim_step; its registered backward
    (the custom op torch.ops.fastddim.ddim_step_backward) gives the eager gradients."""
    table = _table()
    cond, uncond, sample, noise, weight = _inputs(29)
    options = dict(options)
    guided = "guidance_rescale" in options
    use_noise = options.pop("variance_noise", False)

    def step(c, u, x, n):
        return ops.ddim_step(c, x, table, torch.tensor(501), eta=1.0, variance_noise=n if use_noise else None,
                             uncond_output=u if guided else None, guidance_scale=3.0, backend="triton",
                             **options)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for function in (step, compiled):
        leaves = _leaves(cond, uncond, sample, noise)
        (function(*leaves) * weight).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, actual, expected in zip(("cond", "uncond", "sample", "noise"), *grads):
        if expected is None:
            assert actual is None, name
        else:
            torch.testing.assert_close(actual, expected, rtol=2**-16, atol=2**-18 * float(expected.abs().max()))


def test_backward_custom_op_passes_torch_library_opcheck():
    table = _table()
    cond, uncond, sample, grad_prev, grad_x0 = _inputs(31)
    for args in [
        (grad_prev, grad_x0, cond, sample, table, torch.tensor([501, 301]), 0, 1.0, "v_prediction", True, 1.0,
         True, None, 1.0, 0.0, False, 0.995, 1.0),
        (grad_prev, None, cond, sample, table, None, 501, 0.0, "epsilon", False, 1.0, False, uncond, 3.0, 0.5,
         True, 0.8, 50.0),
    ]:
        torch.library.opcheck(torch.ops.fastddim.ddim_step_backward.default, args)
