"""Whole denoising loops, where a user feels the scheduler: 50 guided steps around a real-size UNet.

    python bench/pipeline.py --out bench/results/pipeline-h200.json                 # CUDA, every case
    python bench/pipeline.py --device cpu --tiny --steps 3 --out /tmp/pipeline.json  # a smoke run on a CPU

The UNets are randomly initialised from configs (nothing is downloaded): Stable Diffusion 1.5's UNet
(64x64 latents, fp16 on CUDA), a small fast UNet where the loop is host-bound, and a pixel-space UNet with
dynamic thresholding (DeepFloyd IF-like, 3x64x64 and 3x256x256 pixels). Each loop is classifier-free guided
(a batch of 2: unconditional and conditional, guidance scale 7.5).

Contenders, each timed over whole loops (CUDA synchronised at the end of each loop only):
- `diffusers`: diffusers' DDIMScheduler, the guidance in torch, eager;
- `fastddim`: fastddim's DDIMScheduler with the guidance fused into the step (`guided_step`), eager;
- `fastddim graph`: the whole loop, model included, as one CUDA graph (`fastddim.graphs.GraphedLoop`);
- `diffusers + compiled unet`: diffusers' loop with the UNet under torch.compile(mode="reduce-overhead").
The scheduler's share of a loop is the loop's time minus the same loop with the step replaced by a no-op.
Every contender's final latents are checked against diffusers' eager loop before timing (a wrong contender
fails the run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import fastddim

GUIDANCE_SCALE = 7.5
TEXT_TOKENS, TEXT_DIM = 77, 768


@dataclass(frozen=True)
class UNetCase:
    """A randomly initialised UNet2DConditionModel and the loop run around it."""

    name: str
    unet_config: dict
    channels: int
    size: int
    dtype: torch.dtype
    thresholding: bool = False

    def scheduler_config(self) -> dict:
        config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
        if self.thresholding:
            config.update(beta_schedule="squaredcos_cap_v2", thresholding=True, sample_max_value=1.5)
        return config


def _unet_config(block_out_channels, layers_per_block, cross_attn, channels=4, head_dim=8):
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross_attn)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attn))
    return dict(in_channels=channels, out_channels=channels, block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
                cross_attention_dim=TEXT_DIM, attention_head_dim=head_dim)


# Stable Diffusion 1.5's UNet (860M parameters), a distilled-size one (BK-SDM-Tiny-like block layout at a
# fraction of the width), and an IF-like pixel UNet.
SD15 = _unet_config((320, 640, 1280, 1280), 2, (True, True, True, False))
SMALL = _unet_config((64, 128, 256), 1, (True, True, False))
PIXEL = _unet_config((64, 128, 256), 1, (False, True, True), channels=3)
TINY = {**_unet_config((8, 16), 1, (True, False), head_dim=2), "norm_num_groups": 4}


def cases(device: str, tiny: bool) -> list[UNetCase]:
    half = torch.float16 if device == "cuda" else torch.float32
    if tiny:
        return [UNetCase("tiny latent 4x8x8", TINY, 4, 8, torch.float32),
                UNetCase("tiny pixel 3x8x8 thresholded", {**TINY, "in_channels": 3, "out_channels": 3}, 3, 8,
                         torch.float32, thresholding=True)]
    return [
        UNetCase("SD 1.5 UNet, 4x64x64 latents", SD15, 4, 64, half),
        UNetCase("small UNet, 4x64x64 latents", SMALL, 4, 64, half),
        UNetCase("pixel UNet, 3x64x64, thresholded", PIXEL, 3, 64, torch.float32, thresholding=True),
        UNetCase("pixel UNet, 3x256x256, thresholded", PIXEL, 3, 256, torch.float32, thresholding=True),
    ]


class Loop:
    """One contender's guided 50-step loop over fixed inputs; `run()` returns the final latents."""

    def __init__(self, unet, scheduler, latents, text, steps, fused: bool, skip_step: bool = False):
        self.unet, self.scheduler, self.latents, self.text = unet, scheduler, latents, text
        self.fused, self.skip_step = fused, skip_step
        scheduler.set_timesteps(steps, device=latents.device)
        self.timesteps = scheduler.timesteps

    def guided(self, latents, t):
        both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=self.text).sample
        return both.chunk(2)

    def step(self, uncond, cond, t, latents):
        if self.skip_step:
            return latents
        if self.fused:
            return self.scheduler.guided_step(uncond, cond, t, latents, guidance_scale=GUIDANCE_SCALE).prev_sample
        guided = uncond + GUIDANCE_SCALE * (cond - uncond)
        return self.scheduler.step(guided, t, latents).prev_sample

    def run(self) -> torch.Tensor:
        latents = self.latents
        for t in self.timesteps:
            uncond, cond = self.guided(latents, t)
            latents = self.step(uncond, cond, t, latents)
        return latents


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loops(loops: dict, device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds per loop (median, min) of each contender, interleaved round by round."""
    samples = {name: [] for name in loops}
    for name, run in loops.items():  # warm-up (compiles, captures, autotunes)
        run()
    _sync(device)
    for _ in range(repeats):
        for name, run in loops.items():
            _sync(device)
            began = time.perf_counter()
            run()
            _sync(device)
            samples[name].append((time.perf_counter() - began) * 1e3)
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v)} for name, v in samples.items()}


def run_case(case: UNetCase, device: torch.device, steps: int, repeats: int, compile_unet: bool) -> dict:
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=case.size, **case.unet_config).to(device, case.dtype).eval()
    latents = torch.randn(1, case.channels, case.size, case.size, device=device, dtype=case.dtype)
    text = torch.randn(2, TEXT_TOKENS, TEXT_DIM, device=device, dtype=case.dtype)
    config = case.scheduler_config()

    def loop(cls, fused, skip_step=False, model=unet):
        return Loop(model, cls(**config), latents, text, steps, fused, skip_step)

    contenders = {
        "diffusers": loop(diffusers.DDIMScheduler, fused=False),
        "fastddim": loop(fastddim.DDIMScheduler, fused=True),
    }
    baseline = loop(diffusers.DDIMScheduler, fused=False, skip_step=True)
    runs = {name: c.run for name, c in contenders.items()}
    runs["no step (model only)"] = baseline.run
    if device.type == "cuda":
        from fastddim.graphs import GraphedLoop

        eager = contenders["fastddim"]

        def guided_model(x, t):
            uncond, cond = eager.guided(x, t)
            return uncond + GUIDANCE_SCALE * (cond - uncond)

        with torch.inference_mode():
            graphed = GraphedLoop(guided_model, eager.scheduler, latents)
        runs["fastddim graph"] = lambda: graphed(latents)
        if compile_unet:
            compiled = torch.compile(unet, mode="reduce-overhead")
            runs["diffusers + compiled unet"] = loop(diffusers.DDIMScheduler, fused=False, model=compiled).run

    with torch.inference_mode():
        truth = runs["diffusers"]().float()
        errors = {}
        for name, run in runs.items():
            if name == "no step (model only)":
                continue
            out = run().float()
            errors[name] = float((out - truth).norm() / truth.norm())
            # Long fp16 loops drift apart by rounding; a wrong step is off by order 1.
            if not errors[name] < (5e-2 if case.dtype != torch.float32 else 1e-3):
                raise AssertionError(f"{case.name}: {name} differs from diffusers' loop by {errors[name]:.3g}")
        timings = time_loops(runs, device, repeats)
    model_only = timings["no step (model only)"]["median_ms"]
    reference = timings["diffusers"]["median_ms"]
    for name, timing in timings.items():
        timing["speedup_vs_diffusers"] = reference / timing["median_ms"]
        if name in ("diffusers", "fastddim"):
            timing["scheduler_ms"] = timing["median_ms"] - model_only
            timing["scheduler_share"] = timing["scheduler_ms"] / timing["median_ms"]
    return {"case": case.name, "dtype": str(case.dtype).removeprefix("torch."), "steps": steps,
            "relative_error_vs_diffusers": errors, "timings": timings}


def format_table(results: dict) -> str:
    lines = [f"Whole loops on {results['device']}: {results['steps']} guided steps, batch 1 image (2 UNet rows), "
             "ms per image, median of interleaved loops (speed-up vs diffusers' eager loop; scheduler share)", "",
             "| case | contender | ms per image | speed-up | scheduler ms (share) |", "|---|---|---:|---:|---:|"]
    for entry in results["cases"]:
        for name, t in entry["timings"].items():
            share = f"{t['scheduler_ms']:.2f} ({100 * t['scheduler_share']:.1f}%)" if "scheduler_ms" in t else ""
            lines.append(f"| {entry['case']} | {name} | {t['median_ms']:.2f} | {t['speedup_vs_diffusers']:.2f}x "
                         f"| {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny UNets (a smoke run on a CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    parser.add_argument("--only", default=None, help="run only cases whose name contains this text")
    parser.add_argument("--out", default=None, help="JSON path (a markdown table is written beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "steps": args.steps, "torch": torch.__version__, "cases": []}
    for case in cases(device.type, args.tiny):
        if args.only and args.only not in case.name:
            continue
        results["cases"].append(run_case(case, device, args.steps, args.repeats, not args.no_compile))
        print(format_table({**results, "cases": results["cases"][-1:]}), flush=True)
    table = format_table(results)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        with open(args.out.removesuffix(".json") + ".md", "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
