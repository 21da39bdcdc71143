"""Configuration and persistence (fastddim/config.py) against diffusers' own ConfigMixin/SchedulerMixin.

diffusers is the truth here: for the same arguments, config dictionaries, `from_config` conversions, the files
`save_pretrained` writes and what `from_pretrained` reads must agree with diffusers' DDIMScheduler and
DDIMInverseScheduler, so that pipelines and hub configs move freely between the two libraries.
"""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import re
import warnings
from collections.abc import Mapping

import diffusers
import numpy as np
import pytest
import torch

import fastddim
from fastddim.config import FrozenDict

# Some diffusers schedulers (KDPM2) trip NumPy 2 deprecations while building their sigmas: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SCHEDULER_PAIRS = [
    pytest.param(fastddim.DDIMScheduler, diffusers.DDIMScheduler, id="DDIMScheduler"),
    pytest.param(fastddim.DDIMInverseScheduler, diffusers.DDIMInverseScheduler, id="DDIMInverseScheduler"),
]

# The scheduler_config.json of Stable Diffusion v1.x as published on the hub (a PNDM config that pipelines
# routinely convert to DDIM): the most common input of `DDIMScheduler.from_config` in the wild.
STABLE_DIFFUSION_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# Non-default constructor arguments, so that conversions carry real choices rather than defaults (keys a
# scheduler does not take are filtered out per class).
SOURCE_ARGUMENTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1, clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True, variance_type="fixed_large", clip_sample_range=2.5,
)

# Argument sets shared by both classes; the positional one checks `_use_default_values` bookkeeping for
# positional arguments.
CONSTRUCTOR_CASES = [
    pytest.param((), {}, id="defaults"),
    pytest.param((), dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1), id="stable-diffusion"),
    pytest.param((), dict(prediction_type="v_prediction", timestep_spacing="trailing",
                          rescale_betas_zero_snr=True, clip_sample_range=2.0), id="zero-snr-v"),
    pytest.param((500, 0.001), dict(beta_schedule="squaredcos_cap_v2"), id="positional"),
    pytest.param((), dict(num_train_timesteps=10, trained_betas=[0.01 * (i + 1) for i in range(10)]),
                 id="trained-betas"),
]


