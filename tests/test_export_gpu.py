"""TensorRT engines from the tiny family's ONNX export (needs CUDA and the tensorrt package).

Run with `pytest -m gpu tests/test_export_gpu.py`. Every test skips, saying why, where
CUDA or tensorrt is missing -- which is everywhere this project has run so far
(docs/export.md): none of these tests has passed on real hardware yet.

Tolerance: the engines run fp16 kernels on fp32 inputs and outputs; the reference is the
same U-Net in torch fp16. `ExportConfig.trt_atol` (2e-2) bounds their max abs difference
on the tiny random U-Net, whose outputs are O(1); pipeline images get 8/255.
"""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def require_gpu_and_tensorrt():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    pytest.importorskip("tensorrt", reason="needs the tensorrt package (NVIDIA's index); not installed here")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_gpu_and_tensorrt()
    from export.config import ExportConfig
    from export.onnx import export_family
    from export.tensorrt import build_engines
    from flash.tiny import write_tiny_family

    root = tmp_path_factory.mktemp("trt")
    fam = write_tiny_family(root / "tiny")
    cfg = ExportConfig(
        min_batch=1, opt_batch=2, max_batch=4, timing_cache=str(root / "cache" / "timing.cache")
    )
    export_family(fam, fam / "onnx", cfg)
    manifest = build_engines(fam / "onnx", fam / "tensorrt", cfg)
    return fam, fam / "tensorrt", manifest, cfg


def test_build_writes_engines_and_manifest(built):
    import tensorrt as trt

    fam, out, manifest, cfg = built
    assert manifest["tensorrt"] == trt.__version__
    assert manifest["gpu"]["name"] == torch.cuda.get_device_name(0)
    assert manifest["profiles"] == {"min_batch": 1, "opt_batch": 2, "max_batch": 4}
    assert manifest["precision"]["fp16"] is True
    names = {"text_encoder", "vae_decoder", "unet", "unet-1step", "unet-2step", "unet-3step"}
    assert set(manifest["models"]) == names
    for info in manifest["models"].values():
        assert (out / info["file"]).is_file()
    assert (fam.parent / "cache" / "timing.cache").is_file()
    assert not any(p.suffix == ".cache" for p in out.iterdir())  # kept apart from deployment artifacts


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_unet_parity_against_torch_fp16(built, cuda_graphs):
    from export.tensorrt import Engine
    from flash.models import load_family

    fam, out, manifest, cfg = built
    unet = load_family(fam).students[3].unet.to("cuda", torch.float16)
    engine = Engine(out / manifest["models"]["unet-3step"]["file"], 4, cuda_graphs=cuda_graphs)
    for b in (1, 3, 6):  # 6 > max_batch: split into two calls
        g = torch.Generator().manual_seed(b)
        x, cond = torch.randn(b, 4, 8, 8, generator=g).cuda(), torch.randn(b, 12, 32, generator=g).cuda()
        t = torch.tensor([999, 750, 500, 999, 750, 500][:b], device="cuda")
        with torch.no_grad():
            ref = unet(x.half(), t, encoder_hidden_states=cond.half()).sample.float()
        got = engine.infer({"sample": x, "timestep": t.float(), "encoder_hidden_states": cond})["out_sample"]
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= cfg.trt_atol


def test_backend_pipeline_images(built):
    from export.runtime import register
    from flash.models import load_family
    from flash.pipeline import TextToImage
    from flash.sampling import run_student

    fam, out, _, _ = built
    registry = {}
    register(registry)
    family = load_family(fam)
    be = registry["tensorrt"](
        family, SimpleNamespace(device="cuda", engine_dir=str(out), trt_cuda_graphs=True)
    )
    assert be.name == "tensorrt" and sorted(be.students) == [1, 2, 3]
    ref_family = load_family(fam)
    t2i, s = TextToImage(ref_family.teacher), ref_family.students[3]
    prompts, seeds = ["a red circle", "a blue square", ""], [0, 1, 2]
    ref = t2i.decode(t2i.student_latents(s.unet, prompts, seeds, s.card.timesteps))
    b = be.students[3]
    x_T = t2i.noise(seeds).cuda()
    img = b.decode(run_student(b.denoise, x_T, b.encode(prompts), t2i.schedule, s.card.timesteps))
    assert img.shape == ref.shape and np.abs(img.astype(int) - ref.astype(int)).max() <= 8


def test_engines_for_another_gpu_or_version_are_refused(built, tmp_path):
    from export.tensorrt import TensorRTError, load_engines

    _, out, manifest, _ = built
    for key, value, match in [
        ("gpu", {"name": "Some Other GPU", "compute_capability": "7.5"}, "built for Some Other GPU"),
        ("tensorrt", "8.6.1", "built with TensorRT 8.6.1"),
    ]:
        copy = shutil.copytree(out, tmp_path / key)
        (copy / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(TensorRTError, match=match):
            load_engines(copy)
