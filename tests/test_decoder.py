"""The fast decoder (distill/decoder.py): training, loading, stock diffusers, service wiring."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.decoder import DecoderConfig, build_pool, decoder_loss, encoder_loss, psnr, train_tiny_vae
from flash.models import ModelError, load_components, load_family
from flash.pipeline import TextToImage
from flash.tiny import write_tiny_decoder, write_tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("fam") / "tiny")


def small_config(family: Path, out: Path, **kw) -> DecoderConfig:
    base = dict(family=str(family), out=str(out), channels=8, encoder_channels=8, pool_renders=32,
                pool_students=48, holdout=16, batch_size=8, lr=3e-3, steps=60, checkpoint_every=20)
    return DecoderConfig(**{**base, **kw})


def test_pool_holds_renders_and_student_latents_with_full_decoder_targets(family, tmp_path):
    cfg = small_config(family, tmp_path)
    pool = build_pool(cfg)
    full = load_components(family)
    n = cfg.pool_renders + cfg.pool_students
    assert pool["latents"].shape == (n, 4, 8, 8) and pool["images"].shape == (n, 3, 32, 32)
    assert pool["renders"].shape == (cfg.pool_renders, 3, 32, 32)
    assert pool["render_means"].shape == (cfg.pool_renders, 4, 8, 8)
    # each target is the full decoder's image of its latent (student latents included)
    z = pool["latents"][-4:]
    with torch.no_grad():
        ref = full.vae.decode(z / full.vae.config.scaling_factor).sample
    assert torch.allclose(pool["images"][-4:], ref, atol=1e-5)


def test_training_improves_on_the_untrained_decoder_and_writes_a_loadable_folder(family, tmp_path):
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    from distill.decoder import build_tiny_vae

    cfg = small_config(family, tmp_path)
    folder = train_tiny_vae(cfg)
    report = json.loads((folder / "train.json").read_text())
    pool = load_file(tmp_path / "pool.safetensors")
    torch.manual_seed(cfg.seed)
    untrained = build_tiny_vae(cfg, 2)
    with torch.no_grad():
        before = psnr(untrained.decoder(pool["latents"] / cfg.latent_scale), pool["images"])
        enc_before = encoder_loss(untrained, pool["renders"], pool["render_means"]).mean().item()
    assert report["steps"] == 60
    assert report["psnr_vs_full_decoder_db"] > before + 3, (before, report)
    assert report["encoder_mse_vs_full_encoder_means"] < 0.5 * enc_before, (enc_before, report)
    tiny = AutoencoderTiny.from_pretrained(folder)
    # called as every diffusers VAE is, decode(latents / scaling_factor)
    assert tiny.config.scaling_factor == cfg.latent_scale == 1.0


def test_training_resumes_from_its_checkpoint(family, tmp_path):
    train_tiny_vae(small_config(family, tmp_path, steps=25))  # checkpoints at 20, and at the stop
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 25
    folder = train_tiny_vae(small_config(family, tmp_path, steps=40))
    report = json.loads((folder / "train.json").read_text())
    assert (report["resumed_from"], report["steps"]) == (25, 40)


def test_a_run_can_start_from_a_shipped_decoder_and_refuses_another_architecture(family, tmp_path):
    import shutil

    from safetensors.torch import load_file

    trained = train_tiny_vae(small_config(family, tmp_path / "a", steps=30))
    for run in "bcde":  # the same pool: making it is most of a tiny run's time
        (tmp_path / run).mkdir()
        shutil.copy(tmp_path / "a" / "pool.safetensors", tmp_path / run)
    # no steps: the written decoder is the init's weights, exactly (so the init was loaded)
    folder = train_tiny_vae(small_config(family, tmp_path / "b", steps=0, init=str(trained)))
    a = load_file(trained / "diffusion_pytorch_model.safetensors")
    b = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((folder / "train.json").read_text())["init"] == str(trained)
    # a random start differs from it: the check above is not vacuous
    fresh = train_tiny_vae(small_config(family, tmp_path / "c", steps=0))
    c = load_file(fresh / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="architecture"):
        train_tiny_vae(small_config(family, tmp_path / "d", steps=0, channels=4, init=str(trained)))
    with pytest.raises(FileNotFoundError, match="init"):
        train_tiny_vae(small_config(family, tmp_path / "e", steps=0, init=str(tmp_path / "missing")))


def test_the_retrain_default_re_fit_is_the_shipped_re_fit_config():
    from distill.decoder import refit_config

    shipped = Path(__file__).resolve().parents[1] / "configs" / "shapes64-decoder-refit.json"
    want = DecoderConfig.load(shipped, family="f", init="i", out="o")
    assert refit_config("f", "i", "o") == want  # distill.decoder.REFIT and the config cannot drift apart
    assert refit_config("f", "i", "o", shipped) == want


def test_load_family_with_the_tiny_decoder(family, tmp_path):
    with pytest.raises(ModelError, match="vae_tiny"):
        load_family(family, decoder="tiny")
    with pytest.raises(ModelError, match="unknown decoder"):
        load_components(family, decoder="small")
    import shutil

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    write_tiny_decoder(fam)
    f = load_family(fam, decoder="tiny")
    assert type(f.teacher.vae).__name__ == "AutoencoderTiny"
    t2i = TextToImage(f.teacher)
    assert t2i.image_size == 32
    images = t2i.decode(t2i.student_latents(f.students[1].unet, ["a red circle"], [0], [999]))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_stock_pipeline_with_the_tiny_decoder_matches_the_project_path(family, tmp_path):
    import shutil

    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    write_tiny_decoder(fam)
    pipe = StableDiffusionPipeline.from_pretrained(fam, vae=AutoencoderTiny.from_pretrained(fam / "vae_tiny"),
                                                   safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(["a red circle"], num_inference_steps=10, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(3)], output_type="np").images
    ours = TextToImage(load_components(fam, decoder="tiny"))
    images = ours.decode(ours.teacher_latents(["a red circle"], [3], steps=10, guidance_scale=5.0))
    assert np.abs((stock * 255).round().astype(int) - images.astype(int)).max() <= 1


def test_service_setting_refuses_the_tiny_decoder_on_tensorrt():
    from pydantic import ValidationError

    from service.config import Settings

    assert Settings(decoder="tiny").decoder == "tiny"
    assert Settings(decoder="tiny", backend="onnxruntime").decoder == "tiny"
    with pytest.raises(ValidationError, match="tensorrt engines have the full decoder only"):
        Settings(decoder="tiny", backend="tensorrt")


def test_service_decoder_auto_takes_the_fast_decoder_where_the_family_ships_it(family, tmp_path):
    import shutil

    from service.config import Settings

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    write_tiny_decoder(fam)
    assert Settings().decoder == "auto"  # the default (docs/results.md, the fast decoder's rule 3)
    assert Settings().served_decoder(fam) == "tiny"
    assert Settings(backend="onnxruntime").served_decoder(fam) == "tiny"
    assert Settings().served_decoder(family) == "full"  # no vae_tiny/: a stock diffusers folder, say
    assert Settings(backend="tensorrt").served_decoder(fam) == "full"  # its engines carry the full one only
    assert Settings(decoder="full").served_decoder(fam) == "full"
    assert Settings(decoder="tiny").served_decoder(family) == "tiny"  # asked for: loading says it is missing


def test_onnx_export_carries_the_tiny_decoder_and_the_backend_serves_it(family, tmp_path):
    """A family with vae_tiny/: the export adds vae_decoder_tiny.onnx (parity-checked, its folder
    hashed); the onnxruntime backend decodes with it when decoder=tiny, like the torch fast
    decoder; an export made before the family had one is refused for decoder=tiny."""
    import shutil
    from types import SimpleNamespace

    from export.config import ExportConfig
    from export.onnx import export_family
    from export.runtime import onnxruntime_backends
    from service.backends import BackendError

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    cfg = ExportConfig(parity_threads=1, components=("vae_decoder", "unet"))
    export_family(fam, tmp_path / "before", cfg)
    write_tiny_decoder(fam)
    manifest = export_family(fam, fam / "onnx", cfg)
    info = manifest["models"]["vae_decoder_tiny"]
    assert info["source"] == "vae_tiny" and "vae_tiny" in manifest["source"]["folders"]
    assert manifest["parity"]["vae_decoder_tiny_max_abs"] <= cfg.vae_atol

    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = SimpleNamespace(device="cpu", ort_threads=1, decoder="tiny")
    ort_tiny = onnxruntime_backends(load_family(fam, decoder="tiny"), settings).students[1].decode(lat)
    torch_tiny = TextToImage(load_components(fam, decoder="tiny")).decode(lat)
    torch_full = TextToImage(load_components(fam)).decode(lat)
    assert np.abs(ort_tiny.astype(int) - torch_tiny.astype(int)).max() <= 2
    assert np.abs(ort_tiny.astype(int) - torch_full.astype(int)).max() > 20  # not the full decoder
    settings_full = SimpleNamespace(device="cpu", ort_threads=1, decoder="full")
    ort_full = onnxruntime_backends(load_family(fam), settings_full).students[1].decode(lat)
    assert np.abs(ort_full.astype(int) - torch_full.astype(int)).max() <= 2
    with pytest.raises(BackendError, match="no fast decoder"):
        onnxruntime_backends(load_family(fam, decoder="tiny"), SimpleNamespace(**vars(settings), onnx_dir=tmp_path / "before"))


def test_service_serves_images_through_the_tiny_decoder_by_default_where_the_family_has_one(family, tmp_path):
    import base64
    import io
    import shutil

    import httpx
    from PIL import Image

    from service.config import Settings
    from service.testing import serve_in_thread

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    write_tiny_decoder(fam)
    t2i = TextToImage(load_components(fam, decoder="tiny"))
    s = load_family(fam).students[2]
    expected = t2i.decode(t2i.student_latents(s.unet, ["a blue square"], [5], s.card.timesteps))[0]
    settings = Settings(model_dir=fam, max_batch_size=4, log_level="warning")  # decoder auto: the fast one
    with serve_in_thread(settings) as (url, _):
        assert httpx.get(f"{url}/v1/models").json()["decoder"] == "tiny"
        r = httpx.post(f"{url}/v1/images/generations", timeout=60,
                       json={"prompt": "a blue square", "model": "flash-2step", "seed": 5, "steps": 2})
        assert r.status_code == 200, r.text
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        metrics = httpx.get(f"{url}/metrics").text
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert 'decoder="tiny"' in metrics


def test_cli_distills_publishes_and_generates_with_the_tiny_decoder(family, tmp_path):
    import shutil

    from flash.cli import main

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    cfg = tmp_path / "decoder.json"
    cfg.write_text(json.dumps({"channels": 8, "encoder_channels": 8, "pool_renders": 16, "pool_students": 16,
                               "holdout": 8, "batch_size": 8}))
    main(["distill-decoder", str(fam), "--config", str(cfg), "--out", str(tmp_path / "run"), "--steps", "3",
          "--publish"])
    assert (fam / "vae_tiny" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((fam / "vae_tiny" / "train.json").read_text())["steps"] == 3
    out = tmp_path / "fast.png"
    main(["generate", "a red circle", "--model-dir", str(fam), "--steps", "1", "--decoder", "tiny", "--out", str(out)])
    assert out.is_file()


def test_cli_refuses_unknown_decoder_config_keys(family, tmp_path, capsys):
    from flash.cli import main

    cfg = tmp_path / "decoder.json"
    cfg.write_text(json.dumps({"chanels": 8}))
    with pytest.raises(SystemExit) as e:
        main(["distill-decoder", str(family), "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "unknown decoder config keys ['chanels']" in capsys.readouterr().err


def test_decoder_quality_bench_runs_on_a_tiny_family(load_bench):
    out = load_bench("decoder_quality").main(["--tiny", "--n", "2", "--repeats", "1"])
    assert set(out["quality"]) == {"teacher, 25 steps, CFG", "3-step student", "2-step student", "1-step student"}
    # a random fast decoder is nowhere near the full one: the bench must say so
    assert all(r["psnr_db"] < 20 for r in out["quality"].values())
    assert set(out["decode_ms"]) == {1, 2}


def test_decoder_config_names_the_allowed_values():
    with pytest.raises(ValueError, match="nearest or bilinear"):
        DecoderConfig(upsample="cubic")
    with pytest.raises(ValueError, match="latent_scale"):
        DecoderConfig(latent_scale=0)
    with pytest.raises(ValueError, match="holdout"):
        DecoderConfig(pool_renders=8, pool_students=8, holdout=16)
    with pytest.raises(ValueError, match="edge_weight"):
        DecoderConfig(edge_weight=-1)


class _Identity:
    """A stand-in tiny VAE whose decoder returns its latents: the loss sees the image it is given."""

    class config:
        scaling_factor = 1.0

    @staticmethod
    def decoder(z):
        return z


def test_edge_term_weighs_blurred_outlines_and_ignores_flat_offsets():
    target = torch.zeros(1, 3, 16, 16)
    target[..., 4:12, 4:12] = 1.0  # a square
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    offset = target + (blurred - target).pow(2).mean().sqrt()  # the same pixel MSE, no edge change
    mse = [decoder_loss(_Identity, x, target).item() for x in (blurred, offset)]
    assert mse[0] == pytest.approx(mse[1], rel=1e-4)
    with_edges = [decoder_loss(_Identity, x, target, edge_weight=1.0).item() for x in (blurred, offset)]
    assert with_edges[1] == pytest.approx(mse[1], abs=1e-7)  # a flat offset keeps every outline
    assert with_edges[0] - mse[0] > 0.1 * mse[0]  # the blur softens them, and the term says so


def test_pool_reads_an_x0_students_output_as_x0(tmp_path):
    """The pool's student latents follow each student's own parameterisation (its card): an x0
    1-step student's first batch is its output read as x0, not as eps."""
    from flash.data import shapes

    fam = write_tiny_family(tmp_path / "fam", prediction_type="sample")
    cfg = small_config(fam, tmp_path / "out")
    pool = build_pool(cfg)
    first = pool["latents"][cfg.pool_renders : cfg.pool_renders + cfg.batch_size]  # students in turn: 1-step first
    loaded = load_family(fam)
    s, pipe = loaded.students[1], TextToImage(loaded.teacher)
    prompts = shapes.eval_prompts(cfg.pool_students, seed=cfg.seed + 77)[: cfg.batch_size]
    seeds = [cfg.seed * 1_000_003 + 5_000_000 + j for j in range(cfg.batch_size)]
    as_x0 = pipe.student_latents(s.unet, prompts, seeds, [999], True, "sample")
    as_eps = pipe.student_latents(s.unet, prompts, seeds, [999], True, "epsilon")
    assert torch.allclose(first, as_x0, atol=1e-5)
    assert not torch.allclose(first, as_eps, atol=1e-2)
