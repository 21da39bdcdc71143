"""Production-loop features: per-sample timesteps, device timesteps, fused guidance, Philox noise, torch.compile,
CUDA graphs. Truth: per-sample loops, diffusers' `rescale_noise_cfg` and float64 math, Random123's known-answer
vectors for Philox4x32-10, and the normal distribution itself."""

import math

import pytest
import torch
from conftest import DEVICE, assert_same_nonfinite, truth_alphas, truth_step

import fastddim
from fastddim import ops, reference
from fastddim.graphs import GraphedLoop, GraphedStep
from fastddim.plan import StepOptions
from fastddim.noise import PhiloxGenerator

SHAPE = (3, 4, 5, 6)


def make_scheduler(**config):
    scheduler = fastddim.DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    return scheduler


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# Per-sample timesteps
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_per_sample_timesteps_match_each_sample_stepped_alone(backend, prediction_type, layout):
    scheduler = make_scheduler(prediction_type=prediction_type)
    timesteps = torch.tensor([901, 401, 1])  # first, middle and last steps of a 10-step run
    model_output, sample, noise = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    if layout == "channels_last":
        model_output = model_output.contiguous(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        model_output = randn(3, 4, 5, 12, seed=1)[..., ::2]
    out = scheduler.step(model_output, timesteps, sample, eta=0.8, variance_noise=noise)
    for i, t in enumerate(timesteps.tolist()):
        alone = scheduler.step(model_output[i:i + 1], t, sample[i:i + 1], eta=0.8, variance_noise=noise[i:i + 1])
        torch.testing.assert_close(out.prev_sample[i:i + 1], alone.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(out.pred_original_sample[i:i + 1], alone.pred_original_sample, rtol=0, atol=0)


def test_per_sample_timesteps_inverse_scheduler(backend):
    scheduler = fastddim.DDIMInverseScheduler()
    scheduler.set_timesteps(10)
    timesteps = torch.tensor([0, 500, 900])
    model_output, sample = randn(*SHAPE, seed=4), randn(*SHAPE, seed=5)
    out = scheduler.step(model_output, timesteps, sample).prev_sample
    for i, t in enumerate(timesteps.tolist()):
        alone = scheduler.step(model_output[i:i + 1], t, sample[i:i + 1]).prev_sample
        torch.testing.assert_close(out[i:i + 1], alone, rtol=0, atol=0)


def test_per_sample_timesteps_bad_shape_or_range():
    scheduler = make_scheduler()
    model_output, sample = randn(*SHAPE), randn(*SHAPE)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(model_output, torch.tensor([1, 2]), sample)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(model_output, torch.tensor([1, 2, 1000]), sample)
    with pytest.raises(TypeError, match="timestep"):
        scheduler.step(model_output, torch.tensor([1.0, 2.0, 3.0]), sample)


def test_device_timesteps_outside_the_table_give_nan_not_a_neighbours_numbers(backend):
    # A timestep tensor the host never reads cannot raise; its results must be visibly invalid instead.
    scheduler = make_scheduler()
    table = scheduler._table_on(torch.device(DEVICE))
    timesteps = torch.tensor([5, 1000, -1], device=DEVICE)
    prev, _ = ops.ddim_step(randn(*SHAPE), randn(*SHAPE), table, timesteps)
    assert not prev[0].isnan().any()
    assert prev[1].isnan().all() and prev[2].isnan().all()


@pytest.mark.parametrize("timestep", [901, 1])
def test_tensor_timestep_equals_int_timestep(backend, timestep):
    scheduler = make_scheduler(prediction_type="v_prediction")
    table = scheduler._table_on(torch.device(DEVICE))
    model_output, sample, noise = randn(*SHAPE, seed=6), randn(*SHAPE, seed=7), randn(*SHAPE, seed=8)
    kwargs = dict(eta=0.5, prediction_type="v_prediction", clip_sample=True, variance_noise=noise)
    by_int = ops.ddim_step(model_output, sample, scheduler._table, timestep, **kwargs)
    by_tensor = ops.ddim_step(model_output, sample, table, torch.tensor(timestep, device=DEVICE), **kwargs)
    for a, b in zip(by_int, by_tensor):
        torch.testing.assert_close(a, b, rtol=2**-22, atol=2**-22)


# ----------------------------------------------------------------------------------------------------------
# Fused classifier-free guidance
# ----------------------------------------------------------------------------------------------------------
def diffusers_rescale_noise_cfg():
    guider_utils = pytest.importorskip("diffusers.guiders.guider_utils")
    return guider_utils.rescale_noise_cfg


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guided_step_matches_diffusers_guidance_then_step(backend, guidance_rescale, dtype):
    rescale_noise_cfg = diffusers_rescale_noise_cfg()
    import diffusers

    scheduler = make_scheduler()
    reference_scheduler = diffusers.DDIMScheduler()
    reference_scheduler.set_timesteps(10)
    guidance_scale, t = 7.5, 501
    uncond, cond, sample = randn(*SHAPE, seed=9, dtype=dtype), randn(*SHAPE, seed=10, dtype=dtype), randn(
        *SHAPE, seed=11, dtype=dtype)

    # The float64 truth: diffusers' guidance formulas in float64, then the float64 step.
    u64, c64 = uncond.double().cpu(), cond.double().cpu()
    guided64 = u64 + guidance_scale * (c64 - u64)
    if guidance_rescale:
        guided64 = rescale_noise_cfg(guided64, c64, guidance_rescale)
    alpha_t, alpha_prev = truth_alphas(reference_scheduler.alphas_cumprod, reference_scheduler.final_alpha_cumprod,
                                       1000, 10, t)
    truth, truth_x0 = truth_step(guided64, sample.cpu(), alpha_t, alpha_prev, clip_sample=True)

    out = scheduler.guided_step(uncond, cond, t, sample, guidance_scale, guidance_rescale)
    # What a diffusers pipeline computes: guidance in the input dtype, then diffusers' step.
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale)
    unfused = reference_scheduler.step(guided.cpu(), t, sample.cpu())

    scale = truth.abs().max()
    ours = (out.prev_sample.cpu().double() - truth).abs().max() / scale
    theirs = (unfused.prev_sample.double() - truth).abs().max() / scale
    # fp32: a few roundings of terms 7.5x the result's size; fp16: one rounding of the output.
    assert ours <= {torch.float32: 2e-6, torch.float16: 2**-10}[dtype]
    assert ours <= theirs + 1e-6
    assert out.prev_sample.dtype == dtype


def test_guided_step_with_scale_one_is_the_plain_step(backend):
    scheduler = make_scheduler()
    uncond, cond, sample = randn(*SHAPE, seed=12), randn(*SHAPE, seed=13), randn(*SHAPE, seed=14)
    guided = scheduler.guided_step(uncond, cond, 301, sample, guidance_scale=1.0)
    plain = scheduler.step(cond, 301, sample)
    torch.testing.assert_close(guided.prev_sample, plain.prev_sample, rtol=2**-22, atol=2**-22)


def test_guided_step_bad_arguments():
    scheduler = make_scheduler()
    cond, sample = randn(*SHAPE), randn(*SHAPE)
    with pytest.raises(ValueError, match="uncond_output"):
        scheduler.guided_step(randn(2, 4, 5, 6), cond, 301, sample, 7.5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        scheduler.guided_step(cond, cond, 301, sample, 7.5, guidance_rescale=-0.1)
    with pytest.raises(ValueError, match="guidance_scale"):
        scheduler.guided_step(cond, cond, 301, sample, float("nan"))


# ----------------------------------------------------------------------------------------------------------
# Philox noise
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors), the generator's reference.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = [torch.tensor([w], dtype=torch.int64) for w in counter + key]
    assert tuple(int(w) for w in reference.philox4x32_10(*words)) == expected


def test_philox_noise_is_standard_normal():
    scipy_stats = pytest.importorskip("scipy.stats")
    noise = reference.philox_normal(torch.tensor([1234, 0]), 200_000).double()
    n = noise.numel()
    assert abs(noise.mean()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(noise.var() - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(noise.numpy(), "norm").pvalue > 1e-3


def test_philox_draws_are_independent_across_steps_and_seeds():
    n = 100_000
    first = reference.philox_normal(torch.tensor([7, 0]), n).double()
    for other in (reference.philox_normal(torch.tensor([7, 1]), n), reference.philox_normal(torch.tensor([8, 0]), n)):
        correlation = torch.corrcoef(torch.stack([first, other.double()]))[0, 1]
        assert abs(correlation) < 5 / math.sqrt(n)
    assert torch.equal(first, reference.philox_normal(torch.tensor([7, 0]), n).double())


def test_kernel_draws_the_reference_philox_stream():
    # With eta = 1 at a step whose alpha_prev is 1, prev = std * noise + terms without noise: subtract a
    # noiseless step to recover the kernel's noise and compare it with the torch path's draw.
    scheduler = make_scheduler()
    table = scheduler._table_on(torch.device(DEVICE))
    model_output, sample = randn(*SHAPE, seed=15), randn(*SHAPE, seed=16)
    state = torch.tensor([99, 5], device=DEVICE)
    noisy, _ = ops.ddim_step(model_output, sample, table, 501, eta=1.0, philox_state=state, backend="triton")
    torch_noisy, _ = ops.ddim_step(model_output, sample, scheduler._table, 501, eta=1.0,
                                   philox_state=state.cpu(), backend="torch")
    torch.testing.assert_close(noisy.cpu(), torch_noisy, rtol=1e-5, atol=1e-5)
    assert state.tolist() == [99, 5]  # the op itself does not advance the stream


def test_step_with_philox_generator_is_reproducible_and_fresh_per_step(backend):
    scheduler = make_scheduler()
    model_output, sample = randn(*SHAPE, seed=17), randn(*SHAPE, seed=18)
    generator = PhiloxGenerator(seed=3, device=DEVICE)
    first = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    second = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    assert generator.state.tolist() == [3, 2]
    assert not torch.equal(first, second)
    generator.manual_seed(3)
    again = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # eta = 0 draws nothing and leaves the stream where it was.
    scheduler.step(model_output, 501, sample, eta=0.0, generator=generator)
    assert generator.state.tolist() == [3, 1]


def test_philox_generator_arguments():
    with pytest.raises(TypeError, match="seed"):
        PhiloxGenerator(seed=1.5)
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="generator"):
        scheduler.step(randn(*SHAPE), 501, randn(*SHAPE), eta=1.0, generator=PhiloxGenerator(0),
                       variance_noise=randn(*SHAPE))


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def dynamo_counters():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_loop_has_one_graph_and_no_recompiles(backend, dynamo_counters, compile_backend):
    scheduler = make_scheduler(prediction_type="v_prediction")
    generator = PhiloxGenerator(seed=11, device=DEVICE)

    def denoise_step(model_output, timestep, sample):
        return scheduler.step(model_output, timestep, sample, eta=0.5, generator=generator).prev_sample

    compiled = torch.compile(denoise_step, fullgraph=True, backend=compile_backend)
    timesteps = scheduler.timesteps.to(DEVICE)
    sample = eager_sample = randn(2, 4, 8, 8, seed=19)
    eager_generator = PhiloxGenerator(seed=11, device=DEVICE)
    for i in range(timesteps.shape[0]):
        sample = compiled(torch.sin(3 * sample), timesteps[i], sample)
        eager_sample = scheduler.step(torch.sin(3 * eager_sample), timesteps[i], eager_sample, eta=0.5,
                                      generator=eager_generator).prev_sample
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]
    assert generator.state.tolist() == eager_generator.state.tolist() == [11, 10]
    # Eager steps read host timesteps, compiled ones gather on the device: float32 rounding apart, amplified
    # by 10 steps of a chaotic toy model.
    torch.testing.assert_close(sample, eager_sample, rtol=1e-4, atol=1e-4)


def test_compiled_guided_step_with_per_sample_timesteps(backend, dynamo_counters):
    scheduler = make_scheduler()

    def guided(uncond, cond, timesteps, sample):
        return scheduler.guided_step(uncond, cond, timesteps, sample, 5.0, 0.5).prev_sample

    compiled = torch.compile(guided, fullgraph=True, backend="aot_eager")
    uncond, cond, sample = randn(*SHAPE, seed=20), randn(*SHAPE, seed=21), randn(*SHAPE, seed=22)
    for timesteps in ([901, 401, 1], [801, 301, 101]):
        t = torch.tensor(timesteps, device=DEVICE)
        torch.testing.assert_close(compiled(uncond, cond, t, sample), guided(uncond, cond, t, sample),
                                   rtol=1e-5, atol=1e-5)
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["graph_break"]


def test_custom_op_passes_torch_library_opcheck():
    scheduler = make_scheduler()
    table = scheduler._table_on(torch.device(DEVICE))
    options = StepOptions(eta=0.5, clip_sample=True).op_arguments()
    args = (randn(*SHAPE, seed=23), randn(*SHAPE, seed=24), table, torch.tensor(501, device=DEVICE), 0, None,
            torch.tensor([1, 0], device=DEVICE), None, *options)
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, args)
    channels_last = (args[0].contiguous(memory_format=torch.channels_last),
                     args[1].contiguous(memory_format=torch.channels_last)) + args[2:]
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, channels_last)


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs (capture needs a GPU; on the CPU the helpers run eagerly and must give the eager results)
# ----------------------------------------------------------------------------------------------------------
def toy_model(sample, timestep):
    return torch.tanh(sample) * (timestep.to(sample.dtype) / 1000)