def public(config: Mapping) -> dict:
    """The config without `_`-prefixed bookkeeping keys (class name, library versions, defaults list)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def default_keys(config: Mapping) -> set:
    """The keys recorded as "took the default" (diffusers keeps them in an unordered list)."""
    return set(config.get("_use_default_values", ()))


def assert_same_schedule(ours, theirs, num_inference_steps: int = 10) -> None:
    """The configs also mean the same thing: identical float32 tables and inference timesteps."""
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)


def diffusers_scheduler_or_skip(name: str, **arguments):
    """Instantiate the diffusers scheduler `name` with the arguments it takes (skips optional-dependency ones)."""
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls(**{k: v for k, v in arguments.items() if k in accepted})
    except ImportError as error:  # a dummy object: e.g. DPMSolverSDEScheduler without torchsde
        pytest.skip(f"{name} is not importable here: {error}")


# --------------------------------------------------------------------------------------------------------------
# The config object


def test_config_supports_attribute_and_mapping_access():
    scheduler = fastddim.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    config = scheduler.config
    assert isinstance(config, Mapping)
    assert isinstance(config, FrozenDict)
    assert config.prediction_type == config["prediction_type"] == "v_prediction"
    assert config.beta_schedule == config.get("beta_schedule") == "scaled_linear"
    assert "num_train_timesteps" in config and config["num_train_timesteps"] == 1000
    assert dict(config.items())["clip_sample"] is True
    # The config must not be a shared class-level object: another instance has its own values.
    assert fastddim.DDIMScheduler().config.prediction_type == "epsilon"


# Values may be set, as in diffusers (tests/test_dropin.py); keys cannot be removed. diffusers refuses the first
# four (with a bare Exception) and lets the last three through; fastddim refuses all with a TypeError.
REMOVALS = {
    "delitem": lambda c: c.__delitem__("beta_end"),
    "pop": lambda c: c.pop("beta_end"),
    "update": lambda c: c.update(beta_end=0.5),
    "setdefault": lambda c: c.setdefault("new_key", 1),
    "inplace-or": lambda c: c.__ior__({"beta_end": 0.5}),
    "clear": lambda c: c.clear(),
    "popitem": lambda c: c.popitem(),
    "delattr": lambda c: delattr(c, "beta_end"),
}


@pytest.mark.parametrize("mutation", REMOVALS.values(), ids=REMOVALS.keys())
def test_config_keys_cannot_be_removed(mutation):
    config = fastddim.DDIMScheduler().config
    before = dict(config)
    with pytest.raises(TypeError, match="cannot be removed"):
        mutation(config)
    assert dict(config) == before and config.beta_end == 0.02


@pytest.mark.parametrize("ours_cls, theirs_cls", SCHEDULER_PAIRS)
@pytest.mark.parametrize("args, kwargs", CONSTRUCTOR_CASES)
def test_config_equals_diffusers_for_same_arguments(ours_cls, theirs_cls, args, kwargs):
    ours = ours_cls(*args, **kwargs)
    theirs = theirs_cls(*args, **kwargs)
    assert public(ours.config) == public(theirs.config)
    # Which keys took their defaults decides what a later from_config carries over, so it must match too.
    # One deliberate difference: diffusers also lists arguments passed *positionally* as defaulted (its
    # decorator only looks at keywords), so converting such a scheduler would drop them; fastddim does not.
    positional = set(list(inspect.signature(ours_cls.__init__).parameters)[1:][: len(args)])
    assert default_keys(ours.config) == default_keys(theirs.config) - positional
    assert_same_schedule(ours, theirs)


def test_use_default_values_lists_exactly_the_omitted_arguments():
    # Truth: the constructor signature (and diffusers, checked above); here the rule itself, spelled out.
    scheduler = fastddim.DDIMScheduler(1000, beta_end=0.03)
    signature = [p for p in inspect.signature(fastddim.DDIMScheduler.__init__).parameters if p != "self"]
    assert default_keys(scheduler.config) == set(signature) - {"num_train_timesteps", "beta_end"}
    assert default_keys(fastddim.DDIMScheduler(**{k: scheduler.config[k] for k in signature}).config) == set()


def test_compatibles_match_diffusers():
    assert set(fastddim.DDIMScheduler._compatibles) == set(diffusers.DDIMScheduler._compatibles)
    compatibles = fastddim.DDIMScheduler().compatibles
    assert fastddim.DDIMScheduler in compatibles
    assert diffusers.DDIMScheduler in compatibles and diffusers.EulerDiscreteScheduler in compatibles


# --------------------------------------------------------------------------------------------------------------
# from_config


def assert_from_config_matches_diffusers(config: Mapping, **overrides):
    """fastddim.DDIMScheduler.from_config agrees with diffusers': config, defaults, unused keys, schedule."""
    ours, ours_unused = fastddim.DDIMScheduler.from_config(config, return_unused_kwargs=True, **overrides)
    theirs, theirs_unused = diffusers.DDIMScheduler.from_config(config, return_unused_kwargs=True, **overrides)
    assert isinstance(ours, fastddim.DDIMScheduler)
    assert public(ours.config) == public(theirs.config)
    assert default_keys(ours.config) == default_keys(theirs.config)
    assert ours_unused == theirs_unused
    assert_same_schedule(ours, theirs)
    return ours, ours_unused


@pytest.mark.parametrize("source_name", diffusers.DDIMScheduler._compatibles)
@pytest.mark.parametrize("as_saved_file", [False, True], ids=["in-memory", "saved-json"])
def test_from_config_of_every_compatible_diffusers_scheduler(source_name, as_saved_file):
    source = diffusers_scheduler_or_skip(source_name, **SOURCE_ARGUMENTS)
    # A config read back from disk has no `_use_default_values`: every key counts as chosen.
    config = json.loads(source.to_json_string()) if as_saved_file else source.config
    ours, _ = assert_from_config_matches_diffusers(config)
    # The choices that DDIM shares with the source must arrive (where the source takes them at all).
    for key in ("beta_schedule", "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one"):
        if key in source.config and key not in default_keys(source.config):
            assert ours.config[key] == source.config[key], key


