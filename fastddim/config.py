"""Scheduler configuration and outputs: config storage, `from_config`, `save_pretrained`, `from_pretrained`.

Where diffusers is installed, fastddim's schedulers derive from diffusers' own `ConfigMixin` and `SchedulerMixin`
(and its scheduler classes, see fastddim/scheduler.py) and their outputs from its `BaseOutput`, so that every type
check and loader of diffusers accepts them. Without diffusers the same API comes from the self-contained
counterparts below (`_StandaloneConfigMixin`, `_StandaloneSchedulerMixin`, `_StandaloneBaseOutput`), which read
and write the same `scheduler_config.json` files. Either way `SchedulerConfigMixin` adds fastddim's parts: a config
whose values may be set and are then used, clear errors, and hub ids loaded through huggingface_hub.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "scheduler_config.json"
# The diffusers release whose scheduler API and file format fastddim follows: written as `_diffusers_version` by
# fastddim's own config machinery when diffusers is not installed (diffusers writes its installed version).
DIFFUSERS_FORMAT_VERSION = "0.42.1"

try:
    from diffusers.configuration_utils import ConfigMixin as _DiffusersConfigMixin
    from diffusers.configuration_utils import FrozenDict as _DiffusersFrozenDict
    from diffusers.schedulers.scheduling_utils import SchedulerMixin as _DiffusersSchedulerMixin
    from diffusers.utils import BaseOutput as _DiffusersBaseOutput
except ImportError:  # fastddim works without diffusers, with the standalone classes below
    _DiffusersConfigMixin = _DiffusersFrozenDict = _DiffusersSchedulerMixin = _DiffusersBaseOutput = None

DIFFUSERS_AVAILABLE = _DiffusersConfigMixin is not None


def diffusers_bases(module: str, name: str) -> tuple[type, ...]:
    """`(diffusers.schedulers.<module>.<name>,)` where diffusers is installed, else `()`: the extra base classes
    that make fastddim's classes pass diffusers' isinstance checks."""
    if not DIFFUSERS_AVAILABLE:
        return ()
    return (getattr(importlib.import_module(f"diffusers.schedulers.{module}"), name),)


_REMOVAL = "keys of a scheduler config cannot be removed or replaced wholesale"


class FrozenDict(_DiffusersFrozenDict or OrderedDict):
    """A scheduler's config: a mapping whose keys are also attributes, like diffusers' `FrozenDict` (and one,
    where diffusers is installed).

    As in diffusers, a value may be set (`config.prediction_type = "v_prediction"`, `config["clip_sample"] = False`);
    unlike diffusers, where the attribute and the item then disagree, both change together, so the scheduler's next
    step uses the new value and `save_pretrained` writes it. Keys cannot be removed (`del`, `pop`, `clear`, ...):
    build a new scheduler with `from_config(config, **overrides)` instead.
    """

    def __init__(self, *args, **kwargs):
        OrderedDict.__init__(self)
        for key, value in dict(*args, **kwargs).items():
            OrderedDict.__setitem__(self, key, value)
            if isinstance(key, str):
                object.__setattr__(self, key, value)
        # Counts writes, so a scheduler notices that its config changed (see _DDIMBase._step_options).
        object.__setattr__(self, "_writes", 0)

    def __setattr__(self, name, value):
        self.__setitem__(name, value)

    def __setitem__(self, name, value):
        OrderedDict.__setitem__(self, name, value)
        if isinstance(name, str):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_writes", self.__dict__.get("_writes", 0) + 1)

    def __delitem__(self, *args, **kwargs):
        raise TypeError(f"{_REMOVAL}; use from_config(config, **overrides) instead")

    def __delattr__(self, name):
        raise TypeError(f"{_REMOVAL} (tried to delete {name!r})")

    def setdefault(self, *args, **kwargs):
        raise TypeError(f"{_REMOVAL}; set a value with config[key] = value")

    def pop(self, *args, **kwargs):
        raise TypeError(f"{_REMOVAL}; use from_config(config, **overrides) instead")

    def update(self, *args, **kwargs):
        raise TypeError(f"{_REMOVAL}; set values one at a time (config.key = value) or use from_config")

    def clear(self):
        raise TypeError(f"{_REMOVAL}; use from_config(config, **overrides) instead")

    def __ior__(self, other):
        raise TypeError(f"{_REMOVAL}; set values one at a time (config.key = value) or use from_config")

    def popitem(self, *args, **kwargs):
        raise TypeError(f"{_REMOVAL}; use from_config(config, **overrides) instead")

    def __reduce__(self):
        return (self.__class__, (list(self.items()),))


def register_to_config(init):
    """Decorator for `__init__`: records every argument (passed or default) in the config, as diffusers does.

    Keys that took their default are listed under `_use_default_values`, so that `from_config` of another
    scheduler's config does not carry that scheduler's defaults over as if they had been chosen.
    """

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        init_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private_kwargs = {k: v for k, v in kwargs.items() if k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        parameters = {
            name: p.default
            for i, (name, p) in enumerate(inspect.signature(init).parameters.items())
            if i > 0 and name not in ignore and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        if len(args) > len(parameters):
            raise TypeError(f"{type(self).__name__}() takes at most {len(parameters)} positional arguments")
        config = dict(zip(parameters, args))
        config.update({k: init_kwargs.get(k, default) for k, default in parameters.items() if k not in config})
        defaulted = set(config) - set(init_kwargs) - set(list(parameters)[: len(args)])
        if defaulted:
            config["_use_default_values"] = sorted(defaulted)
        self.register_to_config(**{**private_kwargs, **config})
        init(self, *args, **init_kwargs)

    return inner_init


class _StandaloneConfigMixin:
    """diffusers' `ConfigMixin` for processes without diffusers: config storage, `from_config`, `save_config`,
    the same files and the same warnings."""

    config_name = None
    ignore_for_config: list[str] = []
    has_compatibles = False
    _deprecated_kwargs: list[str] = []

    def register_to_config(self, **kwargs):
        kwargs.pop("kwargs", None)
        internal = self.__dict__.get("_internal_dict")
        self._internal_dict = FrozenDict({**internal, **kwargs} if internal is not None else kwargs)

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    def __getattr__(self, name: str) -> Any:
        # As diffusers: a config value read as an attribute works, with a FutureWarning.
        internal = self.__dict__.get("_internal_dict")
        if internal is not None and hasattr(internal, name) and name not in self.__dict__:
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute is "
                f"deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, e.g. "
                f"'scheduler.config.{name}'.", FutureWarning, stacklevel=2,
            )
            return internal[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        init_dict, unused, hidden = cls.extract_init_dict(config, **kwargs)
        for name in cls._deprecated_kwargs:
            if name in unused:
                init_dict[name] = unused.pop(name)
        instance = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        instance.register_to_config(**hidden)
        if return_unused_kwargs:
            return instance, {**unused, **hidden}
        return instance

    @classmethod
    def _init_keys(cls) -> set[str]:
        parameters = inspect.signature(cls.__init__).parameters
        keys = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return keys - {"self"} - set(cls.ignore_for_config)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Split a config into constructor arguments, unused keys and keys kept only for other classes."""
        used_defaults = set(config_dict.get("_use_default_values", ()))
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config_dict)
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}
        init_dict = {}
        for key in cls._init_keys():
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
                config_dict.pop(key, None)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)
        unused = {**config_dict, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    def to_json_string(self) -> str:
        """The config as diffusers writes it: sorted keys, `_class_name` and `_diffusers_version`."""
        config = {k: v for k, v in self.config.items() if k not in ("_use_default_values", "_ignore_files")}
        config["_class_name"] = type(self).__name__
        config["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
        config = {k: _json_value(v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise ValueError("push_to_hub needs diffusers installed: save locally, then upload the directory")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


class _StandaloneSchedulerMixin:
    """diffusers' `SchedulerMixin` for processes without diffusers."""

    config_name = CONFIG_NAME
    _compatibles: list[str] = []
    has_compatibles = True

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)


class _StandaloneBaseOutput(OrderedDict):
    """diffusers' `BaseOutput` for processes without diffusers: a dataclass that is also an ordered mapping of
    its fields that are not None, indexable by name or position, and a torch pytree node."""

    def __init_subclass__(cls) -> None:
        import torch.utils._pytree as pytree

        pytree.register_pytree_node(
            cls, pytree._dict_flatten, lambda values, context: cls(**pytree._dict_unflatten(values, context)),
            serialized_type_name=f"{cls.__module__}.{cls.__name__}",
        )

    def __post_init__(self) -> None:
        class_fields = fields(self)
        first = getattr(self, class_fields[0].name)
        if all(getattr(self, f.name) is None for f in class_fields[1:]) and isinstance(first, dict):
            for key, value in first.items():
                self[key] = value
        else:
            for field in class_fields:
                value = getattr(self, field.name)
                if value is not None:
                    self[field.name] = value

    def __delitem__(self, *args, **kwargs):
        raise Exception(f"You cannot use ``__delitem__`` on a {self.__class__.__name__} instance.")

    def setdefault(self, *args, **kwargs):
        raise Exception(f"You cannot use ``setdefault`` on a {self.__class__.__name__} instance.")

    def pop(self, *args, **kwargs):
        raise Exception(f"You cannot use ``pop`` on a {self.__class__.__name__} instance.")

    def update(self, *args, **kwargs):
        raise Exception(f"You cannot use ``update`` on a {self.__class__.__name__} instance.")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name: Any, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        if not is_dataclass(self):
            return super().__reduce__()
        callable_, _args, *remaining = super().__reduce__()
        return (callable_, tuple(getattr(self, f.name) for f in fields(self)), *remaining)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


if DIFFUSERS_AVAILABLE:
    ConfigMixin, SchedulerMixin, BaseOutput = _DiffusersConfigMixin, _DiffusersSchedulerMixin, _DiffusersBaseOutput
else:
    ConfigMixin, SchedulerMixin, BaseOutput = _StandaloneConfigMixin, _StandaloneSchedulerMixin, _StandaloneBaseOutput


class _ConfigSlot:
    """The `_internal_dict` attribute: whatever mapping is stored (by `register_to_config`, or by pipelines that
    replace a scheduler's `_internal_dict` to fix a config) becomes a `FrozenDict`, whose writes the scheduler
    sees. Kept in the instance `__dict__`, where diffusers' `ConfigMixin.__getattr__` looks for it."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        try:
            return instance.__dict__["_internal_dict"]
        except KeyError:
            raise AttributeError("_internal_dict") from None

    def __set__(self, instance, value):
        if not isinstance(value, FrozenDict):
            value = FrozenDict(value)
        instance.__dict__["_internal_dict"] = value


class SchedulerConfigMixin(SchedulerMixin, ConfigMixin):
    """Configuration and persistence of fastddim's schedulers: diffusers' `SchedulerMixin` and `ConfigMixin` where
    diffusers is installed (its standalone counterparts otherwise), plus a settable config, clear errors for bad
    input, and hub ids through huggingface_hub in `from_pretrained`."""

    config_name = CONFIG_NAME
    ignore_for_config: list[str] = []
    _deprecated_kwargs: list[str] = []
    _compatibles: list[str] = []
    has_compatibles = True
    _internal_dict = _ConfigSlot()

    def register_to_config(self, **kwargs):
        kwargs.pop("kwargs", None)
        internal = self.__dict__.get("_internal_dict")
        self._internal_dict = {**internal, **kwargs} if internal is not None else kwargs

    @property
    def config(self) -> FrozenDict:
        """The configuration: a mapping with attribute access (`scheduler.config.prediction_type`) whose values may
        be set (`scheduler.config.prediction_type = "v_prediction"`); the next step uses them."""
        return self.__dict__["_internal_dict"]

    @property
    def compatibles(self) -> list[type]:
        """Scheduler classes that accept this scheduler's config: fastddim's, and diffusers' if it is loaded."""
        names = set(self._compatibles) | {type(self).__name__}
        found = []
        for module_name in ("fastddim", "diffusers"):
            module = sys.modules.get(module_name)
            if module is None:
                continue
            found += [getattr(module, n) for n in sorted(names) if isinstance(getattr(module, n, None), type)]
        return found

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build a scheduler from a config mapping (its own, or any diffusers scheduler's) plus overrides.

        Args:
            config (`Mapping` or scheduler):
                A config dictionary, e.g. `pipe.scheduler.config` of any diffusers or fastddim scheduler. Keys this
                class does not take are kept in the new config (so a round trip to the other class keeps them)
                but do not reach the constructor.
            return_unused_kwargs (`bool`, defaults to `False`):
                Also return the config keys and overrides that the constructor did not take.
            kwargs:
                Constructor arguments that override the config's values.
        """
        if config is None:
            raise ValueError("from_config needs a config: pass a mapping such as pipe.scheduler.config")
        if not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a scheduler's .config), got {type(config).__name__}")
        return super().from_config(dict(config), return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write `scheduler_config.json` into `save_directory` (created if needed), as diffusers writes it.

        Args:
            save_directory (`str` or `os.PathLike`): the directory.
            push_to_hub (`bool`, defaults to `False`): also upload it (diffusers' `PushToHubMixin`; needs diffusers).
            kwargs: passed on to diffusers' `push_to_hub`.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, but {str(save_directory)!r} is a file")
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs):
        """Read a config dictionary from a local directory or JSON file, or from a hub repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a directory holding `scheduler_config.json`
                (or a pipeline directory, with `subfolder`), the JSON file itself, or a hub repository id such as
                `"org/name"` (downloaded or found in the local hub cache by huggingface_hub).
            return_unused_kwargs (`bool`, defaults to `False`): also return the keyword arguments not used here.
            return_commit_hash (`bool`, defaults to `False`): also return the commit of a hub snapshot (or None).
            kwargs: `subfolder` and the hub options `cache_dir`, `local_files_only`, `revision`, `token`,
                `force_download`, `proxies`, `local_dir`, `user_agent`, as diffusers takes them.
        """
        if pretrained_model_name_or_path is None:
            raise ValueError("pretrained_model_name_or_path is needed: a directory, a JSON file or a hub id")
        subfolder = kwargs.pop("subfolder", None)
        hub_options = {k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs}
        name = str(pretrained_model_name_or_path)
        if os.path.isfile(name):
            path = name
        elif os.path.isdir(name):
            path = os.path.join(name, subfolder or "", cls.config_name)
            if subfolder and not os.path.isfile(path) and os.path.isfile(os.path.join(name, cls.config_name)):
                path = os.path.join(name, cls.config_name)  # as diffusers: a config at the top serves too
            if not os.path.isfile(path):
                raise ValueError(f"no {cls.config_name} at {path!r}")
        else:
            path = _hub_config_file(name, cls.config_name, subfolder, hub_options)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path!r} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path!r} must hold a JSON object, got {type(config).__name__}")
        outputs = (config,)
        if return_unused_kwargs:
            outputs += (kwargs,)
        if return_commit_hash:
            match = re.search(r"snapshots[\\/]([^\\/]+)[\\/]", path)
            outputs += (match.group(1) if match else None,)
        return outputs if len(outputs) > 1 else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load a scheduler saved by fastddim or diffusers, from a local directory or a hub repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A directory holding `scheduler_config.json` (or a pipeline directory with `subfolder="scheduler"`),
                or a hub repository id such as `"org/name"` (through huggingface_hub, as diffusers loads it).
            subfolder (`str`, *optional*):
                The subfolder of the directory or repository that holds the config, e.g. `"scheduler"`.
            return_unused_kwargs (`bool`, defaults to `False`):
                Also return the keys the constructor did not take.
            kwargs:
                Hub options (`cache_dir`, `local_files_only`, `revision`, `token`, `force_download`, `proxies`),
                then constructor arguments overriding the saved ones. Options that diffusers' pipeline loader
                passes to every component (`torch_dtype`, `variant`, ...) are accepted and ignored.
        """
        kwargs = {k: v for k, v in kwargs.items() if k not in _LOADER_OPTIONS}
        config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)


# Download options of from_pretrained / load_config, handed to huggingface_hub.
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "local_dir",
                "user_agent", "mirror", "use_auth_token", "resume_download", "local_dir_use_symlinks")
# Options diffusers' pipeline loader passes to every component's from_pretrained that concern models only.
_LOADER_OPTIONS = frozenset({"output_loading_info", "dduf_entries", "variant", "torch_dtype", "dtype"})


def _hub_config_file(repo_id: str, filename: str, subfolder: str | None, options: dict) -> str:
    """The local path of `filename` of the hub repository `repo_id`, downloaded or found in the hub cache by
    huggingface_hub (honouring `HF_HUB_OFFLINE` and `local_files_only`)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise ValueError(f"{repo_id!r} is neither a local directory nor a file (hub ids need huggingface_hub)") from None
    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise ValueError(f"{repo_id!r} is neither a local directory nor a file, nor a hub repository id") from None
    if options.get("token") is None and options.get("use_auth_token") is not None:
        options["token"] = options["use_auth_token"]
    accepted = inspect.signature(hf_hub_download).parameters
    options = {k: v for k, v in options.items() if k in accepted and v is not None}
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder or None, **options)
    except Exception as error:
        from huggingface_hub.errors import EntryNotFoundError

        if not isinstance(error, (OSError, EntryNotFoundError)):
            raise
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        revision = options.get("revision") or "main"
        raise OSError(f"cannot load {filename} of the hub repository {where!r} (revision {revision!r}"
                      f"{', local files only' if options.get('local_files_only') else ''}): {error}") from error


def _json_value(value: Any):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, numpy scalars
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value
