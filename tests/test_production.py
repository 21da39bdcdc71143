"""Production-loop features: per-sample timesteps, device timesteps, fused guidance, Philox noise, torch.compile,
CUDA graphs. Truth: per-sample loops, diffusers' `rescale_noise_cfg` and float64 math, Random123's known-answer
vectors for Philox4x32-10, and the normal distribution itself."""

import contextlib
import gc
import math
import weakref

import pytest
import torch
from conftest import DEVICE, assert_same_nonfinite, truth_alphas, truth_step

import fastddim
from fastddim import ops, reference
from fastddim.graphs import CudaGraphCapture, GraphedLoop, GraphedStep
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
    noise = reference.philox_normal(torch.tensor([[1234, 0]]), (1, 200_000)).double()
    n = noise.numel()
    assert abs(noise.mean()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(noise.var() - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(noise.flatten().numpy(), "norm").pvalue > 1e-3


def test_philox_draws_are_independent_across_steps_seeds_and_samples():
    n = 100_000
    first = reference.philox_normal(torch.tensor([[7, 0]]), (1, n)).double().flatten()
    others = [reference.philox_normal(torch.tensor([[7, 1]]), (1, n)),  # the next step
              reference.philox_normal(torch.tensor([[8, 0]]), (1, n)),  # another seed
              reference.philox_normal(torch.tensor([[7, 0]]), (2, n))[1]]  # sample 1 of a one-row batch
    for other in others:
        correlation = torch.corrcoef(torch.stack([first, other.double().flatten()]))[0, 1]
        assert abs(correlation) < 5 / math.sqrt(n)
    assert torch.equal(first, reference.philox_normal(torch.tensor([[7, 0]]), (1, n)).double().flatten())


def test_philox_stream_of_a_one_sample_batch_is_the_flat_stream():
    """Sample 0 with (seed, offset) draws element i from Philox(key=seed, counter=(i, 0, offset, 0)): the stream
    of the two-launch design, checked against the Random123 transcription word by word."""
    noise = reference.philox_normal(torch.tensor([[99, 5]]), (1, 3, 4))
    index = torch.arange(12)
    zero = torch.zeros(12, dtype=torch.int64)
    r0, r1, _, _ = reference.philox4x32_10(index, zero, zero + 5, zero, torch.tensor(99), torch.tensor(0))
    u1 = reference._uniform(r0).clamp(min=1e-7)
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(torch.tensor(6.283185307179586, dtype=torch.float32)
                                                             * reference._uniform(r1))
    assert torch.equal(noise.flatten(), expected)


PHILOX_SHAPES = {
    "one-program": (3, 4, 5, 6),  # 360 elements
    "samples-straddle-programs": (3, 5, 7, 11),  # 385 per sample, 1155 in all: 2 programs of 1024
    "many-programs": (2, 4, 24, 24),  # 2304 per sample: 5 programs
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("rows", ["one-row", "per-sample"])
@pytest.mark.parametrize("shape", list(PHILOX_SHAPES))
def test_kernel_draws_the_reference_philox_stream_and_advances_it(shape, rows, layout):
    # With eta = 1, prev = noiseless terms + std * noise: the kernel's and the torch path's draws are compared
    # through the step (float32 rounding of log/cos apart), and both must move every offset on by one.
    shape = PHILOX_SHAPES[shape]
    scheduler = make_scheduler()
    table = scheduler._table_on(torch.device(DEVICE))
    model_output, sample = randn(*shape, seed=15), randn(*shape, seed=16)
    if layout == "channels_last":
        model_output = model_output.contiguous(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)

    def generator(device):
        if rows == "one-row":
            return PhiloxGenerator(99, device=device)
        return PhiloxGenerator(seeds=[99 + 7 * b for b in range(shape[0])], device=device)

    on_kernel, on_torch = generator(DEVICE), generator("cpu")
    on_kernel.state[:, 1] = on_torch.state[:, 1] = 5
    for draw in range(2):
        noisy, _ = ops.ddim_step(model_output, sample, table, 501, eta=1.0, philox_state=on_kernel.buffer,
                                 backend="triton")
        torch_noisy, _ = ops.ddim_step(model_output.cpu(), sample.cpu(), scheduler._table, 501, eta=1.0,
                                       philox_state=on_torch.buffer, backend="torch")
        torch.testing.assert_close(noisy.cpu(), torch_noisy, rtol=1e-5, atol=1e-5)
        assert on_kernel.buffer.tolist() == on_torch.buffer.tolist()
        assert on_kernel.state[:, 1].tolist() == [6 + draw] * on_kernel.state.shape[0]
        assert on_kernel.buffer[-1].tolist() == [0, 0]  # the ticket is back to zero for the next launch


@pytest.mark.parametrize("timesteps", ["shared", "per-sample"])
def test_philox_sample_in_a_batch_equals_the_sample_alone(backend, timesteps):
    """Continuous batching: each request's noise comes from its own (seed, offset), so stepping it inside any
    batch gives bit for bit what stepping it alone gives, step after step (issue: up to 2.85 apart before)."""
    scheduler = make_scheduler(prediction_type="v_prediction")
    seeds = [11, 2**40 + 3, -5]
    batched = PhiloxGenerator(seeds=seeds, device=DEVICE)
    alone = [PhiloxGenerator(seed, device=DEVICE) for seed in seeds]
    sample = randn(3, 4, 9, 9, seed=40)  # 324 per sample: sample 2 straddles the kernel's first two programs
    samples_alone = [sample[i:i + 1] for i in range(3)]
    for t in ([901, 801, 701], [801, 701, 601]):
        t_batch = torch.tensor(t if timesteps == "per-sample" else t[:1] * 3, device=DEVICE)
        sample = scheduler.step(torch.sin(3 * sample), t_batch, sample, eta=1.0, generator=batched).prev_sample
        for i in range(3):
            x = samples_alone[i]
            t_alone = torch.tensor([int(t_batch[i])], device=DEVICE)
            samples_alone[i] = scheduler.step(torch.sin(3 * x), t_alone, x, eta=1.0, generator=alone[i]).prev_sample
        for i in range(3):
            assert torch.equal(sample[i:i + 1], samples_alone[i]), f"sample {i} at timesteps {t}"
    assert batched.state.tolist() == [[seed, 2] for seed in seeds]


def test_one_row_generator_steps_a_batch_as_consecutive_seeds(backend):
    scheduler = make_scheduler()
    model_output, sample = randn(*SHAPE, seed=41), randn(*SHAPE, seed=42)
    one_row = PhiloxGenerator(seed=1000, device=DEVICE)
    per_sample = PhiloxGenerator(seeds=[1000, 1001, 1002], device=DEVICE)
    for _ in range(2):
        a = scheduler.step(model_output, 501, sample, eta=1.0, generator=one_row).prev_sample
        b = scheduler.step(model_output, 501, sample, eta=1.0, generator=per_sample).prev_sample
        assert torch.equal(a, b)
    assert one_row.state.tolist() == [[1000, 2]]
    alone = scheduler.step(model_output[1:2], 501, sample[1:2], eta=1.0,
                           generator=PhiloxGenerator(1001, device=DEVICE)).prev_sample
    first = scheduler.step(model_output, 501, sample, eta=1.0, generator=PhiloxGenerator(1000, device=DEVICE))
    assert torch.equal(first.prev_sample[1:2], alone)


def test_philox_step_is_one_kernel_launch_and_no_other_device_op(backend):
    """The offsets move on inside the step's own launch (the last program to finish does it): no second launch
    and no torch op touches the generator's state."""
    from torch.utils._python_dispatch import TorchDispatchMode

    scheduler = make_scheduler()
    generator = PhiloxGenerator(seeds=[1, 2, 3], device=DEVICE)
    model_output, sample = randn(*SHAPE, seed=43), randn(*SHAPE, seed=44)
    touched = []

    class StateWatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if not launches.running and any(
                isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage for t in flat
            ):
                touched.append(func)
            return func(*args, **(kwargs or {}))

    storage = generator.buffer.untyped_storage().data_ptr()
    with KernelLaunches() as launches, StateWatch():
        scheduler.step(model_output, 501, sample, eta=1.0, generator=generator)
    if backend == "triton":
        assert [launch.kernel for launch in launches] == ["_ddim_step_kernel"]
        assert touched == []
    assert generator.state.tolist() == [[1, 1], [2, 1], [3, 1]]


def test_step_with_philox_generator_is_reproducible_and_fresh_per_step(backend):
    scheduler = make_scheduler()
    model_output, sample = randn(*SHAPE, seed=17), randn(*SHAPE, seed=18)
    generator = PhiloxGenerator(seed=3, device=DEVICE)
    first = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    second = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    assert generator.state.tolist() == [[3, 2]]
    assert not torch.equal(first, second)
    generator.manual_seed(3)
    again = scheduler.step(model_output, 501, sample, eta=1.0, generator=generator).prev_sample
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # eta = 0 draws nothing and leaves the stream where it was.
    scheduler.step(model_output, 501, sample, eta=0.0, generator=generator)
    assert generator.state.tolist() == [[3, 1]]


def test_philox_generator_stack_split_and_manual_seed():
    a, b = PhiloxGenerator(5), PhiloxGenerator(seeds=[6, 7])
    a.advance()
    stacked = PhiloxGenerator.stack([a, b])
    assert stacked.state.tolist() == [[5, 1], [6, 0], [7, 0]] and stacked.buffer[-1].tolist() == [0, 0]
    stacked.advance()
    assert a.state.tolist() == [[5, 1]]  # stacking copies
    assert [g.state.tolist() for g in stacked.split()] == [[[5, 2]], [[6, 1]], [[7, 1]]]
    assert stacked.manual_seed(10).state.tolist() == [[10, 0], [11, 0], [12, 0]]
    assert stacked.manual_seed([3, 2, 1]).state.tolist() == [[3, 0], [2, 0], [1, 0]]
    state = stacked.state
    stacked.manual_seed(0)
    assert stacked.state is state  # in place: captured graphs keep reading it


def test_philox_generator_arguments():
    with pytest.raises(TypeError, match="seed"):
        PhiloxGenerator(seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        PhiloxGenerator(seed=2**63)
    with pytest.raises(TypeError, match="seeds"):
        PhiloxGenerator(seeds=[])
    with pytest.raises(ValueError, match="seed or seeds"):
        PhiloxGenerator(1, seeds=[1, 2])
    with pytest.raises(ValueError, match="2 seeds for a generator of 3 rows"):
        PhiloxGenerator(seeds=[1, 2, 3]).manual_seed([1, 2])
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="generator"):
        scheduler.step(randn(*SHAPE), 501, randn(*SHAPE), eta=1.0, generator=PhiloxGenerator(0),
                       variance_noise=randn(*SHAPE))
    with pytest.raises(ValueError, match="generator holds 2 .* a batch of 3 samples takes 1 or 3"):
        scheduler.step(randn(*SHAPE), 501, randn(*SHAPE), eta=1.0, generator=PhiloxGenerator(seeds=[1, 2]))
    with pytest.raises(ValueError, match="philox_state"):
        ops.ddim_step(randn(*SHAPE), randn(*SHAPE), scheduler._table, 501, eta=1.0, philox_state=torch.tensor([1, 0]))


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


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
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
    assert generator.state.tolist() == eager_generator.state.tolist() == [[11, 10]]
    # Eager steps read host timesteps, compiled ones gather on the device: float32 rounding apart, amplified
    # by 10 steps of a chaotic toy model.
    torch.testing.assert_close(sample, eager_sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_compiled_by_inductor_gives_the_eager_steps_bits(monkeypatch, dynamo_counters, dtype):
    """What bench/compile_op_check.py requires of the custom op on a GPU: under Inductor, at any timestep, the
    compiled Triton step's outputs are the eager step's, bit for bit, from one graph. (The torch path is traced
    into Inductor's own fused code, whose rounding is Inductor's: within float32 rounding of the eager step.)"""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = make_scheduler()

    def step(model_output, sample, timestep):
        return scheduler.step(model_output, timestep, sample, return_dict=False)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    model_output, sample = randn(*SHAPE, seed=23, dtype=dtype), randn(*SHAPE, seed=24, dtype=dtype)
    timesteps = scheduler.timesteps.to(DEVICE)
    for index in (0, 4, timesteps.shape[0] - 1):
        got, expected = compiled(model_output, sample, timesteps[index]), step(model_output, sample, timesteps[index])
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), index
    assert dynamo_counters["stats"]["unique_graphs"] == 1


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


# bench/compile_op_check.py compares, on a GPU, the custom op with a torch.library.triton_op route. That route
# cannot be run here (wrap_triton leaves interpreted kernels unwrapped), but it must trace: checked in a process
# without TRITON_INTERPRET, the graph compiled and never run.
TRITON_OP_TRACE = r"""
import json, operator, sys
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
sys.path.insert(0, "bench")
import compile_op_check
import fastddim
from fastddim.kernels import ddim

class Traced(Exception):
    pass

def record(graph, example_inputs):
    calls = [node for node in graph.graph.nodes if node.op == "call_function" and node.target is not operator.getitem]
    kernels = [node for node in calls if "triton_kernel_wrapper" in str(node.target)]
    raise Traced(json.dumps({
        "calls": [str(node.target) for node in calls],
        "step_kernel": [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]) is ddim._ddim_step_kernel
                        for node in kernels],
        "constexprs": [{k: v for k, v in node.kwargs["kwargs"].items() if k.isupper()} for node in kernels],
    }))

scheduler = fastddim.DDIMScheduler()
scheduler.set_timesteps(50)
model_output, sample = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
compiled = torch.compile(compile_op_check.triton_op_step(scheduler), backend=aot_autograd(fw_compiler=record),
                         fullgraph=True)
try:
    compiled(model_output, sample, scheduler.timesteps[3])
except Exception as error:
    while error is not None and not isinstance(error, Traced):
        error = error.__cause__ or error.__context__
    if error is None:
        raise
    print("TRACED " + str(error))
"""


def test_compile_op_check_triton_op_traces_to_one_step_kernel_launch(tmp_path):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTDDIM_BACKEND")}
    done = subprocess.run([sys.executable, "-c", TRITON_OP_TRACE], cwd=root, env=environment, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TRACED ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    traced = json.loads(lines[-1][len("TRACED "):])
    assert traced["step_kernel"] == [True], traced["calls"]
    # Two outputs allocated and one launch, with the constexprs of the scheduler's default step (epsilon, clipped)
    # and a 0-d timestep tensor.
    assert sorted(traced["calls"]) == ["aten.empty_like.default"] * 2 + [
        "triton_kernel_wrapper_functional"], traced["calls"]
    constexprs = traced["constexprs"][0]
    assert constexprs["PREDICTION"] == fastddim.kernels.ddim.PREDICTION_CODES["epsilon"]
    assert constexprs["TIMESTEP_MODE"] == fastddim.kernels.ddim.TIMESTEP_TENSOR
    assert constexprs["WRITE_PREV"] and constexprs["WRITE_X0"] and constexprs["CLIP"]
    assert not constexprs["THRESHOLD"] and constexprs["NOISE"] == fastddim.kernels.ddim.NOISE_NONE


def test_custom_op_passes_torch_library_opcheck():
    scheduler = make_scheduler()
    table = scheduler._table_on(torch.device(DEVICE))
    options = StepOptions(eta=0.5, clip_sample=True).op_arguments()
    args = (randn(*SHAPE, seed=23), randn(*SHAPE, seed=24), table, torch.tensor(501, device=DEVICE), 0, None,
            PhiloxGenerator(seeds=[1, 2, 3], device=DEVICE).buffer, None, *options)
    torch.library.opcheck(torch.ops.fastddim.ddim_step_philox.default, args)
    channels_last = (args[0].contiguous(memory_format=torch.channels_last),
                     args[1].contiguous(memory_format=torch.channels_last)) + args[2:]
    torch.library.opcheck(torch.ops.fastddim.ddim_step_philox.default, channels_last)
    noise = randn(*SHAPE, seed=25)
    functional = args[:5] + (noise, None) + args[7:]
    torch.library.opcheck(torch.ops.fastddim.ddim_step.default, functional)


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs. Capture needs a GPU; on the CPU the helpers run eagerly, and a stand-in capture (below) runs their
# warm-up and capture code, records every Triton launch, and replays a "graph" as a CUDA graph does: the same
# kernels with the same arguments (raw buffers), nothing re-evaluated in Python.
# ----------------------------------------------------------------------------------------------------------
class Launch:
    """One Triton kernel launch: the kernel, grid and arguments, tensors held weakly (a graph holds raw
    pointers, not references), and the variant key the JIT compiles per: constexprs, dtypes, integer kinds."""

    def __init__(self, kernel, grid, args, kwargs):
        self.function = kernel
        self.kernel = kernel.__name__
        self.grid, self.kwargs = grid, kwargs
        names = list(kernel.arg_names)
        unspecialized = set(getattr(kernel, "do_not_specialize", None) or
                            getattr(kernel, "kwargs", {}).get("do_not_specialize", ()))
        self.args, key = [], []
        for name, value in zip(names, args):
            if isinstance(value, torch.Tensor):
                owner = value._base if value._base is not None else value
                self.args.append((name, weakref.ref(owner), value.storage_offset(), value.shape, value.stride()))
                key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
            else:
                self.args.append((name, None, value, None, None))
                if isinstance(value, bool) or not isinstance(value, int):
                    key.append((name, type(value).__name__))
                else:
                    width = "i32" if -2**31 <= value < 2**31 else "i64"
                    key.append((name, width) if name in unspecialized else (name, width, value == 1, value % 16 == 0))
        self.variant = (self.kernel, tuple(sorted(kwargs.items())), tuple(key))

    def tensors(self, owned_by_graph):
        """The arguments again; a tensor argument must still be alive unless the graph's pool owns it."""
        values = []
        for name, ref, offset, shape, stride in self.args:
            if ref is None:
                values.append(offset)
                continue
            owner = ref()
            if owner is None:
                raise AssertionError(f"the graph reads freed memory: argument {name} of {self.kernel}")
            values.append(owner.as_strided(shape, stride, offset))
        return values

    def buffers(self):
        return [(name, ref) for name, ref, *_ in self.args if ref is not None]


class KernelLaunches(list):
    """Records every Triton kernel launch while active (by wrapping the kernels' `run`, which `kernel[grid](...)`
    calls); with `launch=False` the kernels are not run, as during a real capture."""

    def __init__(self, launch=True):
        super().__init__()
        self.launch = launch
        self.running = False  # inside a launch (the interpreter copies the arguments in and out)

    def __enter__(self):
        from fastddim.kernels import ddim

        self.kernel_type = type(ddim._ddim_step_kernel)
        original = self.original = self.kernel_type.run
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder.append(Launch(kernel, grid, args, kwargs))
            if not recorder.launch:
                return None
            recorder.running = True
            try:
                return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder.running = False

        self.kernel_type.run = run
        return self

    def __exit__(self, *exc):
        self.kernel_type.run = self.original


class RecordedGraph:
    """A captured graph's stand-in: replay launches the recorded kernels with the recorded arguments. Tensors
    created while capturing belong to the graph (a real graph's private memory pool keeps them)."""

    def __init__(self):
        self.launches, self.pool = [], []

    def replay(self):
        for launch in self.launches:
            launch.function.run(*launch.tensors(self.pool), grid=launch.grid, warmup=False, **launch.kwargs)


class RecordingCapture(CudaGraphCapture):
    """Runs GraphedStep/GraphedLoop's warm-up and capture on the CPU, recording the kernels each phase launches."""

    def __init__(self):
        self.warmup_launches, self.graphs = [], []

    def supports(self, device):
        return True

    @contextlib.contextmanager
    def warmup(self, device):
        with KernelLaunches() as launches:
            yield
        self.warmup_launches.extend(launches)

    def new_graph(self):
        graph = RecordedGraph()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def capture(self, graph):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Pool(TorchDispatchMode):  # what the graph's private memory pool would hold
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                graph.pool.extend(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
                return out

        with KernelLaunches(launch=False) as launches, Pool():
            yield
        graph.launches.extend(launches)

    def variants(self):
        captured = {launch.variant for graph in self.graphs for launch in graph.launches}
        return {launch.variant for launch in self.warmup_launches}, captured


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
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(scheduler, randn(*SHAPE), warmup=0)


GRAPH_CASES = {
    "step": dict(),
    "step-eta1-philox-per-sample-timesteps": dict(eta=1.0, rows=3, per_sample_timesteps=True),
    "step-v-clip-use-clipped": dict(config=dict(prediction_type="v_prediction"), use_clipped_model_output=True),
    "step-thresholded": dict(config=dict(thresholding=True, sample_max_value=1.5)),
    "step-no-x0": dict(write_x0=False),
    "loop-eta1-philox": dict(loop=True, eta=1.0, rows=1),
    "loop-thresholded-eta0.5": dict(loop=True, eta=0.5, rows=3, config=dict(thresholding=True)),
}


def build_graphed(case, capture, sample):
    options = dict(GRAPH_CASES[case])
    scheduler = make_scheduler(**options.pop("config", {}))
    scheduler.write_pred_original_sample = options.pop("write_x0", True)
    rows = options.pop("rows", None)
    generator = None
    if rows is not None:
        generator = PhiloxGenerator(seeds=[21 + b for b in range(rows)], device=DEVICE)
    if options.pop("loop", False):
        return GraphedLoop(toy_model, scheduler, sample, generator=generator, capture=capture, **options)
    return GraphedStep(scheduler, sample, generator=generator, capture=capture, **options)


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_capture_launches_only_kernel_variants_warmup_launched(case, monkeypatch):
    """Loading a kernel module while a stream captures is forbidden, so every variant (kernel, constexprs, dtypes,
    integer kinds) a capture launches must have been launched by the warm-up already (issue: warm-up ran with the
    lazy x0, capture without)."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    capture = RecordingCapture()
    build_graphed(case, capture, randn(3, 4, 8, 8, seed=27))
    warmed, captured = capture.variants()
    assert captured and captured <= warmed, captured - warmed


def test_graph_owns_every_buffer_it_reads_after_set_timesteps(monkeypatch):
    """A replay after `set_timesteps` (which replaces the step table, as pipelines call it every run) and after
    every other reference is gone reads live buffers and gives the eager results bit for bit, noise included."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = make_scheduler()
    capture = RecordingCapture()
    graphed = GraphedStep(scheduler, randn(3, 4, 8, 8), eta=1.0, per_sample_timesteps=True, capture=capture,
                          generator=PhiloxGenerator(seeds=[4, 5, 6], device=DEVICE))
    scheduler.set_timesteps(10)
    gc.collect()
    eager_scheduler, eager_generator = make_scheduler(), PhiloxGenerator(seeds=[4, 5, 6], device=DEVICE)
    sample = randn(3, 4, 8, 8, seed=28)
    for t in ([901, 501, 1], [801, 401, 1]):
        timesteps = torch.tensor(t, device=DEVICE)
        model_output = toy_model(sample, timesteps[:, None, None, None])
        expected = eager_scheduler.step(model_output, timesteps, sample, eta=1.0, generator=eager_generator)
        got = graphed(model_output, timesteps, sample)
        assert torch.equal(got.prev_sample, expected.prev_sample)
        assert torch.equal(got.pred_original_sample, expected.pred_original_sample)
        sample = expected.prev_sample
    # Everything the captured launches read outside the graph's own pool is alive (the helper holds it).
    pool = {t.untyped_storage().data_ptr() for t in capture.graphs[0].pool}
    outside = [(name, ref) for launch in capture.graphs[0].launches for name, ref in launch.buffers()
               if ref().untyped_storage().data_ptr() not in pool]
    assert {name for name, _ in outside} >= {"table_ptr", "timestep_ptr", "rng_ptr", "model_output_ptr"}
    scheduler.set_timesteps(20)
    with pytest.raises(ValueError, match="set to 20 steps after this graph was captured with 10"):
        graphed(model_output, timesteps, sample)


def test_graphed_loop_owns_its_buffers(monkeypatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = make_scheduler()
    capture = RecordingCapture()
    loop = GraphedLoop(toy_model, scheduler, randn(2, 4, 8, 8), eta=1.0, capture=capture,
                       generator=PhiloxGenerator(7, device=DEVICE))
    scheduler.set_timesteps(10)
    gc.collect()
    graph = capture.graphs[0]
    assert len(graph.launches) == 10
    for launch in graph.launches:
        launch.tensors(graph.pool)  # raises if a buffer read by the graph was freed
    assert loop.owned.table is not scheduler._table_on(torch.device(DEVICE))  # set_timesteps made a new one


def test_batched_requests_under_graph_capture_equal_each_request_alone(monkeypatch):
    """Continuous batching through a captured step: per-sample timesteps and per-request generator rows give
    each request, bit for bit, what it gets stepped alone and eagerly."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    scheduler = make_scheduler()
    requests = [PhiloxGenerator(seed, device=DEVICE) for seed in (31, 32, 33)]
    batch_generator = PhiloxGenerator.stack(requests)
    graphed = GraphedStep(scheduler, randn(3, 4, 8, 8), eta=0.7, generator=batch_generator,
                          per_sample_timesteps=True, capture=RecordingCapture())
    sample = randn(3, 4, 8, 8, seed=29)
    alone = [sample[i:i + 1] for i in range(3)]
    for t in ([901, 601, 301], [801, 501, 201]):
        timesteps = torch.tensor(t, device=DEVICE)
        sample = graphed(torch.sin(3 * sample), timesteps, sample).prev_sample.clone()
        for i in range(3):
            alone[i] = scheduler.step(torch.sin(3 * alone[i]), t[i], alone[i], eta=0.7,
                                      generator=requests[i]).prev_sample
    for i in range(3):
        assert torch.equal(sample[i:i + 1], alone[i])


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
    scheduler.set_timesteps(50, device="cuda")  # a new device table; the graph keeps reading its own
    eager = sample
    for t in scheduler.timesteps:
        model_output = toy_model(eager, t)
        expected = scheduler.step(model_output, t, eager).prev_sample
        assert_same_nonfinite(graphed(model_output, t, eager).prev_sample, expected)
        torch.testing.assert_close(graphed.output.prev_sample, expected, rtol=0, atol=0)
        eager = expected