def test_from_config_of_stable_diffusion_config():
    ours, unused = assert_from_config_matches_diffusers(STABLE_DIFFUSION_CONFIG)
    assert ours.config.beta_schedule == "scaled_linear"
    assert (ours.config.beta_start, ours.config.beta_end) == (0.00085, 0.012)
    assert ours.config.steps_offset == 1
    assert ours.config.clip_sample is False and ours.config.set_alpha_to_one is False
    # PNDM's own option is not a DDIM argument: ignored, kept in the config for a round trip, and reported.
    assert "skip_prk_steps" not in inspect.signature(fastddim.DDIMScheduler.__init__).parameters
    assert unused["skip_prk_steps"] is True
    assert ours.final_alpha_cumprod == ours.alphas_cumprod[0]


def test_from_config_ignores_unknown_keys_and_reports_them():
    config = {**STABLE_DIFFUSION_CONFIG, "not_a_scheduler_option": 3}
    _, unused = assert_from_config_matches_diffusers(config, another_unknown_override="x")
    assert unused["not_a_scheduler_option"] == 3
    assert unused["another_unknown_override"] == "x"
    # Without return_unused_kwargs a plain scheduler comes back.
    assert isinstance(fastddim.DDIMScheduler.from_config(config), fastddim.DDIMScheduler)


@pytest.mark.parametrize("config", [pytest.param(STABLE_DIFFUSION_CONFIG, id="sd-dict"),
                                    pytest.param(fastddim.DDIMScheduler().config, id="all-defaults")])
def test_from_config_overrides_win(config):
    overrides = dict(prediction_type="sample", beta_end=0.02, steps_offset=0, clip_sample=True)
    ours, _ = assert_from_config_matches_diffusers(config, **overrides)
    for key, value in overrides.items():
        assert ours.config[key] == value
    assert ours.config.beta_start == config.get("beta_start", 0.0001)


def test_from_config_accepts_a_scheduler_and_a_fastddim_config():
    source = fastddim.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    assert public(fastddim.DDIMScheduler.from_config(source).config) == public(source.config)
    assert_from_config_matches_diffusers(source.config)


def test_round_trip_through_ddim_keeps_ddpm_only_keys():
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", variance_type="fixed_large",
                                   prediction_type="v_prediction", clip_sample_range=3.0)
    ddim = fastddim.DDIMScheduler.from_config(ddpm.config)
    assert ddim.config.variance_type == "fixed_large"  # kept for the way back, unused by DDIM
    back = diffusers.DDPMScheduler.from_config(ddim.config)
    assert public(back.config) == public(ddpm.config)
    # The same through diffusers' DDIMScheduler gives the same answer.
    via_diffusers = diffusers.DDPMScheduler.from_config(diffusers.DDIMScheduler.from_config(ddpm.config).config)
    assert public(back.config) == public(via_diffusers.config)


def test_round_trip_does_not_turn_defaults_into_choices():
    # DDPM's default clip_sample (True) must not become DDIM's explicit choice, and back again.
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear")
    ddim = fastddim.DDIMScheduler.from_config(ddpm.config)
    assert default_keys(ddim.config) == default_keys(diffusers.DDIMScheduler.from_config(ddpm.config).config)
    assert "clip_sample" in default_keys(ddim.config)
    assert public(diffusers.DDPMScheduler.from_config(ddim.config).config) == public(ddpm.config)


@pytest.mark.parametrize("source", [
    pytest.param(STABLE_DIFFUSION_CONFIG, id="sd-dict"),
    pytest.param(diffusers.DDIMScheduler(thresholding=True, prediction_type="v_prediction",
                                         timestep_spacing="trailing", sample_max_value=2.0).config, id="ddim-config"),
])
def test_inverse_scheduler_from_a_forward_config_and_back(source):
    # Inversion pipelines (DiffEdit, pix2pix-zero) build DDIMInverseScheduler.from_config(pipe.scheduler.config).
    ours, ours_unused = fastddim.DDIMInverseScheduler.from_config(source, return_unused_kwargs=True)
    theirs, theirs_unused = diffusers.DDIMInverseScheduler.from_config(source, return_unused_kwargs=True)
    assert public(ours.config) == public(theirs.config)
    assert default_keys(ours.config) == default_keys(theirs.config)
    assert ours_unused == theirs_unused
    assert_same_schedule(ours, theirs)
    # The forward-only options (thresholding, ...) survive the trip back to DDIMScheduler.
    back = fastddim.DDIMScheduler.from_config(ours.config)
    assert public(back.config) == public(diffusers.DDIMScheduler.from_config(theirs.config).config)


