"""One typed config for the export stage (ONNX, ONNX Runtime parity, TensorRT engines).

Defaults: opset 17 through the legacy (TorchScript) exporter -- 0.65 s per U-Net here
against ~12 s for the dynamo exporter, with the same parity (docs/export.md) -- a
dynamic batch axis, and the issue's parity bars: U-Net max abs difference <= 1e-3 in
fp32 and pipeline images within 2/255 per pixel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flash.config import load_config

EXPORTERS = ("legacy", "dynamo")
COMPONENTS = ("text_encoder", "vae_decoder", "unet")  # "unet": the teacher's and every student's
# Opsets each exporter writes (torch 2.13: TorchScript exporter <= 20; dynamo >= 18).
OPSET_RANGE = {"legacy": (14, 20), "dynamo": (18, 23)}


@dataclass
class ExportConfig:
    # ONNX
    opset: int = 17
    exporter: str = "legacy"  # "legacy" (TorchScript tracing) or "dynamo" (torch.export)
    dynamic_batch: bool = True  # False: every graph has the fixed batch `static_batch` (runtimes
    # pad / split other batches; TensorRT profiles then use that batch, not min/opt/max)
    static_batch: int = 1
    components: tuple[str, ...] = COMPONENTS

    # parity through ONNX Runtime (fp32), checked by export_family
    unet_atol: float = 1e-3  # max |onnx - torch| of the U-Net output
    text_encoder_atol: float = 1e-3  # max |onnx - torch| of the last hidden state
    vae_atol: float = 1e-3  # max |onnx - torch| of the decoded image in [0, 1]
    image_atol: float = 2.0  # max per-pixel difference of pipeline images, in 1/255 units
    parity_batch_sizes: tuple[int, ...] = (1, 3)
    parity_timesteps: tuple[int, ...] = (999, 750, 500)  # per item, cycled over the batch
    parity_seeds: tuple[int, ...] = (0, 1, 2)
    parity_prompts: tuple[str, ...] = (
        "a red circle above a blue square",
        "a small green triangle",
        "",
    )
    parity_threads: int = 0  # ONNX Runtime intra-op threads while measuring parity; 0 = its default

    # TensorRT
    min_batch: int = 1  # optimisation profile: min / opt / max batch of every engine
    opt_batch: int = 4
    max_batch: int = 16
    fp16: bool = True
    bf16: bool = False  # only where the GPU supports it (compute capability >= 8.0)
    workspace_gb: float = 8.0
    builder_optimization_level: int = 3  # 0..5
    timing_cache: str = ""  # "" -> ~/.cache/imagine-flash/tensorrt/timing-<trt>-sm<cc>.cache
    trt_atol: float = 2e-2  # GPU tests: max |trt fp16 - torch fp16| of the U-Net output

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded in manifests

    def __post_init__(self) -> None:
        self.components = tuple(self.components)
        self.parity_batch_sizes = tuple(self.parity_batch_sizes)
        self.parity_timesteps = tuple(self.parity_timesteps)
        self.parity_seeds = tuple(self.parity_seeds)
        self.parity_prompts = tuple(self.parity_prompts)
        for name in ("dynamic_batch", "fp16", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {self.exporter!r}; allowed: {', '.join(EXPORTERS)}")
        lo, hi = OPSET_RANGE[self.exporter]
        if not isinstance(self.opset, int) or not lo <= self.opset <= hi:
            raise ValueError(
                f"opset {self.opset!r} is not supported by the {self.exporter} exporter; allowed: {lo}..{hi}"
            )
        if not self.components:
            raise ValueError(f"components is empty; allowed: {', '.join(COMPONENTS)}")
        for c in self.components:
            if c not in COMPONENTS:
                raise ValueError(f"unknown component {c!r}; allowed: {', '.join(COMPONENTS)}")
        if "unet" not in self.components:
            raise ValueError(
                f"components {list(self.components)} lack 'unet': every export carries the U-Nets"
            )
        if self.static_batch < 1:
            raise ValueError(f"static_batch must be >= 1, got {self.static_batch}")
        for name in ("unet_atol", "text_encoder_atol", "vae_atol", "image_atol", "trt_atol", "workspace_gb"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not self.parity_batch_sizes or any(b < 1 for b in self.parity_batch_sizes):
            raise ValueError(
                f"parity_batch_sizes must be positive batch sizes, got {list(self.parity_batch_sizes)}"
            )
        if not self.parity_timesteps or any(not 0 <= t <= 999 for t in self.parity_timesteps):
            raise ValueError(f"parity_timesteps must lie in [0, 999], got {list(self.parity_timesteps)}")
        if not self.parity_seeds:
            raise ValueError("parity_seeds is empty")
        if len(self.parity_prompts) != len(self.parity_seeds):
            raise ValueError(
                f"parity_prompts ({len(self.parity_prompts)}) and parity_seeds ({len(self.parity_seeds)}) "
                "must have the same length"
            )
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"TensorRT profile needs 1 <= min_batch <= opt_batch <= max_batch, got "
                f"min_batch={self.min_batch} opt_batch={self.opt_batch} max_batch={self.max_batch}"
            )
        if not isinstance(self.parity_threads, int) or self.parity_threads < 0:
            raise ValueError(f"parity_threads must be an integer >= 0, got {self.parity_threads!r}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(
                f"builder_optimization_level must lie in 0..5, got {self.builder_optimization_level}"
            )

    @property
    def export_batch(self) -> int:
        """Batch of the example inputs traced at export (the fixed batch when not dynamic)."""
        return 2 if self.dynamic_batch else self.static_batch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ExportConfig:
        """From a JSON file (optional), then non-None keyword overrides; unknown keys are refused."""
        return load_config(cls, path, "ExportConfig", **overrides)
