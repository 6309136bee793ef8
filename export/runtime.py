"""Serving exported models: ONNX Runtime sessions (and TensorRT engines) as the service's backends.

A backend is the three calls of `service.backends`:

    encode(prompts) -> cond [B, L, D]; denoise(x, t [B], cond) -> output; decode(latents) -> uint8 [B, H, W, 3]

`onnxruntime_backends(family, settings)` finds the export (`settings.onnx_dir`, else
`<family>/onnx`), refuses it unless its manifest matches the loaded family's weights
and recorded passing parity, and runs every U-Net through ONNX Runtime; the text
encoder and VAE decoder too where they were exported, else through PyTorch on the CPU.
`register(BACKENDS)` adds the "onnxruntime" and "tensorrt" factories to the service.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from export.onnx import (
    FORMAT,
    MANIFEST,
    TEACHER_UNET,
    TEXT_ENCODER,
    VAE_DECODER,
    VAE_DECODER_TINY,
    combined_sha256,
    source_hashes,
    student_model_name,
    student_source_key,
)
from flash.models import TINY_VAE, Family

if TYPE_CHECKING:
    from service.backends import FamilyBackends

ONNX_SUBDIR = "onnx"  # default export location inside a family folder
ENGINE_SUBDIR = "tensorrt"


def _backend_error(msg: str) -> Exception:
    """service.backends.BackendError where the service is importable (it always is when serving)."""
    try:
        from service.backends import BackendError
    except ImportError:  # export used on its own
        return RuntimeError(msg)
    return BackendError(msg)


# -- manifests and the family check ---------------------------------------------------------


def read_manifest(folder: str | Path, expected_format: str = FORMAT) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise _backend_error(
            f"no {MANIFEST} in {folder}: not an export folder, or the export did not finish "
            "(run `flash export onnx MODEL_DIR --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _backend_error(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != expected_format:
        raise _backend_error(f"{path} has format {manifest.get('format')!r}, expected {expected_format!r}")
    return manifest


def check_source(
    manifest: dict[str, Any], family: Family, folder: Path, needed: Sequence[str] | None = None
) -> None:
    """Refuse an export whose source folders differ from the loaded family's (by folder_sha256)."""
    recorded: dict[str, str] = manifest["source"]["folders"]
    if combined_sha256(recorded) != manifest["source"]["sha256"]:
        raise _backend_error(f"{folder / MANIFEST}: source hashes were edited (combined hash does not match)")
    actual = source_hashes(family)
    keys = list(needed) if needed is not None else list(actual)
    missing = [k for k in keys if k not in recorded]
    if missing:
        raise _backend_error(
            f"export {folder} has no model for {', '.join(missing)} of {family.path} "
            f"(exported: {', '.join(sorted(recorded))}); re-run `flash export onnx {family.path} --out {folder}`"
        )
    changed = [k for k in keys if actual[k] != recorded[k]]
    if changed:
        raise _backend_error(
            f"export {folder} was made from other weights than {family.path}: {', '.join(changed)} changed "
            f"(manifest source sha256 {manifest['source']['sha256'][:12]}...); "
            f"re-run `flash export onnx {family.path} --out {folder}`"
        )


def _needed_sources(manifest: dict[str, Any], family: Family, decoder: str = "full") -> list[str]:
    models = manifest["models"]
    keys = ["unet"]
    keys += [student_source_key(family, s) for _steps, s in sorted(family.students.items())]
    if TEXT_ENCODER in models:
        keys += ["tokenizer", "text_encoder"]
    if decoder == "tiny":
        keys.append(TINY_VAE)
    elif VAE_DECODER in models:
        keys.append("vae")
    return keys