def test_inverse_scheduler_rejects_linspace_spacing_at_construction():
    # Deliberate difference: diffusers accepts "linspace" here and fails only in set_timesteps; fastddim refuses
    # the config up front, naming the option.
    config = diffusers.DDIMScheduler(timestep_spacing="linspace").config
    theirs = diffusers.DDIMInverseScheduler.from_config(config)
    with pytest.raises(ValueError):
        theirs.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep_spacing"):
        fastddim.DDIMInverseScheduler.from_config(config)


@pytest.mark.parametrize("bad, error", [(None, ValueError), (42, TypeError), ("not a mapping", TypeError)])
def test_from_config_rejects_non_mappings(bad, error):
    with pytest.raises(error, match="config"):
        fastddim.DDIMScheduler.from_config(bad)


# --------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


@pytest.mark.parametrize("ours_cls, theirs_cls", SCHEDULER_PAIRS)
@pytest.mark.parametrize("args, kwargs", CONSTRUCTOR_CASES)
@pytest.mark.parametrize("subfolder", [None, "scheduler"])
def test_saved_by_fastddim_loads_in_diffusers(tmp_path, ours_cls, theirs_cls, args, kwargs, subfolder):
    ours = ours_cls(*args, **kwargs)
    target = tmp_path / subfolder if subfolder else tmp_path
    ours.save_pretrained(target)
    written = json.loads((target / "scheduler_config.json").read_text())
    assert written["_class_name"] == ours_cls.__name__
    assert "_use_default_values" not in written  # a saved file lists every value as chosen, as diffusers'
    theirs = theirs_cls.from_pretrained(tmp_path, subfolder=subfolder)
    assert public(theirs.config) == public(ours.config)
    assert_same_schedule(ours, theirs)
    # And back into fastddim, unchanged.
    reloaded = ours_cls.from_pretrained(tmp_path, subfolder=subfolder)
    assert public(reloaded.config) == public(ours.config)


@pytest.mark.parametrize("ours_cls, theirs_cls", SCHEDULER_PAIRS)
@pytest.mark.parametrize("args, kwargs", CONSTRUCTOR_CASES)
@pytest.mark.parametrize("subfolder", [None, "scheduler"])
def test_saved_by_diffusers_loads_in_fastddim(tmp_path, ours_cls, theirs_cls, args, kwargs, subfolder):
    theirs = theirs_cls(*args, **kwargs)
    theirs.save_pretrained(tmp_path / subfolder if subfolder else tmp_path)
    ours = ours_cls.from_pretrained(tmp_path, subfolder=subfolder)
    assert isinstance(ours, ours_cls)
    assert public(ours.config) == public(theirs.config)
    assert_same_schedule(ours, theirs)


def test_save_pretrained_writes_diffusers_file_format(tmp_path):
    ours = fastddim.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    # Same keys and values apart from which library (and version) wrote the file.
    assert public(written) == public(reference)
    assert written["_class_name"] == reference["_class_name"] == "DDIMScheduler"
    assert written["_diffusers_version"] == reference["_diffusers_version"] == diffusers.__version__
    assert written.keys() == reference.keys()


def test_numpy_trained_betas_are_saved_as_a_json_list(tmp_path):
    betas = np.linspace(0.001, 0.02, 20)
    ours = fastddim.DDIMScheduler(num_train_timesteps=20, trained_betas=betas)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["trained_betas"] == betas.tolist()
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert_same_schedule(ours, theirs, num_inference_steps=5)
    assert torch.equal(theirs.alphas_cumprod, diffusers.DDIMScheduler(20, trained_betas=betas).alphas_cumprod)


