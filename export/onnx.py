"""ONNX export of a family: text encoder, VAE decoder, the teacher's and every student's U-Net.

Everything goes through one function, `onnx_export` (after diffusers'
`convert_stable_diffusion_checkpoint_to_onnx.py::onnx_export`): named inputs and outputs,
a dynamic batch axis and the opset from `ExportConfig`, then `onnx.checker`. The graphs:

    text_encoder.onnx  input_ids int64 [B, L]                          -> last_hidden_state [B, L, D]
    unet.onnx          sample [B, C, h, w], timestep float32 [B],      -> out_sample [B, C, h, w]
    unet-<n>step.onnx  encoder_hidden_states [B, L, D]                    (the schedule's parameterisation)
    vae_decoder.onnx   latents [B, C, h, w] *scaled*, as the sampler   -> image float32 [B, H, W, 3] in [0, 1]
                       returns them and TextToImage.decode takes them

The VAE graph divides by `scaling_factor`, decodes and maps [-1, 1] to [0, 1] (clamped,
channels last), so the host only does TextToImage.decode's final `round(255 x)`. The
timestep is float32 (integer values; exact in fp32 and fp16 up to 2048) because every
U-Net casts it to float before the sinusoidal embedding and TensorRT handles float I/O
best; runtimes convert the service's int64 timesteps.

`export_family` then measures parity through ONNX Runtime and writes manifest.json
(docs/export.md describes every field). Parity beyond tolerance raises ParityError
after the manifest, marked `"passed": false`, is written; runtimes refuse such a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.config import ExportConfig
from flash.models import TINY_VAE, Family, folder_sha256, load_family, load_tiny_vae, vae_scale_factor

MANIFEST = "manifest.json"
FORMAT = "imagine-flash/onnx-export"
FORMAT_VERSION = 1
BATCH = "batch"  # name of the dynamic batch axis in every graph

TEXT_ENCODER = "text_encoder"
VAE_DECODER = "vae_decoder"
VAE_DECODER_TINY = "vae_decoder_tiny"  # the family's fast decoder (vae_tiny/), where it has one
TEACHER_UNET = "unet"

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUTS = ("out_sample",)
TEXT_INPUTS, TEXT_OUTPUTS = ("input_ids",), ("last_hidden_state",)
VAE_INPUTS, VAE_OUTPUTS = ("latents",), ("image",)


class ExportError(RuntimeError):
    """An export that cannot be written, read or trusted."""


class ParityError(ExportError):
    """ONNX Runtime's results differ from PyTorch's beyond the configured tolerance."""


def student_model_name(steps: int) -> str:
    return f"unet-{steps}step"


# -- wrappers: plain tensors in, one plain tensor out -------------------------------------


class UNetWrapper(nn.Module):
    """(sample [B,C,h,w], timestep [B], encoder_hidden_states [B,L,D]) -> output [B,C,h,w]."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class TextEncoderWrapper(nn.Module):
    """input_ids [B, L] -> last_hidden_state [B, L, D] (what TextToImage.encode returns)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """Scaled latents [B, C, h, w] -> image [B, H, W, 3] in [0, 1]: TextToImage.decode before rounding."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents):
        img = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


# -- the one export function ----------------------------------------------------------------