def test_graphed_step_matches_eager_for_every_timestep():
    scheduler = make_scheduler()
    sample = randn(2, 4, 8, 8, seed=25)
    graphed = GraphedStep(scheduler, sample)
    for t in scheduler.timesteps.to(DEVICE):
        model_output = toy_model(sample, t)
        expected = scheduler.step(model_output, t, sample).prev_sample
        got = graphed(model_output, t, sample).prev_sample.clone()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        sample = expected


def test_graphed_loop_matches_eager_loop_and_replays_fresh_noise():
    scheduler = make_scheduler()
    noise = randn(2, 4, 8, 8, seed=26)
    generator = PhiloxGenerator(seed=5, device=DEVICE)
    loop = GraphedLoop(toy_model, scheduler, noise, eta=1.0, generator=generator)
    first = loop(noise).clone()
    second = loop(noise).clone()
    assert not torch.equal(first, second)  # the stream moved on between replays

    eager_generator = PhiloxGenerator(seed=5, device=DEVICE)
    sample = noise
    for t in scheduler.timesteps.to(DEVICE):
        sample = scheduler.step(toy_model(sample, t), t, sample, eta=1.0, generator=eager_generator).prev_sample
    torch.testing.assert_close(first, sample, rtol=1e-5, atol=1e-5)
    generator.manual_seed(5)
    torch.testing.assert_close(loop(noise), first, rtol=0, atol=0)


