"""fastddim where diffusers looks: its type checks, its loaders, its output and config objects (issue 12).

diffusers 0.42.1 is the truth: each test does the same thing with diffusers' class and with fastddim's and expects
the same behaviour (or the documented, deliberate improvement named in the test).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import diffusers
import pytest
import torch
import torch.utils._pytree as pytree
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput as DiffusersDDIMSchedulerOutput
from diffusers.utils import BaseOutput

import fastddim
from fastddim import ops

SHAPE = (2, 3, 8, 8)
KINDS = ["DDIMScheduler", "DDIMInverseScheduler"]
STEP_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # one float32 step of either library on the same inputs


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def pair(kind: str = "DDIMScheduler", **config):
    return getattr(fastddim, kind)(**config), getattr(diffusers, kind)(**config)


def step_both(ours, theirs, timestep=501, **kwargs):
    model_output, sample = randn(1), randn(2)
    return (ours.step(model_output, timestep, sample, **kwargs),
            theirs.step(model_output, timestep, sample, **kwargs))


def assert_same_step(ours, theirs, timestep=501, **kwargs):
    out, reference = step_both(ours, theirs, timestep, **kwargs)
    torch.testing.assert_close(out.prev_sample, reference.prev_sample, **STEP_TOLERANCE)
    torch.testing.assert_close(out.pred_original_sample, reference.pred_original_sample, **STEP_TOLERANCE)


TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """A DDPMPipeline directory saved by diffusers with its own scheduler (as on the hub)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddpm")
    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**TINY_UNET).eval(),
                                  scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear"))
    pipe.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Type checks and pipeline loaders


@pytest.mark.parametrize("kind", KINDS)
def test_schedulers_are_diffusers_classes(kind):
    ours = getattr(fastddim, kind)()
    assert isinstance(ours, diffusers.SchedulerMixin) and isinstance(ours, ConfigMixin)
    # LEdits++, Bria and AudioDiffusion branch on isinstance(scheduler, DDIMScheduler).
    assert isinstance(ours, getattr(diffusers, kind))
    # fastddim's own methods, not diffusers', run the step.
    assert type(ours).step is not getattr(diffusers, kind).step


@pytest.mark.parametrize("loader", ["DDPMPipeline", "DiffusionPipeline"])
def test_from_pretrained_accepts_a_fastddim_scheduler(ddpm_dir, loader):
    scheduler = fastddim.DDIMScheduler.from_pretrained(ddpm_dir, subfolder="scheduler")
    pipe = getattr(diffusers, loader).from_pretrained(ddpm_dir, scheduler=scheduler)
    assert pipe.scheduler is scheduler


def test_saved_pipeline_records_fastddim_and_reloads_its_scheduler(ddpm_dir, tmp_path):
    pipe = diffusers.DDPMPipeline.from_pretrained(ddpm_dir, scheduler=fastddim.DDIMScheduler(steps_offset=1))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["fastddim", "DDIMScheduler"]
    reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded.scheduler) is fastddim.DDIMScheduler
    assert reloaded.scheduler.config.steps_offset == 1


