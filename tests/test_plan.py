"""Step plans (fastddim/plan.py, ops.plan_for) and the direct launcher's key (kernels/launch.py).

A plan is built, and its checks run, once per (options, backend, tensors' dtypes, shapes, strides and devices,
timestep kind); these tests check that it is reused across timesteps, rebuilt whenever any of those change (and
then gives the right answer: compared with diffusers or with a step computed from a cleared cache), and that every
bad input still gets its clear error after a plan for good inputs exists. The direct launcher's key is compared
with triton's own specialization function on sample arguments; its fallback is checked in the interpreter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

import fastddim
from fastddim import ops
from fastddim.kernels import ddim as ddim_module
from fastddim.kernels import launch
from fastddim.plan import StepOptions
from fastddim.schedule import step_table

from conftest import DEVICE, arguments_by_name

SHAPE = (2, 3, 8, 8)


def randn(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype).to(DEVICE)


@pytest.fixture
def fresh_plans():
    ops.PLANS.clear()
    yield ops.PLANS
    ops.PLANS.clear()


def diffusers_step(config, timestep, model_output, sample, num_inference_steps=50, **kwargs):
    diffusers = pytest.importorskip("diffusers")
    # Every key as set (from_config would restore the defaults listed in _use_default_values).
    scheduler = diffusers.DDIMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.step(model_output.cpu().double(), timestep, sample.cpu().double(), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------------------------


def test_one_plan_serves_every_timestep_of_a_loop(backend, fresh_plans):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    sample = randn(*SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        timestep = int(t) if i % 2 else t  # ints and 0-d tensors, as pipelines pass them
        sample = scheduler.step(randn(*SHAPE, seed=i + 1), timestep, sample).prev_sample
    # One plan for prev_sample (pred_original_sample, never read here, is skipped or written by the same plan).
    assert fresh_plans.builds == 1
    assert torch.isfinite(sample).all()


def test_functional_api_reuses_its_plan(backend, fresh_plans):
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    for t in (981, 501, 21):
        ops.ddim_step(randn(*SHAPE), randn(*SHAPE, seed=1), table, t, eta=0.0, clip_sample=True)
    assert fresh_plans.builds == 1
    ops.ddim_step(randn(*SHAPE), randn(*SHAPE, seed=1), table, 21, eta=0.5, clip_sample=True,
                  variance_noise=randn(*SHAPE, seed=2))
    assert fresh_plans.builds == 2


# ---------------------------------------------------------------------------------------------------------------
# Invalidation: anything a plan baked in changes, and the result is still right
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = {
    "float64": lambda m, x: (m.double(), x.double()),
    "float16": lambda m, x: (m.half(), x.half()),
    "mixed-dtypes": lambda m, x: (m.half(), x),
    "batch-of-one": lambda m, x: (m[:1], x[:1]),
    "other-shape": lambda m, x: (m[..., :5], x[..., :5].contiguous()),
    "channels-last": lambda m, x: (m.contiguous(memory_format=torch.channels_last),
                                   x.contiguous(memory_format=torch.channels_last)),
    "transposed-sample": lambda m, x: (m, x.transpose(2, 3).contiguous().transpose(2, 3)),
    "offset-view": lambda m, x: (torch.cat([m.flatten(), m.flatten()[:3]])[3:].view(SHAPE), x),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changed_tensor_properties_get_a_new_plan_and_the_right_answer(backend, fresh_plans, variant):
    """Each variant differs from the first call in one property the plan keys on (dtype, shape, strides, or only
    the data pointer's alignment, which the plan must not bake in); its result equals the step computed with no
    plan cached, and diffusers' float64 step within float32 rounding."""
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    ops.ddim_step(randn(*SHAPE), randn(*SHAPE, seed=1), table, 501)
    builds = fresh_plans.builds
    model_output, sample = VARIANTS[variant](randn(*SHAPE, seed=3), randn(*SHAPE, seed=4))
    prev, x0 = ops.ddim_step(model_output, sample, table, 501)
    assert fresh_plans.builds == builds + (variant != "offset-view")
    fresh_plans.clear()
    fresh_prev, fresh_x0 = ops.ddim_step(model_output, sample, table, 501)
    assert torch.equal(prev, fresh_prev) and torch.equal(x0, fresh_x0)
    assert prev.dtype == torch.promote_types(model_output.dtype, sample.dtype)
    truth = diffusers_step(fastddim.DDIMScheduler(clip_sample=False).config, 501, model_output, sample)
    tolerance = 1e-5 if prev.dtype in (torch.float32, torch.float64) else 2e-3
    torch.testing.assert_close(prev.cpu().double(), truth.prev_sample, rtol=tolerance, atol=tolerance)


def test_replaced_config_is_honoured(backend, fresh_plans):
    """Pipelines replace a scheduler's config object (register_to_config); the next step follows the new one."""
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample = randn(*SHAPE, seed=5), 3 * randn(*SHAPE, seed=6)
    scheduler.step(model_output, 501, sample)
    scheduler.register_to_config(prediction_type="v_prediction", clip_sample=False)
    got = scheduler.step(model_output, 501, sample)
    truth = diffusers_step(scheduler.config, 501, model_output, sample)
    torch.testing.assert_close(got.prev_sample.cpu().double(), truth.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pred_original_sample.cpu().double(), truth.pred_original_sample,
                               rtol=1e-5, atol=1e-5)


def test_set_timesteps_is_honoured(backend, fresh_plans):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample = randn(*SHAPE, seed=7), randn(*SHAPE, seed=8)
    scheduler.step(model_output, 501, sample)
    scheduler.set_timesteps(20)  # same timestep, other previous timestep: other coefficients
    got = scheduler.step(model_output, 501, sample).prev_sample
    truth = diffusers_step(scheduler.config, 501, model_output, sample, num_inference_steps=20)
    torch.testing.assert_close(got.cpu().double(), truth.prev_sample, rtol=1e-5, atol=1e-5)


def test_options_of_each_call_are_honoured(backend, fresh_plans):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample, noise = randn(*SHAPE, seed=9), randn(*SHAPE, seed=10), randn(*SHAPE, seed=11)
    for eta, use_clipped in [(0.0, False), (1.0, False), (1.0, True), (0.5, True)]:
        got = scheduler.step(model_output, 501, sample, eta=eta, use_clipped_model_output=use_clipped,
                             variance_noise=noise).prev_sample
        truth = diffusers_step(scheduler.config, 501, model_output, sample, eta=eta,
                               use_clipped_model_output=use_clipped, variance_noise=noise.cpu().double())
        torch.testing.assert_close(got.cpu().double(), truth.prev_sample, rtol=1e-5, atol=1e-5)


def test_the_backend_setting_is_read_at_every_step(monkeypatch, fresh_plans, calls_by_backend):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample = randn(*SHAPE), randn(*SHAPE, seed=1)
    for name in ("torch", "triton", "torch"):
        monkeypatch.setenv("FASTDDIM_BACKEND", name)
        calls_by_backend.clear()
        scheduler.step(model_output, 501, sample, return_dict=False)
        assert calls_by_backend == [name]


def test_host_rows_follow_an_in_place_change_of_the_table(monkeypatch, fresh_plans):
    """The torch path reads an int timestep's coefficients from Python floats converted once per table: a table
    changed in place (its version counter moves) is converted again."""
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0)
    model_output, sample = randn(*SHAPE).cpu(), randn(*SHAPE, seed=1).cpu()
    before, _ = ops.ddim_step(model_output, sample, table, 501)
    table.copy_(step_table(fastddim.DDIMScheduler().alphas_cumprod, 20, 1.0))
    after, _ = ops.ddim_step(model_output, sample, table, 501)
    fresh_plans.clear()
    expected, _ = ops.ddim_step(model_output, sample, table.clone(), 501)
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


