"""Denoisers that need no training and no download: exact noise predictors of known distributions.

- `PosteriorMeanDenoiser`: the optimal (posterior-mean) denoiser of a finite set of images, e.g. the 8x8
  handwritten digits shipped in `fastddim/data/` (`PosteriorMeanDenoiser.digits()`). It is what a perfectly
  trained network would predict for that training set, so DDIM turns noise into recognisable digits.
- `GaussianMixture`: a mixture of Gaussians with diagonal covariances, its exact samples, and its exact noise
  predictor (`GaussianMixture.denoiser`), used by `fastddim paper` to measure sampling error exactly.

Both denoisers are called like a diffusers UNet's forward, `model(sample, timestep)`, with `timestep` an int,
a one-element tensor or one timestep per sample, and return what the scheduler's `prediction_type` expects.
The math runs in float64 on the sample's device (the sets are small); the result has the sample's dtype.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 handwritten digits of UCI "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak, CC BY
    4.0; see fastddim/data/README.md): (images, labels), uint8 images of shape (1797, 8, 8) in 0..16."""
    with resources.files("fastddim").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


class _ExactDenoiser:
    """Shared by the exact denoisers: timestep handling and the conversion of E[x0 | x_t] to a model output."""

    def __init__(self, alphas_cumprod, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self._on_device = {}

    def _cached(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`tensor` (a float64 CPU constant of this model) on `device`, copied once per device."""
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = tensor.to(device)
        return self._on_device[key]

    def _alpha(self, timestep, batch: int) -> torch.Tensor:
        """alpha_cumprod at `timestep`, as a (batch, 1) float64 column."""
        t = torch.as_tensor(timestep).detach().cpu()
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"timestep must be an integer or an integer tensor, got {t.dtype}")
        t = t.reshape(-1).long()
        if t.numel() not in (1, batch):
            raise ValueError(f"timestep must hold one timestep or one per sample ({batch}), got {t.numel()}")
        if bool(((t < 0) | (t >= len(self.alphas_cumprod))).any()):
            raise ValueError(f"timestep must be in [0, {len(self.alphas_cumprod)}), got {t.tolist()}")
        return self.alphas_cumprod[t].expand(batch).reshape(batch, 1).clone()

    def _x0_mean(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x] for flattened float64 samples x of shape (batch, dim)."""
        raise NotImplementedError

    def __call__(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        batch = sample.shape[0]
        x = sample.detach().reshape(batch, -1).to(torch.float64)
        alpha = self._alpha(timestep, batch).to(x.device)
        x0 = self._x0_mean(x, alpha)
        if self.prediction_type == "sample":
            out = x0
        else:
            eps = (x - alpha.sqrt() * x0) / (1 - alpha).sqrt()
            out = eps if self.prediction_type == "epsilon" else alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
        return out.reshape(sample.shape).to(sample.dtype)


class PosteriorMeanDenoiser(_ExactDenoiser):
    """The optimal denoiser of a finite set {x_i} under the forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    with x0 uniform over the set:

        E[x0 | x_t] = sum_i softmax_i(-|x_t - sqrt(a_t) x_i|^2 / (2 (1 - a_t))) x_i

    Args:
        data (`torch.Tensor`): the set, shape (n, *sample_shape), e.g. (n, 1, 8, 8) images in [-1, 1].
        alphas_cumprod (`torch.Tensor`): the scheduler's `alphas_cumprod` (one per training timestep).
        prediction_type (`str`): "epsilon" (default), "sample" or "v_prediction", as the scheduler expects.
    """

    def __init__(self, data: torch.Tensor, alphas_cumprod, prediction_type: str = "epsilon"):
        super().__init__(alphas_cumprod, prediction_type)
        data = torch.as_tensor(data)
        if data.dim() < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape (n, *sample_shape) with n >= 1, got {tuple(data.shape)}")
        self.sample_shape = tuple(data.shape[1:])
        self.data = data.detach().reshape(data.shape[0], -1).to(device="cpu", dtype=torch.float64)
        self._half_sq_norms = 0.5 * (self.data**2).sum(dim=1)

    @classmethod
    def digits(cls, alphas_cumprod, prediction_type: str = "epsilon") -> "PosteriorMeanDenoiser":
        """The denoiser of the 1797 shipped 8x8 digits, scaled to [-1, 1]; samples have shape (1, 8, 8)."""
        images, _ = load_digits()
        data = torch.from_numpy(images.astype(np.float64) / 16.0 * 2.0 - 1.0).unsqueeze(1)
        return cls(data, alphas_cumprod, prediction_type)

    def _x0_mean(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.data.shape[1]:
            raise ValueError(f"sample must have shape (batch, *{self.sample_shape}), "
                             f"got {x.shape[1]} values per sample")
        # -|x - s x_i|^2 / (2 (1 - a)) = (s <x, x_i> - s^2 |x_i|^2 / 2) / (1 - a) - |x|^2 / (2 (1 - a)); the last
        # term is the same for every i and cancels in the softmax.
        data = self._cached("data", self.data, x.device)
        half_sq_norms = self._cached("half_sq_norms", self._half_sq_norms, x.device)
        logits = (alpha.sqrt() * (x @ data.T) - alpha * half_sq_norms) / (1 - alpha)
        return torch.softmax(logits, dim=1) @ data


class GaussianMixture:
    """A mixture of Gaussians with diagonal covariances: exact samples and the exact noise predictor.

    Args:
        weights (`array`, shape (k,)): the mixture weights (normalised here).
        means (`array`, shape (k, dim)): the component means.
        stds (`array`, shape (k, dim) or (k,) or scalar): the component standard deviations, per dimension.
    """

    def __init__(self, weights, means, stds):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must have shape (k, dim), got {tuple(self.means.shape)}")
        k, dim = self.means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {k} positive numbers, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = (stds.reshape(-1, 1) if stds.dim() == 1 else stds).expand(k, dim).clone()
        if not bool((self.stds > 0).all()):
            raise ValueError("stds must be positive")
        self.dim = dim

    @classmethod
    def ring(cls, modes: int = 8, dim: int = 2, radius: float = 0.8, std: float = 0.05) -> "GaussianMixture":
        """`modes` equal-weight, narrow components on a circle in the first two coordinates (the other
        coordinates, if any, are centred at 0): a distribution with fine structure, far from Gaussian."""
        angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        means = torch.zeros(modes, dim, dtype=torch.float64)
        means[:, 0] = radius * torch.cos(angles)
        means[:, 1] = radius * torch.sin(angles)
        return cls(torch.ones(modes), means, std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` exact samples, float64, shape (n, dim)."""
        components = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[components] + self.stds[components] * noise

    def denoiser(self, alphas_cumprod, prediction_type: str = "epsilon") -> "GaussianMixtureDenoiser":
        """The exact model of this mixture for a scheduler with these `alphas_cumprod`."""
        return GaussianMixtureDenoiser(self, alphas_cumprod, prediction_type)


class GaussianMixtureDenoiser(_ExactDenoiser):
    """The exact noise predictor of a `GaussianMixture`: with x_t = sqrt(a) x0 + sqrt(1 - a) eps, component k of
    x_t is N(sqrt(a) mu_k, a sigma_k^2 + 1 - a) per dimension, and E[x0 | x_t] is the responsibility-weighted sum
    of each component's Gaussian posterior mean mu_k + sqrt(a) sigma_k^2 / (a sigma_k^2 + 1 - a) (x_t - sqrt(a) mu_k).
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod, prediction_type: str = "epsilon"):
        super().__init__(alphas_cumprod, prediction_type)
        self.mixture = mixture

    def _x0_mean(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        if x.shape[1] != m.dim:
            raise ValueError(f"sample must have {m.dim} values per sample, got {x.shape[1]}")
        means = self._cached("means", m.means, x.device)
        variances = self._cached("variances", m.stds**2, x.device)
        log_weights = self._cached("log_weights", m.weights.log(), x.device)
        a = alpha[:, :, None]  # (batch, 1, 1) against (batch, k, dim)
        var = a * variances + (1 - a)
        residual = x[:, None, :] - a.sqrt() * means
        log_density = -0.5 * (residual**2 / var + var.log()).sum(dim=2) + log_weights
        responsibilities = torch.softmax(log_density, dim=1)
        posterior_means = means + a.sqrt() * variances / var * residual
        return (responsibilities[:, :, None] * posterior_means).sum(dim=1)
