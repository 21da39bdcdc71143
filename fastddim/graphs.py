"""CUDA-graph capture of a DDIM step, or of a whole denoising loop, with static input buffers.

fastddim's step reads its timestep and noise state from device memory and never synchronises with the host,
so one captured step serves every timestep (`GraphedStep`), and a captured loop (`GraphedLoop`) replays the
model calls and steps of a whole sampling run in one launch. With a `PhiloxGenerator`, each replay draws fresh,
reproducible noise. On a CPU device the same objects run eagerly, so code written for them runs anywhere.

Replays write into the same output tensors every time: clone an output to keep it past the next replay. A graph
holds raw pointers, so each helper keeps a reference to every buffer its graph reads that lives outside the graph
(the step table, the timesteps, the generator's buffer, its static inputs); buffers allocated during capture
belong to the graph's memory pool.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from fastddim.noise import PhiloxGenerator
from fastddim.scheduler import DDIMSchedulerOutput


class CudaGraphCapture:
    """How `GraphedStep` and `GraphedLoop` capture: warm-up runs on a side stream, then one capture into a
    `torch.cuda.CUDAGraph`. Tests substitute an object with the same four methods to run the helpers' warm-up and
    capture code on the CPU (e.g. recording every kernel launch of each phase)."""

    def supports(self, device: torch.device) -> bool:
        """Whether steps on `device` are captured (else the helpers run them eagerly)."""
        return device.type == "cuda"

    @contextlib.contextmanager
    def warmup(self, device: torch.device):
        """The context of the warm-up runs: a side stream, as capture requires, joined afterwards."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(device).wait_stream(stream)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph):
        """The context in which the graph records the launches."""
        return torch.cuda.graph(graph)


CUDA_GRAPHS = CudaGraphCapture()


def _capture(fn: Callable[[], object], device: torch.device, generator: PhiloxGenerator | None, warmup: int,
             capture: CudaGraphCapture):
    """(graph, static output) of `fn`, or (None, None) where `capture` does not support `device` (callers then
    run `fn` eagerly).

    Warm-up and capture run the very same `fn`, so capture launches only kernel variants that warm-up has already
    compiled and loaded (loading a module is forbidden while a stream captures), and copies the step table to
    the device before capture (also forbidden). The warm-up draws are undone: the generator's state is restored."""
    if not capture.supports(device):
        return None, None
    saved = generator.buffer.clone() if generator is not None else None
    with capture.warmup(device):
        for _ in range(warmup):
            fn()
    if generator is not None:
        generator.buffer.copy_(saved)
    graph = capture.new_graph()
    with capture.capture(graph):
        output = fn()
    return graph, output


def _check_generator(eta: float, generator) -> None:
    if eta > 0 and not isinstance(generator, PhiloxGenerator):
        raise ValueError("a captured step with eta > 0 needs generator=fastddim.PhiloxGenerator(seed, device)")


def _check_warmup(warmup) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (capture may only launch kernels a warm-up loaded), "
                         f"got {warmup!r}")
    return warmup


class _Owned:
    """The device buffers a captured graph reads and that live outside it: a graph keeps raw pointers, so its
    helper holds a reference to each (the scheduler may drop its copy, e.g. `set_timesteps` replaces the step
    table, which pipelines call at the start of every run)."""

    def __init__(self, scheduler, device: torch.device, generator: PhiloxGenerator | None):
        if scheduler.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps(...) before capturing")
        self.num_inference_steps = scheduler.num_inference_steps
        self.table = scheduler._table_on(device)  # the table every captured step reads
        self.generator_buffer = generator.buffer if generator is not None else None

    def check(self, scheduler) -> None:
        """A captured graph reads the step table of its capture: refuse to replay it for another schedule."""
        if scheduler.num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"the scheduler was set to {scheduler.num_inference_steps} steps after this graph was captured with "
                f"{self.num_inference_steps}: capture again for the new schedule"
            )