# ---------------------------------------------------------------------------------------------------------------
# The scheduler's step memo: its last plan and table, reused while nothing they were made from changed
# ---------------------------------------------------------------------------------------------------------------


def _mutate_alphas_in_place(scheduler, m, x):
    scheduler.alphas_cumprod[501] *= 0.9


def _assign_boundary(scheduler, m, x):
    scheduler.final_alpha_cumprod = torch.tensor(1.0)


def _mutate_boundary_in_place(scheduler, m, x):
    scheduler.final_alpha_cumprod.fill_(1.0)


def _write_config(scheduler, m, x):
    scheduler.config.prediction_type = "v_prediction"


def _replace_config(scheduler, m, x):
    scheduler.register_to_config(clip_sample=False)


def _no_x0(scheduler, m, x):
    scheduler.write_pred_original_sample = False


def _set_timesteps(scheduler, m, x):
    scheduler.set_timesteps(20)


def _assign_num_inference_steps(scheduler, m, x):
    scheduler.num_inference_steps = 10


def _inference_alphas(scheduler, m, x):
    with torch.inference_mode():
        scheduler.alphas_cumprod = scheduler.alphas_cumprod * 0.99


MEMO_CHANGES = {
    "alphas-in-place": (_mutate_alphas_in_place, {}),
    # Timestep 1 steps past the first training timestep: its coefficients take the boundary alpha product.
    "boundary-assigned": (_assign_boundary, dict(timestep=1)),
    "boundary-in-place": (_mutate_boundary_in_place, dict(timestep=1)),
    "config-written": (_write_config, {}),
    "config-replaced": (_replace_config, {}),
    "no-x0": (_no_x0, {}),
    "set-timesteps": (_set_timesteps, {}),
    "num-inference-steps": (_assign_num_inference_steps, {}),
    "inference-alphas": (_inference_alphas, {}),
    "eta": (None, dict(eta=0.7)),
    "clipped-model-output": (None, dict(use_clipped_model_output=True)),
    "tensor-timestep": (None, dict(timestep=torch.tensor(501))),
    "float64": (None, dict(model_output="double", sample="double")),
    "channels-last": (None, dict(sample="channels_last")),
    "requires-grad": (None, dict(model_output="requires_grad")),
}


def _converted(tensor, how):
    if how == "double":
        return tensor.double()
    if how == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if how == "requires_grad":
        return tensor.clone().requires_grad_(True)
    return tensor


@pytest.mark.parametrize("change", list(MEMO_CHANGES))
def test_step_memo_follows_every_change(backend, fresh_plans, change):
    """A scheduler reuses its last step's plan and table while the table's inputs (also changed in place), the
    config, the arguments and the tensors' properties are the same. After each kind of change the step equals the
    same step of a scheduler in the same state that never stepped (no memo), and the memo is used again after."""
    mutate, arguments = MEMO_CHANGES[change]

    def fresh_scheduler():
        scheduler = fastddim.DDIMScheduler(clip_sample=True, set_alpha_to_one=False)
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.clone()
        scheduler.set_timesteps(50)
        return scheduler

    model_output, sample, noise = randn(*SHAPE, seed=1), 2 * randn(*SHAPE, seed=2), randn(*SHAPE, seed=3)
    stepped, unstepped = fresh_scheduler(), fresh_scheduler()
    stepped.step(model_output, 501, sample, variance_noise=noise)
    stepped.step(model_output, 301, sample, variance_noise=noise)
    for scheduler in (stepped, unstepped):
        if mutate is not None:
            mutate(scheduler, model_output, sample)
    call = dict(model_output=model_output, timestep=501, sample=sample, variance_noise=noise)
    call.update({k: v for k, v in arguments.items() if k not in ("model_output", "sample")})
    for name in ("model_output", "sample"):
        call[name] = _converted(call[name], arguments.get(name))
    got = stepped.step(**call)
    expected = unstepped.step(**call)
    assert torch.equal(got.prev_sample, expected.prev_sample)
    assert (got.pred_original_sample is None) == (expected.pred_original_sample is None)
    if got.pred_original_sample is not None:
        assert torch.equal(got.pred_original_sample, expected.pred_original_sample)
    assert got.prev_sample.grad_fn is not None if change == "requires-grad" else got.prev_sample.grad_fn is None
    # Unchanged again: served by the memo (no plan lookup), with the same result.
    if change not in ("requires-grad", "inference-alphas"):
        lookups = []
        real_plan_for = ops.plan_for
        try:
            ops.plan_for = lambda *args, **kwargs: lookups.append(1) or real_plan_for(*args, **kwargs)
            again = stepped.step(**call)
        finally:
            ops.plan_for = real_plan_for
        assert lookups == [] and torch.equal(again.prev_sample, expected.prev_sample)


