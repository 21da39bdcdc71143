"""The `fastddim` command end to end: `sample` (embedded digits model and local diffusers pipelines), `paper`
(the DDIM paper's orderings on an exactly known distribution) and `bench`, with their one-line errors.

Truths: the shipped training digits (an exact posterior-mean denoiser run with DDIM returns training digits),
diffusers' own DDIMPipeline + DDIMScheduler for `--pipeline`, and the orderings the DDIM paper reports.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastddim
from fastddim import cli, paper
from fastddim.models import load_digits

try:
    import diffusers
except ImportError:  # the --pipeline tests need it; the rest of the command does not
    diffusers = None

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
PAD = cli.TILE_PADDING


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `fastddim argv...`, run in this process."""
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_png(path) -> np.ndarray:
    """The PNG's pixels as (height, width, channels) uint8, after checking its chunks and CRCs."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()  # chunk structure and CRCs
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def tiles(grid: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """Cut a grid written by `fastddim sample` back into its `count` tiles (row-major, square-ish, bordered)."""
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    assert grid.shape[:2] == (PAD + rows * (height + PAD), PAD + columns * (width + PAD))
    out = []
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = PAD + row * (height + PAD), PAD + column * (width + PAD)
        out.append(grid[top:top + height, left:left + width])
    return np.stack(out)


# ------------------------------------------------------------------------------------------------ the command


def test_no_command_prints_help(capsys):
    status, out, err = run_cli(capsys)
    assert status == 0 and err == ""
    for command in ("sample", "paper", "bench"):
        assert command in out


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["fastddim"].partition(":")
    assert (module, function) == ("fastddim.cli", "main")


def test_module_runs_in_a_fresh_process(tmp_path):
    """The real entry point, in a new interpreter: output on stdout, the PNG on disk, exit status 0; and an error
    is one line on stderr with exit status 2."""
    output = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "fastddim.cli", "sample", "--steps", "3", "-n", "4", "-o", output],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 steps" in done.stdout and output.is_file()
    failed = subprocess.run([sys.executable, "-m", "fastddim.cli", "sample", "--steps", "-3"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("fastddim sample: error: argument --steps")


# ------------------------------------------------------------------------------------- sample: digits model


@pytest.mark.parametrize(
    "options",
    [
        ["--eta", "0"],
        ["--eta", "1", "--spacing", "trailing"],
        ["--eta", "0.5", "--thresholding", "--spacing", "linspace"],
    ],
    ids=["ddim", "ddpm-like-trailing", "thresholded-linspace"],
)
def test_sample_writes_a_grid_of_training_digits(tmp_path, capsys, options):
    """The exact posterior-mean denoiser of a finite set maps noise onto members of the set, so with DDIM every
    tile must be one of the shipped digits (up to 8-bit rounding) - and not all the same one."""
    output = tmp_path / "digits.png"
    status, out, err = run_cli(capsys, "sample", "--steps", 10, "-n", 12, "--seed", 1, "-o", output, *options)
    assert status == 0, err
    grid = read_png(output)
    assert grid.shape[2] == 1
    cells = tiles(grid[:, :, 0], 12, 32, 32)
    # Nearest-neighbour 4x upscaling: every 4x4 block is one pixel of the 8x8 sample.
    small = cells[:, ::4, ::4]
    assert (cells == small.repeat(4, axis=1).repeat(4, axis=2)).all()
    digits, _ = load_digits()
    training = torch.from_numpy(digits.reshape(-1, 64) / 16.0)
    samples = torch.from_numpy(small.reshape(12, 64) / 255.0)
    rms = torch.cdist(samples, training) / 8
    nearest = rms.min(dim=1)
    # Distinct training digits are ~0.38 apart (rms per pixel, in [0, 1] units); 8-bit rounding is ~0.001.
    assert float(nearest.values.max()) < 0.05
    assert len(set(nearest.indices.tolist())) >= 6


def test_sample_reports_what_it_did(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "sample", "--steps", 7, "-n", 4, "--eta", 0.25, "-o", tmp_path / "s.png")
    assert status == 0
    assert "7 steps" in out and "eta=0.25" in out and "leading spacing" in out
    backend_line = next(line for line in out.splitlines() if "backend:" in line)
    assert backend_line.split("backend:")[1].strip() == cli.describe_backend(torch.device("cpu"))
    assert "ms/step" in out and "scheduler step" in out
    assert str(tmp_path / "s.png") in out


def test_sample_report_counts_in_the_singular(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "sample", "--steps", 1, "-n", 1, "-o", tmp_path / "s.png")
    assert status == 0
    assert "1 sample of shape" in out and "1 step," in out and "(1 column," in out
    assert "1 steps" not in out and "1 samples" not in out and "1 columns" not in out


def test_sample_backend_follows_fastddim_backend(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "torch")
    status, out, _ = run_cli(capsys, "sample", "--steps", 2, "-n", 1, "-o", tmp_path / "s.png")
    assert status == 0 and "backend:   torch on cpu" in out


def test_sample_is_reproducible_per_seed(tmp_path, capsys):
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (5, 5, 6)):
        assert run_cli(capsys, "sample", "--steps", 4, "-n", 9, "--eta", 1, "--seed", seed, "-o", path)[0] == 0
    first, again, other = (read_png(p) for p in paths)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps"),
        (["--steps", "ten"], "argument --steps"),
        (["--steps", "1001"], "at most num_train_timesteps=1000"),
        (["--eta", "-0.5"], "argument --eta"),
        (["--eta", "nan"], "argument --eta"),
        (["--eta", "5"], "too large"),
        (["--batch-size", "0"], "argument --batch-size"),
        (["--spacing", "quadratic"], "argument --spacing"),
        (["--seed", "-1"], "argument --seed"),
        (["--device", "tpu"], "argument --device"),
        (["--frobnicate"], "unrecognized arguments"),
        (["-o", "{tmp}/missing/out.png"], "does not exist"),
        (["-o", "{tmp}/adir.png"], "is a directory"),
        (["-o", "{tmp}/out.jpg"], "must end in .png"),
        (["--pipeline", "{tmp}/nowhere"], "no such directory"),
        (["--pipeline", "{tmp}/afile.txt"], "not a directory"),
        (["--pipeline", "{tmp}/empty"], "not a diffusers pipeline directory"),
    ],
)
def test_sample_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "never.png")]
    status, out, err = run_cli(capsys, "sample", *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastddim sample: error: ") and message in err
    assert not (tmp_path / "never.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_sample_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    status, _, err = run_cli(capsys, "sample", "--device", "cuda", "-o", tmp_path / "x.png")
    assert status == 2 and "no CUDA device" in err and err.count("\n") == 1


def test_sample_reports_an_unusable_backend_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTDDIM_BACKEND", "fast")
    status, _, err = run_cli(capsys, "sample", "-o", tmp_path / "x.png")
    assert status == 2 and "FASTDDIM_BACKEND" in err and err.count("\n") == 1


# -------------------------------------------------------------------------------- sample: diffusers pipelines

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)
# A non-default schedule, so the test also shows that the directory's scheduler config is the one used (chosen so
# that few pixels of the tiny random UNet's images saturate at 0 or 255, where any two samplers would agree).
SCHEDULER_CONFIG = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A DDIMPipeline with a tiny random UNet, saved with diffusers' save_pretrained."""
    if diffusers is None:
        pytest.skip("diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET).eval()
    directory = tmp_path_factory.mktemp("pipeline")
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**SCHEDULER_CONFIG)).save_pretrained(directory)
    return directory