# -- ONNX Runtime ---------------------------------------------------------------------------


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise _backend_error(
                f"device {device!r} with onnxruntime needs the CUDAExecutionProvider (pip install onnxruntime-gpu); "
                f"this onnxruntime has {', '.join(available)}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "cpu":
        raise _backend_error(f"onnxruntime backend runs on cpu or cuda, not {device!r}")
    return ["CPUExecutionProvider"]


_shared_pool: bool | None = None  # whether this process's ONNX Runtime sessions share one thread pool


def shared_thread_pool(threads: int = 0) -> bool:
    """One intra-op thread pool for every session in the process, set up before the first one.

    A backend holds several sessions (text encoder, U-Nets, VAE decoder) called one after
    another; with a pool each, their spinning threads fight over the cores (on 2 cores the
    3-step pipeline ran 1.4x faster than torch with per-session pools, 2.4x with one shared:
    docs/benchmarks.md). The size is fixed by the first call (0: ONNX Runtime's default).
    False where this onnxruntime build cannot share pools; sessions then get their own.
    """
    global _shared_pool
    if _shared_pool is None:
        try:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(int(threads), 0)
            _shared_pool = True
        except (ImportError, AttributeError, RuntimeError):
            _shared_pool = False
    return _shared_pool


class OrtModel:
    """One ONNX Runtime session: numpy arrays in by input name, the list of outputs back.

    A graph exported with a fixed batch gets other batch sizes split into chunks of that
    size, the last one padded by repeating its final item (items never mix in these graphs).
    session.run is thread-safe, so one OrtModel may serve concurrent callers.
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise _backend_error(f"ONNX file {path} is missing; re-run the export")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if shared_thread_pool(threads):
            opts.use_per_session_threads = False
        elif threads:
            opts.intra_op_num_threads = int(threads)
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) else None

    def input_dtype(self, name: str) -> np.dtype:
        kind = self.inputs[name].type  # e.g. "tensor(float)"
        return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(float16)": np.float16}[kind]  # fmt: skip

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        feeds = {k: np.ascontiguousarray(v, dtype=self.input_dtype(k)) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        fb = self.fixed_batch
        if fb is None or n == fb:
            return self.session.run(None, feeds)
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, fb):
            part = {k: v[start : start + fb] for k, v in feeds.items()}
            real = len(next(iter(part.values())))
            if real < fb:
                part = {k: np.concatenate([v, np.repeat(v[-1:], fb - real, axis=0)]) for k, v in part.items()}
            chunks.append([o[:real] for o in self.session.run(None, part)])
        return [np.concatenate(outs) for outs in zip(*chunks, strict=True)]


@dataclass
class ExportedBackend:
    """The service's Backend protocol: encode / denoise / decode."""

    encode: Callable[[Sequence[str]], Tensor]
    denoise: Callable[[Tensor, Tensor, Tensor], Tensor]
    decode: Callable[[Tensor], np.ndarray]


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] in [0, 1] -> uint8, the rounding of TextToImage.decode."""
    return (image01.astype(np.float32) * 255).round().astype(np.uint8)


def ort_encoder(model: OrtModel, tokenizer) -> Callable[[Sequence[str]], Tensor]:
    def encode(prompts: Sequence[str]) -> Tensor:
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="np",
        ).input_ids  # fmt: skip
        return torch.from_numpy(model(input_ids=ids)[0])

    return encode


def ort_denoiser(model: OrtModel) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        feeds = {
            "sample": x.detach().float().cpu().numpy(),
            "timestep": t.detach().cpu().numpy(),
            "encoder_hidden_states": cond.detach().float().cpu().numpy(),
        }
        return torch.from_numpy(model(**feeds)[0]).to(x.device)

    return denoise


def ort_decoder(model: OrtModel) -> Callable[[Tensor], np.ndarray]:
    def decode(latents: Tensor) -> np.ndarray:
        return to_uint8(model(latents=latents.detach().float().cpu().numpy())[0])

    return decode


def tiny_decoder_model(models: dict[str, Any], family: Family, folder: Path) -> str:
    """The export's fast decoder, or one clear line saying why there is none."""
    if VAE_DECODER_TINY not in models:
        raise _backend_error(
            f"export {folder} has no fast decoder ({VAE_DECODER_TINY}.onnx): the family had no {TINY_VAE}/ "
            f"when it was exported; re-run `flash export onnx {family.path} --out {folder}`, or use decoder=full"
        )
    return VAE_DECODER_TINY


