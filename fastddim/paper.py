"""`fastddim paper`: the two findings of the DDIM paper (Song, Meng & Ermon, ICLR 2021), measured exactly.

A trained network only approximates the noise predictor of its data, so its sample quality mixes sampler error
with model error. Here the data distribution is a Gaussian mixture, whose noise predictor is known in closed form
(`fastddim.models.GaussianMixture`), so everything measured is the sampler's own error:

- Table 1 (sample quality against the number of steps S and eta): the energy distance between DDIM samples and
  exact samples of the mixture, estimated without bias (0 on average for equal distributions). Its noise level
  is measured, not assumed: independent sets of exact samples scored against the same reference show how far
  exact samples can land (mean + 3 standard deviations); a cell at or below that is not distinguishable from
  exact samples with this many samples.
  The paper's pattern: with few steps eta=0 (DDIM) beats eta=1 (DDPM-like); with many steps all converge.
- Table 2 (reconstruction error against S): exact samples x0 are encoded with `DDIMInverseScheduler` and
  decoded with `DDIMScheduler` (eta=0); the mean squared error of the round trip falls as S grows.

All cells share the same exact samples, initial noise and noise seeds (common random numbers), so differences
between cells are the samplers', not the draws'.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from fastddim import ops
from fastddim.models import GaussianMixture
from fastddim.scheduler import DDIMInverseScheduler, DDIMScheduler


@dataclass
class PaperConfig:
    """What `fastddim paper` measures. The defaults follow the paper's grid (Table 1: S in {10, 20, 50, 100,
    1000}, eta in {0, 0.2, 0.5, 1}); the mixture is 8 narrow modes on a ring in 16 dimensions."""

    steps: tuple[int, ...] = (10, 20, 50, 100, 1000)
    etas: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0)
    samples: int = 4000
    noise_sets: int = 20  # independent sets of exact samples that measure the noise level of Table 1
    dim: int = 16
    modes: int = 8
    std: float = 0.05
    seed: int = 0
    timestep_spacing: str = "leading"
    device: str = "cpu"
    scheduler: dict = field(default_factory=lambda: {"clip_sample": False})

    def mixture(self) -> GaussianMixture:
        return GaussianMixture.ring(self.modes, self.dim, radius=0.8, std=self.std)


def _mean_distance(x: torch.Tensor, y: torch.Tensor, same: bool = False, rows: int = 1024) -> float:
    """Mean Euclidean distance over all pairs (x_i, y_j), or over pairs i != j when `same` (x is y), computed
    in blocks of `rows` rows so that memory stays O(rows * len(y))."""
    total = sum(float(torch.cdist(x[i:i + rows], y).sum()) for i in range(0, x.shape[0], rows))
    pairs = x.shape[0] * (x.shape[0] - 1) if same else x.shape[0] * y.shape[0]
    return total / pairs


def energy_distance(x: torch.Tensor, y: torch.Tensor, y_within: float | None = None) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| of two samples (rows, at least two each), estimated
    without bias: the within-sample means leave out each point's zero distance to itself (the U-statistic; its
    expectation is 0 for two samples of one distribution, where counting those zeros would add about
    (E|X - X'| + E|Y - Y'|) / n). `y_within`: E|Y - Y'| of `y` if already computed (for a reused reference)."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    if y_within is None:
        y_within = _mean_distance(y, y, same=True)
    return 2 * _mean_distance(x, y) - _mean_distance(x, x, same=True) - y_within


def noise_level(exact_values) -> float:
    """The largest energy distance that exact samples plausibly score against the reference: mean + 3 standard
    deviations of `exact_values` (independent sets of exact samples, each against the same reference as the
    cells, so the reference's own fluctuation is included). A cell at or below it is not distinguishable from
    exact samples with this many samples."""
    count = len(exact_values)
    mean = sum(exact_values) / count
    spread = math.sqrt(sum((v - mean) ** 2 for v in exact_values) / max(count - 1, 1))
    return mean + 3 * spread


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(scheduler, model, x, num_steps: int, eta: float, seed: int, progress) -> torch.Tensor:
    scheduler.set_timesteps(num_steps, device=x.device)
    generator = _generator(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, eta=eta, generator=generator).prev_sample
        progress(1)
    return x


def _invert(inverse_scheduler, model, x, num_steps: int, progress) -> torch.Tensor:
    inverse_scheduler.set_timesteps(num_steps, device=x.device)
    for t in inverse_scheduler.timesteps:
        x = inverse_scheduler.step(model(x, t), t, x).prev_sample
        progress(1)
    return x


def total_steps(config: PaperConfig) -> int:
    """The number of scheduler steps `run` takes (for a progress bar)."""
    return sum(config.steps) * (len(config.etas) + 2)


@contextlib.contextmanager
def _cpu_threads(device: torch.device, count: int):
    """Run with `count` torch threads on a CPU device (restored afterwards)."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(config: PaperConfig, progress=None) -> dict:
    """Measure both tables; returns a JSON-ready dict. `progress(n)` is called after every scheduler step."""
    device = torch.device(config.device)
    # The tensors are small (samples x dim): more CPU threads gain little, and on a busy machine (a shared 2-core
    # one) two threads waiting for each other were measured 4-6x slower than one.
    with _cpu_threads(device, 1):
        return _run(config, device, progress or (lambda n: None))


def _run(config: PaperConfig, device: torch.device, progress) -> dict:
    mixture = config.mixture()
    scheduler = DDIMScheduler(timestep_spacing=config.timestep_spacing, **config.scheduler)
    inverse = DDIMInverseScheduler(timestep_spacing=config.timestep_spacing, **config.scheduler)
    model = mixture.denoiser(scheduler.alphas_cumprod, prediction_type=scheduler.config.prediction_type)

    draws = _generator(config.seed)
    reference = mixture.sample(config.samples, draws).to(device)
    initial_noise = torch.randn(config.samples, config.dim, generator=draws, dtype=torch.float64).to(device)
    originals = mixture.sample(config.samples, draws).to(device)
    reference_within = _mean_distance(reference, reference, same=True)
    exact_sets = [energy_distance(mixture.sample(config.samples, draws).to(device), reference, reference_within)
                  for _ in range(config.noise_sets)]

    quality = {}
    for num_steps in config.steps:
        for eta in config.etas:
            samples = _sample(scheduler, model, initial_noise, num_steps, eta, config.seed + 1, progress)
            quality[(num_steps, eta)] = energy_distance(samples, reference, reference_within)

    reconstruction = {}
    for num_steps in config.steps:
        latents = _invert(inverse, model, originals, num_steps, progress)
        decoded = _sample(scheduler, model, latents, num_steps, 0.0, config.seed + 1, progress)
        reconstruction[num_steps] = float(((decoded - originals) ** 2).mean())

    return {
        "config": {**asdict(config), "steps": list(config.steps), "etas": list(config.etas)},
        "backend": ops.select_backend(device),
        "table1_energy_distance": {
            "steps": list(config.steps),
            "etas": list(config.etas),
            "values": [[quality[(s, e)] for e in config.etas] for s in config.steps],
            "exact_samples": exact_sets,
            "noise_level": noise_level(exact_sets),
        },
        "table2_reconstruction_mse": {
            "steps": list(config.steps),
            "values": [reconstruction[s] for s in config.steps],
        },
    }


def format_tables(results: dict) -> str:
    """Both tables as Markdown, energy distances scaled by 1000 for readability."""
    t1, t2 = results["table1_energy_distance"], results["table2_reconstruction_mse"]
    noise = t1["noise_level"]
    lines = ["Table 1: energy distance to exact samples (x 1e-3, lower is better)", ""]
    lines.append("| S | " + " | ".join(f"eta={e:g}" for e in t1["etas"]) + " |")
    lines.append("|---:|" + "---:|" * len(t1["etas"]))
    for num_steps, row in zip(t1["steps"], t1["values"]):
        cells = [f"{v * 1e3:.2f}" if v > noise else f"({v * 1e3:.2f})" for v in row]
        lines.append(f"| {num_steps} | " + " | ".join(cells) + " |")
    exact = ", ".join(f"{v * 1e3:.2f}" for v in t1["exact_samples"])
    lines += ["", f"Noise level: {noise * 1e3:.2f}, the mean + 3 standard deviations of {len(t1['exact_samples'])} "
              f"independent sets of exact samples scored the same way ({exact}). Values in parentheses are at or "
              "below it: not distinguishable from exact samples with this many samples."]
    lines += ["", "Table 2: DDIM inversion + reconstruction, mean squared error (lower is better)", ""]
    lines += ["| S | MSE |", "|---:|---:|"]
    lines += [f"| {s} | {v:.3g} |" for s, v in zip(t2["steps"], t2["values"])]
    return "\n".join(lines)


def write_outputs(results: dict, outdir: str) -> list[str]:
    """Write results.json, table1.png and table2.png into `outdir` (created if needed); returns the paths."""
    os.makedirs(outdir, exist_ok=True)
    t1, t2 = results["table1_energy_distance"], results["table2_reconstruction_mse"]
    paths = [os.path.join(outdir, name) for name in ("results.json", "table1.png", "table2.png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    series = {f"eta={e:g}": (t1["steps"], [row[i] * 1e3 for row in t1["values"]]) for i, e in enumerate(t1["etas"])}
    series["noise level"] = (t1["steps"], [t1["noise_level"] * 1e3] * len(t1["steps"]))
    # A log axis shows the small distances at large S; values at or below 0 (exact within the noise) are left out.
    line_plot(paths[1], series, title="Table 1: sample quality against steps",
              xlabel="steps S (log)", ylabel="energy distance x 1e-3 (log)", logx=True, logy=True,
              dashed={"noise level"})
    line_plot(paths[2], {"DDIM inversion": (t2["steps"], t2["values"])},
              title="Table 2: inversion error against steps", xlabel="steps S (log)",
              ylabel="MSE (log)", logx=True, logy=True)
    return paths


# A minimal line plotter (pillow): axes with ticks, one coloured line with markers per series, a legend.
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    raw = (high - low) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.floor(low / step), math.ceil(high / step) + 1)]


def _dashed_line(draw, start, end, color, dash: int = 8) -> None:
    """A line from `start` to `end` drawn as dashes and gaps of about `dash` pixels each."""
    (ax, ay), (bx, by) = start, end
    pieces = max(1, int(math.hypot(bx - ax, by - ay) // dash))
    for k in range(0, pieces, 2):
        s, e = k / pieces, min(k + 1, pieces) / pieces
        draw.line([ax + s * (bx - ax), ay + s * (by - ay), ax + e * (bx - ax), ay + e * (by - ay)], fill=color, width=2)


def line_plot(path: str, series: dict, title: str, xlabel: str, ylabel: str, logx: bool = False,
              logy: bool = False, dashed=(), size=(720, 480)) -> None:
    """Draw `series` ({label: (xs, ys)}) as lines into a PNG at `path`. Non-positive values are left out of
    log axes."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 80, 20, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)

    def usable(v, log):
        return math.isfinite(v) and (v > 0 or not log)

    points = {label: [(x, y) for x, y in zip(xs, ys) if usable(x, logx) and usable(y, logy)]
              for label, (xs, ys) in series.items()}
    xs = [x for pts in points.values() for x, _ in pts] or [1.0]
    ys = [y for pts in points.values() for _, y in pts] or [1.0]
    xticks = _ticks(min(xs), max(xs), logx)
    yticks = _ticks(min(ys + ([] if logy else [0.0])), max(ys), logy)
    fx = (lambda v: math.log10(v)) if logx else float
    fy = (lambda v: math.log10(v)) if logy else float
    x0, x1 = fx(xticks[0]), fx(xticks[-1])
    y0, y1 = fy(yticks[0]), fy(yticks[-1])

    def to_pixel(x, y):
        px = left + (fx(x) - x0) / ((x1 - x0) or 1) * (width - left - right)
        py = height - bottom - (fy(y) - y0) / ((y1 - y0) or 1) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in xticks:
        px, _ = to_pixel(x, yticks[0])
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.line([px, top, px, height - bottom], fill=(230, 230, 230))
        draw.text((px, height - bottom + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    for y in yticks:
        _, py = to_pixel(xticks[0], y)
        draw.line([left - 5, py, left, py], fill="black")
        draw.line([left, py, width - right, py], fill=(230, 230, 230))
        draw.text((left - 8, py), f"{y:g}", fill="black", font=small, anchor="rm")
    draw.text((width / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.text(((left + width - right) / 2, height - 22), xlabel, fill="black", font=font, anchor="mt")
    label_image = Image.new("RGB", (height - top - bottom, 20), "white")
    ImageDraw.Draw(label_image).text((label_image.width / 2, 10), ylabel, fill="black", font=font, anchor="mm")
    image.paste(label_image.rotate(90, expand=True), (8, top))

    legend_y = top + 10
    for index, (label, pts) in enumerate(points.items()):
        color = COLORS[index % len(COLORS)]
        pixels = [to_pixel(x, y) for x, y in pts]
        legend = [(width - right - 150, legend_y), (width - right - 125, legend_y)]
        if label in dashed:  # a reference level: dashed, without markers, in the legend too
            for a, b in zip(pixels, pixels[1:]):
                _dashed_line(draw, a, b, color)
            _dashed_line(draw, *legend, color, dash=5)
        else:
            if len(pixels) > 1:
                draw.line(pixels, fill=color, width=2)
            for px, py in pixels:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            draw.line(legend, fill=color, width=3)
        draw.text((width - right - 118, legend_y), label, fill="black", font=small, anchor="lm")
        legend_y += 18
    image.save(path, format="PNG")
