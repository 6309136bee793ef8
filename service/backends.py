"""Inference backends: the three calls the batching loop makes on the device thread.

    encode(prompts)       -> cond [B, L, D]
    denoise(x, t[B], cond) -> model output [B, C, h, w], in the schedule's parameterisation
    decode(latents)       -> uint8 images [B, H, W, 3]

One `Backend` per model (the teacher and each student U-Net; they share the text
encoder and VAE). Tensors in and out are float32 torch tensors on `device`; a backend
converts to whatever it runs internally. All sampling math stays in `flash.sampling`.

Registering a backend: add a factory `(family, settings) -> FamilyBackends` to
`BACKENDS` (ONNX Runtime and TensorRT arrive with the export issue).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from flash.models import Family
from flash.pipeline import TextToImage, unet_denoiser

if TYPE_CHECKING:
    from service.config import Settings


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


BackendFactory = Callable[[Family, "Settings"], FamilyBackends]


def torch_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {name!r} is not available: torch sees no CUDA device; use device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"device {name!r} is not available on this machine; use device=cpu")
    return device


def torch_backends(family: Family, settings: Settings) -> FamilyBackends:
    """Eager PyTorch on `settings.device`, through the project's TextToImage helpers."""
    device = torch_device(settings.device)
    c = family.teacher
    for module in (c.text_encoder, c.vae, c.unet, *(s.unet for s in family.students.values())):
        module.to(device)
    t2i = TextToImage(c, device)

    def for_unet(unet) -> TorchBackend:
        denoiser, dtype = unet_denoiser(unet), unet.dtype

        @torch.no_grad()
        def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            return denoiser(x.to(dtype), t, cond.to(dtype)).float()

        return TorchBackend(encode=lambda p: t2i.encode(p).float(), denoise=denoise, decode=t2i.decode)

    students = {steps: for_unet(s.unet) for steps, s in family.students.items()}
    return FamilyBackends("torch", device, for_unet(c.unet), students)


# The registration point: name -> factory. export/ adds "onnxruntime" and "tensorrt".
BACKENDS: dict[str, BackendFactory] = {"torch": torch_backends}


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