class GraphedStep:
    """`scheduler.step` captured once and replayed for any timestep.

    Args:
        scheduler (`DDIMScheduler`): a scheduler whose `set_timesteps` has been called.
        sample (`torch.Tensor`): a tensor with the shape, dtype, layout and device of the samples to step.
        eta (`float`, defaults to 0.0): the noise weight (fixed at capture).
        generator (`PhiloxGenerator`, *optional*): the device-side noise source, needed when eta > 0.
        use_clipped_model_output (`bool`, defaults to `False`): as in `step`.
        warmup (`int`, defaults to 2): eager runs on a side stream before capture (at least 1).
        per_sample_timesteps (`bool`, defaults to `False`): the step takes one timestep per sample (a (batch,)
            buffer; continuous batching); a single timestep is then given to every sample.
        capture (`CudaGraphCapture`, *optional*): how to capture (defaults to CUDA graphs on CUDA devices, eager
            steps elsewhere); tests pass a recording stand-in.
        static_model_output (`torch.Tensor`, *optional*), static_sample (`torch.Tensor`, *optional*): tensors of
            the callers' own (e.g. the output buffer of a captured model) that the graph reads directly; by
            default the step allocates its own. A call whose argument is that very tensor copies nothing.

    Call it as `step(model_output, timestep, sample)`; it returns a `DDIMSchedulerOutput` whose tensors are the
    graph's static outputs. Arguments other than the static tensors are copied into them first. The graph keeps
    the step table, timestep and generator buffers it reads alive, and serves the scheduler's schedule at capture:
    after `set_timesteps` with another number of steps it raises (capture again); the scheduler's other settings
    are those at capture.
    """

    def __init__(self, scheduler, sample: torch.Tensor, eta: float = 0.0, generator: PhiloxGenerator | None = None,
                 use_clipped_model_output: bool = False, warmup: int = 2, per_sample_timesteps: bool = False, *,
                 capture: CudaGraphCapture | None = None, static_model_output: torch.Tensor | None = None,
                 static_sample: torch.Tensor | None = None):
        _check_generator(eta, generator)
        _check_warmup(warmup)
        for name, static in (("static_model_output", static_model_output), ("static_sample", static_sample)):
            if static is not None and (not isinstance(static, torch.Tensor) or static.shape != sample.shape
                                       or static.device != sample.device or static.dtype != sample.dtype):
                raise ValueError(f"{name} must be a tensor of the sample's shape {tuple(sample.shape)}, dtype "
                                 f"{sample.dtype} and device {sample.device}")
        self.owned = _Owned(scheduler, sample.device, generator)
        self.scheduler = scheduler
        self.eta = eta
        self.generator = generator
        self.use_clipped_model_output = use_clipped_model_output
        self.static_model_output = static_model_output if static_model_output is not None else torch.zeros_like(sample)
        self.static_sample = static_sample if static_sample is not None else torch.zeros_like(sample)
        batch = sample.shape[0] if sample.dim() else 1
        self.static_timestep = torch.zeros((batch,) if per_sample_timesteps else (), dtype=torch.int64,
                                           device=sample.device)
        self.graph, self.output = _capture(self._step, sample.device, generator, warmup, capture or CUDA_GRAPHS)

    def _step(self) -> DDIMSchedulerOutput:
        return self.scheduler.step(self.static_model_output, self.static_timestep, self.static_sample, eta=self.eta,
                                   use_clipped_model_output=self.use_clipped_model_output, generator=self.generator)

    def __call__(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> DDIMSchedulerOutput:
        self.owned.check(self.scheduler)
        if model_output is not self.static_model_output:
            self.static_model_output.copy_(model_output)
        if sample is not self.static_sample:
            self.static_sample.copy_(sample)
        if isinstance(timestep, torch.Tensor):
            self.static_timestep.copy_(timestep.reshape(()) if timestep.numel() == 1 else timestep)
        else:
            self.static_timestep.fill_(int(timestep))
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.output


class GraphedLoop:
    """A whole denoising loop (model calls and steps over `scheduler.timesteps`) captured as one CUDA graph.

    Args:
        model (`Callable[[Tensor, Tensor], Tensor]`): `model(sample, timestep)` returning the model output; it must
            be capturable (no host synchronisation, static shapes), as `torch.cuda.graphs` requires.
        scheduler (`DDIMScheduler`): a scheduler whose `set_timesteps` has been called.
        sample (`torch.Tensor`): a tensor like the initial noise (shape, dtype, layout, device).
        eta (`float`, defaults to 0.0): the noise weight.
        generator (`PhiloxGenerator`, *optional*): the device-side noise source, needed when eta > 0; every
            replay continues its stream, so replays draw fresh noise.
        warmup (`int`, defaults to 1): eager runs of the loop on a side stream before capture (at least 1).
        capture (`CudaGraphCapture`, *optional*): as in `GraphedStep`.

    Call it with the initial noise; it returns the final sample (the graph's static output). Like `GraphedStep`,
    it owns the buffers it reads and refuses to run after `set_timesteps` with another number of steps.
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                 sample: torch.Tensor, eta: float = 0.0, generator: PhiloxGenerator | None = None, warmup: int = 1,
                 *, capture: CudaGraphCapture | None = None):
        _check_generator(eta, generator)
        _check_warmup(warmup)
        self.owned = _Owned(scheduler, sample.device, generator)
        self.model = model
        self.scheduler = scheduler
        self.eta = eta
        self.generator = generator
        self.static_sample = torch.zeros_like(sample)
        self.timesteps = scheduler.timesteps.to(sample.device)
        self.graph, self.output = _capture(self._loop, sample.device, generator, warmup, capture or CUDA_GRAPHS)

    def _loop(self) -> torch.Tensor:
        sample = self.static_sample
        for i in range(self.timesteps.shape[0]):
            timestep = self.timesteps[i]
            model_output = self.model(sample, timestep)
            sample = self.scheduler.step(model_output, timestep, sample, eta=self.eta,
                                         generator=self.generator).prev_sample
        return sample

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        self.owned.check(self.scheduler)
        self.static_sample.copy_(sample)
        if self.graph is None:
            return self._loop()
        self.graph.replay()
        return self.output
