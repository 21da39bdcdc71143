"""Direct launches of compiled Triton kernels: the JIT's per-call work done once per specialization.

`kernel[grid](*args, **constexprs)` binds every argument, computes the specialization key and looks the compiled
kernel up on every call (15-24 µs of host time on an H100/H200, ../shared/notes/direct-launch.md), where the
kernel itself runs for about 3 µs at latent sizes. `DirectLauncher` takes the `CompiledKernel` that the first
JIT launch of a specialization returns, and later calls with the same specialization go straight to its `run`
(4-5 µs). The specialization is keyed exactly as the JIT keys it (`specialization_key`): per argument the
dtype and 16-byte alignment of a tensor, and for an int whether it equals 1 (then a constexpr), is divisible by
16, and whether it fits int32, int64 or uint64; bools and floats are not specialized; plus the constexprs, the
JIT options (debug, instrumentation mode), the launch options (`LAUNCH_OPTIONS`: no fp contraction) and the current
device. Anything else takes the JIT launch:

- the interpreter (TRITON_INTERPRET=1; it has no compiled kernels), CPU tensors, a triton version whose
  `CompiledKernel.run` signature was not validated (`VALIDATED_TRITON_VERSIONS`), launch hooks (profilers),
  and arguments of a type the key does not cover.

The stream is the current stream at each call. A module is only ever loaded by the JIT launch (never here), so a
direct launch is safe under CUDA-graph capture once the specialization ran eagerly.
"""

from __future__ import annotations

import operator

import torch
import triton
from triton import knobs
from triton.runtime import driver

# Versions on which `CompiledKernel.run(grid_0, grid_1, grid_2, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *args, *constexprs)` was read from the runtime (runtime/jit.py,
# JITFunction.run) and the recipe measured. Triton 3.9.0's JITFunction.run calls the same signature, but its
# keys gained entries (fpsan_homomorphic_casts, custom pipelines) that are not mirrored here: it stays on the JIT.
VALIDATED_TRITON_VERSIONS = ("3.6.0",)

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _int_range(value: int) -> str:
    if INT32_MIN <= value <= INT32_MAX:
        return "i32"
    if INT64_MIN <= value <= INT64_MAX:
        return "i64"
    return "u64"


class Unsupported(TypeError):
    """An argument the key does not cover: the call takes the JIT launch."""


def specialization_key(args, do_not_specialize: tuple[int, ...] | frozenset[int] = ()) -> tuple:
    """What triton's JIT specializes a kernel on, for runtime arguments `args` (in the kernel's parameter order,
    constexprs excluded); `do_not_specialize` holds the positions of parameters declared `do_not_specialize`.

    Mirrors triton 3.6.0's `native_specialize_impl`: a tensor gives (dtype, data_ptr % 16 == 0); an int gives
    ("constexpr", 1) when it equals 1, else its range ("i32", "i64", "u64") and whether it is divisible by 16;
    a do-not-specialize int only its range; bools and floats their type; None stays None. Two argument lists
    with equal keys run the same compiled binary. Raises `Unsupported` for any other argument.
    """
    key = []
    for position, arg in enumerate(args):
        kind = type(arg)
        if kind is torch.Tensor or isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() % 16 == 0))
        elif arg is None:
            key.append(None)
        elif kind is bool:
            key.append("u1")
        elif kind is int:
            if position in do_not_specialize:
                key.append(_int_range(arg))
            elif arg == 1:
                key.append(("constexpr", 1))
            else:
                key.append((_int_range(arg), arg % 16 == 0))
        elif kind is float:
            key.append("fp32")
        else:
            raise Unsupported(f"no direct launch for an argument of type {kind.__name__}")
    return tuple(key)


# What specialization_key gives one do-not-specialize int in int32 range (the timestep): DirectLauncher.launch_key
# returns it without the call.
_INT32_KEY = specialization_key([0], (0,))


def direct_launch_supported(version: str | None = None, interpreted: bool | None = None) -> bool:
    """Whether direct launches may be used at all: a validated triton version, compiled (not interpreted)."""
    version = triton.__version__ if version is None else version
    if interpreted is None:
        from .ddim import INTERPRETED

        interpreted = INTERPRETED
    return version in VALIDATED_TRITON_VERSIONS and not interpreted