def test_step_memo_serves_a_whole_loop(backend, fresh_plans):
    """After the first step of a loop, each step skips the options, table and plan lookups."""
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    reference_scheduler = fastddim.DDIMScheduler()
    reference_scheduler.set_timesteps(50)
    sample = expected = randn(*SHAPE)
    lookups = []
    real_plan_for = ops.plan_for
    try:
        ops.plan_for = lambda *args, **kwargs: lookups.append(1) or real_plan_for(*args, **kwargs)
        for i, t in enumerate(scheduler.timesteps[:10]):
            model_output = randn(*SHAPE, seed=i + 1)
            sample = scheduler.step(model_output, int(t), sample).prev_sample
            reference_scheduler.__dict__.pop("_step_memo", None)
            expected = reference_scheduler.step(model_output, int(t), expected).prev_sample
    finally:
        ops.plan_for = real_plan_for
    assert torch.equal(sample, expected)
    assert len(lookups) == 1 + 10  # the first step of `scheduler`, and every memo-less step of the reference


# ---------------------------------------------------------------------------------------------------------------
# Checks still run once a plan exists
# ---------------------------------------------------------------------------------------------------------------

BAD_SCHEDULER_CALLS = {
    "model_output-shape": (lambda m, x: dict(model_output=m[:1]), ValueError, "model_output.*shape"),
    "model_output-int": (lambda m, x: dict(model_output=m.int()), TypeError, "model_output.*floating"),
    "model_output-numpy": (lambda m, x: dict(model_output=m.cpu().numpy()), TypeError, "model_output"),
    "sample-list": (lambda m, x: dict(sample=x.tolist()), TypeError, "sample"),
    "sample-device": (lambda m, x: dict(sample=torch.zeros(SHAPE, device="meta")), ValueError, "device"),
    "timestep-too-large": (lambda m, x: dict(timestep=1000), ValueError, "timestep"),
    "timestep-negative-tensor": (lambda m, x: dict(timestep=torch.tensor(-1)), ValueError, "timestep"),
    "timestep-float-tensor": (lambda m, x: dict(timestep=torch.tensor(501.0, device=DEVICE)), TypeError,
                              "timestep"),
    "timestep-wrong-count": (lambda m, x: dict(timestep=torch.tensor([501, 401, 301], device=DEVICE)), ValueError,
                             "timestep"),
    "eta-true": (lambda m, x: dict(eta=True), TypeError, "eta"),
    "eta-nan": (lambda m, x: dict(eta=math.nan), ValueError, "eta"),
    "eta-too-large": (lambda m, x: dict(eta=50.0, variance_noise=torch.zeros_like(x)), ValueError, "eta"),
    "noise-shape": (lambda m, x: dict(eta=1.0, variance_noise=x[:1]), ValueError, "variance_noise.*shape"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULER_CALLS))
def test_bad_inputs_raise_after_a_plan_for_good_ones_exists(backend, fresh_plans, case):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_output, sample = randn(*SHAPE), randn(*SHAPE, seed=1)
    good = dict(model_output=model_output, timestep=501, sample=sample)
    for eta in (0.0, 1.0):
        scheduler.step(**good, eta=eta, variance_noise=torch.zeros_like(sample))
    changes, error, pattern = BAD_SCHEDULER_CALLS[case]
    with pytest.raises(error, match=pattern):
        scheduler.step(**{**good, **changes(model_output, sample)})


def test_functional_api_checks_options_at_every_call(backend, fresh_plans):
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    model_output, sample = randn(*SHAPE), randn(*SHAPE, seed=1)
    ops.ddim_step(model_output, sample, table, 501, eta=1, variance_noise=torch.zeros_like(sample))
    with pytest.raises(TypeError, match="eta"):  # True == 1 and hashes alike: the key alone would not catch it
        ops.ddim_step(model_output, sample, table, 501, eta=True, variance_noise=torch.zeros_like(sample))
    with pytest.raises(ValueError, match="prediction_type"):
        ops.ddim_step(model_output, sample, table, 501, prediction_type="noise")
    with pytest.raises(TypeError, match="either as options or as keywords"):
        ops.ddim_step(model_output, sample, table, 501, options=StepOptions(), eta=0.5)


def test_step_options_cross_the_custom_op_unchanged():
    options = StepOptions(eta=0.3, prediction_type="v_prediction", clip_sample=True, clip_sample_range=2.0,
                          thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                          use_clipped_model_output=True, guidance_scale=7.5, guidance_rescale=0.7)
    prediction_type, values = options.op_arguments()
    assert StepOptions.from_op_arguments(prediction_type, tuple(values)) == options


# ---------------------------------------------------------------------------------------------------------------
# The direct launcher: its key against triton's own specialization, and its fallbacks
# ---------------------------------------------------------------------------------------------------------------


def compiled_step_kernel() -> JITFunction:
    """The step kernel as the compiler's JITFunction (conftest made the decorated one an interpreted function)."""
    interpreted = ddim_module._ddim_step_kernel
    return JITFunction(interpreted.fn, **interpreted.kwargs)


def jit_specialization(kernel: JITFunction, args, constexprs=None) -> tuple:
    """What triton 3.6's JITFunction.run keys its kernel cache on for these arguments (its binder, with the
    base backend's alignment and divisibility rules): the runtime arguments and `constexprs` by name, or, without
    `constexprs`, every argument by position (as a DirectLauncher's launch passes them)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    _, specialization, _ = binder(*args, **(constexprs or {}))
    return tuple(specialization)


def launch_arguments(variant: str):
    """The step kernel's arguments as StepLauncher passes them, with one argument changed per variant."""
    captured = {}
    constexpr_names = [p.name for p in compiled_step_kernel().params if p.is_constexpr]

    class Capture:
        def __getitem__(self, grid):
            def run(*args, **kwargs):  # the constexprs come last, by position; the launch options by keyword
                runtime = len(args) - len(constexpr_names)
                captured.update(args=list(args[:runtime]),
                                constexprs=arguments_by_name(constexpr_names, args[runtime:], kwargs))
            return run

    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0)
    storage = torch.zeros(2 * math.prod(SHAPE) + 16)
    model_output = storage[: math.prod(SHAPE)].view(SHAPE)
    sample = storage[math.prod(SHAPE):2 * math.prod(SHAPE)].view(SHAPE)
    timestep = 501
    if variant == "misaligned-pointer":
        model_output = storage[1:1 + math.prod(SHAPE)].view(SHAPE)
    elif variant == "half-dtype":
        model_output = model_output.half()
    elif variant == "timestep-1":
        timestep = 1  # do_not_specialize: no constexpr, no divisibility
    elif variant == "timestep-16":
        timestep = 16
    elif variant == "one-row-table":
        table = table[500:501]  # num_train_timesteps == 1: a constexpr to the JIT
    elif variant == "table-of-16":
        table = table[:16]
    elif variant == "table-of-17":
        table = table[:17]
    original = ddim_module._ddim_step_kernel
    ddim_module._ddim_step_kernel = Capture()
    try:
        ddim_module.ddim_step(model_output.cpu(), sample.cpu(), table, timestep, eta=0.5)
    finally:
        ddim_module._ddim_step_kernel = original
    return captured["args"], captured["constexprs"]