def onnx_export(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
    exporter: str = "legacy",
) -> Path:
    """Export `module(*inputs)` to `path`, then run onnx.checker on the file.

    Weights above 2 GB go to one `<path>.data` file beside the graph. Returns `path`.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / path.name
        kwargs: dict[str, Any] = dict(
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or None,
            opset_version=opset,
        )
        if exporter == "dynamo":
            big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5e9
            kwargs.update(dynamo=True, external_data=big, optimize=True)
        elif exporter == "legacy":
            kwargs.update(dynamo=False, do_constant_folding=True)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; allowed: legacy, dynamo")
        # the exporters warn about tracing and deprecation, and dynamo prints progress to stdout
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, inputs, str(tmp_path), **kwargs)
            except Exception as e:  # the exporters raise many types; name the file and the cause
                raise ExportError(f"exporting {path.name} with the {exporter} exporter failed: {e}") from e
        others = [f for f in Path(tmp).iterdir() if f != tmp_path]
        if others:  # external data (one file per tensor from the legacy exporter): gather into one
            model = onnx.load(str(tmp_path), load_external_data=True)
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
            )
        else:
            shutil.move(str(tmp_path), path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"onnx.checker rejected {path}: {e}") from e
    return path


# -- describing what was written ------------------------------------------------------------


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints, or axis names for dynamic axes) of a graph's inputs and outputs."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append(
                {"name": v.name, "dtype": np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name, "shape": dims}
            )
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def file_sha256(path: Path) -> str:
    """sha256 of an ONNX file and, where present, its external-data file."""
    h = hashlib.sha256()
    for f in (path, path.with_name(path.name + ".data")):
        if f.is_file():
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def source_hashes(family: Family) -> dict[str, str]:
    """folder_sha256 of every source folder an export reads, keyed by path relative to the family.

    Per folder rather than over the whole family: a family folder also holds things that
    are not weights (flash.json's eval figures, maybe this very export under onnx/), which
    would otherwise change the hash without changing a single weight.
    """
    if family.path is None:
        raise ExportError("the family has no folder (family.path is None); cannot hash its weights")
    root = Path(family.path)
    hashes = {sub: folder_sha256(root / sub) for sub in ("tokenizer", "text_encoder", "vae", "unet")}
    if (root / TINY_VAE).is_dir():
        hashes[TINY_VAE] = folder_sha256(root / TINY_VAE)
    for _steps, student in sorted(family.students.items()):
        key = student_source_key(family, student)
        hashes[key] = folder_sha256(root / key)
    return hashes


def student_source_key(family: Family, student) -> str:
    try:
        return Path(student.path).resolve().relative_to(Path(family.path).resolve()).as_posix()
    except (TypeError, ValueError) as e:
        raise ExportError(
            f"student folder {student.path} is not inside the family folder {family.path}"
        ) from e


def combined_sha256(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


# -- the family export ----------------------------------------------------------------------


def _batch_axes(names: Sequence[str], dynamic: bool) -> dict[str, dict[int, str]] | None:
    return {n: {0: BATCH} for n in names} if dynamic else None


def _example_timesteps(cfg: ExportConfig, batch: int) -> torch.Tensor:
    ts = cfg.parity_timesteps
    return torch.tensor([ts[i % len(ts)] for i in range(batch)], dtype=torch.float32)


def export_family(
    model_dir: str | Path, out_dir: str | Path, cfg: ExportConfig | None = None
) -> dict[str, Any]:
    """Export a family folder's components to `out_dir`, check parity, write manifest.json.

    Returns the manifest. Raises ParityError (after writing the manifest with
    `parity.passed = false`) when ONNX Runtime differs from PyTorch beyond `cfg`'s tolerances.
    """
    cfg = cfg or ExportConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    t_start = time.perf_counter()
    family = load_family(model_dir)
    if not family.students:
        raise ExportError(f"{model_dir} has no students under students/; nothing to serve fast")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a half-written export must not look valid

    c = family.teacher
    b = cfg.export_batch
    tok = c.tokenizer
    length = int(tok.model_max_length)
    cross_dim = int(c.unet.config.cross_attention_dim)
    latent = (int(c.unet.config.in_channels), int(c.unet.config.sample_size), int(c.unet.config.sample_size))
    g = torch.Generator().manual_seed(0)

    def export(name: str, module, inputs, in_names, out_names, **info) -> dict[str, Any]:
        t0 = time.perf_counter()
        path = onnx_export(
            module, inputs, out_dir / f"{name}.onnx", in_names, out_names,
            _batch_axes((*in_names, *out_names), cfg.dynamic_batch), cfg.opset, cfg.exporter,
        )  # fmt: skip
        return {
            "file": path.name,
            "sha256": file_sha256(path),
            "export_seconds": round(time.perf_counter() - t0, 3),
            **graph_io(path),
            **info,
        }

    models: dict[str, dict[str, Any]] = {}
    if "text_encoder" in cfg.components:
        ids = tok(
            [""] * b, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        models[TEXT_ENCODER] = export(
            TEXT_ENCODER, TextEncoderWrapper(c.text_encoder), (ids,), TEXT_INPUTS, TEXT_OUTPUTS,
            role="text_encoder", source="text_encoder", uses_source=["tokenizer", "text_encoder"],
        )  # fmt: skip
    if "vae_decoder" in cfg.components:
        lat = torch.randn(b, int(c.vae.config.latent_channels), *latent[1:], generator=g)
        models[VAE_DECODER] = export(
            VAE_DECODER, VaeDecoderWrapper(c.vae), (lat,), VAE_INPUTS, VAE_OUTPUTS,
            role="vae_decoder", source="vae", uses_source=["vae"],
            scaling_factor=float(c.vae.config.scaling_factor), latents="scaled",
        )  # fmt: skip
        if (model_dir / TINY_VAE).is_dir():  # the fast decoder, served with decoder=tiny
            tiny = load_tiny_vae(model_dir)
            models[VAE_DECODER_TINY] = export(
                VAE_DECODER_TINY, VaeDecoderWrapper(tiny), (lat,), VAE_INPUTS, VAE_OUTPUTS,
                role=VAE_DECODER_TINY, source=TINY_VAE, uses_source=[TINY_VAE],
                scaling_factor=float(tiny.config.scaling_factor), latents="scaled",
            )  # fmt: skip
    unet_inputs = (torch.randn(b, *latent, generator=g), _example_timesteps(cfg, b),
                   torch.randn(b, length, cross_dim, generator=g))  # fmt: skip
    models[TEACHER_UNET] = export(
        TEACHER_UNET, UNetWrapper(c.unet), unet_inputs, UNET_INPUTS, UNET_OUTPUTS,
        role="teacher", source="unet", uses_source=["unet"],
    )  # fmt: skip
    for steps, s in sorted(family.students.items()):
        key = student_source_key(family, s)
        models[student_model_name(steps)] = export(
            student_model_name(steps), UNetWrapper(s.unet), unet_inputs, UNET_INPUTS, UNET_OUTPUTS,
            role="student", steps=steps, timesteps=list(s.card.timesteps), source=key, uses_source=[key],
            noise_correction=s.card.noise_correction, prediction_type=s.card.prediction_type,
        )  # fmt: skip

    hashes = source_hashes(family)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "path": str(model_dir.resolve()),
            "family": family.card.name,
            "version": family.card.version,
            "sha256": combined_sha256(hashes),
            "folders": hashes,
        },
        "opset": cfg.opset,
        "exporter": cfg.exporter,
        "dynamic_batch": cfg.dynamic_batch,
        "batch": BATCH if cfg.dynamic_batch else cfg.static_batch,
        "geometry": {
            "latent_shape": list(latent),
            "text_length": length,
            "text_dim": cross_dim,
            "image_size": int(c.unet.config.sample_size) * vae_scale_factor(c.vae),
        },
        "models": models,
        "config": cfg.to_dict(),
        "versions": versions(),
    }
    manifest["parity"] = measure_parity(family, out_dir, manifest, cfg)
    manifest["export_seconds"] = round(time.perf_counter() - t_start, 3)
    write_manifest(out_dir, manifest)
    if not manifest["parity"]["passed"]:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch beyond tolerance in {out_dir}: "
            + "; ".join(manifest["parity"]["failures"])
        )
    return manifest


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(Path(out_dir) / MANIFEST)


# -- parity ---------------------------------------------------------------------------------


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@torch.no_grad()
def measure_parity(
    family: Family, out_dir: Path, manifest: dict[str, Any], cfg: ExportConfig
) -> dict[str, Any]:
    """Max abs differences ONNX Runtime vs PyTorch (fp32, CPU), per graph and for whole student pipelines."""
    from export.runtime import OrtModel, ort_backends_for
    from flash.pipeline import TextToImage
    from flash.sampling import run_student

    c = family.teacher
    models = manifest["models"]
    geo = manifest["geometry"]
    g = torch.Generator().manual_seed(1234)
    failures: list[str] = []

    def check(label: str, value: float, tol: float) -> float:
        if not value <= tol:  # also catches NaN
            failures.append(f"{label} = {value:.3g} > {tol:g}")
        return value

    unet_diffs: dict[str, dict[str, float]] = {}
    for name, info in models.items():
        if info["role"] not in ("teacher", "student"):
            continue
        unet = c.unet if info["role"] == "teacher" else family.students[info["steps"]].unet
        session = OrtModel(out_dir / info["file"], threads=cfg.parity_threads)
        per_batch = {}
        for b in cfg.parity_batch_sizes:
            x = torch.randn(b, *geo["latent_shape"], generator=g)
            t = _example_timesteps(cfg, b)
            cond = torch.randn(b, geo["text_length"], geo["text_dim"], generator=g)
            ref = UNetWrapper(unet)(x, t, cond).numpy()
            out = session(sample=x.numpy(), timestep=t.numpy(), encoder_hidden_states=cond.numpy())[0]
            per_batch[str(b)] = check(
                f"{name} U-Net max abs diff at batch {b}", _max_abs(out, ref), cfg.unet_atol
            )
        unet_diffs[name] = per_batch

    result: dict[str, Any] = {
        "device": "cpu",
        "provider": "CPUExecutionProvider",
        "batch_sizes": list(cfg.parity_batch_sizes),
        "timesteps": list(cfg.parity_timesteps),
        "seeds": list(cfg.parity_seeds),
        "prompts": list(cfg.parity_prompts),
        "tolerances": {
            "unet_max_abs": cfg.unet_atol,
            "text_encoder_max_abs": cfg.text_encoder_atol,
            "vae_decoder_max_abs": cfg.vae_atol,
            "image_max_diff_255": cfg.image_atol,
        },
        "unet_max_abs": unet_diffs,
    }
    t2i = TextToImage(c)
    prompts = list(cfg.parity_prompts)
    if TEXT_ENCODER in models:
        tok = c.tokenizer
        ids = tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ref = TextEncoderWrapper(c.text_encoder)(ids.input_ids).numpy()
        out = OrtModel(out_dir / models[TEXT_ENCODER]["file"], threads=cfg.parity_threads)(
            input_ids=ids.input_ids.numpy()
        )[0]
        result["text_encoder_max_abs"] = check(
            "text encoder max abs diff", _max_abs(out, ref), cfg.text_encoder_atol
        )
    if VAE_DECODER in models:
        lat = torch.randn(len(prompts), *geo["latent_shape"], generator=g)
        ref = VaeDecoderWrapper(c.vae)(lat).numpy()
        out = OrtModel(out_dir / models[VAE_DECODER]["file"], threads=cfg.parity_threads)(
            latents=lat.numpy()
        )[0]
        result["vae_decoder_max_abs"] = check("VAE decoder max abs diff", _max_abs(out, ref), cfg.vae_atol)
    if VAE_DECODER_TINY in models:
        lat = torch.randn(len(prompts), *geo["latent_shape"], generator=g)
        ref = VaeDecoderWrapper(load_tiny_vae(Path(family.path)))(lat).numpy()
        out = OrtModel(out_dir / models[VAE_DECODER_TINY]["file"], threads=cfg.parity_threads)(
            latents=lat.numpy()
        )[0]
        result["vae_decoder_tiny_max_abs"] = check(
            "fast VAE decoder max abs diff", _max_abs(out, ref), cfg.vae_atol
        )

    # whole student pipelines: text encode, n U-Net steps, decode, on the same seeds
    ort = ort_backends_for(family, out_dir, manifest, threads=cfg.parity_threads)
    seeds = list(cfg.parity_seeds)
    pipeline: dict[str, float] = {}
    for steps, s in sorted(family.students.items()):
        ref_img = t2i.decode(
            t2i.student_latents(s.unet, prompts, seeds, s.card.timesteps, s.card.noise_correction, s.card.prediction_type)
        )
        be = ort.students[steps]
        lat = run_student(
            be.denoise, t2i.noise(seeds), be.encode(prompts), t2i.student_schedule(s.card.prediction_type),
            s.card.timesteps, None,
            s.card.noise_correction,
        )  # fmt: skip
        img = be.decode(lat)
        diff = float(np.abs(img.astype(np.int16) - ref_img.astype(np.int16)).max())
        pipeline[f"{steps}-step"] = check(
            f"{steps}-step pipeline max pixel diff (/255)", diff, cfg.image_atol
        )
    result["pipeline_max_diff_255"] = pipeline
    result["passed"] = not failures
    result["failures"] = failures
    return result