def test_from_pretrained_overrides_and_ignores_loader_options(tmp_path):
    diffusers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path)
    # diffusers' pipeline loader passes download options to every component: they must not reach __init__.
    ours = fastddim.DDIMScheduler.from_pretrained(tmp_path, prediction_type="sample", cache_dir=str(tmp_path),
                                                  local_files_only=True, revision=None, torch_dtype=torch.float16)
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path, prediction_type="sample")
    assert ours.config.prediction_type == "sample"
    assert public(ours.config) == public(theirs.config)


def test_load_config_returns_the_raw_dictionary(tmp_path):
    diffusers.DDIMScheduler(steps_offset=1).save_pretrained(tmp_path / "scheduler")
    ours = fastddim.DDIMScheduler.load_config(tmp_path, subfolder="scheduler")
    theirs = diffusers.DDIMScheduler.load_config(tmp_path, subfolder="scheduler")
    assert ours == theirs
    assert ours["_class_name"] == "DDIMScheduler" and ours["steps_offset"] == 1


# --------------------------------------------------------------------------------------------------------------
# DDIMInverseScheduler's deprecated set_alpha_to_zero


@pytest.mark.parametrize("value", [False, True])
def test_set_alpha_to_zero_ends_up_as_set_alpha_to_one(tmp_path, value):
    with pytest.warns(FutureWarning, match="set_alpha_to_zero"):
        ours = fastddim.DDIMInverseScheduler(set_alpha_to_zero=value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.DDIMInverseScheduler(set_alpha_to_zero=value)
    # Behaviour as diffusers (the keyword is a misnomer: it sets set_alpha_to_one)...
    assert torch.equal(ours.initial_alpha_cumprod, theirs.initial_alpha_cumprod)
    # ...but recorded under its current name, so the saved file means the same thing without the keyword
    # (diffusers' own config keeps the stale default here, which fastddim deliberately does not copy).
    assert ours.config.set_alpha_to_one is value
    assert "set_alpha_to_zero" not in ours.config
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["set_alpha_to_one"] is value
    reloaded = diffusers.DDIMInverseScheduler.from_pretrained(tmp_path)
    assert torch.equal(reloaded.initial_alpha_cumprod, theirs.initial_alpha_cumprod)


@pytest.mark.parametrize("value", [False, True])
def test_old_config_file_with_set_alpha_to_zero_loads_as_diffusers_does(tmp_path, value):
    # Old files carry both keys; the deprecated one wins in diffusers.
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMInverseScheduler", "set_alpha_to_zero": value, "set_alpha_to_one": not value}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = fastddim.DDIMInverseScheduler.from_pretrained(tmp_path)
        theirs = diffusers.DDIMInverseScheduler.from_pretrained(tmp_path)
    assert torch.equal(ours.initial_alpha_cumprod, theirs.initial_alpha_cumprod)
    assert ours.config.set_alpha_to_one is value


def test_set_alpha_to_zero_survives_from_config_in_memory():
    with pytest.warns(FutureWarning):
        ours = fastddim.DDIMInverseScheduler(set_alpha_to_zero=False)
    copy_of_it = fastddim.DDIMInverseScheduler.from_config(ours.config)
    assert copy_of_it.config.set_alpha_to_one is False
    assert torch.equal(copy_of_it.initial_alpha_cumprod, ours.initial_alpha_cumprod)


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_from_pretrained_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        fastddim.DDIMScheduler.from_pretrained(missing)


def test_from_pretrained_directory_without_config_names_the_file(tmp_path):
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "scheduler_config.json"))):
        fastddim.DDIMScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "scheduler"))):
        fastddim.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")


@pytest.mark.parametrize("content", ['{"beta_start": 0.1,', "", "not json"], ids=["truncated", "empty", "text"])
def test_from_pretrained_malformed_json_names_the_path(tmp_path, content):
    path = tmp_path / "scheduler_config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*JSON"):
        fastddim.DDIMScheduler.from_pretrained(tmp_path)


def test_from_pretrained_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        fastddim.DDIMScheduler.from_pretrained(tmp_path)


