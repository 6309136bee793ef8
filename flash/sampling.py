"""Samplers as small stateless functions over tensors.

A *denoiser* is any callable `(x [B,C,H,W], t [B] long, cond [B,L,D]) -> model output`
in the schedule's parameterisation (a U-Net's `.sample`). Every function takes
per-item timesteps so that one call can advance items that sit at different
points of their trajectories (the service's continuous batching and the
distiller's backward trajectories both rely on this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flash.schedule import FINAL, NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def _per_item(t: Tensor | int | Sequence[int], batch: int, device) -> Tensor:
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


def ddim_step(
    schedule: NoiseSchedule,
    x_t: Tensor,
    model_output: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise_correction: bool | Tensor = False,
) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM update, paper eq. (4): x_{t'} = alpha_{t'} x0_hat + sigma_{t'} eps_hat.

    Noise correction (eq. 9): where set, the update uses the true noise instead of the
    predicted one, eps_hat := x_T. It is meant for the first step, t = T, where the
    current sample *is* x_T; `noise_correction` may be a bool or a per-item mask [B].
    t_next = FINAL (-1) returns x0_hat itself. Returns (x_{t'}, x0_hat).
    """
    b = x_t.shape[0]
    t, t_next = _per_item(t, b, x_t.device), _per_item(t_next, b, x_t.device)
    x0, eps = schedule.split(model_output, x_t, t)
    if isinstance(noise_correction, Tensor):
        mask = noise_correction.to(x_t.device).bool().reshape(-1, *([1] * (x_t.ndim - 1)))
        eps = torch.where(mask, x_t, eps)
    elif noise_correction:
        eps = x_t
    alpha_n, sigma_n = schedule.alpha_sigma(t_next, x_t)
    return alpha_n * x0 + sigma_n * eps, x0


def next_timesteps(timesteps: Sequence[int]) -> list[int]:
    """The target of each step of a student schedule: [999, 750, 500] -> [750, 500, FINAL]."""
    return list(timesteps[1:]) + [FINAL]


@torch.no_grad()
def cfg_output(
    denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None, scale: float
) -> Tensor:
    """Classifier-free guidance: u + s (c - u), both branches in one batched call."""
    if uncond is None or scale == 1.0:
        return denoiser(x, t, cond)
    out = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
    u, c = out.chunk(2)
    return u + scale * (c - u)


def run_student(
    denoiser: Denoiser,
    x_T: Tensor,
    cond: Tensor,
    schedule: NoiseSchedule,
    timesteps: Sequence[int],
    num_steps: int | Tensor | None = None,
    noise_correction: bool = True,
) -> Tensor:
    """The few-step student sampler: DDIM over `timesteps` from pure noise x_T.

    `num_steps` (int or per-item [B]) stops each item after that many updates, giving
    x at `timesteps[num_steps]` -- the backward trajectory x_{T->t} that backward
    distillation trains on. None runs every step and returns the final x0 estimate.
    Noise correction applies at the first step. Differentiable; wrap in no_grad as needed.
    """
    b, n = x_T.shape[0], len(timesteps)
    stops = _per_item(n if num_steps is None else num_steps, b, x_T.device)
    if ((stops < 0) | (stops > n)).any():
        raise ValueError(f"num_steps must lie in [0, {n}], got {stops.tolist()}")
    targets = next_timesteps(timesteps)
    x = x_T
    for i, (t, t_next) in enumerate(zip(timesteps, targets, strict=True)):
        active = stops > i
        if not active.any():
            break
        xa = x[active]
        out = denoiser(xa, _per_item(t, len(xa), x.device), cond[active])
        xa, _ = ddim_step(schedule, xa, out, t, t_next, noise_correction=noise_correction and i == 0)
        x = x.clone()
        x[active] = xa
    return x


@torch.no_grad()
def teacher_ddim(
    denoiser: Denoiser,
    x_t: Tensor,
    t_start: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    schedule: NoiseSchedule,
    num_steps: int,
    guidance_scale: float,
) -> Tensor:
    """k uniformly spaced teacher DDIM steps with CFG from per-item t_start [B] down to 0.

    Step i evaluates at round(t_start * (k - i) / k); the last update goes to the clean
    end, so the result is the teacher's final x0 estimate (the SRL target, eq. 8).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_start = _per_item(t_start, x_t.shape[0], x_t.device)
    x = x_t
    for i in range(num_steps):
        t = torch.div(t_start * (num_steps - i), num_steps, rounding_mode="floor")
        if i + 1 < num_steps:
            t_next = torch.div(t_start * (num_steps - i - 1), num_steps, rounding_mode="floor")
        else:
            t_next = torch.full_like(t, FINAL)
        out = cfg_output(denoiser, x, t, cond, uncond, guidance_scale)
        x, _ = ddim_step(schedule, x, out, t, t_next)
    return x


@torch.no_grad()
def run_diffusers_scheduler(
    denoiser: Denoiser,
    x_T: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    scheduler,
    num_inference_steps: int,
    guidance_scale: float,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Run any diffusers scheduler (DPM-Solver++ for the teacher baseline) with CFG.

    diffusers schedulers count their own steps, so `scheduler` must be a fresh instance
    per call (`type(s).from_config(s.config)`); the caller never shares one between
    concurrent requests. Mirrors StableDiffusionPipeline's denoising loop exactly.
    """
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        tb = t.reshape(1).expand(x.shape[0]).to(x.device)
        out = cfg_output(denoiser, x_in, tb, cond, uncond, guidance_scale)
        x = scheduler.step(out, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, x)
    return x
