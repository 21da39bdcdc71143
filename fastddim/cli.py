"""The `fastddim` command: `sample`, `paper` and `bench`.

    fastddim sample                  # 64 handwritten digits from noise, on CPU, nothing to download
    fastddim sample --pipeline DIR   # any local unconditional diffusers pipeline, with fastddim's scheduler
    fastddim paper                   # the DDIM paper's Tables 1 and 2 on an exactly known distribution
    fastddim bench                   # step microbenchmarks on this machine's device

Errors are one line on stderr (`fastddim <command>: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

TILE_PADDING = 2  # pixels of border around and between the tiles of a sample grid
GRID_BACKGROUND = 128  # the border's gray level


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line `CLIError`s instead of usage + message."""

    def error(self, message):
        raise CLIError(message)


# ----------------------------------------------------------------------------------------------- option types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _eta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 is DDIM, 1 is DDPM-like), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 is DDIM, 1 is DDPM-like), got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(_positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return values


def _eta_list(text: str) -> tuple[float, ...]:
    values = tuple(_eta(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**63), got {text!r}")
    return value


# --------------------------------------------------------------------------------------------- shared helpers


def _count(number: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return torch.device(name)


def describe_backend(device: torch.device, thresholding: bool = False) -> str:
    """The backend the scheduler's step uses on `device`, in words (see `fastddim.ops.select_backend`)."""
    from fastddim import ops

    try:
        backend = ops.select_backend(device)
    except (ValueError, RuntimeError) as error:
        raise CLIError(str(error)) from None
    if thresholding:
        return "torch (thresholded steps run on the torch path)"
    if backend == "triton" and device.type == "cpu":
        return "triton, in Triton's interpreter on the CPU (TRITON_INTERPRET=1: slow, for testing kernels)"
    if backend == "triton":
        return f"triton (fused kernel) on {torch.cuda.get_device_name(device)}"
    return f"torch on {device.type}"


def check_output_path(path: str, suffix: str = ".png") -> str:
    """Fail early, before any work, if `path` cannot be written."""
    if not path.lower().endswith(suffix):
        raise CLIError(f"output path {path!r} must end in {suffix}")
    if os.path.isdir(path):
        raise CLIError(f"output path {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CLIError(f"cannot write {path!r}: permission denied")
    return path


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """Tile uint8 images (batch, height, width, channels) into one image, row-major, `columns` per row (default:
    a square-ish grid), each upscaled `scale` times (nearest neighbour), with a TILE_PADDING-pixel border of
    gray GRID_BACKGROUND around and between tiles."""
    batch, height, width, channels = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        height, width = height * scale, width * scale
    columns = columns or math.ceil(math.sqrt(batch))
    rows = math.ceil(batch / columns)
    pad = TILE_PADDING
    grid = np.full((pad + rows * (height + pad), pad + columns * (width + pad), channels), GRID_BACKGROUND, np.uint8)
    for index in range(batch):
        row, column = divmod(index, columns)
        top, left = pad + row * (height + pad), pad + column * (width + pad)
        grid[top:top + height, left:left + width] = images[index]
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 (height, width, 1 | 3 | 4) array as a PNG."""
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    try:
        Image.fromarray(image[:, :, 0] if mode == "L" else image).save(path, format="PNG")
    except OSError as error:
        raise CLIError(f"cannot write {path!r}: {error.strerror or error}") from None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-space images in [-1, 1], (batch, channels, height, width) -> uint8 (batch, height, width, channels),
    rounded as diffusers' pipelines round them ((x / 2 + 0.5).clamp(0, 1) * 255, then round)."""
    images = (images.detach().float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return (images * 255).round().astype(np.uint8)


def _progress(total: int, description: str, enabled: bool):
    """A tqdm progress bar on stderr (when tqdm is installed and stderr is a terminal, or `enabled` is True)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety: run without it
        return None
    return tqdm(total=total, desc=description, unit="step", disable=None if not enabled else False, file=sys.stderr)


# --------------------------------------------------------------------------------------------------- sampling


def ddim_loop(model, scheduler, noise: torch.Tensor, num_inference_steps: int, eta: float, generator,
              progress=None) -> tuple[torch.Tensor, dict]:
    """The loop of diffusers' DDIMPipeline: returns (samples, timings in seconds: total, model, scheduler)."""
    device = noise.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scheduler.set_timesteps(num_inference_steps)
    timings = {"model": 0.0, "scheduler": 0.0}
    x = noise
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            before_model = time.perf_counter()
            model_output = model(x, t)
            sync()
            before_step = time.perf_counter()
            x = scheduler.step(model_output, t, x, eta=eta, generator=generator).prev_sample
            sync()
            after_step = time.perf_counter()
            timings["model"] += before_step - before_model
            timings["scheduler"] += after_step - before_step
            if progress is not None:
                progress.update(1)
    timings["total"] = time.perf_counter() - start
    return x, timings


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise CLIError(f"{path} is not valid JSON ({error})") from None
    except OSError as error:
        raise CLIError(f"cannot read {path}: {error.strerror or error}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path} must hold a JSON object")
    return data


def _check_unet_directory(unet_dir: str, directory: str) -> None:
    """Clear errors for the usual ways a UNet2DModel folder is incomplete, before diffusers sees it."""
    if not os.path.isdir(unet_dir):
        raise CLIError(f"--pipeline {directory!r}: no unet folder ({unet_dir} is missing)")
    config_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"--pipeline {directory!r}: {config_path} is missing")
    class_name = _read_json(config_path).get("_class_name")
    if class_name != "UNet2DModel":
        raise CLIError(f"--pipeline {directory!r}: {config_path} describes a {class_name}, not a UNet2DModel "
                       "(fastddim sample runs unconditional UNet2DModel pipelines such as DDPMPipeline, DDIMPipeline)")
    weights = [name for name in os.listdir(unet_dir) if name.startswith("diffusion_pytorch_model")]
    if not weights:
        raise CLIError(f"--pipeline {directory!r}: no weights in {unet_dir} (expected "
                       "diffusion_pytorch_model.safetensors or .bin)")


def load_pipeline(directory: str):
    """(unet, scheduler config or None, description) from a local diffusers pipeline directory (model_index.json
    with a UNet2DModel `unet`, e.g. DDPMPipeline or DDIMPipeline) or a UNet2DModel directory (config.json)."""
    if not os.path.exists(directory):
        raise CLIError(f"--pipeline {directory!r}: no such directory")
    if not os.path.isdir(directory):
        raise CLIError(f"--pipeline {directory!r}: not a directory")
    index_path = os.path.join(directory, "model_index.json")
    if os.path.isfile(index_path):
        index = _read_json(index_path)
        if "unet" not in index:
            raise CLIError(f"--pipeline {directory!r}: model_index.json lists no unet (fastddim sample runs "
                           "unconditional UNet2DModel pipelines such as DDPMPipeline and DDIMPipeline)")
        unet_dir = os.path.join(directory, "unet")
        scheduler_path = os.path.join(directory, "scheduler", "scheduler_config.json")
        description = f"{index.get('_class_name', 'the pipeline')} at {directory}"
    elif os.path.isfile(os.path.join(directory, "config.json")):
        unet_dir = directory
        scheduler_path = os.path.join(directory, "scheduler_config.json")
        description = f"the UNet2DModel at {directory}"
    else:
        raise CLIError(f"--pipeline {directory!r}: not a diffusers pipeline directory (no model_index.json, "
                       "and no config.json of a UNet2DModel)")
    _check_unet_directory(unet_dir, directory)
    try:
        import diffusers
    except ImportError:
        raise CLIError("--pipeline needs diffusers: pip install diffusers") from None
    verbosity = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # diffusers logs loading trouble on top of raising it: say it once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it.
            unet = diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as error:  # OSError, ValueError, safetensors and torch errors for damaged files
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CLIError(f"--pipeline {directory!r}: cannot load its UNet2DModel: {first_line}") from None
    finally:
        diffusers.logging.set_verbosity(verbosity)
    scheduler_config = _read_json(scheduler_path) if os.path.isfile(scheduler_path) else None
    return unet.eval(), scheduler_config, description


def cmd_sample(args) -> int:
    from fastddim import DDIMScheduler
    from fastddim.scheduler import randn_tensor

    device = _device(args.device)
    output = check_output_path(args.output)
    overrides = {"thresholding": True} if args.thresholding else {}
    if args.spacing:
        overrides["timestep_spacing"] = args.spacing

    if args.pipeline:
        unet, scheduler_config, what = load_pipeline(args.pipeline)
        unet = unet.to(device)
        try:
            scheduler = DDIMScheduler.from_config(scheduler_config or {}, **overrides)
        except (ValueError, TypeError) as error:
            raise CLIError(f"--pipeline {args.pipeline!r}: its scheduler config is not usable: {error}") from None
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (args.batch_size, unet.config.in_channels, *size)
        dtype = unet.dtype

        def model(x, t):
            return unet(x, t).sample
    else:
        from fastddim.models import PosteriorMeanDenoiser

        scheduler = DDIMScheduler(**overrides)
        model = PosteriorMeanDenoiser.digits(scheduler.alphas_cumprod, scheduler.config.prediction_type)
        what = "the posterior-mean denoiser of 1797 8x8 handwritten digits (UCI, Alpaydin & Kaynak, CC BY 4.0)"
        shape = (args.batch_size, *model.sample_shape)
        dtype = torch.float32

    num_train = scheduler.config.num_train_timesteps
    if args.steps > num_train:
        raise CLIError(f"argument --steps: at most num_train_timesteps={num_train}, got {args.steps}")
    backend = describe_backend(device, scheduler.config.thresholding)
    # One CPU generator draws the initial noise and every step's noise, as diffusers' pipelines do with it.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    bar = _progress(args.steps, "fastddim sample", args.progress)
    try:
        samples, timings = ddim_loop(model, scheduler, noise, args.steps, args.eta, generator, progress=bar)
    except ValueError as error:  # the scheduler's argument errors, e.g. an eta above 1 that makes a step NaN
        raise CLIError(str(error)) from None
    finally:
        if bar is not None:
            bar.close()

    images = to_uint8(samples)
    scale = args.scale or max(1, 32 // max(images.shape[1], images.shape[2]))
    grid = image_grid(images, scale=scale)
    write_png(output, grid)

    steps = args.steps
    per_step = lambda seconds: f"{seconds / steps * 1e3:.2f} ms"  # noqa: E731
    columns = math.ceil(math.sqrt(args.batch_size))
    print(f"fastddim sample: {_count(args.batch_size, 'sample')} of shape {tuple(shape[1:])} from {what}")
    print(f"  scheduler: fastddim.DDIMScheduler, {_count(steps, 'step')}, {scheduler.config.timestep_spacing} spacing, "
          f"eta={args.eta:g}, thresholding {'on' if scheduler.config.thresholding else 'off'}, seed {args.seed}")
    print(f"  backend:   {backend}")
    print(f"  time:      {timings['total']:.3f} s, {per_step(timings['total'])}/step "
          f"(model {per_step(timings['model'])}, scheduler step {per_step(timings['scheduler'])})")
    print(f"  wrote {output} ({_count(columns, 'column')}, "
          f"{images.shape[2] * scale}x{images.shape[1] * scale} px per sample)")
    return 0


# ------------------------------------------------------------------------------------------------------ paper


def cmd_paper(args) -> int:
    from fastddim import paper

    config = paper.PaperConfig(steps=args.steps, etas=args.etas, samples=args.samples, dim=args.dim,
                               seed=args.seed)
    if max(config.steps) > 1000:
        raise CLIError(f"argument --steps: at most 1000 (the schedule's num_train_timesteps), got {max(config.steps)}")
    if args.samples < 2:
        raise CLIError("argument --samples: at least 2")
    if args.dim < 2:
        raise CLIError("argument --dim: at least 2 (the mixture's modes lie on a circle)")
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        raise CLIError(f"--outdir {args.outdir!r} exists and is not a directory")
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create --outdir {args.outdir!r}: {error.strerror or error}") from None
    if not os.access(args.outdir, os.W_OK):
        raise CLIError(f"cannot write into --outdir {args.outdir!r}: permission denied")

    backend = describe_backend(torch.device(config.device))
    bar = _progress(paper.total_steps(config), "fastddim paper", args.progress)
    start = time.perf_counter()
    try:
        results = paper.run(config, progress=bar.update if bar is not None else None)
    except ValueError as error:  # the scheduler's argument errors, e.g. an eta above 1 that makes a step NaN
        raise CLIError(str(error)) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    try:
        paths = paper.write_outputs(results, args.outdir)
    except OSError as error:
        raise CLIError(f"cannot write into --outdir {args.outdir!r}: {error.strerror or error}") from None

    print(f"fastddim paper: DDIM (Song et al., 2021) on a mixture of {config.modes} Gaussians in {config.dim} "
          f"dimensions with its exact noise predictor; {config.samples} samples per cell, seed {config.seed}, "
          f"{config.timestep_spacing} spacing")
    print(f"  backend: {backend}; {_count(paper.total_steps(config), 'step')} in {elapsed:.1f} s")
    print()
    print(paper.format_tables(results))
    print()
    print("wrote " + ", ".join(paths))
    return 0


# ------------------------------------------------------------------------------------------------------ bench


def cmd_bench(args) -> int:
    try:
        from fastddim import benchmark
    except ImportError as error:
        raise CLIError(f"the benchmark module is not available ({error})") from None
    output = check_output_path(args.output, suffix=".json")
    device = _device(args.device)
    # One line per case on stderr while it runs (a full run takes a while); the table goes to stdout at the end.
    results = benchmark.run(device=device, quick=args.quick, progress=lambda line: print(line, file=sys.stderr))
    table = benchmark.format_table(results)
    try:
        with open(output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    except OSError as error:
        raise CLIError(f"cannot write {output!r}: {error.strerror or error}") from None
    print(table)
    print(f"wrote {output}")
    return 0


# ------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastddim", description="fastddim: a faster drop-in DDIMScheduler for diffusers.")
    from fastddim import __version__

    parser.add_argument("--version", action="version", version=f"fastddim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sample = commands.add_parser(
        "sample", help="DDIM-sample images and write a PNG grid",
        description="DDIM sampling with fastddim's scheduler. Without --pipeline the model is the exact "
                    "posterior-mean denoiser of 1797 8x8 handwritten digits shipped with fastddim (UCI Optical "
                    "Recognition of Handwritten Digits, Alpaydin & Kaynak, CC BY 4.0): no training, no download.")
    sample.add_argument("--steps", type=_positive_int, default=50, metavar="S",
                        help="number of DDIM steps S (default 50)")
    sample.add_argument("--eta", type=_eta, default=0.0, metavar="ETA",
                        help="noise weight: 0 is DDIM, 1 is DDPM-like (default 0)")
    sample.add_argument("--spacing", choices=("leading", "trailing", "linspace"),
                        help="timestep spacing (default: the scheduler config's, 'leading' for the digits)")
    sample.add_argument("--seed", type=_seed, default=0, metavar="N", help="random seed (default 0)")
    sample.add_argument("--batch-size", "-n", type=_positive_int, default=64, metavar="N",
                        help="number of samples (default 64)")
    sample.add_argument("--output", "-o", default="samples.png", metavar="PNG",
                        help="PNG grid to write (default samples.png)")
    sample.add_argument("--thresholding", action="store_true", help="dynamic thresholding of the predicted x0")
    sample.add_argument("--pipeline", metavar="DIR",
                        help="a local diffusers pipeline directory (DDPMPipeline/DDIMPipeline) or UNet2DModel "
                             "directory; its scheduler config is kept, its scheduler replaced by fastddim's")
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to sample (default: cuda if available, else cpu)")
    sample.add_argument("--scale", type=_positive_int, default=None, metavar="N",
                        help="upscale each sample this many times in the grid (default: to at least 32 px)")
    sample.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    sample.set_defaults(handler=cmd_sample)

    paper = commands.add_parser(
        "paper", help="reproduce the DDIM paper's Tables 1 and 2 on an exactly known distribution",
        description="Sample quality against steps S and eta (Table 1) and inversion error against S (Table 2), "
                    "measured on a Gaussian mixture with its exact noise predictor against exact samples.")
    paper.add_argument("--steps", type=_int_list, default=(10, 20, 50, 100, 1000), metavar="S,S,...",
                       help="comma-separated step counts S (default 10,20,50,100,1000)")
    paper.add_argument("--etas", type=_eta_list, default=(0.0, 0.2, 0.5, 1.0), metavar="ETA,ETA,...",
                       help="comma-separated etas (default 0,0.2,0.5,1)")
    paper.add_argument("--samples", type=_positive_int, default=4000, metavar="N",
                       help="samples per table cell (default 4000)")
    paper.add_argument("--dim", type=_positive_int, default=16, metavar="D",
                       help="dimension of the mixture (default 16)")
    paper.add_argument("--seed", type=_seed, default=0, metavar="N", help="random seed (default 0)")
    paper.add_argument("--outdir", default="paper", metavar="DIR",
                       help="where to write results.json and the plots (default paper/)")
    paper.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    paper.set_defaults(handler=cmd_paper)

    bench = commands.add_parser(
        "bench", help="step microbenchmarks against diffusers on this machine",
        description="The step microbenchmarks of bench/ on this machine's device (CUDA if any, else CPU), "
                    "against diffusers' DDIMScheduler.step when diffusers is installed.")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to benchmark (default: cuda if available, else cpu)")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bench.add_argument("--output", "-o", default="bench.json", metavar="JSON",
                       help="JSON file to write (default bench.json)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.handler(args)
    except CLIError as error:
        prefix = f"fastddim {command}" if command in ("sample", "paper", "bench") else "fastddim"
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastddim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
