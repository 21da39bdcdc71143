"""Noise for the eta > 0 step: diffusers' host generators, or a Philox stream whose state lives on the device."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor` draws it (same generator calls), so a
    seeded pipeline gets the same noise with either scheduler. A CPU generator draws on the CPU, then moves."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        if first.device.type != device.type:
            if first.device.type != "cpu":
                raise ValueError(f"generator is on {first.device}: it cannot make noise for a tensor on {device}")
            rand_device = torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} generators; the batch size is {shape[0]}")
        one = (1,) + tuple(shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value}")
    return int(value)


class PhiloxGenerator:
    """A noise source for `DDIMScheduler.step(..., generator=...)` whose state lives on the device.

    The state is one (seed, offset) row per sample, or one row for a whole batch. The step's kernel draws the
    noise of element `i` of sample `b` (its index within the sample, row-major) from Philox4x32-10 keyed by the
    sample's seed, with the counter block (i_lo, i_hi, offset_lo, offset_hi), then Box-Muller as `tl.randn`; the
    same launch then adds 1 to every offset (the last of its programs to finish does it). No host work is involved,
    so a CUDA graph that captured steps draws fresh noise on every replay, and the same seeds reproduce the same
    streams. The torch path draws the identical numbers (up to float32 rounding of log/cos) and advances the same way.

    A sample's noise depends only on its own (seed, offset), never on the batch around it: give each request of a
    continuously batched server its own row (`PhiloxGenerator(seeds=[...])`, `PhiloxGenerator.stack`, or in-place
    writes to `state`) and it gets the result it would get alone. A one-row generator (`PhiloxGenerator(seed)`)
    steps a batch as `PhiloxGenerator(seeds=[seed, seed + 1, ..., seed + batch - 1])` would (with the same
    offset): sample b draws the stream of seed + b (wrapping in 64 bits), diffusers' convention for a list of
    generators, so `PhiloxGenerator(seed + b)` reproduces sample b alone.

    Args:
        seed (`int`, defaults to 0): the seed of a one-row generator (any signed 64-bit integer).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the state lives: the samples' device.
        seeds (`Sequence[int]`, *optional*): one seed per sample instead of `seed` (offsets start at 0).

    `state` is an int64 tensor of shape (rows, 2); it is a view of `buffer`, which adds the kernel's ticket row
    (kept at zero between steps). Both are allocated once and only ever changed in place, so captured graphs
    and compiled code keep reading them.
    """

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu", *, seeds: Sequence[int] | None = None):
        if seeds is None:
            rows = [_check_seed("seed", seed)]
        else:
            if seed != 0:
                raise ValueError("pass either seed or seeds, not both")
            if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
                raise TypeError("seeds must be a non-empty sequence of ints (one per sample)")
            rows = [_check_seed("seeds", s) for s in seeds]
        self.buffer = torch.zeros(len(rows) + 1, 2, dtype=torch.int64, device=device)
        self.state = self.buffer[:-1]
        self.state[:, 0].copy_(torch.tensor(rows, dtype=torch.int64))

    @classmethod
    def stack(cls, generators: Sequence["PhiloxGenerator"]) -> "PhiloxGenerator":
        """One generator whose rows are those of `generators`, at their current offsets, in order: e.g. the
        requests of a batch, each with its own generator. The result is a new generator (the inputs are not
        advanced by its steps; `split` gives the advanced rows back)."""
        generators = list(generators)
        if not generators or not all(isinstance(g, PhiloxGenerator) for g in generators):
            raise TypeError("stack takes a non-empty sequence of PhiloxGenerator")
        if len({g.device for g in generators}) != 1:
            raise ValueError("stacked generators must live on one device")
        stacked = cls(device=generators[0].device, seeds=[0] * sum(g.state.shape[0] for g in generators))
        torch.cat([g.state for g in generators], out=stacked.state)
        return stacked

    def split(self) -> list["PhiloxGenerator"]:
        """One one-row generator per row, each continuing that row's stream (copies: stepping one does not move
        this generator)."""
        parts = []
        for row in self.state.unbind(0):
            part = PhiloxGenerator(device=self.device)
            part.state.copy_(row[None])
            parts.append(part)
        return parts

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def manual_seed(self, seed: int | Sequence[int]) -> "PhiloxGenerator":
        """Restart every row at offset 0: row b gets seed + b for an int (a one-row generator: `seed`), or
        seed[b] for a sequence of one seed per row (in place on the device, so captured graphs see it)."""
        rows = self.state.shape[0]
        if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
            seeds = [_check_seed("seed", s) for s in seed]
            if len(seeds) != rows:
                raise ValueError(f"manual_seed got {len(seeds)} seeds for a generator of {rows} rows")
            values = torch.tensor(seeds, dtype=torch.int64)
        else:
            values = _check_seed("seed", seed) + torch.arange(rows, dtype=torch.int64)
        self.buffer.zero_()
        self.state[:, 0].copy_(values)
        return self

    def advance(self) -> None:
        """Skip one draw on every row (a device op; steps advance the generator themselves)."""
        self.state[:, 1].add_(1)

    def __repr__(self) -> str:
        return f"PhiloxGenerator(rows={self.state.shape[0]}, device={self.device})"
