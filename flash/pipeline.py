"""The project's own generation path: text conditioning, initial noise, decoding.

It conditions on text exactly as diffusers' StableDiffusionPipeline does (tokenizer
padded to `model_max_length`, the text encoder's last hidden state, "" as the
unconditional prompt) and draws each item's x_T from its own seeded generator, so a
seeded image is the same alone or inside a batch and matches the stock pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from flash.models import Components, vae_scale_factor
from flash.sampling import Denoiser, run_diffusers_scheduler, run_student
from flash.schedule import NoiseSchedule


def unet_denoiser(unet) -> Denoiser:
    """Adapt a diffusers UNet2DConditionModel to the (x, t, cond) -> output signature."""

    def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    return denoise


# torch.compile modes, "off" for eager: the service's `torch_compile`, distill's `compile_teacher`
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def compiled_unet_denoiser(unet, mode: str) -> Denoiser:
    """`unet_denoiser` through torch.compile(mode), one static shape per input shape.

    A CUDA graph's output buffer is overwritten by its next replay (mode reduce-overhead), so each
    call marks a new step and returns a copy; without CUDA graphs both are cheap no-ops.
    """
    compiled = unet_denoiser(torch.compile(unet, mode=mode, dynamic=False))

    def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, t, cond).clone()

    return denoise


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], dtype=torch.float32, device="cpu") -> Tensor:
    """x_T [B, C, h, w], one CPU generator per item (batch-independent, like diffusers' randn_tensor
    with a list of generators)."""
    # drawn in float32 whatever the model's dtype, so fp16 and fp32 models share x_T
    xs = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.cat(xs).to(device=device, dtype=dtype)


class TextToImage:
    """Stateless helpers over loaded components; safe to share between requests."""

    def __init__(self, components: Components, device: str | torch.device = "cpu"):
        self.c = components
        self.device = torch.device(device)
        self.schedule = NoiseSchedule.from_config(components.scheduler_config)
        self.dtype = components.unet.dtype
        size = components.unet.config.sample_size
        self.latent_shape = (components.unet.config.in_channels, size, size)
        self.image_size = size * vae_scale_factor(components.vae)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """[B, L, D] text embeddings, as StableDiffusionPipeline.encode_prompt computes them."""
        tok = self.c.tokenizer
        ids = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.c.text_encoder(ids)[0].to(self.dtype)

    def noise(self, seeds: Sequence[int]) -> Tensor:
        return initial_noise(seeds, self.latent_shape, self.dtype, self.device)

    def decode_pixels(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1], [B, 3, H, W], differentiable in the latents (the VAE stays frozen)."""
        vae = self.c.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        """uint8 [B, H, W, 3], the same rounding as diffusers' image processor."""
        img = self.decode_pixels(latents)
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (img * 255).round().astype(np.uint8)

    def student_schedule(self, prediction_type: str | None = None) -> NoiseSchedule:
        """The teacher's noise schedule read in a student's own parameterisation (None: the teacher's)."""
        if prediction_type is None or prediction_type == self.schedule.prediction_type:
            return self.schedule
        return dataclasses.replace(self.schedule, prediction_type=prediction_type)

    @torch.no_grad()
    def student_latents(
        self,
        unet,
        prompts: Sequence[str],
        seeds: Sequence[int],
        timesteps: Sequence[int],
        noise_correction=True,
        prediction_type: str | None = None,
    ) -> Tensor:
        cond = self.encode(prompts)
        schedule = self.student_schedule(prediction_type)
        return run_student(unet_denoiser(unet), self.noise(seeds), cond, schedule, timesteps, None, noise_correction)

    @torch.no_grad()
    def teacher_latents(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 25,
        guidance_scale: float = 5.0,
        scheduler: str = "dpmsolver++",
    ) -> Tensor:
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts)) if guidance_scale != 1.0 else None
        sched = make_scheduler(scheduler, self.c.scheduler_config)
        return run_diffusers_scheduler(
            unet_denoiser(self.c.unet), self.noise(seeds), cond, uncond, sched, steps, guidance_scale
        )


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler per call (they count their own steps)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    factories = {
        "dpmsolver++": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
        "ddim": lambda: DDIMScheduler.from_config(config),
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
    }
    if name not in factories:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(factories)}")
    return factories[name]()