KEY_VARIANTS = ["base", "misaligned-pointer", "half-dtype", "timestep-1", "timestep-16", "one-row-table",
                "table-of-16", "table-of-17"]


def test_the_jit_binds_constexprs_passed_by_position_as_by_keyword():
    """Both launches pass the constexprs positionally after the runtime arguments (binding 14 keywords cost the JIT
    launch about 0.4 us more): triton's binder gives the same bound arguments, specialization and options."""
    kernel = compiled_step_kernel()
    args, keywords = launch_arguments("base")
    constexprs = {k: v for k, v in keywords.items() if k not in ddim_module.LAUNCH_OPTIONS}
    shuffled = dict(reversed(list(constexprs.items())))  # prepare puts them in the kernel's order
    prepared = launch.DirectLauncher(kernel, ddim_module.LAUNCH_OPTIONS).prepare(shuffled, ddim_module.STEP_TENSORS)
    binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    by_keyword = binder(*args, **constexprs, **ddim_module.LAUNCH_OPTIONS)
    by_position = binder(*args, *prepared.constexpr_values, **prepared.launch_options)
    assert by_position[0] == by_keyword[0] and list(by_position[1]) == list(by_keyword[1])
    assert by_position[2] == by_keyword[2]
    assert all(by_position[0][name] == value for name, value in constexprs.items())


def test_launch_key_separates_exactly_what_the_jit_separates():
    kernel = compiled_step_kernel()
    launcher = launch.DirectLauncher(kernel, enabled=False)
    keys, specializations = {}, {}
    for variant in KEY_VARIANTS:
        args, constexprs = launch_arguments(variant)
        keys[variant] = launch.specialization_key(args, launcher.do_not_specialize)
        specializations[variant] = jit_specialization(kernel, args, constexprs)
    for a in KEY_VARIANTS:
        for b in KEY_VARIANTS:
            assert (keys[a] == keys[b]) == (specializations[a] == specializations[b]), (a, b)
    # The variants that must differ from the base do (and a do-not-specialize timestep does not).
    assert specializations["timestep-1"] == specializations["base"] == specializations["timestep-16"]
    for variant in ("misaligned-pointer", "half-dtype", "one-row-table", "table-of-16"):
        assert keys[variant] != keys["base"], variant


@pytest.mark.parametrize("value", [0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -2**31,
                                   -2**31 - 1, 2**63 - 1, 2**63, 2**64 - 16, 0.5, 1.0, True, False, None])
@pytest.mark.parametrize("do_not_specialize", [False, True])
def test_launch_key_of_each_scalar_matches_triton(value, do_not_specialize):
    from triton._C.libtriton import native_specialize_impl

    kind, specialization = native_specialize_impl(BaseBackend, value, False, not do_not_specialize, True)
    positions = frozenset({0}) if do_not_specialize else frozenset()
    for other in [0, 1, 2, 16, 17, -1, 2**31, 2**31 - 1, 2**63, 2**64 - 16, 0.5, True, None]:
        other_kind, other_specialization = native_specialize_impl(BaseBackend, other, False, not do_not_specialize,
                                                                  True)
        same_jit = (kind, specialization) == (other_kind, other_specialization)
        same_key = launch.specialization_key([value], positions) == launch.specialization_key([other], positions)
        assert same_jit == same_key, (value, other)


def test_launch_key_of_tensors_matches_triton():
    from triton._C.libtriton import native_specialize_impl

    storage = torch.zeros(64)
    tensors = [storage, storage[4:], storage[1:], storage.double(), storage.half()[8:], storage.half()[1:]]
    for a in tensors:
        for b in tensors:
            same_jit = (native_specialize_impl(BaseBackend, a, False, True, True)
                        == native_specialize_impl(BaseBackend, b, False, True, True))
            assert same_jit == (launch.specialization_key([a]) == launch.specialization_key([b]))


def test_launch_key_refuses_arguments_it_does_not_cover():
    with pytest.raises(launch.Unsupported):
        launch.specialization_key([np.float32(0.5)])
    with pytest.raises(launch.Unsupported):
        launch.specialization_key([(1, 2)])


def test_direct_launches_only_on_validated_compiled_triton():
    assert launch.direct_launch_supported("3.6.0", interpreted=False)
    assert not launch.direct_launch_supported("3.6.0", interpreted=True)
    for version in ("3.9.0", "3.7.0", "3.5.1", "3.6.1"):
        assert not launch.direct_launch_supported(version, interpreted=False)
    if ddim_module.INTERPRETED:
        assert not ddim_module._step_launcher.enabled


class RecordingKernel:
    """Stands in for a JIT kernel: records launches through `kernel[grid](...)` as (grid, positional arguments,
    keyword arguments, with the positional ones by name when `arg_names` are given), which return `compiled`
    (what the JIT launch returns: None, or a stand-in for the CompiledKernel)."""

    params = ()

    def __init__(self, compiled=None, arg_names=()):
        self.launches = []
        self.compiled = compiled
        self.arg_names = list(arg_names)

    def __getitem__(self, grid):
        def run(*args, **options):
            self.launches.append((grid, args, arguments_by_name(self.arg_names, args, options)))
            return self.compiled
        return run


