"""Step microbenchmarks: fastddim's `DDIMScheduler.step` against diffusers', side by side in one run.

Used by `bench/run.py`, `bench/test_bench_step.py` and `fastddim bench`:

    from fastddim import benchmark
    results = benchmark.run(device="cpu")          # a JSON-ready dict
    print(benchmark.format_table(results))         # the same as a markdown table

How cases are set up and timed: `METHOD` below.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import fastddim
from fastddim import ops

NUM_INFERENCE_STEPS = 50
TIMESTEP_INDEX = 10  # timesteps[10] = 780 for 50 "leading" steps of 1000
THRESHOLD_MAX_VALUE = 1.5  # sample_max_value of thresholded cases: above diffusers' default 1.0, so the quantile matters
ACCEPTANCE_SPEEDUP = 2.0  # fastddim's CPU step must be this many times faster than diffusers' at ACCEPTANCE_CASE
FLOOR = "add floor"
COMPILED = "diffusers compiled"
GRAPH_LOOP_STEPS = 50
METHOD = """\
Both schedulers get the same configuration (diffusers' defaults, plus the case's prediction type or
thresholding), `set_timesteps(50)`, the timestep `timesteps[10]` (780) as a Python int (in "t=tensor" cases
as the 0-d tensor itself, as pipelines pass it), the same inputs, and for eta > 0 the same `variance_noise`.
Before anything is timed, each contender's outputs are checked against a float64 truth (diffusers' step on the
inputs upcast to float64): a wrong contender fails the run, it is not timed.