def test_from_pretrained_without_a_path():
    with pytest.raises(ValueError):
        fastddim.DDIMScheduler.from_pretrained()


def test_save_pretrained_onto_a_file_is_refused(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        fastddim.DDIMScheduler().save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------
# Copies, pickles, reuse, repr


def run_steps(scheduler, num_inference_steps=5, eta=0.0):
    """A few steps on fixed inputs (noise passed explicitly, so copies can be compared bit for bit)."""
    torch.manual_seed(0)
    sample = torch.randn(2, 3, 8, 8)
    outputs = []
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_output = 0.5 * sample + 0.1 * torch.randn(2, 3, 8, 8)
        if isinstance(scheduler, (fastddim.DDIMInverseScheduler, diffusers.DDIMInverseScheduler)):
            sample = scheduler.step(model_output, t, sample).prev_sample
        else:
            noise = torch.randn(2, 3, 8, 8)
            sample = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        outputs.append(sample)
    return torch.stack(outputs)


COPIERS = {
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("cls", [fastddim.DDIMScheduler, fastddim.DDIMInverseScheduler])
@pytest.mark.parametrize("copier", COPIERS.values(), ids=COPIERS.keys())
@pytest.mark.parametrize("after_set_timesteps", [False, True], ids=["fresh", "after-set_timesteps"])
def test_copies_keep_config_and_tables_and_step_identically(cls, copier, after_set_timesteps):
    original = cls(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if after_set_timesteps:
        original.set_timesteps(7)
    duplicate = copier(original)
    assert type(duplicate) is cls
    assert duplicate.config == original.config  # private keys too
    assert isinstance(duplicate.config, FrozenDict)
    with pytest.raises(TypeError):
        del duplicate.config["beta_end"]
    assert torch.equal(duplicate.alphas_cumprod, original.alphas_cumprod)
    assert torch.equal(duplicate.betas, original.betas)
    assert duplicate.num_inference_steps == original.num_inference_steps
    assert torch.equal(duplicate.timesteps, original.timesteps)
    if after_set_timesteps:
        t = int(original.timesteps[2])
        x, m = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        assert torch.equal(duplicate.step(m, t, x).prev_sample, original.step(m, t, x).prev_sample)
    assert torch.equal(run_steps(duplicate, eta=1.0), run_steps(original, eta=1.0))
    # A copy is independent: re-planning it leaves the original's timesteps alone.
    original.set_timesteps(4)
    duplicate.set_timesteps(9)
    assert len(original.timesteps) == 4


def test_config_alone_pickles_and_deep_copies():
    config = fastddim.DDIMScheduler(prediction_type="sample").config
    for copier in COPIERS.values():
        duplicate = copier(config)
        assert type(duplicate) is FrozenDict and duplicate == config
        assert duplicate.prediction_type == "sample"
        with pytest.raises(TypeError):
            duplicate.pop("prediction_type")


@pytest.mark.parametrize("ours_cls, theirs_cls", SCHEDULER_PAIRS)
def test_reusable_across_set_timesteps_calls(ours_cls, theirs_cls):
    # One scheduler re-planned several times steps as a fresh one would, and as diffusers does.
    kwargs = dict(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    reused = ours_cls(**kwargs)
    theirs = theirs_cls(**kwargs)
    for num_inference_steps in (10, 4, 10, 7):
        got = run_steps(reused, num_inference_steps, eta=0.5)
        assert torch.equal(got, run_steps(ours_cls(**kwargs), num_inference_steps, eta=0.5))
        expected = run_steps(theirs, num_inference_steps, eta=0.5)
        assert torch.equal(reused.timesteps, theirs.timesteps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ours_cls, theirs_cls", SCHEDULER_PAIRS)
def test_repr_names_the_class_and_shows_the_config(ours_cls, theirs_cls):
    ours = ours_cls(prediction_type="v_prediction")
    text = repr(ours)
    name, _, body = text.partition(" ")
    assert name == ours_cls.__name__
    shown = json.loads(body)
    theirs_shown = json.loads(repr(theirs_cls(prediction_type="v_prediction")).partition(" ")[2])
    assert public(shown) == public(theirs_shown)
    assert shown["_class_name"] == ours_cls.__name__
