"""Inference backends: the three calls the batching loop makes on the device thread.

    encode(prompts)       -> cond [B, L, D]
    denoise(x, t[B], cond) -> model output [B, C, h, w], in the schedule's parameterisation
    decode(latents)       -> uint8 images [B, H, W, 3]

One `Backend` per model (the teacher and each student U-Net; they share the text
encoder and VAE). Tensors in and out are float32 torch tensors on `device`; a backend
converts to whatever it runs internally. All sampling math stays in `flash.sampling`.

Registering a backend: add a factory `(family, settings) -> FamilyBackends` to
`BACKENDS` (export/ registers ONNX Runtime and TensorRT this way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from flash.models import Family
from flash.pipeline import TextToImage, compiled_unet_denoiser, unet_denoiser

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A backend that is unknown, or that cannot run here (missing runtime or device)."""


class Backend(Protocol):
    encode: Callable[[Sequence[str]], Tensor]
    denoise: Callable[[Tensor, Tensor, Tensor], Tensor]
    decode: Callable[[Tensor], np.ndarray]


@dataclass
class TorchBackend:
    encode: Callable[[Sequence[str]], Tensor]
    denoise: Callable[[Tensor, Tensor, Tensor], Tensor]
    decode: Callable[[Tensor], np.ndarray]


@dataclass
class FamilyBackends:
    name: str
    device: torch.device  # where the engine keeps latents
    teacher: Backend
    students: dict[int, Backend]  # by step count
    warm_batches: list[int] = field(default_factory=list)  # batch sizes warm-up must run (compiled shapes)


BackendFactory = Callable[[Family, "Settings"], FamilyBackends]


def torch_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {name!r} is not available: torch sees no CUDA device; use device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"device {name!r} is not available on this machine; use device=cpu")
    return device


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The `torch_dtype` setting: auto is float16 on CUDA (what the GPU paths are built for), else float32."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def batch_buckets(largest: int) -> list[int]:
    """Powers of two up to `largest` (itself included): the batch shapes a compiled U-Net sees."""
    sizes = [1 << k for k in range(largest.bit_length()) if 1 << k < largest]
    return [*sizes, largest]


def padded_to_buckets(denoise: Callable[[Tensor, Tensor, Tensor], Tensor], buckets: Sequence[int]):
    """`denoise` with the batch padded up to the next bucket (repeating the last item) and cut back.

    A compiled or graph-captured U-Net then meets a handful of static shapes instead of one per
    batch size. Items never mix in a U-Net, so padding changes no real item's output. Batches
    above the largest bucket pass through unpadded.
    """

    def call(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        b = x.shape[0]
        n = next((k for k in buckets if k >= b), b)
        if n == b:
            return denoise(x, t, cond)
        idx = torch.cat([torch.arange(b, device=x.device), torch.full((n - b,), b - 1, device=x.device)])
        return denoise(x[idx], t[idx], cond[idx])[:b]

    return call


def torch_backends(family: Family, settings: Settings) -> FamilyBackends:
    """PyTorch on `settings.device`, through the project's TextToImage helpers.

    `torch_dtype` sets the precision; `torch_compile` compiles each U-Net (mode
    reduce-overhead: with CUDA graphs), its batches padded to `warm_batches` buckets,
    which the engine's warm-up runs once each on the device thread.
    """
    device = torch_device(settings.device)
    dtype = torch_dtype(getattr(settings, "torch_dtype", "auto"), device)
    mode = getattr(settings, "torch_compile", "off")
    c = family.teacher
    for module in (c.text_encoder, c.vae, c.unet, *(s.unet for s in family.students.values())):
        module.to(device, dtype)
    t2i = TextToImage(c, device)
    # the teacher's classifier-free guidance runs both branches in one call: twice the batch
    buckets = batch_buckets(2 * getattr(settings, "max_batch_size", 16))

    def for_unet(unet) -> TorchBackend:
        if mode == "off":
            denoiser = unet_denoiser(unet)
        else:  # each call a new CUDA-graph step, its output a copy (flash.pipeline)
            denoiser = padded_to_buckets(compiled_unet_denoiser(unet, mode), buckets)

        @torch.no_grad()
        def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            return denoiser(x.to(dtype), t, cond.to(dtype)).float()

        return TorchBackend(encode=lambda p: t2i.encode(p).float(), denoise=denoise, decode=t2i.decode)

    students = {steps: for_unet(s.unet) for steps, s in family.students.items()}
    backends = FamilyBackends("torch", device, for_unet(c.unet), students)
    if mode != "off":
        backends.warm_batches = buckets
    return backends


def auto_backends(family: Family, settings: Settings) -> FamilyBackends:
    """The default: ONNX Runtime on CPU where the family has a usable export (`onnx_dir`, or
    <family>/onnx as `flash export onnx` and `make serve` write it), else torch. On this 2-core
    CPU a lone 3-step image takes ~40 ms on ONNX Runtime against ~67 on torch (docs/benchmarks.md).
    Decided again at every load, so a reload to a version without an export serves it on torch."""
    onnxruntime = BACKENDS.get("onnxruntime")  # absent without the export extra
    if onnxruntime is not None and torch_device(settings.device).type == "cpu":
        from export.runtime import onnx_folder  # importable: it registered "onnxruntime"

        folder = onnx_folder(family, settings)
        if (folder / "manifest.json").is_file():
            try:
                return onnxruntime(family, settings)
            except (BackendError, ImportError) as e:  # stale, failed parity, no onnxruntime
                log.warning("backend auto: not serving the export in %s (%s); serving with torch", folder, e)
        else:
            log.info("backend auto: no export in %s (`flash export onnx` makes one); serving with torch", folder)
    return torch_backends(family, settings)


# The registration point: name -> factory. export/ adds "onnxruntime" and "tensorrt".
BACKENDS: dict[str, BackendFactory] = {"auto": auto_backends, "torch": torch_backends}


def _register_exported() -> None:
    """ONNX Runtime and TensorRT factories from export/ (their runtimes are imported lazily)."""
    try:
        from export.runtime import register
    except ImportError:  # the export extra is not installed: torch only
        return
    register(BACKENDS)


_register_exported()


def make_backend(name: str, family: Family, settings: Settings) -> FamilyBackends:
    factory = BACKENDS.get(name)
    if factory is None:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return factory(family, settings)