class PreparedLaunch:
    """What the launches of one step plan share, prepared once by `DirectLauncher.prepare`.

    Attributes:
        constexprs (`dict`): the constexpr values by name, in the kernel's parameter order.
        constexpr_values (`tuple`): their values, as both launches take them: positionally, after the runtime
            arguments, at the end of a launch's `args` (binding them by keyword costs the JIT launch about 0.4 us
            more).
        launch_options (`dict`): the JIT launch's keyword arguments (compile options such as enable_fp_fusion).
        tensor_count (`int` or None): the number of leading tensor arguments whose dtypes the plan fixes; None when
            nothing but the constexprs is fixed (every call keys all its arguments).
        varying (`tuple`): the positions, after the tensors, of the int arguments that may change between the
            plan's launches (e.g. the timestep); every other argument after the tensors is the plan's constant.
        distinct (`tuple`): the positions of the leading tensors whose alignment a launch reads: all of them, or
            those the caller names, when the others always repeat one of these (placeholders for absent inputs).
        pick_distinct (`Callable`): `args` -> the tensors at `distinct`, as a tuple.
        unspecialized_int (`int` or None): the position of the one varying argument when it is a do-not-specialize
            int (the timestep): its key part is read without `specialization_key`.
        fixed_key (`int` or None): the number of the key's part that is the same for every launch of the plan,
            computed at the first launch (see `DirectLauncher.launch_key`).
    """

    __slots__ = ("constexprs", "constexpr_values", "launch_options", "tensor_count", "varying", "distinct",
                 "pick_distinct", "unspecialized_int", "fixed_key")

    def __init__(self, constexprs: dict, launch_options: dict, tensor_count: int | None, varying: tuple = (),
                 distinct: tuple | None = None, unspecialized_int: int | None = None):
        self.constexprs = dict(constexprs)
        self.constexpr_values = tuple(self.constexprs.values())
        self.launch_options = dict(launch_options)
        self.tensor_count = tensor_count
        self.varying = tuple(varying)
        self.distinct = tuple(range(tensor_count or 0)) if distinct is None else tuple(distinct)
        pick = operator.itemgetter(*self.distinct) if self.distinct else (lambda args: ())
        self.pick_distinct = pick if len(self.distinct) != 1 else (lambda args: (pick(args),))
        self.unspecialized_int = unspecialized_int
        self.fixed_key = None

    def runtime_arguments(self, args) -> tuple:
        """A launch's `args` without the constexpr values they end with."""
        return args[:len(args) - len(self.constexpr_values)]


