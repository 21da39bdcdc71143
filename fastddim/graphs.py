"""CUDA-graph capture of a DDIM step, or of a whole denoising loop, with static input buffers.

fastddim's step reads its timestep and noise state from device memory and never synchronises with the host,
so one captured step serves every timestep (`GraphedStep`), and a captured loop (`GraphedLoop`) replays the
model calls and steps of a whole sampling run in one launch. With a `PhiloxGenerator`, each replay draws fresh,
reproducible noise. On a CPU device the same objects run eagerly, so code written for them runs anywhere.

Replays write into the same output tensors every time: clone an output to keep it past the next replay.
"""

from __future__ import annotations

from typing import Callable

import torch

from fastddim.noise import PhiloxGenerator
from fastddim.scheduler import DDIMSchedulerOutput


def _capture(fn: Callable[[], object], scheduler, device: torch.device, generator: PhiloxGenerator | None,
             warmup: int):
    """(graph, static output) of `fn` captured on `device`, or (None, None) off CUDA (callers then run `fn`).

    Warm-up runs go first, on a side stream as capture requires: they compile the kernels and copy the step
    table to the device, which capture forbids. They use no noise: the generator's state is restored."""
    if device.type != "cuda":
        return None, None
    scheduler._table_on(device)
    saved = generator.state.clone() if generator is not None else None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if generator is not None:
        generator.state.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def _check_generator(eta: float, generator) -> None:
    if eta > 0 and not isinstance(generator, PhiloxGenerator):
        raise ValueError("a captured step with eta > 0 needs generator=fastddim.PhiloxGenerator(seed, device)")


class GraphedStep:
    """`scheduler.step` captured once and replayed for any timestep.

    Args:
        scheduler (`DDIMScheduler`): a scheduler whose `set_timesteps` has been called.
        sample (`torch.Tensor`): a tensor with the shape, dtype, layout and device of the samples to step.
        eta (`float`, defaults to 0.0): the noise weight (fixed at capture).
        generator (`PhiloxGenerator`, *optional*): the device-side noise source, needed when eta > 0.
        use_clipped_model_output (`bool`, defaults to `False`): as in `step`.
        warmup (`int`, defaults to 2): eager runs on a side stream before capture.
        static_model_output (`torch.Tensor`, *optional*), static_sample (`torch.Tensor`, *optional*): tensors of
            the callers' own (e.g. the output buffer of a captured model) that the graph reads directly; by
            default the step allocates its own. A call whose argument is that very tensor copies nothing.

    Call it as `step(model_output, timestep, sample)`; it returns a `DDIMSchedulerOutput` whose tensors are the
    graph's static outputs. Arguments other than the static tensors are copied into them first.
    """

    def __init__(self, scheduler, sample: torch.Tensor, eta: float = 0.0, generator: PhiloxGenerator | None = None,
                 use_clipped_model_output: bool = False, warmup: int = 2,
                 static_model_output: torch.Tensor | None = None, static_sample: torch.Tensor | None = None):
        _check_generator(eta, generator)
        for name, static in (("static_model_output", static_model_output), ("static_sample", static_sample)):
            if static is not None and (not isinstance(static, torch.Tensor) or static.shape != sample.shape
                                       or static.device != sample.device or static.dtype != sample.dtype):
                raise ValueError(f"{name} must be a tensor of the sample's shape {tuple(sample.shape)}, dtype "
                                 f"{sample.dtype} and device {sample.device}")
        self.scheduler = scheduler
        self.eta = eta
        self.generator = generator
        self.use_clipped_model_output = use_clipped_model_output
        self.static_model_output = static_model_output if static_model_output is not None else torch.zeros_like(sample)
        self.static_sample = static_sample if static_sample is not None else torch.zeros_like(sample)
        self.static_timestep = torch.zeros((), dtype=torch.int64, device=sample.device)
        self.graph, self.output = _capture(self._step, scheduler, sample.device, generator, warmup)

    def _step(self) -> DDIMSchedulerOutput:
        return self.scheduler.step(self.static_model_output, self.static_timestep, self.static_sample, eta=self.eta,
                                   use_clipped_model_output=self.use_clipped_model_output, generator=self.generator)

    def __call__(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> DDIMSchedulerOutput:
        if model_output is not self.static_model_output:
            self.static_model_output.copy_(model_output)
        if sample is not self.static_sample:
            self.static_sample.copy_(sample)
        if isinstance(timestep, torch.Tensor):
            self.static_timestep.copy_(timestep.reshape(()))
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
        warmup (`int`, defaults to 1): eager runs of the loop on a side stream before capture.

    Call it with the initial noise; it returns the final sample (the graph's static output).
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                 sample: torch.Tensor, eta: float = 0.0, generator: PhiloxGenerator | None = None, warmup: int = 1):
        _check_generator(eta, generator)
        if scheduler.num_inference_steps is None:
            raise ValueError("call scheduler.set_timesteps(...) before capturing a loop")
        self.model = model
        self.scheduler = scheduler
        self.eta = eta
        self.generator = generator
        self.static_sample = torch.zeros_like(sample)
        self.timesteps = scheduler.timesteps.to(sample.device)
        self.graph, self.output = _capture(self._loop, scheduler, sample.device, generator, warmup)

    def _loop(self) -> torch.Tensor:
        sample = self.static_sample
        for i in range(self.timesteps.shape[0]):
            timestep = self.timesteps[i]
            model_output = self.model(sample, timestep)
            sample = self.scheduler.step(model_output, timestep, sample, eta=self.eta,
                                         generator=self.generator).prev_sample
        return sample

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        self.static_sample.copy_(sample)
        if self.graph is None:
            return self._loop()
        self.graph.replay()
        return self.output
