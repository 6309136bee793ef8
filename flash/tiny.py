"""Tiny randomly initialised pipelines for tests (no downloads, < 1 s to build).

Same classes and layout as a real Stable Diffusion 1.x checkpoint (CLIPTextModel,
UNet2DConditionModel with cross-attention, AutoencoderKL, scaled_linear schedule),
so every code path that loads a real diffusers folder runs on these too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flash.models import TINY_VAE, Components, save_components
from flash.tokenizer import build_clip_tokenizer

SD_SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_components(seed: int = 0, image_size: int = 32, max_length: int = 12) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(model_max_length=max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return Components(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), dict(SD_SCHEDULER_CONFIG))


def write_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """A stock-loadable tiny diffusers folder on disk."""
    save_components(tiny_components(seed), Path(path))
    return Path(path)


def write_tiny_family(path: Path, seed: int = 0, image_size: int = 32, prediction_type: str = "epsilon") -> Path:
    """A tiny family folder: teacher + 1/2/3-step students (random U-Nets, valid cards), the
    students predicting `prediction_type` (their card and scheduler say so)."""
    from flash.models import FamilyCard, StudentCard, save_student, write_card
    from flash.scheduler import DEFAULT_TIMESTEPS

    path = Path(path)
    c = tiny_components(seed, image_size=image_size)
    save_components(c, path)
    write_card(path, FamilyCard(name="tiny", version="tiny-0", guidance_scale=5.0))
    for steps, ts in DEFAULT_TIMESTEPS.items():
        card = StudentCard(steps=steps, timesteps=ts, version="tiny-0", prediction_type=prediction_type)
        save_student(c.unet, card, path / "students" / f"{steps}-step", c.scheduler_config)
    return path


def write_tiny_decoder(family: Path, seed: int = 0) -> Path:
    """A random-weight fast decoder (`vae_tiny/`, an AutoencoderTiny) for a tiny family."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    folder = Path(family) / TINY_VAE
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 0),
        upsampling_scaling_factor=2,
        scaling_factor=2.0,  # not 1, so a path that forgets to divide by it shows
    ).save_pretrained(folder)
    return folder