def test_launcher_takes_the_jit_launch_where_it_cannot_launch_directly():
    kernel = RecordingKernel()
    args, constexprs = (torch.zeros(4), 3, 0.5), {"BLOCK": 4}
    for launcher in (launch.DirectLauncher(kernel, enabled=False), launch.DirectLauncher(kernel, enabled=True)):
        # Disabled (interpreter, unvalidated version), or enabled but with CPU tensors: always the JIT launch.
        for _ in range(3):
            launcher.launch(kernel, (1,), args + (4,), launcher.prepare(constexprs))
        assert launcher.compiled == {}
    assert len(kernel.launches) == 6
    # The constexprs follow the runtime arguments, by position.
    assert all(launched == ((1,), args + (4,), {}) for launched in kernel.launches)
    # A kernel other than the launcher's (e.g. replaced by a test's recorder) is launched itself, by the JIT.
    other = RecordingKernel()
    launcher = launch.DirectLauncher(kernel, enabled=True)
    launcher.launch(other, (2,), args + (4,), launcher.prepare(constexprs))
    assert other.launches == [((2,), args + (4,), {})] and len(kernel.launches) == 6


def test_launch_arguments_must_end_with_the_prepared_constexpr_values():
    """A launch passes every argument in one tuple, the constexpr values last; a plan's launcher that left them
    out (or passed others) gets a clear error from its first key, not a binary of other constexprs."""
    launcher = launch.DirectLauncher(RecordingKernel(), enabled=False)
    prepared = launcher.prepare({"BLOCK": 4, "MODE": 1}, tensor_count=1, varying=(1,))
    tensor = torch.zeros(4)
    for args in ((tensor, 3, 0.5), (tensor, 3, 0.5, 1, 4)):
        with pytest.raises(ValueError, match="end with its prepared constexpr values"):
            launcher.launch_key(args, prepared)
    assert prepared.fixed_key is None
    key = launcher.launch_key((tensor, 3, 0.5, 4, 1), prepared)
    assert key[0] == prepared.fixed_key is not None


def test_step_launches_carry_the_launch_options_and_the_per_sample_grid(fresh_plans):
    """Every launch of the step kernel, JIT or direct, compiles without fp contraction (LAUNCH_OPTIONS), and a
    prepared launch keeps main's per-sample programs (grid of batch x chunks per sample) and generator rows."""
    assert ddim_module._step_launcher.launch_options == ddim_module.LAUNCH_OPTIONS == {"enable_fp_fusion": False}
    kernel = RecordingKernel()
    args, constexprs = (torch.zeros(4), 3, 0.5), {"BLOCK": 4}
    launcher = launch.DirectLauncher(kernel, ddim_module.LAUNCH_OPTIONS, enabled=False)
    launcher.launch(kernel, (1,), args + (4,), launcher.prepare(constexprs))
    assert kernel.launches == [((1,), args + (4,), {"enable_fp_fusion": False})]
    table = step_table(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), 10, 1.0)
    batch, per_sample = 3, 2 * ddim_module.BLOCK_SIZE + 5
    model_output, sample = randn(batch, per_sample), randn(batch, per_sample, seed=1)
    generator = fastddim.PhiloxGenerator(seeds=[1, 2, 3])
    original = ddim_module._ddim_step_kernel
    ddim_module._ddim_step_kernel = RecordingKernel(arg_names=original.arg_names)
    try:
        for timestep, by_sample in ((torch.tensor([500, 300, 100]), True), (torch.tensor(500), False)):
            ddim_module._ddim_step_kernel.launches.clear()
            ops.ddim_step(model_output, sample, table, timestep, eta=1.0, philox_state=generator.buffer,
                          backend="triton")
            (grid, launched, constexprs), = ddim_module._ddim_step_kernel.launches
            assert constexprs["enable_fp_fusion"] is False and constexprs["SAMPLE_PROGRAMS"] == by_sample
            blocks = math.ceil(per_sample / ddim_module.BLOCK_SIZE)
            assert grid == ((batch * blocks,) if by_sample else (math.ceil(batch * per_sample /
                                                                           ddim_module.BLOCK_SIZE),))
            # rng_rows (after timestep and num_train_timesteps) and the elements per sample.
            timestep_at = 11
            assert launched[timestep_at + 1:timestep_at + 3] == (1000, batch)
            assert launched[timestep_at + 7:timestep_at + 9] == (batch * per_sample, per_sample)
    finally:
        ddim_module._ddim_step_kernel = original


# ---------------------------------------------------------------------------------------------------------------
# GraphedStep on the caller's static buffers
# ---------------------------------------------------------------------------------------------------------------


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_graphed_step_reads_the_callers_static_buffers_without_copies(monkeypatch):
    from fastddim.graphs import GraphedStep

    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")  # on the CPU the graphed step runs eagerly: torch ops only
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    model_buffer, sample_buffer = randn(*SHAPE, seed=12), randn(*SHAPE, seed=13)
    graphed = GraphedStep(scheduler, sample_buffer, static_model_output=model_buffer, static_sample=sample_buffer)
    assert graphed.static_model_output is model_buffer and graphed.static_sample is sample_buffer
    with RecordOps() as recorded:
        got = graphed(model_buffer, 501, sample_buffer).prev_sample.clone()
    assert not [op for op in recorded.ops if op.startswith("aten.copy_")], recorded.ops
    assert torch.equal(got, scheduler.step(model_buffer, 501, sample_buffer).prev_sample)
    # Any other tensor is copied into the static buffer first.
    doubled = 2 * model_buffer
    got = graphed(doubled, 501, sample_buffer).prev_sample
    assert torch.equal(model_buffer, doubled)
    assert torch.equal(got, scheduler.step(doubled, 501, sample_buffer).prev_sample)


@pytest.mark.parametrize("bad", ["shape", "dtype", "list"])
def test_graphed_step_rejects_static_buffers_unlike_the_sample(bad):
    from fastddim.graphs import GraphedStep

    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    sample = randn(*SHAPE)
    buffer = {"shape": randn(1, 3, 8, 8), "dtype": sample.double(), "list": sample.tolist()}[bad]
    with pytest.raises(ValueError, match="static_model_output"):
        GraphedStep(scheduler, sample, static_model_output=buffer)