CPU: one torch thread (restored afterwards), fastddim's torch path (FASTDDIM_BACKEND=torch for the run), and
`time.perf_counter` around batches of back-to-back calls; the contenders' batches are interleaved, in
alternating order, round after round, and each contender's median and minimum per-call time are reported.
CUDA: `triton.testing.do_bench` (GPU time per call, L2 cleared before each call), and host time per call from
`time.perf_counter` around rounds of back-to-back calls that do not wait for the GPU. "add floor" is
`torch.add(a, b, out=c)` on tensors of the case's shape: a pass that reads two tensors and writes one, about the
least any step can move (the fused step reads two tensors and writes one or two).
"""

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Bounds on ||output - truth|| / ||truth|| that a correct step meets with room to spare: float32 math rounds
# at about 6e-8; diffusers rounds every half-precision intermediate (2-4e-3 absolute at fp16, 1.6e-2 at bf16).
RELATIVE_ERROR_BOUNDS = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-6, torch.float64: 1e-10}


@dataclass(frozen=True)
class Case:
    """One benchmarked step: input shape and dtype, eta (noise passed as variance_noise when > 0), prediction type,
    whether the scheduler thresholds (dynamic thresholding, sample_max_value=THRESHOLD_MAX_VALUE), and whether
    the timestep is passed as the 0-d tensor `scheduler.timesteps[i]` (as diffusers' pipelines pass it) rather
    than as a Python int."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    eta: float = 0.0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    tensor_timestep: bool = False

    @property
    def name(self) -> str:
        words = ["thresholded" if self.thresholding else "step"]
        if self.prediction_type != "epsilon":
            words.append(self.prediction_type)
        if self.eta:
            words.append(f"eta={self.eta:g}")
        if self.tensor_timestep:
            words.append("t=tensor")
        words += ["x".join(map(str, self.shape)), DTYPE_NAMES[self.dtype]]
        return " ".join(words)

    def __str__(self) -> str:
        return self.name

    def scheduler_config(self) -> dict:
        """Constructor arguments, the same for fastddim's and diffusers' DDIMScheduler (defaults otherwise)."""
        config = {"prediction_type": self.prediction_type}
        if self.thresholding:
            config.update(thresholding=True, sample_max_value=THRESHOLD_MAX_VALUE)
        return config


ACCEPTANCE_CASE = Case((1, 4, 128, 128))
CPU_CASES = (
    ACCEPTANCE_CASE,
    Case((1, 4, 64, 64)),
    Case((2, 4, 128, 128)),
    Case((1, 4, 128, 128), eta=1.0),
    Case((1, 4, 128, 128), tensor_timestep=True),
    Case((1, 4, 128, 128), prediction_type="sample"),
    Case((1, 4, 128, 128), prediction_type="v_prediction"),
    Case((1, 3, 256, 256), thresholding=True),
)
# The sizes of /work/shared/notes/gpu-anchors.md (latents of common pipelines, pixel-space batches).
GPU_SHAPES = (
    ((1, 4, 64, 64), torch.float16),
    ((8, 4, 64, 64), torch.float16),
    ((2, 4, 128, 128), torch.float16),
    ((1, 4, 16, 96, 96), torch.bfloat16),
    ((16, 3, 256, 256), torch.float32),
    ((64, 4, 256, 256), torch.float32),
    ((4, 3, 1024, 1024), torch.float32),
)
GPU_CASES = (
    tuple(Case(shape, dtype) for shape, dtype in GPU_SHAPES)
    + (
        Case((2, 4, 128, 128), torch.float16, eta=1.0),
        Case((2, 4, 128, 128), torch.float16, prediction_type="sample"),
        Case((2, 4, 128, 128), torch.float16, prediction_type="v_prediction"),
    )
    + tuple(Case(shape, dtype, thresholding=True) for shape, dtype in GPU_SHAPES)
)
QUICK_CASES = {"cpu": (ACCEPTANCE_CASE,), "cuda": (Case(*GPU_SHAPES[0]), Case(*GPU_SHAPES[-1]))}


def _diffusers():
    """diffusers' module, or None where it is not installed (then fastddim is timed alone)."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


@contextlib.contextmanager
def forced_backend(backend: str | None):
    """Set FASTDDIM_BACKEND for the duration (None leaves it as it is), restoring it afterwards."""
    if backend is None:
        yield
        return
    saved = os.environ.get("FASTDDIM_BACKEND")
    os.environ["FASTDDIM_BACKEND"] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FASTDDIM_BACKEND"]
        else:
            os.environ["FASTDDIM_BACKEND"] = saved


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch.set_num_threads(threads) for the duration (None leaves it), restoring the previous count."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """||actual - truth|| / ||truth|| in float64 (NaN if either holds a NaN)."""
    a, t = actual.to(torch.float64), truth.to(torch.float64)
    return float(torch.linalg.vector_norm(a - t) / torch.linalg.vector_norm(t))


class StepOutputs(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None


@dataclass
class Prepared:
    """A case ready to time: zero-argument calls per contender, checked against the truth."""

    case: Case
    steps: dict[str, Callable[[], object]]
    errors: dict[str, dict[str, float]]  # contender -> output name -> relative error against the truth
    truth: str  # what the outputs were checked against


def prepare(case: Case, device="cpu", floor: bool = False, seed: int = 0, compiled: bool = False) -> Prepared:
    """Schedulers, inputs and step calls for `case` on `device` (with `compiled`, also diffusers' step under
    torch.compile); raises AssertionError if a contender's
    prev_sample or pred_original_sample is off the float64 truth by more than RELATIVE_ERROR_BOUNDS."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)

    def normal() -> torch.Tensor:
        return torch.randn(case.shape, generator=generator, device=device).to(case.dtype)

    model_output, sample = normal(), normal()
    noise = normal() if case.eta > 0 else None
    diffusers = _diffusers()
    config = case.scheduler_config()
    schedulers = {"fastddim": fastddim.DDIMScheduler(**config)}
    if diffusers is not None:
        schedulers["diffusers"] = diffusers.DDIMScheduler(**config)
    for scheduler in schedulers.values():
        scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    timestep = schedulers["fastddim"].timesteps[TIMESTEP_INDEX]
    if not case.tensor_timestep:
        timestep = int(timestep)
    steps = {
        name: functools.partial(scheduler.step, model_output, timestep, sample, eta=case.eta, variance_noise=noise)
        for name, scheduler in schedulers.items()
    }
    if compiled and diffusers is not None:
        # diffusers' step as torch.compile makes it (its default mode), the first call compiling it.
        compiled_step = torch.compile(functools.partial(schedulers["diffusers"].step, model_output, timestep, sample,
                                                        eta=case.eta, variance_noise=noise, return_dict=False))
        steps[COMPILED] = lambda: StepOutputs(*compiled_step())

    # The truth: diffusers' step (else fastddim's) on the inputs upcast to float64, so every operation is float64.
    truth_scheduler = (diffusers or fastddim).DDIMScheduler(**config)
    truth_scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    wide = [t.to(torch.float64) if t is not None else None for t in (model_output, sample, noise)]
    with forced_backend("torch"):
        expected = truth_scheduler.step(wide[0], timestep, wide[1], eta=case.eta, variance_noise=wide[2])
    truth = ("diffusers" if diffusers is not None else "fastddim") + " in float64"
    bound = RELATIVE_ERROR_BOUNDS[case.dtype]
    errors = {}
    for name, step in steps.items():
        output = step()
        errors[name] = {
            key: relative_error(getattr(output, key), getattr(expected, key))
            for key in ("prev_sample", "pred_original_sample")
        }
        for key, error in errors[name].items():
            assert error <= bound, (
                f"{name} is wrong at {case.name}: {key} is off {truth} by {error:.3g} (relative; bound {bound:g})"
            )
    if floor:
        out = torch.empty_like(sample)
        steps[FLOOR] = functools.partial(torch.add, model_output, sample, out=out)
    return Prepared(case, steps, errors, truth)


def time_graph_loop(case: Case, device, steps: int = GRAPH_LOOP_STEPS, replays: int = 20) -> dict:
    """GPU time per step inside one CUDA graph of a whole `steps`-step fastddim loop (`fastddim.graphs.GraphedLoop`,
    the model replaced by a static tensor, eta > 0 with a PhiloxGenerator), median over `replays` replays timed
    with CUDA events; {"error": text} where capture fails (a result, not a crash: the rest of the run goes on)."""
    device = torch.device(device)
    from fastddim.graphs import GraphedLoop

    generator = torch.Generator(device).manual_seed(1)
    model_output = torch.randn(case.shape, generator=generator, device=device).to(case.dtype)
    sample = torch.randn(case.shape, generator=generator, device=device).to(case.dtype)
    scheduler = fastddim.DDIMScheduler(**case.scheduler_config())
    scheduler.set_timesteps(steps, device=device)
    noise = fastddim.PhiloxGenerator(0, device=device) if case.eta > 0 else None
    try:
        loop = GraphedLoop(lambda x, t: model_output, scheduler, sample, eta=case.eta, generator=noise)
        times = []
        for _ in range(replays + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loop(sample)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / steps)
    except Exception as error:  # noqa: BLE001 - reported in the results
        return {"error": f"{type(error).__name__}: {error}"}
    times = times[2:]
    return {"median_us": statistics.median(times), "min_us": min(times), "steps": steps}


def _calls_per_round(fn: Callable[[], object], round_seconds: float, sync: Callable[[], None]) -> int:
    """How many back-to-back calls of `fn` take about `round_seconds` (at least 1)."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return max(1, int(round_seconds / max(statistics.median(times), 1e-9)))


def time_host(steps: dict[str, Callable[[], object]], rounds: int = 40, round_seconds: float = 2e-3,
              warmup_seconds: float = 0.1, sync: Callable[[], None] = lambda: None,
              max_calls: int | None = None) -> dict[str, dict[str, float]]:
    """Per-call host time of each contender in microseconds ({"median_us", "min_us"} over rounds).

    Each round times a batch of back-to-back calls per contender with time.perf_counter; the contenders'
    batches are interleaved, in alternating order, so drifts of the machine reach all of them alike. `sync`
    runs after each batch, outside the timed region (torch.cuda.synchronize on a GPU: then the time is what
    the host spends issuing the calls, as long as `max_calls` keeps the launch queue from filling up).
    """
    for fn in steps.values():
        deadline = time.perf_counter() + warmup_seconds
        calls = 0
        while calls < 3 or time.perf_counter() < deadline:
            fn()
            calls += 1
        sync()
    counts = {name: _calls_per_round(fn, round_seconds, sync) for name, fn in steps.items()}
    if max_calls is not None:
        counts = {name: min(count, max_calls) for name, count in counts.items()}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one batch would land on one contender only
    try:
        for round_index in range(rounds):
            for name in order if round_index % 2 == 0 else reversed(order):
                fn, calls = steps[name], counts[name]
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                elapsed = time.perf_counter() - start
                sync()
                samples[name].append(elapsed / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_us": statistics.median(s) * 1e6, "min_us": min(s) * 1e6} for name, s in samples.items()}


def time_gpu(steps: dict[str, Callable[[], object]], quick: bool = False) -> dict[str, dict[str, float]]:
    """GPU time per call in microseconds from triton.testing.do_bench (L2 cleared before each call)."""
    import triton.testing

    timings = {}
    for name, fn in steps.items():
        times_ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                           return_mode="all")
        timings[name] = {"median_us": statistics.median(times_ms) * 1e3, "min_us": min(times_ms) * 1e3}
    return timings


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict:
    """The machine in words, and a short name for result files (e.g. cpu-2core-x86_64, gpu-NVIDIA-H100...)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "short": "gpu-" + "-".join(name.split()),
                "host_cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    cores = os.cpu_count()
    return {"type": "cpu", "name": _cpu_name(), "cpu_count": cores,
            "short": f"cpu-{cores}core-{platform.machine()}"}


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "fastddim": fastddim.__version__}
    for module in ("triton", "diffusers"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def run(device=None, quick: bool = False, cases=None, threads: int | None = 1, rounds: int | None = None,
        progress: Callable[[str], None] | None = None, host: bool = True) -> dict:
    """Time fastddim's step against diffusers' (when installed) on `device` (default: CUDA if available, else
    CPU); returns a JSON-ready dict (see module docstring for the method).

    Args:
        device: "cpu", "cuda" or a torch.device.
        quick: fewer cases and repeats (a few seconds).
        cases: the `Case`s to time (default CPU_CASES or GPU_CASES, QUICK_CASES with `quick`).
        threads: torch threads on CPU (default 1; None keeps the current count). Restored afterwards.
        rounds: interleaved timing rounds (default 40, 5 with `quick`).
        progress: called with a line of text per case done (e.g. `print`).
        host: also time the host overhead per step at latent sizes (`run_host`), under "host_overhead".
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if cases is None:
        cases = QUICK_CASES[device.type] if quick else (GPU_CASES if on_gpu else CPU_CASES)
    rounds = rounds or (5 if quick else 40)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    # fastddim's CPU contender is its torch path even where TRITON_INTERPRET=1 routes CPU tensors to the
    # (slow, test-only) interpreted kernels; on CUDA the backend is the normal choice (Triton).
    backend_override = None if on_gpu else "torch"
    with forced_backend(backend_override), torch_threads(None if on_gpu else threads):
        backend = ops.select_backend(device)
        load_before = _load_average()
        results = {
            "device": describe_device(device),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend,
            "settings": {
                "scheduler": "DDIMScheduler() defaults (linear betas, clip_sample=True) plus the case's options; "
                             f"thresholded cases: thresholding=True, sample_max_value={THRESHOLD_MAX_VALUE}",
                "num_inference_steps": NUM_INFERENCE_STEPS,
                "timestep_index": TIMESTEP_INDEX,
                "rounds": rounds,
                "quick": quick,
            },
            "method": " ".join(METHOD.split()),
            "cases": [],
        }
        for case in cases:
            prepared = prepare(case, device, floor=True, compiled=on_gpu)
            host = time_host(prepared.steps, rounds=rounds, round_seconds=1e-3 if quick else 2e-3,
                             warmup_seconds=0.02 if quick else 0.1, sync=sync, max_calls=50 if on_gpu else None)
            if on_gpu:
                timings = time_gpu(prepared.steps, quick=quick)
                for name, host_timing in host.items():
                    timings[name].update(host_median_us=host_timing["median_us"], host_min_us=host_timing["min_us"])
            else:
                timings = host
            entry = {
                "name": case.name, "shape": list(case.shape), "dtype": str(case.dtype).removeprefix("torch."),
                "eta": case.eta, "prediction_type": case.prediction_type, "thresholding": case.thresholding,
                "tensor_timestep": case.tensor_timestep,
                "checked_against": prepared.truth, "relative_error": prepared.errors, "timings": timings,
                "speedup": _ratio(timings, "median_us"),
            }
            if on_gpu:
                entry["host_speedup"] = _ratio(timings, "host_median_us")
                entry["graph_loop"] = time_graph_loop(case, device)
            results["cases"].append(entry)
            if progress is not None:
                progress(format_case(entry, on_gpu))
    if host:
        results["host_overhead"] = run_host(device, quick=quick, rounds=rounds, progress=progress)
    # Other processes on the machine slow single-threaded timings down: the 1-minute load before and after.
    results["load_average"] = [load_before, _load_average()]
    if not on_gpu:
        measured = next((c for c in results["cases"] if c["name"] == ACCEPTANCE_CASE.name), None)
        if measured is not None and measured["speedup"] is not None:
            results["acceptance"] = {"case": ACCEPTANCE_CASE.name, "target_speedup": ACCEPTANCE_SPEEDUP,
                                     "speedup": measured["speedup"], "met": measured["speedup"] >= ACCEPTANCE_SPEEDUP}
    return results


# ------------------------------------------------------------------------------------------------------------
# Host overhead per step at latent sizes
# ------------------------------------------------------------------------------------------------------------

HOST_SHAPE = (1, 4, 8, 8)
HOST_METHOD = """\
Host time per step call at 1x4x8x8 float32, where a GPU step moves so few bytes that its cost is what the host
spends. CPU: fastddim's Triton backend with every Triton launch replaced by a no-op that runs no Python of its own
("launch stubbed": a C function that ignores its arguments; what remains is the Python that runs before the
kernel, which is what a GPU step costs on the host besides the launch itself), its torch path, and diffusers'
eager step, each with real tensors on the CPU. CUDA: wall time per call over back-to-back
calls (perf_counter around batches, the GPU synchronised between batches only). Default DDIMScheduler config,
set_timesteps(50), timestep timesteps[10]; eta=1 cases draw noise from a generator (diffusers and fastddim's torch
path: torch.Generator; fastddim's Triton backend: PhiloxGenerator, drawn in the kernel); guided: classifier-free
guidance at scale 7.5 (fastddim fuses it into the step, diffusers' pipelines compute it before the step: timed as
the same formula plus the step);
pipeline call: the step as diffusers' pipelines call it, in a loop under torch.no_grad() with the 0-d tensor
timestep, eta and generator as keywords and return_dict=False.
"""


@dataclass(frozen=True)
class HostCase:
    """One host-overhead case: noise from a generator (eta > 0), a 0-d tensor timestep, thresholding, guidance,
    or called as pipelines call it (`pipeline_call`: timed under torch.no_grad(), with return_dict=False)."""

    name: str
    eta: float = 0.0
    tensor_timestep: bool = False
    thresholding: bool = False
    guided: bool = False
    pipeline_call: bool = False


HOST_CASES = (
    HostCase("step"),
    HostCase("step t=tensor", tensor_timestep=True),
    HostCase("step eta=1 generator", eta=1.0),
    HostCase("thresholded", thresholding=True),
    HostCase("guided", guided=True),
    HostCase("pipeline call", tensor_timestep=True, pipeline_call=True),
)


# What a stubbed kernel's `kernel[grid]` gives: a C function that takes any arguments and does nothing (`format` of
# an empty string ignores them), so that the stub adds no Python of its own. A Python no-op function would add about
# 0.35 us per launch on the 2-CPU development machine (its frame packs the 44 arguments into a new tuple and the
# options into a new dict): work of the launch being stubbed (triton's launch begins with Python frames of its own,
# as does CompiledKernel.run), not of the host code before it.
_NO_LAUNCH = "".format


def _no_launch_kernel() -> collections.defaultdict:
    """Stands in for a Triton kernel: `kernel[grid](*args, **options)` is a dict lookup and a C call that does
    nothing."""
    return collections.defaultdict(lambda: _NO_LAUNCH)


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel of fastddim.kernels replaced by a no-op and CPU tensors routed to the Triton backend,
    for the duration: what remains of a step is its host-side Python."""
    from fastddim import kernels
    from fastddim.kernels import ddim, threshold

    saved = []
    for module in (ddim, threshold):
        for name, value in vars(module).copy().items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                saved.append((module, name, value))
                setattr(module, name, _no_launch_kernel())
    saved_interpreting = ops.triton_interpreting
    ops.triton_interpreting = lambda: True
    ops.PLANS.clear()
    try:
        with forced_backend("triton"):
            yield kernels
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        ops.triton_interpreting = saved_interpreting
        ops.PLANS.clear()


def host_steps(case: HostCase, device, seed: int = 0, philox: bool = True) -> dict[str, Callable[[], object]]:
    """`{"fastddim": step, "diffusers": step}` (diffusers where installed) for `case` on `device`; fastddim's noise
    comes from a PhiloxGenerator (`philox`, drawn in the kernel) or, as diffusers', from a torch.Generator."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    model_output, sample, uncond = (torch.randn(HOST_SHAPE, generator=generator, device=device) for _ in range(3))
    config = {"thresholding": True, "sample_max_value": THRESHOLD_MAX_VALUE} if case.thresholding else {}
    schedulers = {"fastddim": fastddim.DDIMScheduler(**config)}
    diffusers = _diffusers()
    if diffusers is not None:
        schedulers["diffusers"] = diffusers.DDIMScheduler(**config)
    for scheduler in schedulers.values():
        scheduler.set_timesteps(NUM_INFERENCE_STEPS, device=device)
    timestep = schedulers["fastddim"].timesteps[TIMESTEP_INDEX]
    if not case.tensor_timestep:
        timestep = int(timestep)
    steps = {}
    fast = schedulers["fastddim"]
    noise_source = None
    if case.eta > 0:
        noise_source = (fastddim.PhiloxGenerator(seed, device=device) if philox
                        else torch.Generator(device).manual_seed(seed))
    options = {"return_dict": False} if case.pipeline_call else {}
    if case.guided:
        steps["fastddim"] = functools.partial(fast.guided_step, uncond, model_output, timestep, sample, 7.5,
                                              eta=case.eta, generator=noise_source, **options)
    else:
        steps["fastddim"] = functools.partial(fast.step, model_output, timestep, sample, eta=case.eta,
                                              generator=noise_source, **options)
    if "diffusers" in schedulers:
        slow = schedulers["diffusers"]
        noise_generator = torch.Generator(device).manual_seed(seed) if case.eta > 0 else None
        if case.guided:
            def diffusers_guided():
                guided = uncond + 7.5 * (model_output - uncond)
                return slow.step(guided, timestep, sample, eta=case.eta, generator=noise_generator, **options)
            steps["diffusers"] = diffusers_guided
        else:
            steps["diffusers"] = functools.partial(slow.step, model_output, timestep, sample, eta=case.eta,
                                                   generator=noise_generator, **options)
    return steps


def run_host(device=None, quick: bool = False, rounds: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Host time per step call of fastddim and diffusers at 1x4x8x8 (see HOST_METHOD); a JSON-ready dict.

    On the CPU fastddim is timed twice: Triton backend with the launches stubbed (where triton is installed),
    and its torch path; diffusers' step runs in the same round robin as the torch path.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    rounds = rounds or (5 if quick else 40)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    timing = dict(rounds=rounds, round_seconds=1e-3 if quick else 2e-3, warmup_seconds=0.02 if quick else 0.1,
                  sync=sync, max_calls=200 if on_gpu else None)
    results = {"shape": list(HOST_SHAPE), "method": " ".join(HOST_METHOD.split()), "cases": []}
    with torch_threads(None if on_gpu else 1):
        for case in HOST_CASES:
            grad_mode = torch.no_grad() if case.pipeline_call else contextlib.nullcontext()
            with grad_mode:
                timings = _time_host_case(case, device, on_gpu, timing)
            entry = {"name": case.name, "timings": timings}
            results["cases"].append(entry)
            if progress is not None:
                progress(f"host {case.name}: " + ", ".join(f"{name} {_cell(t)} us" for name, t in timings.items()))
    return results


def _time_host_case(case: HostCase, device: torch.device, on_gpu: bool, timing: dict) -> dict:
    """The timings of one host case: fastddim and diffusers on a GPU; on the CPU fastddim's Triton backend with its
    launches stubbed (where triton is installed), its torch path and diffusers."""
    timings = {}
    if on_gpu:
        timings.update(time_host(host_steps(case, device), **timing))
        return timings
    if ops.triton_available():
        with stubbed_launches():
            stubbed = host_steps(case, device)["fastddim"]
            timings["fastddim launch stubbed"] = time_host({"fastddim": stubbed}, **timing)["fastddim"]
    with forced_backend("torch"):
        steps = host_steps(case, device, philox=False)
        measured = time_host(steps, **timing)
    timings["fastddim torch path"] = measured.pop("fastddim")
    timings.update(measured)
    return timings


def format_host_table(host: dict) -> str:
    """The host-overhead results as markdown: one row per case, one column per contender."""
    names = list(dict.fromkeys(name for case in host["cases"] for name in case["timings"]))
    lines = [f"Host time per step call at {'x'.join(map(str, host['shape']))} float32, microseconds, median (min):",
             "", "| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for case in host["cases"]:
        lines.append(f"| {case['name']} | " + " | ".join(_cell(case["timings"].get(name)) for name in names) + " |")
    return "\n".join(lines)


def _ratio(timings: dict, key: str) -> float | None:
    """diffusers' time over fastddim's (how many times faster fastddim is), None without diffusers."""
    if "diffusers" not in timings:
        return None
    return timings["diffusers"][key] / timings["fastddim"][key]


def _cell(timing: dict | None, key: str = "median_us", low: str = "min_us") -> str:
    if timing is None:
        return "-"
    return f"{timing[key]:.1f} ({timing[low]:.1f})"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_case(entry: dict, on_gpu: bool) -> str:
    timings = entry["timings"]
    if on_gpu:
        return (f"{entry['name']}: GPU fastddim {_cell(timings['fastddim'])}, diffusers "
                f"{_cell(timings.get('diffusers'))}, floor {_cell(timings[FLOOR])} us; host fastddim "
                f"{_cell(timings['fastddim'], 'host_median_us', 'host_min_us')}, diffusers "
                f"{_cell(timings.get('diffusers'), 'host_median_us', 'host_min_us')} us")
    return (f"{entry['name']}: fastddim {_cell(timings['fastddim'])}, diffusers {_cell(timings.get('diffusers'))}, "
            f"floor {_cell(timings[FLOOR])} us median (min); {_times(entry['speedup'])}")


def format_table(results: dict) -> str:
    """The results as markdown: a header naming the machine and versions, then one row per case."""
    device = results["device"]
    on_gpu = device["type"] == "cuda"
    v = results["versions"]
    lines = [
        f"Device: {device['name']} ({device['short']}); torch threads: {results['torch_threads']}; "
        f"fastddim backend: {results['backend']}",
        f"Versions: python {v['python']}, torch {v['torch']}, triton {v['triton']}, diffusers {v['diffusers']}, "
        f"fastddim {v['fastddim']}; {results['date']}",
    ]
    load = results.get("load_average")
    if load and None not in load:
        lines.append(f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
                     f"({device['cpu_count']} CPUs)")
    lines.append("")
    if on_gpu:
        lines += [
            "Microseconds per step, median (min). GPU: triton.testing.do_bench, L2 cleared; host: perf_counter over "
            "back-to-back calls; compiled: diffusers' step under torch.compile; in a 50-step graph: GPU time per "
            "step of fastddim's whole loop captured as one CUDA graph (GraphedLoop, CUDA events).",
            "",
            "| case | fastddim GPU | diffusers GPU | compiled GPU | add floor GPU | GPU speedup | fastddim host "
            "| diffusers host | compiled host | host speedup | in a 50-step graph |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in results["cases"]:
            t = c["timings"]
            graph = c.get("graph_loop") or {}
            lines.append(
                f"| {c['name']} | {_cell(t['fastddim'])} | {_cell(t.get('diffusers'))} | {_cell(t.get(COMPILED))} | "
                f"{_cell(t[FLOOR])} | {_times(c['speedup'])} | {_cell(t['fastddim'], 'host_median_us', 'host_min_us')}"
                f" | {_cell(t.get('diffusers'), 'host_median_us', 'host_min_us')} | "
                f"{_cell(t.get(COMPILED), 'host_median_us', 'host_min_us')} | {_times(c['host_speedup'])} | "
                f"{graph.get('error') or _cell(graph or None)} |"
            )
    else:
        lines += [
            "Microseconds per step, median (min), perf_counter over interleaved batches of back-to-back calls.",
            "",
            "| case | fastddim | diffusers | add floor | speedup |",
            "|---|---|---|---|---|",
        ]
        for c in results["cases"]:
            t = c["timings"]
            lines.append(f"| {c['name']} | {_cell(t['fastddim'])} | {_cell(t.get('diffusers'))} | "
                         f"{_cell(t[FLOOR])} | {_times(c['speedup'])} |")
    acceptance = results.get("acceptance")
    if acceptance is not None:
        verdict = "met" if acceptance["met"] else "NOT met"
        lines += ["", f"Acceptance ({acceptance['case']}: fastddim at least {acceptance['target_speedup']:g}x faster "
                      f"than diffusers): {verdict}, {acceptance['speedup']:.2f}x."]
    if results.get("host_overhead"):
        lines += ["", format_host_table(results["host_overhead"])]
    return "\n".join(lines)


def save(results: dict, path) -> tuple[Path, Path]:
    """Write `results` as JSON to `path` and as a markdown table beside it (same name, .md); returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    markdown = path.with_suffix(".md")
    markdown.write_text(f"# fastddim step benchmark: {results['device']['short']}\n\n{format_table(results)}\n\n"
                        f"Method: {results['method']}\n", encoding="utf-8")
    return path, markdown


def main(argv: list[str] | None = None) -> int:
    """`python bench/run.py`: time the step on this machine and write bench/results/<device>.json and .md."""
    import argparse

    parser = argparse.ArgumentParser(description="Time fastddim's DDIM step against diffusers' on this machine.")
    parser.add_argument("--out", help="JSON file to write; the markdown table goes beside it "
                                      "(default: bench/results/<device>.json)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 40)")
    parser.add_argument("--filter", default=None, help="time only cases whose name contains this text")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cases = None
    if args.filter:
        pool = QUICK_CASES[device.type] if args.quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
        cases = [c for c in pool if args.filter in c.name]
        if not cases:
            parser.error(f"no case name contains {args.filter!r}")
    results = run(device=device, quick=args.quick, cases=cases, threads=args.threads, rounds=args.rounds,
                  progress=functools.partial(print, flush=True))
    out = args.out or Path("bench") / "results" / f"{results['device']['short']}.json"
    paths = save(results, out)
    print()
    print(format_table(results))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