def diffusers_images(unet_dir, scheduler_dir, seed, steps, eta, batch):
    """What diffusers' own DDIMPipeline (with diffusers' DDIMScheduler) makes of the same directory: uint8
    (batch, height, width, channels), rounded as its numpy_to_pil rounds."""
    unet = diffusers.UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
    scheduler = (diffusers.DDIMScheduler.from_pretrained(scheduler_dir) if scheduler_dir
                 else diffusers.DDIMScheduler())
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), eta=eta,
                  num_inference_steps=steps, output_type="np").images
    return (images * 255).round().astype(np.uint8)


def assert_same_images(ours: np.ndarray, theirs: np.ndarray):
    """Images of a short run (a few steps): fastddim's and diffusers' steps differ by float32 rounding, which an
    8-bit value shows only where x * 255 lands within that rounding of .5. (Over many steps a model can amplify
    those differences into different images: README claims, and these tests check, short runs only.)"""
    assert ours.shape == theirs.shape
    # Saturated pixels would agree whatever the sampler did: most must not be.
    assert ((theirs > 0) & (theirs < 255)).mean() > 0.5
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


def record_scheduler_steps(monkeypatch) -> list:
    """Record every fastddim DDIMScheduler.step call the command makes: (config, num_inference_steps, inputs,
    keyword arguments, the generator's state before the call, prev_sample)."""
    calls = []
    step = fastddim.DDIMScheduler.step

    def recording_step(self, model_output, timestep, sample, **kwargs):
        generator = kwargs.get("generator")
        state = generator.get_state() if generator is not None else None
        output = step(self, model_output, timestep, sample, **kwargs)
        calls.append((dict(self.config), self.num_inference_steps, model_output.clone(), timestep, sample.clone(),
                      kwargs, state, output.prev_sample.clone()))
        return output

    monkeypatch.setattr(fastddim.DDIMScheduler, "step", recording_step)
    return calls