class LaunchRecorder:
    """Stands in for a DirectLauncher: prepares launches as `real` does and records (args, prepared) per launch."""

    def __init__(self, real: launch.DirectLauncher):
        self.prepare = real.prepare
        self.launches = []

    def launch(self, kernel, grid, args, prepared):
        self.launches.append((args, prepared))


def test_plan_launch_keys_separate_exactly_what_the_jit_separates_within_a_plan(monkeypatch):
    """A step plan's launches differ only in their pointers and timestep, so the direct launcher keys them on the
    plan's fixed part (computed once) plus the tensors' dtypes and alignment and the do-not-specialize ints'
    ranges (DirectLauncher.launch_key): two launches of one plan get equal keys exactly when triton's JIT
    specializes them equally (an unaligned view, a timestep of 1 or 16, which the JIT does not specialize)."""
    kernel = compiled_step_kernel()
    launcher = launch.DirectLauncher(kernel, enabled=False)
    recorder = LaunchRecorder(ddim_module._step_launcher)
    recorded = recorder.launches
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    storage = torch.randn(2 * 256 + 1, device=DEVICE)
    aligned, misaligned, sample = storage[:256].view(1, 4, 8, 8), storage[1:257].view(1, 4, 8, 8), storage[257:]
    sample = sample.view(1, 4, 8, 8).clone()
    monkeypatch.setenv("FASTDDIM_BACKEND", "triton")
    monkeypatch.setattr(ddim_module, "_step_launcher", recorder)
    for model_output, timestep in ((aligned, 780), (misaligned, 780), (aligned, 1), (aligned, 16),
                                   (aligned.clone(), 999)):
        scheduler.step(model_output, timestep, sample)
    assert len(recorded) == 5 and all(r[1] is recorded[0][1] for r in recorded), "one plan for all five launches"
    assert recorded[0][1].tensor_count == ddim_module.STEP_TENSORS
    keys = [launcher.launch_key(args, prepared) for args, prepared in recorded]
    specializations = [jit_specialization(kernel, args) for args, _ in recorded]
    for i in range(5):
        for j in range(5):
            assert (keys[i] == keys[j]) == (specializations[i] == specializations[j]), (i, j)
    assert keys[0] != keys[1] and keys[0] == keys[2] == keys[3] == keys[4]
    assert recorded[0][1].fixed_key is not None  # the fixed part was computed once and kept with the plan


def _distinct_case(name: str):
    """ops.ddim_step arguments for one kind of step plan (which inputs it has, which outputs it writes)."""
    generator = torch.Generator().manual_seed(3)

    def randn(shape=SHAPE):
        return torch.randn(shape, generator=generator).to(DEVICE)

    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    args, kwargs = [randn(), randn(), table, 501], {}
    if name == "noise":
        kwargs.update(eta=0.5, variance_noise=randn())
    elif name == "philox":
        kwargs.update(eta=0.5, philox_state=fastddim.PhiloxGenerator(seeds=[1, 2], device=DEVICE).buffer)
    elif name == "guided":
        kwargs.update(uncond_output=randn(), guidance_scale=7.5)
    elif name == "guided rescaled":
        kwargs.update(uncond_output=randn(), guidance_scale=7.5, guidance_rescale=0.7)
    elif name == "tensor timestep":
        args[3] = torch.tensor(501, device=DEVICE)
    elif name == "per-sample timesteps":
        args[3] = torch.tensor([501, 21], device=DEVICE)
    elif name == "thresholded":
        kwargs.update(thresholding=True, sample_max_value=1.5)
    elif name == "prev only":
        kwargs.update(write_pred_original_sample=False)
    elif name == "x0 only":
        kwargs.update(write_prev_sample=False)
    elif name == "strided":
        args[0], args[1] = randn((2, 3, 8, 16))[..., ::2], randn().transpose(-1, -2)
    elif name == "everything":
        kwargs.update(eta=0.5, variance_noise=randn(), uncond_output=randn(), guidance_scale=7.5,
                      guidance_rescale=0.7, thresholding=True, sample_max_value=1.5)
        args[3] = torch.tensor([501, 21], device=DEVICE)
    return args, kwargs


@pytest.mark.parametrize("case", ["plain", "noise", "philox", "guided", "guided rescaled", "tensor timestep",
                                  "per-sample timesteps", "thresholded", "prev only", "x0 only", "strided",
                                  "everything"])
def test_step_launches_repeat_a_distinct_tensor_wherever_they_pass_no_tensor_of_their_own(monkeypatch, case):
    """The direct launcher reads the alignment of the step's distinct tensors only (StepLauncher.distinct_tensors):
    in every kind of plan, each other leading argument of every launch is one of them, the same object."""
    recorder = LaunchRecorder(ddim_module._step_launcher)
    monkeypatch.setattr(ddim_module, "_step_launcher", recorder)
    ops.PLANS.clear()
    args, kwargs = _distinct_case(case)
    ops.ddim_step(*args, backend="triton", **kwargs)
    assert recorder.launches
    for launched, prepared in recorder.launches:
        distinct = prepared.distinct
        assert distinct and len(distinct) < ddim_module.STEP_TENSORS
        assert prepared.pick_distinct(launched) == tuple(launched[i] for i in distinct)
        for position, tensor in enumerate(launched[:ddim_module.STEP_TENSORS]):
            assert isinstance(tensor, torch.Tensor), (case, position)
            assert any(tensor is launched[i] for i in distinct), (case, position)
        # No placeholder among the distinct ones: each holds a tensor of its own.
        assert len({id(launched[i]) for i in distinct}) == len(distinct), case


@pytest.mark.parametrize("case", ["thresholded", "guided", "guided rescaled", "tensor timestep",
                                  "per-sample timesteps", "sharded", "everything"])
