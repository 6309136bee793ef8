"""The shipped default family (models/shapes64): stock diffusers loads it offline and agrees
with the project's own generation path; the whole family fits the 80 MB budget."""

from pathlib import Path

import numpy as np
import pytest
import torch

FAMILY = Path(__file__).resolve().parents[1] / "models" / "shapes64"
BUDGET_BYTES = 80 * 1000 * 1000

pytestmark = pytest.mark.skipif(not (FAMILY / "model_index.json").is_file(),
                                reason="models/shapes64 is not trained yet (flash train-teacher)")


def test_family_fits_the_size_budget():
    total = sum(f.stat().st_size for f in FAMILY.rglob("*.safetensors"))
    assert 0 < total <= BUDGET_BYTES, f"{total / 1e6:.1f} MB"
    assert not [f for f in FAMILY.rglob("*") if f.suffix in (".bin", ".pt", ".ckpt", ".pkl")]


def test_stock_pipeline_matches_the_project_path():
    from diffusers import StableDiffusionPipeline

    from flash.models import load_components
    from flash.pipeline import TextToImage

    prompts = ["a red circle above a blue square", "a small green triangle"]
    pipe = StableDiffusionPipeline.from_pretrained(FAMILY, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    stock = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, output_type="np").images
    ours = TextToImage(load_components(FAMILY))
    images = ours.decode(ours.teacher_latents(prompts, [0, 1], steps=25, guidance_scale=5.0))
    assert np.abs((stock * 255).round().astype(int) - images.astype(int)).max() <= 1


def test_every_student_runs_in_a_stock_pipeline():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from flash.models import list_students
    from flash.scheduler import FlashScheduler

    for folder in list_students(FAMILY):
        pipe = StableDiffusionPipeline.from_pretrained(FAMILY, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet = UNet2DConditionModel.from_pretrained(folder)
        pipe.scheduler = FlashScheduler.from_pretrained(folder)
        n = len(pipe.scheduler.config.timesteps)
        image = pipe("a red circle", num_inference_steps=n, guidance_scale=1.0).images[0]
        assert image.size == (64, 64)


@pytest.mark.skipif(not (FAMILY / "vae_tiny").is_dir(), reason="no fast decoder shipped (flash distill-decoder)")
def test_the_shipped_fast_decoder_stays_close_to_the_full_one():
    from flash.models import load_components, load_family
    from flash.pipeline import TextToImage

    fam = load_family(FAMILY)
    full, fast = TextToImage(fam.teacher), TextToImage(load_components(FAMILY, decoder="tiny"))
    s = fam.students[3]
    prompts = ["a red circle above a blue square", "a small green triangle", "a large yellow square",
               "a cyan circle to the left of a magenta triangle"]
    with torch.no_grad():
        lat = full.student_latents(s.unet, prompts, [0, 1, 2, 3], s.card.timesteps)
    a, b = full.decode(lat).astype(np.float64), fast.decode(lat).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))
    assert psnr >= 27.0, psnr  # bench/decoder_quality.py measured ~30 dB on 100 test prompts