def test_importing_fastddim_imports_no_diffusers_and_installs_no_hook():
    code = ("import sys, fastddim, fastddim.ops; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'; "
            "assert not any('fastddim' in type(f).__module__ for f in sys.meta_path), 'import hook installed'; "
            "fastddim.DDIMScheduler; assert 'diffusers' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"FASTDDIM_BACKEND": "torch", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]


STANDALONE = r"""
import json, sys, tempfile, warnings
sys.modules["diffusers"] = None  # as if diffusers were not installed
import torch, fastddim
s = fastddim.DDIMScheduler(prediction_type="v_prediction")
assert not any(c.__module__.startswith("diffusers") for c in type(s).__mro__)
s.set_timesteps(10)
x = torch.randn(2, 3, 4, 4)
out = s.step(x, 901, x)
assert "prev_sample" in out and out[0] is out.prev_sample and out["pred_original_sample"] is out[1]
assert [l.shape for l in torch.utils._pytree.tree_leaves(out)] == [x.shape, x.shape]
d = tempfile.mkdtemp(); s.save_pretrained(d)
saved = json.load(open(d + "/scheduler_config.json"))
reloaded = fastddim.DDIMScheduler.from_pretrained(d)
assert dict(reloaded.config) == saved, (dict(reloaded.config), saved)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert s.prediction_type == "v_prediction"
assert caught and caught[0].category is FutureWarning
s.config.prediction_type = "epsilon"
eps = fastddim.DDIMScheduler(); eps.set_timesteps(10)
assert torch.equal(s.step(x, 901, x).prev_sample, eps.step(x, 901, x).prev_sample)
print("RESULT " + json.dumps(sorted(k for k in saved if k.startswith("_"))))
"""


def test_standalone_without_diffusers():
    done = subprocess.run([sys.executable, "-c", STANDALONE], capture_output=True, text=True, timeout=300,
                          env={"FASTDDIM_BACKEND": "torch", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    # The same private keys as diffusers writes.
    assert json.loads(line[len("RESULT "):]) == ["_class_name", "_diffusers_version"]


# --------------------------------------------------------------------------------------------------------------
# from_pretrained with hub ids, offline, on a cache laid out as huggingface_hub lays it out


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path):
    """models--org--tiny-ddim/{refs/main, refs/v1, snapshots/<commit>/scheduler/scheduler_config.json}."""
    repo = tmp_path / "models--org--tiny-ddim"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    folder = repo / "snapshots" / COMMIT / "scheduler"
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                            prediction_type="v_prediction").save_pretrained(folder)
    return tmp_path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("revision", [None, "v1", COMMIT])
def test_from_pretrained_hub_id_from_the_cache(hub_cache, kind, revision):
    options = dict(subfolder="scheduler", cache_dir=hub_cache, local_files_only=True, revision=revision)
    ours = getattr(fastddim, kind).from_pretrained("org/tiny-ddim", token="hf_unused", **options)
    theirs = getattr(diffusers, kind).from_pretrained("org/tiny-ddim", **options)
    assert type(ours) is getattr(fastddim, kind)
    assert dict(ours.config) == dict(theirs.config)
    config, commit = type(ours).load_config("org/tiny-ddim", return_commit_hash=True, **options)
    assert commit == COMMIT and config["prediction_type"] == "v_prediction"


def test_from_pretrained_hub_id_missing_from_the_cache_is_an_os_error_as_in_diffusers(hub_cache):
    options = dict(cache_dir=hub_cache, local_files_only=True)
    with pytest.raises(OSError):
        diffusers.DDIMScheduler.from_pretrained("org/not-cached", **options)
    with pytest.raises(OSError, match="org/not-cached"):
        fastddim.DDIMScheduler.from_pretrained("org/not-cached", **options)
    with pytest.raises(OSError, match="nothing-here"):
        fastddim.DDIMScheduler.from_pretrained("org/tiny-ddim", subfolder="nothing-here", **options)


# --------------------------------------------------------------------------------------------------------------
# DDIMSchedulerOutput is diffusers' BaseOutput


def test_output_is_a_diffusers_ddim_output_and_behaves_as_one(backend):
    ours, theirs = pair()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    out, reference = step_both(ours, theirs)
    assert isinstance(out, BaseOutput) and isinstance(out, DiffusersDDIMSchedulerOutput)
    assert list(out.keys()) == list(reference.keys()) == ["prev_sample", "pred_original_sample"]
    assert "prev_sample" in out and "pred_original_sample" in out
    assert out["prev_sample"] is out.prev_sample is out[0] and out.to_tuple()[1] is out.pred_original_sample
    assert list(out) == list(reference)
    replacement = torch.zeros(SHAPE)
    out["prev_sample"] = replacement  # item assignment updates the attribute too, as in diffusers
    assert out.prev_sample is replacement
    out.pred_original_sample = replacement
    assert out["pred_original_sample"] is replacement
    leaves, spec = pytree.tree_flatten(out)
    reference_leaves, reference_spec = pytree.tree_flatten(reference)
    assert len(leaves) == len(reference_leaves) == 2 and spec.context == reference_spec.context
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is fastddim.DDIMSchedulerOutput and rebuilt.prev_sample is replacement
    copy = pickle.loads(pickle.dumps(out))
    assert type(copy) is fastddim.DDIMSchedulerOutput and torch.equal(copy["pred_original_sample"], replacement)
    for forbidden in (lambda o: o.pop("prev_sample"), lambda o: o.update(prev_sample=None),
                      lambda o: o.__delitem__("prev_sample"), lambda o: o.setdefault("x", 1)):
        with pytest.raises(Exception):
            forbidden(out)
        with pytest.raises(Exception):
            forbidden(reference)


def test_output_without_pred_original_sample_has_one_key_as_in_diffusers():
    prev = torch.ones(2)
    ours = fastddim.DDIMSchedulerOutput(prev_sample=prev)
    theirs = DiffusersDDIMSchedulerOutput(prev_sample=prev)
    assert list(ours.keys()) == list(theirs.keys()) == ["prev_sample"]
    assert ours.pred_original_sample is None and "pred_original_sample" not in ours
    assert ours.to_tuple() == theirs.to_tuple() == (prev,)


# --------------------------------------------------------------------------------------------------------------
# Config round trips and config access


CONFIGS = [pytest.param({}, id="defaults"),
           pytest.param(dict(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                             timestep_spacing="trailing"), id="sd-trailing")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_save_and_reload_gives_the_saved_config_as_in_diffusers(tmp_path, kind, config):
    ours, theirs = pair(kind, **config)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert written == reference  # same keys, `_diffusers_version` included, no `_fastddim_version`
    reloaded = type(ours).from_pretrained(tmp_path / "ours")
    theirs_reloaded = type(theirs).from_pretrained(tmp_path / "theirs")
    assert dict(theirs_reloaded.config) == reference
    assert dict(reloaded.config) == written
    # After saving, too (the defaults list is unordered in diffusers).
    defaults = "_use_default_values"
    assert {k: v for k, v in ours.config.items() if k != defaults} == {
        k: v for k, v in theirs.config.items() if k != defaults}
    assert set(ours.config[defaults]) == set(theirs.config[defaults])


@pytest.mark.parametrize("kind", KINDS)
def test_config_values_read_as_attributes_warn_as_in_diffusers(kind):
    ours, theirs = pair(kind, prediction_type="v_prediction")
    for scheduler in (ours, theirs):
        with pytest.warns(FutureWarning, match="scheduler.config.prediction_type"):
            assert scheduler.prediction_type == "v_prediction"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.config.prediction_type == "v_prediction"  # the config itself does not warn
    with pytest.raises(AttributeError):
        ours.not_a_config_key


def test_config_write_is_used_by_the_next_step(backend):
    ours, theirs = pair()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    step_both(ours, theirs)  # cache the step options first
    for scheduler in (ours, theirs):  # diffusers accepts this write and uses it
        scheduler.config.prediction_type = "v_prediction"
        scheduler.config.clip_sample_range = 0.5
    assert ours.config["prediction_type"] == "v_prediction"  # item and attribute agree (diffusers: not)
    assert_same_step(ours, theirs)
    fresh = fastddim.DDIMScheduler(prediction_type="v_prediction", clip_sample_range=0.5)
    fresh.set_timesteps(10)
    assert torch.equal(step_both(ours, fresh)[0].prev_sample, step_both(ours, fresh)[1].prev_sample)


def test_config_item_write_is_used_and_saved(tmp_path):
    # diffusers accepts config[key] = value too but its step reads the stale attribute: fastddim keeps one value.
    ours = fastddim.DDIMScheduler()
    ours.set_timesteps(10)
    ours.config["clip_sample"] = False
    expected = fastddim.DDIMScheduler(clip_sample=False)
    expected.set_timesteps(10)
    model_output, sample = randn(1) * 10, randn(2)  # large x0: clipping matters
    assert torch.equal(ours.step(model_output, 501, sample).prev_sample,
                       expected.step(model_output, 501, sample).prev_sample)
    ours.config.steps_offset = 1
    ours.set_timesteps(10)  # timestep options apply at the next set_timesteps, as in diffusers
    assert int(ours.timesteps[-1]) == 1
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["clip_sample"] is False and saved["steps_offset"] == 1


def test_bad_config_writes_are_clear_errors():
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(10)
    scheduler.config.prediction_type = "noise"
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler.step(randn(1), 501, randn(2))
    scheduler.config.prediction_type = "epsilon"
    scheduler.config.beta_end = 0.03  # the betas were built from the old value: neither used nor ignored
    with pytest.raises(ValueError, match="beta_end.*from_config"):
        scheduler.step(randn(1), 501, randn(2))
    with pytest.raises(ValueError, match="beta_end"):
        scheduler.set_timesteps(10)


# --------------------------------------------------------------------------------------------------------------
# State assigned after set_timesteps


@pytest.mark.parametrize("kind", KINDS)
def test_assigned_num_inference_steps_is_used_by_the_next_step(kind, backend):
    ours, theirs = pair(kind)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    step_both(ours, theirs)
    ours.num_inference_steps = theirs.num_inference_steps = 25
    assert_same_step(ours, theirs, timestep=500)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.num_inference_steps = 0


@pytest.mark.parametrize("kind", KINDS)
def test_assigned_alphas_cumprod_is_used_by_step_and_add_noise(kind, backend):
    ours, theirs = pair(kind)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = randn(3), randn(4)
    if kind == "DDIMScheduler":
        ours.add_noise(x0, noise, torch.tensor([301]))  # caches alphas_cumprod in float64
    step_both(ours, theirs)
    new = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    ours.alphas_cumprod = new.clone()
    theirs.alphas_cumprod = new.clone()
    assert_same_step(ours, theirs)
    if kind == "DDIMScheduler":
        torch.testing.assert_close(ours.add_noise(x0, noise, torch.tensor([301])),
                                   theirs.add_noise(x0, noise, torch.tensor([301])), **STEP_TOLERANCE)
    # Changed in place: used too.
    ours.alphas_cumprod[401] = theirs.alphas_cumprod[401] = 0.25
    assert_same_step(ours, theirs, timestep=401)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ours.alphas_cumprod = new[:10]


@pytest.mark.parametrize("kind, name", [("DDIMScheduler", "final_alpha_cumprod"),
                                        ("DDIMInverseScheduler", "initial_alpha_cumprod")])
def test_assigned_boundary_alpha_product_is_used_by_the_next_step(kind, name, backend):
    ours, theirs = pair(kind)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    boundary_step = 1 if kind == "DDIMScheduler" else 99  # the step that reads the boundary value
    step_both(ours, theirs, timestep=boundary_step)
    # Between alphas_cumprod[0] and 1, so the step stays finite in both libraries.
    setattr(ours, name, torch.tensor(0.99995))
    setattr(theirs, name, torch.tensor(0.99995))
    assert_same_step(ours, theirs, timestep=boundary_step)


def test_assigned_timesteps_are_what_pipelines_iterate():
    ours = fastddim.DDIMScheduler()
    ours.set_timesteps(10)
    ours.timesteps = torch.tensor([999, 500, 1])
    sample = randn(2)
    for t in ours.timesteps:
        sample = ours.step(randn(int(t)), t, sample).prev_sample
    assert torch.isfinite(sample).all()


# --------------------------------------------------------------------------------------------------------------
# Thresholding with sample_max_value below 1, and the functional API's timestep range


@pytest.mark.parametrize("max_value", [0.5, 1.0])
def test_thresholding_with_sample_max_value_below_one_runs_as_diffusers(max_value, backend):
    ours, theirs = pair(thresholding=True, sample_max_value=max_value)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    for t in (901, 501, 1):
        assert_same_step(ours, theirs, timestep=t)


def test_thresholding_below_one_propagates_nan_as_diffusers(backend):
    # A NaN in x0 makes torch.quantile, hence the whole sample's threshold, NaN; the other sample is unaffected.
    ours, theirs = pair(thresholding=True, sample_max_value=0.5)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    model_output, sample = randn(1), randn(2)
    model_output[0, 1, 2, 3] = float("nan")
    out = ours.step(model_output, 501, sample).prev_sample
    reference = theirs.step(model_output, 501, sample).prev_sample
    assert torch.equal(out.isnan(), reference.isnan()) and out[0].isnan().all()
    torch.testing.assert_close(out[1], reference[1], **STEP_TOLERANCE)


@pytest.mark.parametrize("timestep", [5000, 1000, -1])
def test_functional_step_refuses_host_timesteps_outside_the_table(timestep, backend):
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        ops.ddim_step(randn(1), randn(2), scheduler._table, timestep)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(randn(1), timestep, randn(2))