def test_threshold_launches_repeat_a_distinct_tensor_wherever_they_pass_no_tensor_of_their_own(monkeypatch, case):
    """The threshold passes' and selects' direct launches read the alignment of their distinct tensors only: in
    every kind of thresholded plan, each other leading argument of every launch is one of them, the same object."""
    from fastddim.kernels import threshold as threshold_module

    recorders = {name: LaunchRecorder(getattr(threshold_module, name)) for name in ("_pass_launcher",
                                                                                    "_select_launcher")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(threshold_module, name, recorder)
    args, kwargs = _distinct_case("everything" if case == "everything" else "thresholded")
    kwargs.update(thresholding=True, sample_max_value=1.5)
    generator = torch.Generator().manual_seed(5)
    if case in ("guided", "guided rescaled"):
        kwargs.update(uncond_output=torch.randn(SHAPE, generator=generator).to(DEVICE), guidance_scale=7.5,
                      guidance_rescale=0.7 if case == "guided rescaled" else 0.0)
    elif case == "tensor timestep":
        args[3] = torch.tensor(501, device=DEVICE)
    elif case == "per-sample timesteps":
        args[3] = torch.tensor([501, 21], device=DEVICE)
    elif case == "sharded":
        kwargs["threshold_reduce"] = lambda tensor, op: None  # one process holding every shard
    ddim_module.ddim_step(*args, **kwargs)
    for name, recorder in recorders.items():
        tensor_count = (threshold_module.PASS_TENSORS if name == "_pass_launcher"
                        else threshold_module.SELECT_TENSORS)
        assert recorder.launches, name
        for launched, prepared in recorder.launches:
            distinct = prepared.distinct
            assert distinct and len(distinct) <= tensor_count
            for position, tensor in enumerate(launched[:tensor_count]):
                assert isinstance(tensor, torch.Tensor), (case, name, position)
                assert any(tensor is launched[i] for i in distinct), (case, name, position)
            assert len({id(launched[i]) for i in distinct}) == len(distinct), (case, name)


def test_plan_launch_keys_see_a_misaligned_tensor_in_any_slot(monkeypatch):
    """With the alignment read from the distinct tensors only, a misaligned sample (which also fills the uncond
    slot) or noise still gives the key of its own JIT specialization."""
    kernel = compiled_step_kernel()
    launcher = launch.DirectLauncher(kernel, enabled=False)
    recorder = LaunchRecorder(ddim_module._step_launcher)
    monkeypatch.setattr(ddim_module, "_step_launcher", recorder)
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    storage = torch.randn(4 * 256 + 1, device=DEVICE)
    aligned = [storage[i * 256:(i + 1) * 256].view(1, 4, 8, 8) for i in range(3)]
    misaligned = storage[3 * 256 + 1:].view(1, 4, 8, 8)
    ops.PLANS.clear()
    for sample, noise in ((aligned[0], aligned[1]), (misaligned, aligned[1]), (aligned[0], misaligned),
                          (aligned[2], aligned[0])):
        ops.ddim_step(aligned[2], sample, table, 501, eta=0.5, variance_noise=noise, backend="triton")
    assert len({id(prepared) for _, prepared in recorder.launches}) == 1
    keys = [launcher.launch_key(args, prepared) for args, prepared in recorder.launches]
    specializations = [jit_specialization(kernel, args) for args, _ in recorder.launches]
    for i in range(4):
        for j in range(4):
            assert (keys[i] == keys[j]) == (specializations[i] == specializations[j]), (i, j)
    assert keys[0] == keys[3] and len({keys[0], keys[1], keys[2]}) == 3


def test_unspecialized_int_key_is_what_specialization_key_gives():
    """The timestep's key part read without specialization_key (an int32 do-not-specialize int) equals that
    function's, and other values still take it."""
    kernel = compiled_step_kernel()
    launcher = launch.DirectLauncher(kernel, enabled=False)
    args, launched = launch_arguments("base")
    constexprs = {k: v for k, v in launched.items() if k not in ddim_module.LAUNCH_OPTIONS}
    position = ddim_module.STEP_TENSORS
    general = launch.DirectLauncher(kernel, enabled=False).prepare(constexprs, ddim_module.STEP_TENSORS,
                                                                   varying=(position,))
    general.unspecialized_int = None  # forces specialization_key
    fast = launcher.prepare(constexprs, ddim_module.STEP_TENSORS, varying=(position,))
    assert fast.unspecialized_int == position
    args += fast.constexpr_values  # a launch's arguments end with the constexpr values
    for value in (0, 1, 15, 16, 999, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63, True, 5.0):
        args[position] = value
        fast_key, general_key = launcher.launch_key(args, fast), launcher.launch_key(args, general)
        assert fast_key[1:] == general_key[1:], value


def test_threshold_plan_launch_keys_separate_exactly_what_the_jit_separates(monkeypatch):
    """The threshold passes launch through their own direct launchers with one prepared launch per radix level:
    within a step plan, two launches of a level get equal keys exactly when triton's JIT specializes them equally
    (timesteps 1, 16 and 999 are do-not-specialize arguments; an unaligned model output is not)."""
    from fastddim.kernels import threshold as threshold_module

    kernel = JITFunction(threshold_module._threshold_pass_kernel.fn, **threshold_module._threshold_pass_kernel.kwargs)
    launcher = launch.DirectLauncher(kernel, enabled=False)
    recorder = LaunchRecorder(threshold_module._pass_launcher)
    recorded = recorder.launches
    table = step_table(fastddim.DDIMScheduler().alphas_cumprod, 50, 1.0).to(DEVICE)
    storage = torch.randn(2 * 256 + 1, device=DEVICE)
    aligned, misaligned = storage[:256].view(1, 4, 8, 8), storage[1:257].view(1, 4, 8, 8)
    sample = storage[257:].view(1, 4, 8, 8).clone()
    monkeypatch.setattr(threshold_module, "_pass_launcher", recorder)
    ops.PLANS.clear()
    for model_output, timestep in ((aligned, 780), (misaligned, 780), (aligned, 1), (aligned, 16), (aligned, 999)):
        ops.ddim_step(model_output, sample, table, timestep, thresholding=True, sample_max_value=1.5,
                      backend="triton")
    levels = len(recorded) // 5
    assert levels == 3 and len({id(prepared) for _, prepared in recorded}) == levels
    for level in range(levels):
        launches = recorded[level::levels]
        keys = [launcher.launch_key(args, prepared) for args, prepared in launches]
        specializations = [jit_specialization(kernel, args) for args, _ in launches]
        for i in range(5):
            for j in range(5):
                assert (keys[i] == keys[j]) == (specializations[i] == specializations[j]), (level, i, j)
        assert keys[0] != keys[1] and keys[0] == keys[2] == keys[3] == keys[4]


def test_prepared_launches_take_the_constexprs_in_the_kernels_order():
    """CompiledKernel.run takes the constexprs positionally: prepare orders them as the kernel declares them and
    refuses a set that is not the kernel's."""
    kernel = compiled_step_kernel()
    declared = [p.name for p in kernel.params if p.is_constexpr]
    _, launched = launch_arguments("base")  # the JIT launch's keywords: constexprs and launch options
    constexprs = {k: v for k, v in launched.items() if k not in ddim_module.LAUNCH_OPTIONS}
    shuffled = dict(reversed(list(constexprs.items())))
    prepared = launch.DirectLauncher(kernel, ddim_module.LAUNCH_OPTIONS).prepare(shuffled, ddim_module.STEP_TENSORS)
    assert list(prepared.constexprs) == declared
    assert prepared.constexpr_values == tuple(constexprs[name] for name in declared)
    assert prepared.launch_options == ddim_module.LAUNCH_OPTIONS
    with pytest.raises(ValueError, match="constexprs"):
        launch.DirectLauncher(kernel).prepare({k: v for k, v in constexprs.items() if k != "BLOCK"})
    for distinct, tensor_count in (((0, 11), 11), ((), 11), ((0,), None)):
        with pytest.raises(ValueError, match="distinct"):
            launch.DirectLauncher(kernel).prepare(constexprs, tensor_count, distinct=distinct)
    # An interpreted kernel names its parameters but not which are constexprs: they are ordered by its names, and
    # a set that is not its last parameters is refused (both launches pass them positionally after the others).
    interpreted = ddim_module._ddim_step_kernel
    names = list(interpreted.arg_names)
    assert names[-len(declared):] == declared
    prepared = launch.DirectLauncher(interpreted, ddim_module.LAUNCH_OPTIONS).prepare(shuffled)
    assert list(prepared.constexprs) == declared
    with pytest.raises(ValueError, match="constexprs"):
        launch.DirectLauncher(interpreted).prepare({**{k: v for k, v in constexprs.items() if k != "BLOCK"},
                                                    "timestep": 0})


def test_direct_launchers_refuse_a_kernel_with_a_constexpr_before_a_runtime_parameter():
    """CompiledKernel.run takes the arguments in declaration order and a direct launch appends the constexprs:
    every launched kernel declares them last, and a kernel that does not is refused when its launcher is made."""
    from fastddim.kernels import threshold as threshold_module

    for interpreted in (ddim_module._ddim_step_kernel, threshold_module._threshold_pass_kernel,
                        threshold_module._threshold_select_kernel):
        kernel = JITFunction(interpreted.fn, **interpreted.kwargs)
        flags = [p.is_constexpr for p in kernel.params]
        assert flags == sorted(flags), kernel.fn.__name__
        launch.DirectLauncher(kernel)

    def interleaved(x_ptr, BLOCK: tl.constexpr, n):
        pass

    with pytest.raises(ValueError, match="constexpr"):
        launch.DirectLauncher(JITFunction(interleaved))


def test_direct_launches_run_the_compiled_kernel_with_the_prepared_arguments(monkeypatch):
    """The direct branch, with stand-ins for a CUDA tensor, the driver and a compiled kernel: the first launch of a
    specialization takes the JIT launch (whose CompiledKernel is kept), later ones call CompiledKernel.run with
    the grid, the current stream, the loaded function, its metadata, no hooks, the runtime arguments and the
    constexprs in the kernel's order; a changed alignment or a varying int of another range is a new
    specialization (the JIT again)."""

    class CudaTensor:  # what the key and the launch read of a CUDA tensor
        is_cuda = True
        dtype = torch.float32

        def __init__(self, address):
            self.address = address

        def data_ptr(self):
            return self.address

    class Driver:
        class active:
            @staticmethod
            def get_current_device():
                return 0

            @staticmethod
            def get_current_stream(device):
                return 1234

    runs = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        @staticmethod
        def run(*arguments):
            runs.append(arguments)

    monkeypatch.setattr(launch, "driver", Driver)
    kernel = RecordingKernel(Compiled())
    launcher = launch.DirectLauncher(kernel, {"enable_fp_fusion": False}, enabled=True)
    prepared = launcher.prepare({"BLOCK": 4, "MODE": 1}, tensor_count=2, varying=(2,))
    assert prepared.constexpr_values == (4, 1)  # a launch's arguments end with them
    aligned = (CudaTensor(4096), CudaTensor(8192), 7, 0.5, 4, 1)
    launcher.launch(kernel, (3,), aligned, prepared)
    assert kernel.launches == [((3,), aligned, {"enable_fp_fusion": False})] and runs == []
    later = (CudaTensor(4096), CudaTensor(8192), 9, 0.5, 4, 1)
    launcher.launch(kernel, (3, 2), later, prepared)
    assert len(kernel.launches) == 1
    assert runs == [(3, 2, 1, 1234, "function", "metadata", None, None, None, *later)]
    launcher.launch(kernel, (3,), (CudaTensor(4100), CudaTensor(8192), 7, 0.5, 4, 1), prepared)  # unaligned: JIT
    launcher.launch(kernel, (3,), (CudaTensor(4096), CudaTensor(8192), 2**40, 0.5, 4, 1), prepared)  # an int64
    launcher.launch(kernel, (3,), (CudaTensor(4096), CudaTensor(8192), 16, 0.5, 4, 1), prepared)  # divisible by 16
    assert len(kernel.launches) == 4 and len(runs) == 1
    launcher.launch(kernel, (3,), (CudaTensor(4096), CudaTensor(8192), 23, 0.5, 4, 1), prepared)  # as the first
    assert len(kernel.launches) == 4 and len(runs) == 2
    # The same specialization through another kernel object (a test's recorder): that kernel, by the JIT.
    other = RecordingKernel(Compiled())
    launcher.launch(other, (3,), later, prepared)
    assert len(other.launches) == 1 and len(runs) == 2
    # With a launch hook set (a profiler), the JIT launch, which calls it.
    hook = lambda *args: None  # noqa: E731
    launch.knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher.launch(kernel, (3,), later, prepared)
    finally:
        launch.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.launches) == 5 and len(runs) == 2
    launcher.launch(kernel, (3,), later, prepared)
    assert len(kernel.launches) == 5 and len(runs) == 3
