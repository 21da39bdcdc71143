"""Scheduler configuration: storage, `from_config`, `save_pretrained`, `from_pretrained`.

A self-contained reimplementation of the parts of diffusers' `ConfigMixin` and `SchedulerMixin` that schedulers
use, reading and writing the same `scheduler_config.json` files, so fastddim needs no diffusers at run time while
diffusers pipelines can hold, save and load fastddim schedulers (see `register_with_diffusers`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "scheduler_config.json"


class FrozenDict(OrderedDict):
    """A read-only mapping whose keys are also attributes, like diffusers' `FrozenDict`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        self.__frozen = True

    def __delitem__(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def setdefault(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def pop(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def update(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def clear(self):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def popitem(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only; use from_config(config, **overrides) instead")

    def __delattr__(self, name):
        raise TypeError(f"a scheduler config is read-only (tried to delete {name!r})")

    def __setattr__(self, name, value):
        if getattr(self, "_FrozenDict__frozen", False):
            raise TypeError(f"a scheduler config is read-only (tried to set {name!r})")
        super().__setattr__(name, value)

    def __setitem__(self, name, value):
        if getattr(self, "_FrozenDict__frozen", False):
            raise TypeError(f"a scheduler config is read-only (tried to set {name!r})")
        super().__setitem__(name, value)

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


class SchedulerMixin:
    """Configuration and persistence shared by fastddim's schedulers (diffusers' ConfigMixin + SchedulerMixin).

    The name matters: diffusers' pipeline loader recognises a component class by a base class of this name in
    the component's library, which lets `DiffusionPipeline.from_pretrained` load fastddim schedulers.
    """

    config_name = CONFIG_NAME
    ignore_for_config: list[str] = []
    _deprecated_kwargs: list[str] = []
    _compatibles: list[str] = []
    has_compatibles = True

    def register_to_config(self, **kwargs):
        register_with_diffusers()
        internal = getattr(self, "_internal_dict", None)
        merged = dict(internal) if internal is not None else {}
        merged.update(kwargs)
        self._internal_dict = FrozenDict(merged)

    @property
    def config(self) -> FrozenDict:
        """The configuration, a read-only mapping with attribute access (`scheduler.config.prediction_type`)."""
        return self._internal_dict

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
        if not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        if not hasattr(config, "items"):
            raise TypeError(f"config must be a mapping (a scheduler's .config), got {type(config).__name__}")
        init_dict, unused, hidden = cls.extract_init_dict(config, **kwargs)
        for name in cls._deprecated_kwargs:
            if name in unused:
                init_dict[name] = unused.pop(name)
        scheduler = cls(**init_dict)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden)
        if return_unused_kwargs:
            return scheduler, {**unused, **hidden}
        return scheduler

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
        """The config as diffusers writes it: sorted keys, `_class_name` and the writing library's version."""
        from fastddim import __version__

        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        config["_class_name"] = type(self).__name__
        config["_fastddim_version"] = __version__
        config = {k: _json_value(v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write `scheduler_config.json` into `save_directory` (created if needed)."""
        if push_to_hub:
            raise ValueError("push_to_hub is not supported by fastddim: save locally, then upload the directory")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, but {save_directory!r} is a file")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Save the scheduler config so that `from_pretrained` (fastddim's or diffusers') can load it."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None, return_unused_kwargs=False,
                    **kwargs):
        """Read a config dictionary from a local directory (optionally its `subfolder`) or a JSON file."""
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        if path.is_dir():
            path = path / cls.config_name
        if not path.is_file():
            raise ValueError(
                f"no {cls.config_name} at {str(path)!r}: fastddim loads local directories only (download a hub "
                "repository first, e.g. with huggingface_hub.snapshot_download, and pass its path)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load a scheduler saved by fastddim or diffusers from a local directory.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A directory holding `scheduler_config.json` (or a pipeline directory with `subfolder="scheduler"`).
            subfolder (`str`, *optional*):
                The subfolder of the directory that holds the config, e.g. `"scheduler"`.
            return_unused_kwargs (`bool`, defaults to `False`):
                Also return the keys the constructor did not take.
            kwargs:
                Constructor arguments overriding the saved ones. Hub download options that diffusers' pipeline
                loader passes along (`cache_dir`, `local_files_only`, ...) are accepted and ignored.
        """
        if pretrained_model_name_or_path is None:
            raise ValueError("from_pretrained needs a directory path")
        kwargs = {k: v for k, v in kwargs.items() if k not in _LOADER_OPTIONS}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


# Options diffusers' pipeline loader passes to every component's from_pretrained; they concern downloads.
_LOADER_OPTIONS = frozenset({
    "cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "output_loading_info",
    "use_auth_token", "resume_download", "user_agent", "dduf_entries", "mirror", "variant", "torch_dtype", "dtype",
})


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


_registered_with_diffusers = False
_LOADING_MODULE = "diffusers.pipelines.pipeline_loading_utils"


class _RegisterWhenDiffusersLoads(importlib.abc.MetaPathFinder):
    """Runs `register_with_diffusers` right after diffusers' pipeline loader module is imported, for processes
    that import fastddim (and build schedulers) before diffusers. Finds nothing itself: it wraps the real
    loader of that one module, then removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _LOADING_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                real_exec = spec.loader.exec_module

                def exec_module(module, real_exec=real_exec):
                    real_exec(module)
                    _remove_import_hook()
                    register_with_diffusers()

                spec.loader.exec_module = exec_module
                return spec
        return None


def _remove_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWhenDiffusersLoads)]


def install_import_hook() -> None:
    """Register with diffusers now if its pipeline loader is loaded, else as soon as it is."""
    if _LOADING_MODULE in sys.modules:
        register_with_diffusers()
    elif not any(isinstance(f, _RegisterWhenDiffusersLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenDiffusersLoads())


def register_with_diffusers() -> None:
    """Let diffusers' pipelines save and load fastddim schedulers (a no-op until diffusers is imported).

    diffusers saves a pipeline component only if its class derives from a base class listed for some library in
    its `LOADABLE_CLASSES`; listing fastddim's `SchedulerMixin` there, the way diffusers lists transformers' and
    onnxruntime's base classes, makes `pipe.save_pretrained` write the scheduler and record it in
    `model_index.json` as `["fastddim", "DDIMScheduler"]`. Runs when fastddim is imported and whenever a
    scheduler is built (and `install_import_hook` runs it when diffusers' pipeline loader is imported later), so
    it takes effect whichever of the two libraries is imported first.
    """
    global _registered_with_diffusers
    if _registered_with_diffusers or _LOADING_MODULE not in sys.modules and "diffusers" not in sys.modules:
        return
    try:
        loading = sys.modules.get(_LOADING_MODULE) or importlib.import_module(_LOADING_MODULE)
        loadable, importable = loading.LOADABLE_CLASSES, loading.ALL_IMPORTABLE_CLASSES
    except Exception:  # a partially imported or unusual diffusers: leave it alone
        return
    entry = {"SchedulerMixin": ["save_pretrained", "from_pretrained"]}
    loadable.setdefault("fastddim", entry)
    importable.update(entry)
    _registered_with_diffusers = True