def assert_each_step_matches_diffusers(calls):
    """Every recorded step against diffusers' DDIMScheduler.step formulas, evaluated in float64 on the very same
    inputs and noise (test_scheduler's oracle): within float32 rounding (conftest's float32 tolerance plus two
    float32 ulps of the step's largest intermediate). diffusers' own float32 result is not the reference: where
    its formulas cancel (sqrt(1 - alpha_prev - std^2) at eta = 1 near t = T) its rounding is far larger."""
    from diffusers.utils.torch_utils import randn_tensor
    from test_scheduler import assert_close_to_truth, float32_slack, step_truth

    assert calls
    config, num_inference_steps = calls[0][0], calls[0][1]
    theirs = diffusers.DDIMScheduler.from_config(config)
    theirs.set_timesteps(num_inference_steps)
    for index, (_, _, model_output, timestep, sample, kwargs, state, prev_sample) in enumerate(calls):
        eta, noise = kwargs.get("eta", 0.0), None
        if eta > 0:  # the draw diffusers' step makes with the same generator state
            noise = randn_tensor(model_output.shape, generator=torch.Generator().set_state(state),
                                 dtype=model_output.dtype)
        truth, _ = step_truth(theirs, timestep, model_output, sample, eta, noise)
        allowance = 2 * float32_slack(theirs, timestep, model_output, sample, noise)
        assert_close_to_truth(prev_sample, truth, torch.float32, f"step {index} (t={int(timestep)})", allowance)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pipeline_directory_samples_like_diffusers(pipeline_dir, tmp_path, capsys, monkeypatch, eta):
    """Each step of the command's run agrees with diffusers' step formulas on identical inputs, and the images
    of this short run (4 steps) match diffusers' own DDIMPipeline with the same seed."""
    output = tmp_path / "pipe.png"
    calls = record_scheduler_steps(monkeypatch)
    status, out, err = run_cli(capsys, "sample", "--pipeline", pipeline_dir, "--steps", 4, "-n", 3, "--eta", eta,
                               "--seed", 3, "--scale", 1, "-o", output)
    assert status == 0, err
    assert "DDIMPipeline" in out and "linspace spacing" in out
    assert len(calls) == 4
    assert_each_step_matches_diffusers(calls)
    ours = tiles(read_png(output), 3, 8, 8)
    theirs = diffusers_images(pipeline_dir / "unet", pipeline_dir / "scheduler", seed=3, steps=4, eta=eta, batch=3)
    assert_same_images(ours, theirs)