class DirectLauncher:
    """Launches one `@triton.jit` kernel, directly through its `CompiledKernel` once a specialization has run.

    Args:
        kernel (`triton.JITFunction`): the kernel.
        launch_options (`dict`, *optional*): compile options of every launch (e.g. `{"enable_fp_fusion": False}`):
            passed to the JIT launch, and part of the key.
        enabled (`bool`, *optional*): force direct launches off (False); by default `direct_launch_supported()`.

    Launch with `launcher.launch(kernel, grid, args, prepared)`: `prepared` is the `PreparedLaunch` of
    `prepare(constexprs, tensor_count)`, `args` every argument of the kernel in parameter order: the runtime
    arguments, then `prepared.constexpr_values` (the kernel declares its constexprs last; a caller appends their
    values once per plan, so that a launch passes one tuple on as it is). `kernel` is passed per call so that a
    kernel replaced at run time (e.g. a test's launch recorder) is the one launched; direct launches are only used
    while it is the kernel given here.
    """

    def __init__(self, kernel, launch_options: dict | None = None, enabled: bool | None = None):
        self.kernel = kernel
        self.launch_options = dict(launch_options or {})
        self.launch_options_key = tuple(self.launch_options.items())
        self.enabled = direct_launch_supported() if enabled is None else enabled
        self.compiled: dict = {}
        self.fixed_keys: dict = {}  # the fixed parts of prepared launches' keys, numbered
        parameters = list(getattr(kernel, "params", ()))  # an interpreted kernel has none: it is never run here
        runtime_parameters = [p for p in parameters if not p.is_constexpr]
        # CompiledKernel.run takes every argument in declaration order, and a direct launch passes the constexprs
        # after the runtime arguments: right only for a kernel that declares them last.
        if any(p.is_constexpr for p in parameters[:len(runtime_parameters)]):
            raise ValueError(f"{getattr(kernel, '__name__', kernel)} declares a constexpr before a runtime "
                             "parameter: a DirectLauncher needs its constexprs declared last")
        self.do_not_specialize = tuple(i for i, p in enumerate(runtime_parameters) if p.do_not_specialize)

    def prepare(self, constexprs: dict, tensor_count: int | None = None, varying: tuple = (),
                distinct: tuple | None = None) -> PreparedLaunch:
        """The `PreparedLaunch` of launches with these constexprs, ordered as the kernel declares them. A caller
        whose launches share everything but their pointers and a few ints (a step plan: dtypes, shapes, strides
        and options fixed) passes `tensor_count`, the number of leading tensor arguments, and `varying`, the
        positions of the ints that change: see `launch_key`. `distinct`: the positions of the leading tensors
        that may differ from one another; every other leading tensor must be one of these in every launch (the
        same object), so that their alignment stands for all (default: all positions)."""
        # Both launches pass the constexprs positionally after the runtime arguments: in declaration order, and
        # they must be the kernel's last parameters (an interpreted kernel names its parameters, not which are
        # constexprs).
        declared = [p.name for p in getattr(self.kernel, "params", ()) if p.is_constexpr]
        names = list(getattr(self.kernel, "arg_names", ()))
        trailing = names[len(names) - len(constexprs):] if constexprs else []
        if declared and sorted(declared) != sorted(constexprs) or names and sorted(trailing) != sorted(constexprs):
            raise ValueError(f"constexprs {sorted(constexprs)} are not the kernel's last parameters "
                             f"{declared or trailing}")
        if names:
            constexprs = {name: constexprs[name] for name in trailing}
        if distinct is not None and (tensor_count is None or not distinct
                                     or not set(distinct) <= set(range(tensor_count))):
            raise ValueError(f"distinct must name some of the {tensor_count} leading tensors' positions, got "
                             f"{distinct}")
        unspecialized_int = varying[0] if len(varying) == 1 and varying[0] in self.do_not_specialize else None
        return PreparedLaunch(constexprs, self.launch_options, tensor_count, varying, distinct, unspecialized_int)

    def launch_key(self, args, prepared: PreparedLaunch) -> tuple:
        """The key of a launch (without the device and the JIT's settings): equal keys run the same binary.

        Without a `tensor_count` it is the whole specialization of `args`, computed argument by argument (about
        12 µs of Python for the step kernel's 44 arguments). With one, the launches of `prepared` must keep the
        dtypes of their leading `tensor_count` tensors and every argument after them but those at
        `prepared.varying` (a step plan fixes them: its key holds every input's dtype and property, and the
        outputs and scratch tensors it allocates have fixed dtypes); that fixed part (constexprs, launch options,
        the dtypes, the specialization of the constant arguments) is computed once, numbered, and kept in
        `prepared.fixed_key`, and each call adds only the tensors' 16-byte alignment (one OR of the addresses of
        the tensors at `prepared.distinct` when all are aligned, the common case; the others repeat them) and the
        specialization of the varying ints. `args` end with the constexpr values, which the key holds by name."""
        tensor_count = prepared.tensor_count
        if tensor_count is None:
            return (tuple(prepared.constexprs.items()), self.launch_options_key,
                    specialization_key(prepared.runtime_arguments(args), self.do_not_specialize))
        fixed = prepared.fixed_key
        if fixed is None:
            runtime_arguments = prepared.runtime_arguments(args)
            if tuple(args[len(runtime_arguments):]) != prepared.constexpr_values:
                raise ValueError("a launch's arguments must end with its prepared constexpr values")
            constants = [None if position in prepared.varying else arg
                         for position, arg in enumerate(runtime_arguments) if position >= tensor_count]
            constant_positions = [p for p in self.do_not_specialize if p >= tensor_count]
            whole = (tuple(prepared.constexprs.items()), self.launch_options_key,
                     tuple(arg.dtype for arg in args[:tensor_count]),
                     specialization_key(constants, [p - tensor_count for p in constant_positions]))
            fixed = prepared.fixed_key = self.fixed_keys.setdefault(whole, len(self.fixed_keys))
        addresses = 0
        for tensor in prepared.pick_distinct(args):
            addresses |= tensor.data_ptr()
        if addresses % 16 == 0:
            alignment = True
        else:
            alignment = tuple([tensor.data_ptr() % 16 == 0 for tensor in args[:tensor_count]])
        if not prepared.varying:
            return (fixed, alignment)
        position = prepared.unspecialized_int
        if position is not None:  # the timestep: the JIT keys a do-not-specialize int on its range alone
            value = args[position]
            if type(value) is int and INT32_MIN <= value <= INT32_MAX:
                return (fixed, alignment, _INT32_KEY)
        return (fixed, alignment, specialization_key([args[i] for i in prepared.varying],
                                                     [j for j, i in enumerate(prepared.varying)
                                                      if i in self.do_not_specialize]))

    def launch(self, kernel, grid, args, prepared: PreparedLaunch):
        """`kernel[grid](*args, **launch options)`, directly where this specialization already ran (see the
        class); `args` end with `prepared.constexpr_values`."""
        key = None  # stays None where only the JIT launch may be used
        if (self.enabled and kernel is self.kernel and args[0].is_cuda
                and not (knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls)):
            try:
                device = driver.active.get_current_device()
                key = (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode,
                       self.launch_key(args, prepared))
            except Unsupported:
                key = None
            entry = self.compiled.get(key) if key is not None else None
            if entry is not None:
                run, function, packed_metadata = entry
                stream = driver.active.get_current_stream(device)  # the current stream now, as the JIT takes it
                grid_1 = grid[1] if len(grid) > 1 else 1
                grid_2 = grid[2] if len(grid) > 2 else 1
                run(grid[0], grid_1, grid_2, stream, function, packed_metadata, None, None, None, *args)
                return None
        compiled = kernel[grid](*args, **prepared.launch_options)
        # Only a kernel the JIT launch has loaded (function set) is kept: a direct launch never loads one.
        if key is not None and getattr(compiled, "function", None) is not None:
            self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata)
        return compiled
