"""Noise for the eta > 0 step: diffusers' host generators, or a Philox stream whose state lives on the device."""

from __future__ import annotations

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


class PhiloxGenerator:
    """A noise source for `DDIMScheduler.step(..., generator=...)` whose state lives on the device.

    The step's kernel draws its noise itself from (seed, counter) with Philox4x32-10, and the counter advances
    by one on the device after every step. No host work is involved, so a CUDA graph that captured steps draws
    fresh noise on every replay, and the same seed reproduces the same stream. The torch path draws the
    identical stream (up to float32 rounding of log/cos), so CPU and GPU runs agree statistically and closely.

    Args:
        seed (`int`): the stream's key (any 64-bit integer).
        device (`str` or `torch.device`, defaults to `"cpu"`): where the state lives: the samples' device.
    """

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.state = torch.tensor([seed, 0], dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.state.device

    def manual_seed(self, seed: int) -> "PhiloxGenerator":
        """Restart the stream at `seed` (in place on the device, so captured graphs see it)."""
        self.state.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        return self

    def advance(self) -> None:
        """Move to the next draw (a device op; inside a CUDA graph it is replayed too)."""
        self.state[1:].add_(1)

    def __repr__(self) -> str:
        return f"PhiloxGenerator(device={self.device})"