def ort_backends_for(
    family: Family, folder: str | Path, manifest: dict[str, Any], device: str = "cpu", threads: int = 0,
    decoder: str = "full",
) -> FamilyBackends:
    """FamilyBackends running the export in `folder` (no checks; see onnxruntime_backends).

    decoder "tiny" decodes with the export's fast decoder (vae_decoder_tiny, exported from the
    family's vae_tiny/)."""
    from flash.pipeline import TextToImage
    from service.backends import FamilyBackends

    folder = Path(folder)
    models = manifest["models"]

    def session(name: str) -> OrtModel:
        return OrtModel(folder / models[name]["file"], device, threads)

    c = family.teacher
    t2i = None
    if TEXT_ENCODER not in models or VAE_DECODER not in models:  # PyTorch fallback, on the CPU
        t2i = TextToImage(c, "cpu")
    if TEXT_ENCODER in models:
        encode = ort_encoder(session(TEXT_ENCODER), c.tokenizer)
    else:
        encode = lambda prompts: t2i.encode(prompts).float()  # noqa: E731
    if decoder == "tiny":
        decode = ort_decoder(session(tiny_decoder_model(models, family, folder)))
    else:
        decode = ort_decoder(session(VAE_DECODER)) if VAE_DECODER in models else t2i.decode

    def unet_backend(name: str) -> ExportedBackend:
        if name not in models:
            raise _backend_error(f"export {folder} has no {name}.onnx; re-run the export for this family")
        return ExportedBackend(encode=encode, denoise=ort_denoiser(session(name)), decode=decode)

    students = {steps: unet_backend(student_model_name(steps)) for steps in sorted(family.students)}
    return FamilyBackends("onnxruntime", torch.device("cpu"), unet_backend(TEACHER_UNET), students)


def _setting(settings: Any, name: str, default: Any = None) -> Any:
    value = getattr(settings, name, None)
    return default if value in (None, "") else value


def onnx_folder(family: Family, settings: Any) -> Path:
    """The export the onnxruntime backend serves: `settings.onnx_dir`, or <family>/onnx."""
    return Path(_setting(settings, "onnx_dir", Path(family.path or ".") / ONNX_SUBDIR))


def onnxruntime_backends(family: Family, settings: Any) -> FamilyBackends:
    """The "onnxruntime" factory: `settings.onnx_dir` (or <family>/onnx), checked against the family.

    Reads `settings.device` (cpu, or cuda with onnxruntime-gpu) and, if present,
    `settings.ort_threads` (intra-op threads; 0 = ONNX Runtime's default).
    """
    if family.path is None:
        raise _backend_error(
            "the onnxruntime backend needs a family loaded from a folder (family.path is None)"
        )
    folder = onnx_folder(family, settings)
    manifest = read_manifest(folder)
    parity = manifest.get("parity", {})
    if not parity.get("passed", False):
        raise _backend_error(
            f"export {folder} failed its parity check ({'; '.join(parity.get('failures', [])) or 'no figures'}); "
            "re-export before serving it"
        )
    decoder = str(_setting(settings, "decoder", "full"))
    if decoder == "tiny":
        tiny_decoder_model(manifest["models"], family, folder)
    check_source(manifest, family, folder, _needed_sources(manifest, family, decoder))
    for name, info in manifest["models"].items():
        if not (folder / info["file"]).is_file():
            raise _backend_error(f"export {folder} lists {info['file']} for {name} but the file is missing")
    return ort_backends_for(family, folder, manifest, str(_setting(settings, "device", "cpu")),
                            int(_setting(settings, "ort_threads", 0)), decoder)  # fmt: skip


def tensorrt_backends(family: Family, settings: Any) -> FamilyBackends:
    """The "tensorrt" factory: engines from `settings.engine_dir` (or <family>/tensorrt).

    Fails with one clear line where CUDA or the tensorrt package is missing, or where the
    engines were built for another GPU or TensorRT version. Unverified: see docs/export.md.
    """
    from export.tensorrt import TensorRTError, trt_backends

    try:
        return trt_backends(family, settings)
    except TensorRTError as e:
        raise _backend_error(str(e)) from e


def register(backends_registry: dict[str, Callable[[Family, Any], FamilyBackends]]) -> None:
    """Add the "onnxruntime" and "tensorrt" factories to the service's BACKENDS."""
    backends_registry["onnxruntime"] = onnxruntime_backends
    backends_registry["tensorrt"] = tensorrt_backends
