"""FlashScheduler inside a stock diffusers pipeline equals the pure sampler."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from flash.models import load_components
from flash.pipeline import TextToImage
from flash.scheduler import FlashScheduler

PROMPTS = ["a red circle", "a blue square above a green triangle"]


@pytest.mark.parametrize("timesteps", [[999, 750, 500], [999, 666], [999]])
@pytest.mark.parametrize("noise_correction", [True, False])
def test_stock_pipeline_matches_pure_sampler(tiny_dir, timesteps, noise_correction):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlashScheduler.from_config(
        pipe.scheduler.config, timesteps=timesteps, noise_correction=noise_correction
    )
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    stock = pipe(PROMPTS, num_inference_steps=len(timesteps), guidance_scale=1.0, generator=gens,
                 output_type="latent").images
    c = load_components(tiny_dir)
    ours = TextToImage(c).student_latents(c.unet, PROMPTS, [7, 8], timesteps, noise_correction)
    assert torch.allclose(stock, ours, atol=1e-6)


def test_noise_correction_changes_the_result(tiny_dir):
    c = load_components(tiny_dir)
    p = TextToImage(c)
    on = p.student_latents(c.unet, PROMPTS, [1, 2], [999, 750, 500], True)
    off = p.student_latents(c.unet, PROMPTS, [1, 2], [999, 750, 500], False)
    assert not torch.allclose(on, off)


def test_scheduler_config_round_trip(tmp_path):
    s = FlashScheduler(timesteps=[999, 666], noise_correction=False)
    s.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    t = FlashScheduler.from_pretrained(tmp_path)
    assert t.config.timesteps == [999, 666] and t.config.noise_correction is False
    t.set_timesteps(2)
    assert t.timesteps.tolist() == [999, 666]
    t.set_timesteps(4)  # other counts fall back to trailing spacing
    assert t.timesteps.tolist() == [999, 749, 499, 249]


def test_scheduler_rejects_bad_config():
    with pytest.raises(ValueError, match="descending"):
        FlashScheduler(timesteps=[500, 999])
    with pytest.raises(ValueError, match="prediction_type"):
        FlashScheduler(prediction_type="flow")


def test_teacher_path_matches_stock_dpm_solver(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    stock = pipe(PROMPTS, num_inference_steps=8, guidance_scale=5.0, generator=gens, output_type="latent").images
    c = load_components(tiny_dir)
    ours = TextToImage(c).teacher_latents(PROMPTS, [3, 4], steps=8, guidance_scale=5.0)
    assert torch.allclose(stock, ours, atol=1e-5)


def test_readme_example_runs_a_student_in_a_stock_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel

    from flash.tiny import write_tiny_family

    fam = write_tiny_family(tmp_path / "fam")
    pipe = StableDiffusionPipeline.from_pretrained(fam)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(fam / "students" / "3-step")
    pipe.scheduler = FlashScheduler.from_pretrained(fam / "students" / "3-step")
    image = pipe("a red circle above a blue square", num_inference_steps=3, guidance_scale=1.0).images[0]
    assert image.size == (32, 32)
    assert pipe.scheduler.timesteps.tolist() == [999, 750, 500]
