"""What `scheduler.write_pred_original_sample = False` saves: the same step with and without its x0 output.

    python bench/x0_optout.py [--out bench/results/x0-optout-NAME.md]     # CPU: torch path, one thread

A step reads model_output and sample and writes prev_sample and pred_original_sample: four full-size passes
over memory (five with variance_noise). Without x0 it is three (four): on a GPU, where a latent-size step is
bandwidth-bound, a quarter of the bytes (1/5 with noise), e.g. 1x4x128x128 fp16: 384 KiB instead of 512 KiB.
On the CPU's torch path the x0 tensor is computed either way (prev_sample is built from it); the opt-out
saves its final copy/cast only, so the measured gain is smaller. Both variants are timed interleaved
(`fastddim.benchmark.time_host`) after checking they give the same prev_sample.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

import fastddim
from fastddim import benchmark as fb

CASES = (
    fb.Case((1, 4, 64, 64)),
    fb.Case((1, 4, 128, 128)),
    fb.Case((1, 4, 128, 128), torch.float16),
    fb.Case((2, 4, 128, 128)),
    fb.Case((1, 4, 128, 128), eta=1.0),
)


def gpu_bytes(case: fb.Case, write_x0: bool) -> int:
    """Bytes a fused step moves on a GPU: each full-size input read once, each output written once."""
    passes = 2 + (case.eta > 0) + 1 + write_x0
    return passes * math.prod(case.shape) * torch.empty((), dtype=case.dtype).element_size()


def steps(case: fb.Case) -> dict:
    generator = torch.Generator().manual_seed(0)
    model_output, sample, noise = (torch.randn(case.shape, generator=generator).to(case.dtype) for _ in range(3))
    contenders = {}
    for write_x0 in (True, False):
        scheduler = fastddim.DDIMScheduler(**case.scheduler_config())
        scheduler.set_timesteps(50)
        scheduler.write_pred_original_sample = write_x0
        contenders["with x0" if write_x0 else "without x0"] = functools.partial(
            scheduler.step, model_output, int(scheduler.timesteps[10]), sample, eta=case.eta,
            variance_noise=noise if case.eta else None)
    with_x0, without_x0 = (fn() for fn in contenders.values())
    assert torch.equal(with_x0.prev_sample, without_x0.prev_sample) and without_x0.pred_original_sample is None
    return contenders


def run(rounds: int = 40) -> str:
    lines = ["| case | with x0, us: median (min) | without x0, us: median (min) | saved (median, min) | "
             "GPU bytes with / without x0 |", "|---|---|---|---|---|"]
    with fb.torch_threads(1), fb.forced_backend("torch"):
        for case in CASES:
            timings = fb.time_host(steps(case), rounds=rounds)
            a, b = timings["with x0"], timings["without x0"]
            lines.append(
                f"| {case.name} | {a['median_us']:.1f} ({a['min_us']:.1f}) | "
                f"{b['median_us']:.1f} ({b['min_us']:.1f}) | "
                f"{1 - b['median_us'] / a['median_us']:.0%}, {1 - b['min_us'] / a['min_us']:.0%} | "
                f"{gpu_bytes(case, True) // 1024} KiB / {gpu_bytes(case, False) // 1024} KiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    load = fb._load_average()
    table = run(args.rounds)
    header = (f"# write_pred_original_sample opt-out, CPU torch path, one thread\n\n{fb._cpu_name()}; "
              f"torch {torch.__version__}; {args.rounds} interleaved rounds (fastddim.benchmark.time_host); "
              f"load average before / after: {load} / {fb._load_average()}\n\n")
    print(header + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + table + "\n")