def test_graphed_helpers_need_a_device_generator_for_noise():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="PhiloxGenerator"):
        GraphedStep(scheduler, randn(*SHAPE), eta=0.5, generator=torch.Generator())
    with pytest.raises(ValueError, match="set_timesteps"):
        GraphedLoop(toy_model, fastddim.DDIMScheduler(), randn(*SHAPE))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_step_never_synchronises_with_the_host():
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(10, device="cuda")
    sample = torch.randn(2, 4, 16, 16, device="cuda")
    generator = PhiloxGenerator(seed=1, device="cuda")
    uncond = torch.randn_like(sample)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.tanh(sample), t, sample, eta=0.5, generator=generator).prev_sample
            sample = scheduler.guided_step(uncond, torch.tanh(sample), t, sample, 7.5, 0.7).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sample).all()


@cuda_only
def test_captured_step_is_one_graph_replayed_for_all_timesteps():
    scheduler = fastddim.DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(50, device="cuda")
    sample = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    graphed = GraphedStep(scheduler, sample)
    eager = sample
    for t in scheduler.timesteps:
        model_output = toy_model(eager, t)
        expected = scheduler.step(model_output, t, eager).prev_sample
        assert_same_nonfinite(graphed(model_output, t, eager).prev_sample, expected)
        torch.testing.assert_close(graphed.output.prev_sample, expected, rtol=0, atol=0)
        eager = expected


