"""Noise schedule and parameterisations, in one place.

Paper eq. (1): x_t = alpha_t * x_0 + sigma_t * eps, with alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t) for the variance-preserving DDPM schedules used by Stable
Diffusion and Emu. Eq. (5) is the x0 estimate from an eps prediction. Training,
sampling, distillation and export all convert model outputs through this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# Timestep value meaning "the clean end of the trajectory": alpha = 1, sigma = 0.
# A DDIM update towards FINAL returns the x0 estimate itself.
FINAL = -1


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete VP schedule: `alphas_cumprod[t]` for t in [0, num_train_timesteps)."""

    alphas_cumprod: Tensor  # [T], float64 for exact arithmetic; cast on use
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        if self.alphas_cumprod.ndim != 1 or len(self.alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from any diffusers scheduler config (betas exactly as diffusers computes them)."""
        from diffusers import DDPMScheduler

        config = dict(config)
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        ddpm = DDPMScheduler.from_config(config)
        return cls(ddpm.alphas_cumprod.to(torch.float64), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def T(self) -> int:
        """The last (noisiest) training timestep, 999 for SD."""
        return self.num_train_timesteps - 1

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t for per-item timesteps t [B], shaped to broadcast over `like` [B, ...].

        t = FINAL (-1) gives alpha = 1, sigma = 0 (the clean end).
        """
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1)
        if t.numel() == 1 and like.shape[0] != 1:
            t = t.expand(like.shape[0])
        if ((t < FINAL) | (t > self.T)).any():
            raise ValueError(f"timesteps must lie in [-1, {self.T}], got {t.tolist()}")
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().to(device=like.device, dtype=like.dtype).reshape(shape)
        sigma = (1 - abar).sqrt().to(device=like.device, dtype=like.dtype).reshape(shape)
        return alpha, sigma

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process, eq. (1): x_t = alpha_t x0 + sigma_t eps."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def split(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from a model output in this schedule's parameterisation."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return to_x0_eps(model_output, x_t, alpha, sigma, self.prediction_type)


def to_x0_eps(model_output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str):
    """Convert a model output to (x0, eps); eq. (5) for eps-prediction.

    epsilon:      x0 = (x_t - sigma eps) / alpha
    sample:       eps = (x_t - alpha x0) / sigma
    v_prediction: v = alpha eps - sigma x0  =>  x0 = alpha x_t - sigma v,  eps = sigma x_t + alpha v
    """
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        v = model_output
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Inverse of `to_x0_eps`: the model output that encodes (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def validate_timesteps(timesteps: list[int] | tuple[int, ...], num_train_timesteps: int = 1000) -> list[int]:
    """Student timesteps must be distinct integers in [0, T], strictly descending."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps must not be empty")
    for t in ts:
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"timestep {t} out of range [0, {num_train_timesteps - 1}] in {ts}")
    for a, b in zip(ts, ts[1:], strict=False):
        if b >= a:
            raise ValueError(f"timesteps must be strictly descending, got {ts}")
    return ts
