"""A diffusers-compatible scheduler wrapping the few-step student sampler.

    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, unet=student_unet)
    pipe.scheduler = FlashScheduler.from_config(pipe.scheduler.config, timesteps=[999, 750, 500])
    image = pipe(prompt, num_inference_steps=3, guidance_scale=1.0).images[0]

The math is `flash.sampling.ddim_step`; this class only adapts it to diffusers'
stateful step() protocol. Like every diffusers scheduler it remembers the timesteps
set on it, so give each concurrent request its own instance (the service does not
use this class at all; it calls the pure functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from flash.sampling import ddim_step
from flash.schedule import FINAL, NoiseSchedule, validate_timesteps

DEFAULT_TIMESTEPS = {1: [999], 2: [999, 666], 3: [999, 750, 500]}


@dataclass
class FlashSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class FlashScheduler(SchedulerMixin, ConfigMixin):
    """Few-step DDIM over explicit timesteps with Imagine Flash noise correction (eq. 9)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        timesteps: list[int] | None = None,
        noise_correction: bool = True,
    ):
        self.schedule = NoiseSchedule.from_config(
            dict(
                num_train_timesteps=num_train_timesteps,
                beta_start=beta_start,
                beta_end=beta_end,
                beta_schedule=beta_schedule,
                trained_betas=trained_betas,
                prediction_type=prediction_type,
            )
        )
        ts = validate_timesteps(timesteps or DEFAULT_TIMESTEPS[3], num_train_timesteps)
        self.init_noise_sigma = 1.0
        self.timesteps = torch.tensor(ts, dtype=torch.long)
        self.num_inference_steps = len(ts)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Explicit `timesteps` win; else the configured list when its length matches,
        else trailing spacing (T, T - T/n, ...)."""
        n_train = self.config.num_train_timesteps
        if timesteps is None:
            configured = list(self.config.timesteps or DEFAULT_TIMESTEPS[3])
            n = num_inference_steps or len(configured)
            if n == len(configured):
                timesteps = configured
            else:
                timesteps = [int(round(n_train - i * n_train / n)) - 1 for i in range(n)]
        ts = validate_timesteps(timesteps, n_train)
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self.num_inference_steps = len(ts)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _next_timestep(self, timestep: int) -> int:
        ts = self.timesteps.tolist()
        if timestep not in ts:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps {ts}")
        i = ts.index(timestep)
        return ts[i + 1] if i + 1 < len(ts) else FINAL

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs,
    ):
        t = int(timestep)
        first = t == int(self.timesteps[0])
        prev, x0 = ddim_step(
            self.schedule,
            sample,
            model_output,
            torch.tensor([t]),
            torch.tensor([self._next_timestep(t)]),
            noise_correction=bool(self.config.noise_correction and first),
        )
        if not return_dict:
            return (prev, x0)
        return FlashSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        return self.schedule.add_noise(original_samples, noise, timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
