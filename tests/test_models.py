"""The exact denoisers of fastddim.models and the shipped digits, against independent truths: the UCI
description of the digits, brute-force float64 formulas, Tweedie's formula through autograd of the exact
log-density, and diffusers' own DDIMScheduler for the prediction-type conversions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastddim import DDIMScheduler
from fastddim.models import GaussianMixture, PosteriorMeanDenoiser, load_digits
from fastddim.paper import energy_distance

diffusers = pytest.importorskip("diffusers")

ALPHAS = DDIMScheduler().alphas_cumprod  # diffusers' default linear schedule (checked bit-exact elsewhere)
TIMESTEPS = [0, 1, 250, 999]


# ------------------------------------------------------------------------------------------------- the digits


def test_digits_match_the_uci_description():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,)
    # UCI: "All input attributes are integers in the range 0..16"; all 17 levels occur.
    assert sorted(np.unique(images).tolist()) == list(range(17))
    # UCI's class distribution of the test set optdigits.tes.
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The first row of optdigits.tes (and of scikit-learn's digits.csv.gz): a 0.
    first = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
             0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
    assert images[0].reshape(-1).tolist() == first and labels[0] == 0


def test_digits_denoiser_data_is_scaled_to_minus_one_one():
    model = PosteriorMeanDenoiser.digits(ALPHAS)
    images, _ = load_digits()
    assert model.sample_shape == (1, 8, 8)
    expected = torch.from_numpy(images.reshape(1797, 64).astype(np.float64)) / 8 - 1
    torch.testing.assert_close(model.data, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------- posterior-mean denoiser math


def brute_force_posterior_mean(data: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """E[x0 | x_t = x] for x0 uniform over `data`, straight from the definition: weights proportional to
    exp(-|x - sqrt(a) x_i|^2 / (2 (1 - a))), in float64, one sample at a time."""
    out = []
    for row in x.to(torch.float64):
        sq = ((row - math.sqrt(alpha) * data) ** 2).sum(dim=1)
        logw = -sq / (2 * (1 - alpha))
        w = torch.exp(logw - logw.max())
        out.append((w[:, None] * data).sum(0) / w.sum())
    return torch.stack(out)


@pytest.mark.parametrize("timestep", TIMESTEPS)
def test_posterior_mean_matches_the_definition(timestep):
    g = torch.Generator().manual_seed(timestep)
    data = torch.rand(7, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    model = PosteriorMeanDenoiser(data, ALPHAS, prediction_type="sample")
    alpha = float(ALPHAS[timestep])
    # Samples near the scaled data points (where the weights are sharp) and far from them.
    noise = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    x = math.sqrt(alpha) * data[[0, 3, 5]] + math.sqrt(1 - alpha) * noise
    x = torch.cat([x, 3 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)])
    expected = brute_force_posterior_mean(data.reshape(7, -1), x.reshape(5, -1), alpha).reshape(x.shape)
    torch.testing.assert_close(model(x, timestep), expected, rtol=1e-9, atol=1e-9)


def test_posterior_mean_of_one_point_is_that_point():
    point = torch.tensor([[[0.25, -0.5], [1.0, 0.0]]], dtype=torch.float64)
    model = PosteriorMeanDenoiser(point[None], ALPHAS, prediction_type="epsilon")
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    alpha = float(ALPHAS[500])
    # With one candidate x0 is known, and the noise is whatever separates x from sqrt(a) x0.
    expected = (x - math.sqrt(alpha) * point) / math.sqrt(1 - alpha)
    torch.testing.assert_close(model(x, 500), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep", [1, 600])
def test_prediction_types_give_diffusers_the_same_x0(prediction_type, timestep):
    """diffusers' own DDIMScheduler recovers the denoiser's E[x0 | x_t] from each prediction type."""
    data = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = PosteriorMeanDenoiser(data, ALPHAS, "sample")(x, timestep)
    output = PosteriorMeanDenoiser(data, ALPHAS, prediction_type)(x, timestep)
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(1000)
    recovered = scheduler.step(output, timestep, x).pred_original_sample
    torch.testing.assert_close(recovered, x0, rtol=1e-5, atol=1e-5)


def test_v_prediction_matches_diffusers_get_velocity():
    data = torch.rand(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0 = PosteriorMeanDenoiser(data, ALPHAS, "sample")(x, 300)
    eps = PosteriorMeanDenoiser(data, ALPHAS, "epsilon")(x, 300)
    v = PosteriorMeanDenoiser(data, ALPHAS, "v_prediction")(x, 300)
    expected = diffusers.DDIMScheduler().get_velocity(x0, eps, torch.tensor([300]))
    torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-6)


def test_one_timestep_per_sample_equals_separate_calls():
    model = PosteriorMeanDenoiser.digits(ALPHAS)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    timesteps = torch.tensor([0, 400, 999])
    together = model(x, timesteps)
    for i, t in enumerate(timesteps):
        torch.testing.assert_close(together[i:i + 1], model(x[i:i + 1], int(t)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_the_sample_dtype_and_shape(dtype):
    model = PosteriorMeanDenoiser.digits(ALPHAS)
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    out = model(x, torch.tensor(10))
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: m(torch.zeros(1, 1, 8, 8), 1000), ValueError),
        (lambda m: m(torch.zeros(1, 1, 8, 8), -1), ValueError),
        (lambda m: m(torch.zeros(1, 1, 8, 8), torch.tensor(1.5)), TypeError),
        (lambda m: m(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2, 3])), ValueError),
        (lambda m: m(torch.zeros(1, 1, 4, 4), 1), ValueError),
    ],
    ids=["timestep-too-large", "negative-timestep", "float-timestep", "timestep-count", "wrong-shape"],
)
def test_bad_calls_raise_clear_errors(call, error):
    with pytest.raises(error):
        call(PosteriorMeanDenoiser.digits(ALPHAS))


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        PosteriorMeanDenoiser.digits(ALPHAS, prediction_type="noise")


# ---------------------------------------------------------------------------------------- Gaussian mixtures


def mixture_log_density(mixture: GaussianMixture, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """log q_t(x) of the noised mixture, with torch.distributions (independent of the denoiser's algebra)."""
    D = torch.distributions
    scale = (alpha * mixture.stds**2 + (1 - alpha)).sqrt()
    components = D.Independent(D.Normal(math.sqrt(alpha) * mixture.means, scale), 1)
    return D.MixtureSameFamily(D.Categorical(probs=mixture.weights), components).log_prob(x)


@pytest.mark.parametrize("timestep", [0, 50, 500, 999])
def test_mixture_noise_predictor_is_tweedies_formula(timestep):
    """The optimal noise prediction is -sqrt(1 - a) * grad log q_t(x) (Tweedie); the gradient by autograd."""
    g = torch.Generator().manual_seed(timestep)
    mixture = GaussianMixture(torch.tensor([1.0, 2.0, 0.5]), torch.randn(3, 4, generator=g, dtype=torch.float64),
                              0.05 + torch.rand(3, 4, generator=g, dtype=torch.float64))
    alpha = float(ALPHAS[timestep])
    noise = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x = math.sqrt(alpha) * mixture.sample(6, g) + math.sqrt(1 - alpha) * noise
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(mixture_log_density(mixture, x, alpha).sum(), x)
    expected = -math.sqrt(1 - alpha) * score
    torch.testing.assert_close(mixture.denoiser(ALPHAS)(x.detach(), timestep), expected, rtol=1e-8, atol=1e-8)


def test_one_gaussian_has_the_closed_form_posterior_mean():
    mean, std = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.4
    model = GaussianMixture([1.0], mean, std).denoiser(ALPHAS, prediction_type="sample")
    alpha = float(ALPHAS[200])
    x = torch.randn(5, 2, dtype=torch.float64)
    # x0 ~ N(m, s^2), x = sqrt(a) x0 + sqrt(1 - a) e: E[x0 | x] = m + sqrt(a) s^2 / (a s^2 + 1 - a) (x - sqrt(a) m).
    expected = mean + math.sqrt(alpha) * std**2 / (alpha * std**2 + 1 - alpha) * (x - math.sqrt(alpha) * mean)
    torch.testing.assert_close(model(x, 200), expected, rtol=1e-12, atol=1e-12)


def test_mixture_samples_have_the_mixture_moments():
    mixture = GaussianMixture([1.0, 3.0], [[-1.0, 0.0], [2.0, 1.0]], [[0.5, 0.1], [0.2, 0.3]])
    n = 40000
    x = mixture.sample(n, torch.Generator().manual_seed(0))
    w, mu, var = mixture.weights, mixture.means, mixture.stds**2
    mean = (w[:, None] * mu).sum(0)
    variance = (w[:, None] * (var + mu**2)).sum(0) - mean**2
    # Five standard errors of the mean; the variance within 5%.
    assert ((x.mean(0) - mean).abs() < 5 * (variance / n).sqrt()).all()
    torch.testing.assert_close(x.var(0), variance, rtol=0.05, atol=0)


def test_ring_places_equal_modes_on_a_circle():
    mixture = GaussianMixture.ring(modes=6, dim=5, radius=0.8, std=0.05)
    assert mixture.means.shape == (6, 5)
    torch.testing.assert_close(mixture.means[:, :2].norm(dim=1), torch.full((6,), 0.8, dtype=torch.float64))
    assert (mixture.means[:, 2:] == 0).all() and (mixture.stds == 0.05).all()
    torch.testing.assert_close(mixture.weights, torch.full((6,), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "weights, means, stds",
    [([1.0], [0.0, 1.0], 0.1), ([1.0, -1.0], [[0.0], [1.0]], 0.1), ([1.0], [[0.0]], 0.0)],
    ids=["means-not-2d", "negative-weight", "zero-std"],
)
def test_invalid_mixtures_are_rejected(weights, means, stds):
    with pytest.raises(ValueError):
        GaussianMixture(weights, means, stds)


# ------------------------------------------------------------------------------------------ energy distance


def test_energy_distance_in_one_dimension_is_scipys_squared_without_self_pairs():
    """scipy's energy_distance (from the empirical CDFs) is the square root of the V-statistic, which counts each
    point's zero distance to itself in the within-sample means; the unbiased estimate used here leaves those
    out: U = V - B_x / (n - 1) - B_y / (m - 1), B the V-statistic's within-sample mean (all n^2 pairs)."""
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 1, generator=g), 0.5 + 1.5 * torch.randn(200, 1, generator=g)
    a, b = x[:, 0].double().numpy(), y[:, 0].double().numpy()
    within = (lambda v: np.abs(v[:, None] - v[None, :]).mean())  # noqa: E731
    expected = stats.energy_distance(a, b) ** 2 - within(a) / (len(a) - 1) - within(b) / (len(b) - 1)
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_energy_distance_separates_distributions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64)
    same = energy_distance(x, torch.randn(500, 3, generator=g, dtype=torch.float64))
    shifted = energy_distance(x, 0.5 + torch.randn(500, 3, generator=g, dtype=torch.float64))
    assert shifted > 0 and abs(same) < shifted / 5  # unbiased: 0 on average for one distribution, either sign