def test_unet_directory_samples_like_diffusers(pipeline_dir, tmp_path, capsys):
    """A bare UNet2DModel folder (no scheduler config) runs with fastddim's default DDIMScheduler."""
    unet_dir = tmp_path / "unet_only"
    diffusers.UNet2DModel.from_pretrained(pipeline_dir / "unet", low_cpu_mem_usage=False).save_pretrained(unet_dir)
    output = tmp_path / "unet.png"
    status, out, err = run_cli(capsys, "sample", "--pipeline", unet_dir, "--steps", 3, "-n", 2, "--scale", 1,
                               "-o", output)
    assert status == 0, err
    ours = tiles(read_png(output), 2, 8, 8)
    assert_same_images(ours, diffusers_images(unet_dir, None, seed=0, steps=3, eta=0.0, batch=2))


def test_ddpm_pipeline_directory_runs_with_ddim(tmp_path, capsys, pipeline_dir):
    """A DDPMPipeline's DDPMScheduler config becomes a DDIMScheduler, as DDIMPipeline itself converts it."""
    directory = tmp_path / "ddpm"
    unet = diffusers.UNet2DModel.from_pretrained(pipeline_dir / "unet", low_cpu_mem_usage=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
                           ).save_pretrained(directory)
    status, out, err = run_cli(capsys, "sample", "--pipeline", directory, "--steps", 3, "-n", 2, "--scale", 1,
                               "-o", tmp_path / "ddpm.png")
    assert status == 0, err
    ours = tiles(read_png(tmp_path / "ddpm.png"), 2, 8, 8)
    theirs = diffusers_images(directory / "unet", directory / "scheduler", seed=0, steps=3, eta=0.0, batch=2)
    assert_same_images(ours, theirs)


def _break_index(d):
    (d / "model_index.json").write_text("{not json")


