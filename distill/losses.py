"""Imagine Flash losses, each a small function returning per-sample values [B].

The caller weights and reduces. Paper references: backward distillation (sec. 4.1),
shifted reconstruction loss (sec. 4.2, eq. 8), adversarial hinge loss (sec. 4.3,
following SDXL-Lightning / UFOGen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flash.sampling import Denoiser, teacher_ddim
from flash.schedule import NoiseSchedule


def shifted_timestep(t: Tensor, rules: Sequence[Sequence[int]]) -> Tensor:
    """gamma(t): the first rule [threshold, gamma] with t > threshold applies.

    Paper defaults: 990 for t > 900, 950 for 500 < t <= 900, 200 for t <= 500.
    """
    out = torch.full_like(t, -1)
    for threshold, g in reversed(list(rules)):
        out = torch.where(t > threshold, torch.full_like(t, g), out)
    if (out < 0).any():
        raise ValueError(f"gamma rules {rules} do not cover timesteps {t.tolist()}")
    return out


@torch.no_grad()
def srl_target(
    teacher: Denoiser,
    student_x0: Tensor,
    gamma: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    schedule: NoiseSchedule,
    teacher_steps: int,
    guidance_scale: float,
    noise: Tensor,
) -> Tensor:
    """The shifted reconstruction target: re-noise the (detached) student x0 to gamma(t)
    with fresh noise, run k teacher DDIM steps with CFG to 0, return the teacher's x0."""
    x_gamma = schedule.add_noise(student_x0.detach(), noise, gamma)
    return teacher_ddim(teacher, x_gamma, gamma, cond, uncond, schedule, teacher_steps, guidance_scale)


def reconstruction_loss(student_x0: Tensor, target: Tensor) -> Tensor:
    """Eq. (8): ||target - x0_student||^2, mean over latent dims, per sample [B]."""
    return F.mse_loss(student_x0, target.detach(), reduction="none").flatten(1).mean(1)


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical finite differences of images [B, C, H, W]."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def pixel_loss(image: Tensor, target: Tensor, edge_weight: float = 0.0) -> Tensor:
    """Per-sample MSE between images [B, C, H, W], plus `edge_weight` times the MSE between their
    image gradients: a blurred outline costs more than a flat offset of the same pixel error."""
    target = target.detach()
    loss = (image - target).pow(2).mean(dim=(1, 2, 3))
    if edge_weight:
        for g, g_target in zip(image_gradients(image), image_gradients(target), strict=True):
            loss = loss + edge_weight / 2 * (g - g_target).pow(2).mean(dim=(1, 2, 3))
    return loss


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss per sample: relu(1 - D(real)) + relu(1 + D(fake))."""
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator (student) hinge loss per sample: -D(fake)."""
    return -fake_logits