# ----------------------------------------------------------------------------------------------------------
# pred_original_sample computed on first read (Triton backend)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_lazy_pred_original_sample_equals_the_eager_one(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    model_output, sample, noise = randn(*SHAPE, seed=30), randn(*SHAPE, seed=31), randn(*SHAPE, seed=32)
    lazy = scheduler.step(model_output, 501, sample, eta=0.5, variance_noise=noise)
    scheduler.lazy_pred_original_sample = False
    eager = scheduler.step(model_output, 501, sample, eta=0.5, variance_noise=noise)
    torch.testing.assert_close(lazy.prev_sample, eager.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(lazy.pred_original_sample, eager.pred_original_sample, rtol=0, atol=0)
    assert lazy.pred_original_sample is lazy.pred_original_sample  # computed once
    prev, x0 = lazy
    assert x0 is lazy.pred_original_sample and lazy["prev_sample"] is prev and len(lazy) == 2


def test_lazy_pred_original_sample_refuses_inputs_modified_in_place(backend):
    scheduler = make_scheduler()
    model_output, sample = randn(*SHAPE, seed=33), randn(*SHAPE, seed=34)
    out = scheduler.step(model_output, 501, sample)
    model_output.mul_(2)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="model_output was modified in place"):
            out.pred_original_sample
    else:  # the torch path computes x0 with the step: nothing to recompute
        assert torch.isfinite(out.pred_original_sample).all()


def test_guided_lazy_pred_original_sample_uses_the_guidance():
    scheduler = make_scheduler()
    uncond, cond, sample = randn(*SHAPE, seed=35), randn(*SHAPE, seed=36), randn(*SHAPE, seed=37)
    lazy = scheduler.guided_step(uncond, cond, 301, sample, 4.0, 0.5)
    scheduler.lazy_pred_original_sample = False
    eager = scheduler.guided_step(uncond, cond, 301, sample, 4.0, 0.5)
    torch.testing.assert_close(lazy.pred_original_sample, eager.pred_original_sample, rtol=0, atol=0)