def _drop_weights(d):
    for f in (d / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()


def _corrupt_weights(d):
    for f in (d / "unet").glob("diffusion_pytorch_model*"):
        f.write_bytes(b"definitely not safetensors")


def _drop_unet(d):
    for f in (d / "unet").iterdir():
        f.unlink()
    (d / "unet").rmdir()


def _conditional_unet(d):
    config = json.loads((d / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (d / "unet" / "config.json").write_text(json.dumps(config))


def _bad_scheduler(d):
    path = d / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = "flow"
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_break_index, "is not valid JSON"),
        (_drop_weights, "no weights"),
        (_corrupt_weights, "cannot load its UNet2DModel"),
        (_drop_unet, "no unet folder"),
        (_conditional_unet, "not a UNet2DModel"),
        (_bad_scheduler, "scheduler config is not usable"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_malformed_pipeline_directory_is_a_one_line_error(pipeline_dir, tmp_path, capsys, damage, message):
    directory = tmp_path / "damaged"
    shutil.copytree(pipeline_dir, directory)
    damage(directory)
    status, out, err = run_cli(capsys, "sample", "--pipeline", directory, "--steps", 2, "-o", tmp_path / "x.png")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastddim sample: error: ") and message in err


# ------------------------------------------------------------------------------------------------------ paper


def test_paper_writes_tables_json_and_plots(tmp_path, capsys):
    outdir = tmp_path / "paper"
    status, out, err = run_cli(capsys, "paper", "--steps", "5,20", "--etas", "0,1", "--samples", 200, "--dim", 4,
                               "--outdir", outdir)
    assert status == 0, err
    assert "Table 1" in out and "Table 2" in out and "| 20 |" in out
    results = json.loads((outdir / "results.json").read_text())
    assert results["table1_energy_distance"]["steps"] == [5, 20]
    assert results["table1_energy_distance"]["etas"] == [0.0, 1.0]
    assert np.array(results["table1_energy_distance"]["values"]).shape == (2, 2)
    assert len(results["table2_reconstruction_mse"]["values"]) == 2
    for name in ("table1.png", "table2.png"):
        pixels = read_png(outdir / name)
        assert pixels.shape == (480, 720, 3)
        # Something was drawn in colour (the series), not only black axes on white.
        assert (pixels.max(axis=2).astype(int) - pixels.min(axis=2) > 100).any()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "10,0"], "argument --steps"),
        (["--steps", "2000"], "at most 1000"),
        (["--etas", "0,-1"], "argument --etas"),
        (["--etas", "3", "--steps", "10", "--samples", "10", "--outdir", "{tmp}/out"], "too large"),
        (["--samples", "1"], "--samples"),
        (["--dim", "1"], "--dim"),
        (["--outdir", "{tmp}/afile"], "is not a directory"),
    ],
)
def test_paper_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status, out, err = run_cli(capsys, "paper", *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fastddim paper: error: ") and message in err


@pytest.fixture(scope="module")
def paper_results():
    """A reduced Table 1 / Table 2 run (the full one is `fastddim paper`): S in {10, 20, 500}, eta in {0, 1},
    2000 samples in 16 dimensions. The step is checked against diffusers elsewhere; the torch path keeps this
    run short under the Triton interpreter. The margins below are wide: at S = 10 the distances are about 15e-3
    and 21e-3, at S = 500 within the noise level (about 1e-3 at 2000 samples) of 0."""
    previous = os.environ.get("FASTDDIM_BACKEND")
    os.environ["FASTDDIM_BACKEND"] = "torch"
    try:
        config = paper.PaperConfig(steps=(10, 20, 500), etas=(0.0, 1.0), samples=2000, dim=16, seed=0)
        return paper.run(config)
    finally:
        if previous is None:
            del os.environ["FASTDDIM_BACKEND"]
        else:
            os.environ["FASTDDIM_BACKEND"] = previous


def test_paper_table1_few_steps_ddim_beats_ddpm(paper_results):
    (ddim_10, ddpm_10), _, _ = paper_results["table1_energy_distance"]["values"]
    assert ddim_10 < ddpm_10


def test_paper_table1_quality_improves_with_steps(paper_results):
    values = np.array(paper_results["table1_energy_distance"]["values"])  # rows S = 10, 20, 500; columns eta
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()


def test_paper_table1_all_etas_converge_with_many_steps(paper_results):
    values = np.array(paper_results["table1_energy_distance"]["values"])
    spread_few, spread_many = values[0, 1] - values[0, 0], abs(values[2, 1] - values[2, 0])
    assert spread_many < 0.5 * spread_few
    assert values[2].max() < 0.3 * values[0].min()


def test_paper_table1_few_steps_are_above_the_noise_level(paper_results):
    table = paper_results["table1_energy_distance"]
    assert len(table["exact_samples"]) == paper.PaperConfig().noise_sets
    assert min(table["values"][0] + table["values"][1]) > table["noise_level"]


def test_energy_distance_leaves_out_self_pairs():
    """The unbiased (U-statistic) estimate, by hand: cross pairs (0 + 3 + 1 + 2) / 4 = 1.5, within x (pairs
    i != j) 1, within y 3. Counting each point's zero distance to itself would give 2 * 1.5 - 0.5 - 1.5 = 1."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [3.0]])
    assert paper.energy_distance(x, y) == 2 * 1.5 - 1 - 3
    assert paper.energy_distance(x, y, y_within=3.0) == -1.0


def test_noise_level_and_table_marks():
    assert paper.noise_level([1.0, 2.0, 3.0]) == 2 + 3 * 1.0  # mean + 3 sample standard deviations
    results = {"table1_energy_distance": {"steps": [10, 100], "etas": [0.0], "values": [[0.02], [0.0004]],
                                          "exact_samples": [0.0001, -0.0001], "noise_level": 0.0005},
               "table2_reconstruction_mse": {"steps": [10, 100], "values": [0.01, 0.001]}}
    text = paper.format_tables(results)
    assert "| 10 | 20.00 |" in text and "| 100 | (0.40) |" in text and "Noise level: 0.50" in text


def test_paper_table2_inversion_error_falls_with_steps(paper_results):
    mse = paper_results["table2_reconstruction_mse"]["values"]  # S = 10, 20, 500
    assert mse[0] > mse[1] > mse[2] > 0
    assert mse[2] < mse[0] / 10


def test_line_plot_draws_a_dashed_series_dashed_in_the_legend_too(tmp_path):
    path = tmp_path / "plot.png"
    paper.line_plot(str(path), {"a": ([1, 10], [1.0, 2.0]), "level": ([1, 10], [1.5, 1.5])}, title="t",
                    xlabel="x", ylabel="y", logx=True, dashed={"level"})
    pixels = read_png(path).astype(int)
    # Legend entries: a 25-pixel line from x = 720 - 20 - 150 at y = 40 + 10 + 18 * index (see line_plot).
    solid, dashed = (pixels[50 + 18 * index, 550:575] for index in (0, 1))
    coloured = (lambda row: (row.max(axis=1) - row.min(axis=1)) > 100)  # noqa: E731
    assert coloured(solid).all()
    assert coloured(dashed).any() and not coloured(dashed).all()


def test_line_plot_leaves_out_values_a_log_axis_cannot_show(tmp_path):
    path = tmp_path / "plot.png"
    paper.line_plot(str(path), {"a": ([1, 10, 100], [1e-3, 0.0, 1e-5]), "b": ([1, 10, 100], [2, 3, float("nan")])},
                    title="t", xlabel="x", ylabel="y", logx=True, logy=True)
    assert read_png(path).shape == (480, 720, 3)


# ------------------------------------------------------------------------------------------------------ bench


def test_bench_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    status, out, err = run_cli(capsys, "bench", "--quick", "--device", "cpu", "-o", output)
    assert status == 0, err
    results = json.loads(output.read_text())  # the schema is fastddim.benchmark's (tested in bench/)
    assert results["cases"]
    assert "| case |" in out and str(output) in out


def test_stubbed_launches_launch_no_kernel_and_restore_every_one():
    """The host benchmark's stub: inside, fastddim's Triton backend runs its host code on CPU tensors and no kernel
    (a step's outputs are allocated, nothing is launched); after, every kernel and the backend choice are back."""
    pytest.importorskip("triton")
    from fastddim import benchmark, ops
    from fastddim.kernels import ddim, threshold

    def kernels():
        return {(module.__name__, name): value for module in (ddim, threshold) for name, value in vars(module).items()
                if type(value).__name__ in ("JITFunction", "InterpretedFunction")}

    originals, interpreting = kernels(), ops.triton_interpreting
    assert ("fastddim.kernels.ddim", "_ddim_step_kernel") in originals
    scheduler = fastddim.DDIMScheduler()
    scheduler.set_timesteps(50)
    sample = torch.randn(1, 4, 8, 8)
    with benchmark.stubbed_launches():
        assert kernels() == {}
        prev, x0 = scheduler.step(torch.randn(1, 4, 8, 8), 780, sample, return_dict=False)
        assert scheduler._step_memo[1].__qualname__.startswith("StepLauncher.")  # the Triton backend's plan
        assert prev.shape == x0.shape == sample.shape
    assert kernels() == originals and ops.triton_interpreting is interpreting


def test_bench_rejects_an_unwritable_output(tmp_path, capsys):
    status, out, err = run_cli(capsys, "bench", "-o", tmp_path / "missing" / "b.json")
    assert status == 2 and out == "" and "does not exist" in err and err.count("\n") == 1
