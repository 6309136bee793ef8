"""ONNX export of the tiny family: checker, manifest, parity through ONNX Runtime, the service backend."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from export.config import ExportConfig
from export.onnx import (
    UNET_INPUTS,
    UNET_OUTPUTS,
    ParityError,
    UNetWrapper,
    combined_sha256,
    export_family,
    onnx_export,
    source_hashes,
)
from export.runtime import OrtModel, onnxruntime_backends, register, shared_thread_pool
from flash.models import load_family
from flash.pipeline import TextToImage
from flash.sampling import run_student
from flash.tiny import write_tiny_family
from service.backends import BackendError, auto_backends

FILES = [
    "text_encoder.onnx",
    "vae_decoder.onnx",
    "unet.onnx",
    "unet-1step.onnx",
    "unet-2step.onnx",
    "unet-3step.onnx",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine this is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    fam = write_tiny_family(tmp_path_factory.mktemp("export") / "tiny")
    manifest = export_family(fam, fam / "onnx", ExportConfig(parity_threads=1))
    return fam, fam / "onnx", manifest


@pytest.fixture(scope="module")
def family(exported):
    return load_family(exported[0])


def settings(**kw):
    return SimpleNamespace(**{"device": "cpu", "ort_threads": 1, **kw})


def test_files_pass_checker(exported):
    import onnx

    _, out, _ = exported
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(FILES)
    for name in FILES:
        onnx.checker.check_model(str(out / name))


def test_manifest_fields(exported, family):
    fam, out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == "imagine-flash/onnx-export" and manifest["opset"] == 17
    assert manifest["source"]["folders"] == source_hashes(family)
    assert manifest["source"]["sha256"] == combined_sha256(source_hashes(family))
    unet = manifest["models"]["unet-3step"]
    assert unet["role"] == "student" and unet["steps"] == 3 and unet["timesteps"] == [999, 750, 500]
    assert unet["inputs"] == [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 12, 32]},
    ]
    assert unet["outputs"] == [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    te, vae = manifest["models"]["text_encoder"], manifest["models"]["vae_decoder"]
    assert te["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", 12]}
    assert vae["outputs"][0]["shape"] == ["batch", 32, 32, 3] and vae["latents"] == "scaled"
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "diffusers", "transformers"}
    parity = manifest["parity"]
    assert parity["passed"] and not parity["failures"]
    assert set(parity["unet_max_abs"]) == {"unet", "unet-1step", "unet-2step", "unet-3step"}
    assert max(v for d in parity["unet_max_abs"].values() for v in d.values()) <= 1e-3
    assert max(parity["pipeline_max_diff_255"].values()) <= 2


@pytest.mark.parametrize("timesteps", [[999], [999, 750, 500]])
def test_unet_parity_per_item_timesteps(exported, family, timesteps):
    _, out, _ = exported
    b = len(timesteps)
    g = torch.Generator().manual_seed(7)
    x, cond = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 12, 32, generator=g)
    t = torch.tensor(timesteps)  # int64, as the service passes it
    with torch.no_grad():
        ref = family.students[3].unet(x, t, encoder_hidden_states=cond).sample
    got = OrtModel(out / "unet-3step.onnx", threads=1)(
        sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=cond.numpy()
    )[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-3


def test_three_step_pipeline_through_backend(exported, family):
    be = onnxruntime_backends(family, settings())  # finds <family>/onnx
    assert be.name == "onnxruntime" and sorted(be.students) == [1, 2, 3]
    t2i, s = TextToImage(family.teacher), family.students[3]
    prompts, seeds = ["a red circle above a blue square", "a green triangle", ""], [0, 1, 2]
    ref = t2i.decode(t2i.student_latents(s.unet, prompts, seeds, s.card.timesteps, s.card.noise_correction))
    b = be.students[3]
    lat = run_student(b.denoise, t2i.noise(seeds), b.encode(prompts), t2i.schedule, s.card.timesteps)
    img = b.decode(lat)
    assert img.dtype == np.uint8 and img.shape == ref.shape == (3, 32, 32, 3)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 2


def test_factory_rejects_other_weights(exported, tmp_path):
    fam, out, _ = exported
    other = shutil.copytree(fam, tmp_path / "fam", ignore=shutil.ignore_patterns("onnx"))
    s = load_family(other).students[3]
    with torch.no_grad():
        next(s.unet.parameters()).add_(1e-3)
    s.unet.save_pretrained(other / "students" / "3-step", safe_serialization=True)
    with pytest.raises(BackendError, match=r"other weights.*students/3-step changed"):
        onnxruntime_backends(load_family(other), settings(onnx_dir=str(out)))


def test_factory_rejects_bad_folders(exported, family, tmp_path):
    _, out, manifest = exported
    with pytest.raises(BackendError, match="no manifest.json"):
        onnxruntime_backends(family, settings(onnx_dir=str(tmp_path)))
    edited = shutil.copytree(out, tmp_path / "edited")
    m = json.loads(json.dumps(manifest))
    m["source"]["folders"]["unet"] = "0" * 64
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BackendError, match="edited"):
        onnxruntime_backends(family, settings(onnx_dir=str(edited)))
    m = json.loads(json.dumps(manifest))
    m["parity"].update(passed=False, failures=["unet U-Net max abs diff at batch 1 = 0.1 > 0.001"])
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BackendError, match="failed its parity check"):
        onnxruntime_backends(family, settings(onnx_dir=str(edited)))


def test_auto_serves_a_matching_export_on_onnxruntime_and_anything_else_on_torch(exported, family, tmp_path, caplog):
    """FLASH_BACKEND=auto (the default): <family>/onnx when it matches the weights, else torch."""
    fam, out, _ = exported
    auto = settings(onnx_dir=None)
    assert auto_backends(family, auto).name == "onnxruntime"  # finds <family>/onnx
    bare = load_family(shutil.copytree(fam, tmp_path / "bare", ignore=shutil.ignore_patterns("onnx")))
    with caplog.at_level("INFO", logger="service.backends"):
        assert auto_backends(bare, auto).name == "torch"
    assert "no export in" in caplog.text
    other = shutil.copytree(fam, tmp_path / "other")  # its export, then other weights: a stale export
    s = load_family(other).students[3]
    with torch.no_grad():
        next(s.unet.parameters()).add_(1e-3)
    s.unet.save_pretrained(other / "students" / "3-step", safe_serialization=True)
    caplog.clear()
    assert auto_backends(load_family(other), auto).name == "torch"
    assert "not serving the export" in caplog.text and "students/3-step changed" in caplog.text
    cuda = settings(onnx_dir=None, device="cuda")  # not a CPU: torch, which names the missing device
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch sees no CUDA device"):
            auto_backends(family, cuda)


def test_parity_failure_raises_and_marks_manifest(exported, tmp_path):
    fam, _, _ = exported
    out = tmp_path / "strict"
    with pytest.raises(ParityError, match=r"unet-3step U-Net max abs diff at batch 3 = .* > 1e-12"):
        export_family(fam, out, ExportConfig(components=("unet",), unet_atol=1e-12, parity_threads=1))
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] is False and len(parity["failures"]) == 8  # 4 U-Nets x 2 batch sizes


def test_cli_errors_are_one_line_and_non_zero(tmp_path, capsys):
    from export.cli import main

    assert main(["onnx", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flash export onnx: error:") and "nope" in err
    assert main(["onnx", str(tmp_path), "--out", str(tmp_path / "o"), "--opset", "12"]) == 2
    assert "opset 12 is not supported" in capsys.readouterr().err


def test_static_batch_graph_pads_and_splits(family, tmp_path):
    unet = UNetWrapper(family.students[3].unet)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 750.0]), torch.randn(2, 12, 32)
    path = onnx_export(unet, (x, t, cond), tmp_path / "u.onnx", UNET_INPUTS, UNET_OUTPUTS, None, 17)
    model = OrtModel(path, threads=1)
    assert model.fixed_batch == 2
    # every session of the process shares one thread pool (per-session pools fight over the cores)
    assert shared_thread_pool() and not model.session.get_session_options().use_per_session_threads
    x3, t3, c3 = torch.randn(3, 4, 8, 8), torch.tensor([999.0, 750.0, 500.0]), torch.randn(3, 12, 32)
    with torch.no_grad():
        ref = unet(x3, t3, c3).numpy()
    got = model(sample=x3.numpy(), timestep=t3.numpy(), encoder_hidden_states=c3.numpy())[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-3


def test_register_adds_both_factories():
    registry = {}
    register(registry)
    assert set(registry) == {"onnxruntime", "tensorrt"}
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="tensorrt Python package is not installed"):
            registry["tensorrt"](None, settings(device="cuda"))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"opset": 13}, "opset 13 is not supported by the legacy exporter"),
        ({"exporter": "dynamo", "opset": 17}, "opset 17 is not supported by the dynamo exporter"),
        ({"exporter": "jit"}, "unknown exporter 'jit'"),
        ({"components": ("unet", "vae")}, "unknown component 'vae'"),
        ({"components": ("text_encoder",)}, "lack 'unet'"),
        ({"min_batch": 4, "opt_batch": 2}, "opt_batch=2"),
        ({"unet_atol": 0}, "unet_atol must be a positive number, got 0"),
        ({"dynamic_batch": "yes"}, "dynamic_batch must be true or false, got 'yes'"),
        ({"parity_seeds": (0,)}, "same length"),
        ({"builder_optimization_level": 7}, "builder_optimization_level must lie in 0..5, got 7"),
    ],
)
def test_bad_config_names_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kw)


def test_config_load_refuses_unknown_keys(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"opset": 18, "fp32": True}))
    with pytest.raises(ValueError, match=r"unknown ExportConfig keys \['fp32'\]"):
        ExportConfig.load(f)
    assert ExportConfig.load(None, opset=18, max_batch=None).opset == 18


def test_tensorrt_refusal_logic_without_tensorrt(monkeypatch, tmp_path):
    """The wrong-GPU / wrong-version check itself, with TensorRT and the GPU faked (the real one is in test_export_gpu)."""
    import export.tensorrt as T

    monkeypatch.setattr(T, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(T, "require_cuda", lambda: None)
    monkeypatch.setattr(T, "gpu_info", lambda device=0: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    ok = {"tensorrt": "10.3.0", "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}}
    T.check_compatible(ok, tmp_path)
    with pytest.raises(T.TensorRTError, match="built with TensorRT 10.1.0, this is TensorRT 10.3.0"):
        T.check_compatible({**ok, "tensorrt": "10.1.0"}, tmp_path)
    with pytest.raises(
        T.TensorRTError, match=r"built for NVIDIA A100 \(compute capability 8.0\), this GPU is NVIDIA H100"
    ):
        T.check_compatible({**ok, "gpu": {"name": "NVIDIA A100", "compute_capability": "8.0"}}, tmp_path)


def test_tensorrt_profiles_and_timing_cache_place(tmp_path):
    import export.tensorrt as T

    cfg = ExportConfig(min_batch=1, opt_batch=4, max_batch=16)
    inputs = [{"name": "sample", "shape": ["batch", 4, 8, 8]}, {"name": "timestep", "shape": ["batch"]}]
    assert T.profile_shapes(inputs, cfg) == {
        "sample": [[1, 4, 8, 8], [4, 4, 8, 8], [16, 4, 8, 8]],
        "timestep": [[1], [4], [16]],
    }
    assert T.batch_buckets(16) == [1, 2, 4, 8, 16] and T.batch_buckets(12) == [1, 2, 4, 8, 12]
    inside = ExportConfig(timing_cache=str(tmp_path / "engines" / "t.cache"))
    with pytest.raises(ValueError, match="inside the engine folder"):
        T.timing_cache_path(inside, tmp_path / "engines", "10.3.0", "9.0")
    assert not T.timing_cache_path(cfg, tmp_path / "engines", "10.3.0", "9.0").is_relative_to(tmp_path)


@pytest.mark.slow
def test_dynamo_exporter_parity(family, tmp_path):
    unet = UNetWrapper(family.students[3].unet)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 750.0]), torch.randn(2, 12, 32)
    axes = {n: {0: "batch"} for n in (*UNET_INPUTS, *UNET_OUTPUTS)}
    path = onnx_export(unet, (x, t, cond), tmp_path / "u.onnx", UNET_INPUTS, UNET_OUTPUTS, axes, 18, "dynamo")
    x3, t3, c3 = torch.randn(3, 4, 8, 8), torch.tensor([999.0, 750.0, 500.0]), torch.randn(3, 12, 32)
    with torch.no_grad():
        ref = unet(x3, t3, c3).numpy()
    got = OrtModel(path, threads=1)(sample=x3.numpy(), timestep=t3.numpy(), encoder_hidden_states=c3.numpy())[
        0
    ]
    assert np.abs(got - ref).max() <= 1e-3


def test_service_serves_the_onnxruntime_backend_like_torch(exported, family):
    """FLASH_BACKEND=onnxruntime (and auto, with the export in place): same API, images within
    2/255 of the torch backend."""
    import base64
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from service.config import Settings
    from service.testing import serve_in_thread

    fam, onnx_dir, _ = exported
    body = {"prompt": "a red circle above a blue square", "model": "flash-3step", "seed": 5, "n": 2}
    images = {}
    for backend in ("torch", "onnxruntime", "auto"):
        s = Settings(model_dir=fam, backend=backend, onnx_dir=onnx_dir, port=0, warmup=False)
        with serve_in_thread(s) as (url, _):
            r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
            assert r.status_code == 200, r.text
            images[backend] = [
                np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in r.json()["data"]
            ]
            served = "onnxruntime" if backend == "auto" else backend  # auto: the export, as it matches
            assert f'backend="{served}"' in httpx.get(f"{url}/metrics").text
    assert Settings(model_dir=fam).backend == "auto"  # the default
    np.testing.assert_array_equal(images["auto"], images["onnxruntime"])
    for a, b in zip(images["torch"], images["onnxruntime"], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_an_x0_student_exports_and_runs_in_its_own_parameterisation(tmp_path):
    """A student that predicts x0 ("sample"): the manifest records it, the export's pipeline parity
    passes reading it on both sides, and the ONNX Runtime backend's images follow the x0 reading,
    which differs from reading the same output as eps (so a side that dropped it would fail)."""
    fam = write_tiny_family(tmp_path / "tiny", prediction_type="sample")
    manifest = export_family(fam, fam / "onnx", ExportConfig(parity_threads=1, components=("unet",)))
    assert manifest["models"]["unet-1step"]["prediction_type"] == "sample"
    assert manifest["parity"]["passed"], manifest["parity"]

    family = load_family(fam)
    s = family.students[1]
    assert s.card.prediction_type == "sample"
    t2i = TextToImage(family.teacher)
    prompts, seeds = ["a red circle above a blue square", "a green triangle"], [0, 1]
    as_x0 = t2i.decode(t2i.student_latents(s.unet, prompts, seeds, [999], True, "sample"))
    as_eps = t2i.decode(t2i.student_latents(s.unet, prompts, seeds, [999], True, "epsilon"))
    assert np.abs(as_x0.astype(int) - as_eps.astype(int)).max() > 20
    b = onnxruntime_backends(family, settings()).students[1]
    lat = run_student(b.denoise, t2i.noise(seeds), b.encode(prompts), t2i.student_schedule("sample"), [999])
    assert np.abs(b.decode(lat).astype(int) - as_x0.astype(int)).max() <= 2


def test_bench_export_times_torch_against_onnxruntime_on_the_tiny_export(exported, load_bench, tmp_path, capsys):
    fam, onnx_dir, _ = exported
    out = tmp_path / "bench.json"
    argv = ["--model", str(fam), "--onnx-dir", str(onnx_dir), "--cpu-only", "--batch", "1", "2", "--repeats", "1",
            "--warmup", "0", "--threads", "1", "--json", str(out)]  # fmt: skip
    assert load_bench("bench_export").main(argv) == 0
    rows = json.loads(out.read_text())["cpu"]
    assert [(r["batch"], r["steps"]) for r in rows] == [(1, 3), (2, 3)]
    assert all(r[k] > 0 for r in rows for k in ("unet_torch_s", "unet_ort_s", "e2e_torch_s", "e2e_ort_s"))
    printed = capsys.readouterr().out
    assert "| 2 | end to end, 3 steps |" in printed and "ORT speed-up" in printed
    assert "exported" not in printed  # the given export is used, not a temporary one
