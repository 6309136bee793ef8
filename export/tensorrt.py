"""TensorRT engines from an ONNX export: build / load / infer (after TensorRT's demo/Diffusion engine.py).

UNVERIFIED: written against the documented TensorRT 10 Python API; TensorRT could not be
installed on any machine this project has (docs/export.md says what ran where).

    build_engines(onnx_dir, out_dir, cfg)   one engine per exported graph (<name>.plan),
                                            fp16 (+ bf16 where the GPU has it), one
                                            optimisation profile min/opt/max batch from cfg,
                                            a timing cache kept outside out_dir, manifest.json
    Engine(path, ...)                       load (refusing another GPU / TensorRT version
                                            through `check_compatible` first) and
    Engine.infer({name: tensor})            run on torch CUDA tensors, optionally replaying
                                            one CUDA graph per batch-size bucket
    trt_backends(family, settings)          the service's "tensorrt" backend

Inputs and outputs stay float32 (int64 for input_ids) as in the ONNX graphs; the fp16
and bf16 flags let TensorRT choose lower-precision kernels inside.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.config import ExportConfig
from export.onnx import (
    BATCH,
    MANIFEST,
    TEACHER_UNET,
    TEXT_ENCODER,
    VAE_DECODER,
    VAE_DECODER_TINY,
    student_model_name,
    write_manifest,
)
from service.backends import batch_buckets  # the torch backend's compiled shapes: the same buckets

ENGINE_FORMAT = "imagine-flash/tensorrt-engines"
ENGINE_SUFFIX = ".plan"


class TensorRTError(RuntimeError):
    """TensorRT or CUDA missing, a failed build, or engines made for another GPU / TensorRT version."""


def import_tensorrt():
    """The tensorrt module, imported only when needed."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTError(
            "the tensorrt Python package is not installed (it comes from NVIDIA's package index, "
            "e.g. `pip install tensorrt`); TensorRT engines cannot be built or run here"
        ) from e
    return trt


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise TensorRTError(
            "TensorRT needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)"
        )


def gpu_info(device: int = 0) -> dict[str, str]:
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def default_timing_cache(trt_version: str, compute_capability: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (
        root
        / "imagine-flash"
        / "tensorrt"
        / f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"
    )


def timing_cache_path(cfg: ExportConfig, out_dir: Path, trt_version: str, compute_capability: str) -> Path:
    """Where the timing cache lives: cfg.timing_cache or the user cache; never inside the engine folder."""
    path = (
        Path(cfg.timing_cache) if cfg.timing_cache else default_timing_cache(trt_version, compute_capability)
    )
    if path.resolve().is_relative_to(Path(out_dir).resolve()):
        raise ValueError(
            f"timing_cache {path} lies inside the engine folder {out_dir}; keep it apart from deployment artifacts"
        )
    return path


def profile_shapes(inputs: list[dict[str, Any]], cfg: ExportConfig) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes} from the ONNX manifest's input shapes; only the batch axis varies."""
    shapes: dict[str, list[list[int]]] = {}
    for inp in inputs:
        triple = []
        for batch in (cfg.min_batch, cfg.opt_batch, cfg.max_batch):
            dims = []
            for d in inp["shape"]:
                if d == BATCH:
                    dims.append(batch)
                elif isinstance(d, int) and d > 0:
                    dims.append(d)
                else:
                    raise TensorRTError(f"input {inp['name']} has a dynamic axis {d!r} other than {BATCH!r}")
            triple.append(dims)
        shapes[inp["name"]] = triple
    return shapes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _supports_bf16(trt, compute_capability: str) -> bool:
    major = int(compute_capability.split(".")[0])
    return hasattr(trt.BuilderFlag, "BF16") and major >= 8


# -- build ----------------------------------------------------------------------------------


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, list[list[int]]],
    cfg: ExportConfig,
    timing_cache: Path,
    bf16: bool,
) -> float:
    """Parse one ONNX graph, build and write its engine; reads and updates the timing cache. Returns seconds."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also reads <file>.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gb * (1 << 30)))
    config.builder_optimization_level = cfg.builder_optimization_level
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is not used
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    seconds = time.perf_counter() - t0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with engine_path.open("wb") as f:
        f.write(plan)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    with timing_cache.open("wb") as f:
        f.write(config.get_timing_cache().serialize())
    return seconds


def build_engines(
    onnx_dir: str | Path, out_dir: str | Path, cfg: ExportConfig | None = None
) -> dict[str, Any]:
    """One engine per graph of an ONNX export (those in cfg.components), plus manifest.json."""
    from export.runtime import read_manifest

    cfg = cfg or ExportConfig()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    trt = import_tensorrt()
    require_cuda()
    source = read_manifest(onnx_dir)
    if not source.get("parity", {}).get("passed", False):
        raise TensorRTError(
            f"ONNX export {onnx_dir} did not pass its parity check; fix it before building engines"
        )
    gpu = gpu_info()
    cache = timing_cache_path(cfg, out_dir, trt.__version__, gpu["compute_capability"])
    bf16 = cfg.bf16 and _supports_bf16(trt, gpu["compute_capability"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)

    engines: dict[str, dict[str, Any]] = {}
    for name, info in source["models"].items():
        if info["role"] in (TEXT_ENCODER, VAE_DECODER) and info["role"] not in cfg.components:
            continue
        if info["role"] == VAE_DECODER_TINY:  # the TensorRT backend serves the full decoder only
            continue
        profile = profile_shapes(info["inputs"], cfg)
        engine_path = out_dir / (name + ENGINE_SUFFIX)
        seconds = build_engine(onnx_dir / info["file"], engine_path, profile, cfg, cache, bf16)
        keep = ("role", "steps", "timesteps", "source", "uses_source", "noise_correction", "prediction_type",
                "scaling_factor", "latents", "inputs", "outputs")  # fmt: skip
        engines[name] = {
            "file": engine_path.name,
            "sha256": _sha256(engine_path),
            "onnx_file": info["file"],
            "onnx_sha256": info["sha256"],
            "profile": profile,
            "build_seconds": round(seconds, 2),
            **{k: info[k] for k in keep if k in info},
        }
    manifest = {
        "format": ENGINE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "precision": {
            "fp16": cfg.fp16,
            "bf16": bf16,
            "bf16_requested": cfg.bf16,
            "io": "float32 (input_ids int64)",
        },
        "profiles": {"min_batch": cfg.min_batch, "opt_batch": cfg.opt_batch, "max_batch": cfg.max_batch},
        "timing_cache": str(cache),
        "onnx": {"path": str(onnx_dir.resolve()), "manifest_sha256": _sha256(onnx_dir / MANIFEST)},
        "source": source["source"],
        "geometry": source["geometry"],
        "models": engines,
        "config": cfg.to_dict(),
    }
    write_manifest(out_dir, manifest)
    return manifest


# -- load / infer ---------------------------------------------------------------------------


def check_compatible(manifest: dict[str, Any], folder: Path) -> None:
    """Refuse engines built with another TensorRT version or for another GPU, before deserialising."""
    trt = import_tensorrt()
    require_cuda()
    here = gpu_info()
    built = manifest.get("gpu", {})
    if manifest.get("tensorrt") != trt.__version__:
        raise TensorRTError(
            f"engines in {folder} were built with TensorRT {manifest.get('tensorrt')}, this is TensorRT "
            f"{trt.__version__}; rebuild them here with `flash export tensorrt ONNX_DIR --out {folder}`"
        )
    if (built.get("name"), built.get("compute_capability")) != (here["name"], here["compute_capability"]):
        raise TensorRTError(
            f"engines in {folder} were built for {built.get('name')} (compute capability "
            f"{built.get('compute_capability')}), this GPU is {here['name']} (compute capability "
            f"{here['compute_capability']}); rebuild them here with `flash export tensorrt ONNX_DIR --out {folder}`"
        )


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool}  # fmt: skip
    for name, torch_dt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_dt
    if dt not in table:
        raise TensorRTError(f"engine tensor dtype {dt} has no torch equivalent")
    return table[dt]


class Engine:
    """One deserialised engine with one execution context; calls are serialised by a lock.

    `infer` takes and returns torch CUDA tensors by I/O name. Batches above the profile's
    max are split. With `cuda_graphs`, each batch-size bucket is captured once into a
    torch.cuda.CUDAGraph over static buffers (inputs padded to the bucket) and replayed.
    """

    def __init__(self, path: Path, max_batch: int, cuda_graphs: bool = False, device: str = "cuda"):
        trt = import_tensorrt()
        require_cuda()
        self.path = Path(path)
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTError(
                f"TensorRT could not deserialise {self.path} (built by another TensorRT version or for another GPU?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], dict[str, Tensor]]] = {}
        self._lock = threading.Lock()

    def _bind(self, feeds: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        ins = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        for n, t in ins.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        outs = {}
        for n in self.outputs:
            outs[n] = torch.empty(
                tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device
            )
            self.context.set_tensor_address(n, outs[n].data_ptr())
        return ins, outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise TensorRTError(f"TensorRT execution of {self.path.name} failed")

    def _run_eager(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        _ins, outs = self._bind(feeds)  # inputs stay alive until the stream has consumed them
        self._execute()
        return outs

    def _run_graph(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        n = len(next(iter(feeds.values())))
        bucket = next(b for b in batch_buckets(self.max_batch) if b >= n)
        if bucket not in self._graphs:
            static = {
                k: torch.zeros((bucket, *feeds[k].shape[1:]), dtype=self.dtypes[k], device=self.device)
                for k in self.inputs
            }
            ins, outs = self._bind(static)
            self._execute()  # TensorRT allocates lazily on the first run: never inside a capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute()
            self._graphs[bucket] = (graph, ins, outs)
        graph, ins, outs = self._graphs[bucket]
        for k in self.inputs:
            ins[k][:n].copy_(feeds[k])
        graph.replay()
        return {k: v[:n].clone() for k, v in outs.items()}

    def infer(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        n = len(next(iter(feeds.values())))
        with self._lock:
            run = self._run_graph if self.cuda_graphs else self._run_eager
            if n <= self.max_batch:
                return run(feeds)
            parts = [
                run({k: v[s : s + self.max_batch] for k, v in feeds.items()})
                for s in range(0, n, self.max_batch)
            ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def load_engines(
    folder: str | Path, cuda_graphs: bool = False, device: str = "cuda"
) -> tuple[dict, dict[str, Engine]]:
    """(manifest, {model name: Engine}) after the GPU / TensorRT version check and a hash check per file."""
    from export.runtime import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder, ENGINE_FORMAT)
    check_compatible(manifest, folder)
    engines = {}
    for name, info in manifest["models"].items():
        path = folder / info["file"]
        if not path.is_file():
            raise TensorRTError(f"engine {path} listed in {folder / MANIFEST} is missing")
        if _sha256(path) != info["sha256"]:
            raise TensorRTError(f"engine {path} does not match the sha256 in {folder / MANIFEST}; rebuild it")
        engines[name] = Engine(path, manifest["profiles"]["max_batch"], cuda_graphs, device)
    return manifest, engines


# -- the service backend --------------------------------------------------------------------


def trt_backends(family, settings):
    """FamilyBackends on TensorRT engines from `settings.engine_dir` (or <family>/tensorrt).

    `settings.device` must be cuda[:N]; `settings.trt_cuda_graphs` (if present) turns on
    per-bucket CUDA graphs. Text encoder / VAE decoder without an engine run in PyTorch on the GPU.
    """
    import numpy as np

    from export.runtime import ENGINE_SUBDIR, ExportedBackend, _needed_sources, check_source, to_uint8
    from flash.pipeline import TextToImage
    from service.backends import FamilyBackends

    import_tensorrt()
    require_cuda()
    device = str(getattr(settings, "device", "cuda") or "cuda")
    if not device.startswith("cuda"):
        raise TensorRTError(
            f"the tensorrt backend runs on a CUDA device; set FLASH_DEVICE=cuda (got {device!r})"
        )
    if family.path is None:
        raise TensorRTError("the tensorrt backend needs a family loaded from a folder (family.path is None)")
    folder = Path(getattr(settings, "engine_dir", None) or Path(family.path) / ENGINE_SUBDIR)
    manifest, engines = load_engines(folder, bool(getattr(settings, "trt_cuda_graphs", False)), device)
    check_source(manifest, family, folder, _needed_sources(manifest, family))

    c = family.teacher
    for name, module in ((TEXT_ENCODER, c.text_encoder), (VAE_DECODER, c.vae)):
        if name not in engines:  # no engine: this component runs in PyTorch on the GPU
            module.to(device)
    t2i = TextToImage(c, device)

    if TEXT_ENCODER in engines:
        te = engines[TEXT_ENCODER]

        def encode(prompts):
            tok = c.tokenizer
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
            return te.infer({"input_ids": ids.to(device)})["last_hidden_state"].float()
    else:

        def encode(prompts):
            return t2i.encode(prompts).float()

    if VAE_DECODER in engines:
        vae = engines[VAE_DECODER]

        def decode(latents) -> np.ndarray:
            return to_uint8(vae.infer({"latents": latents.float()})["image"].cpu().numpy())
    else:
        decode = t2i.decode

    def unet_backend(name: str) -> ExportedBackend:
        if name not in engines:
            raise TensorRTError(f"{folder} has no engine for {name}; rebuild the engines for this family")
        engine = engines[name]

        def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            t = torch.as_tensor(t, device=x.device).reshape(-1).float().expand(x.shape[0])
            out = engine.infer({"sample": x.float(), "timestep": t, "encoder_hidden_states": cond.float()})
            return out["out_sample"]

        return ExportedBackend(encode=encode, denoise=denoise, decode=decode)

    students = {steps: unet_backend(student_model_name(steps)) for steps in sorted(family.students)}
    return FamilyBackends("tensorrt", torch.device(device), unet_backend(TEACHER_UNET), students)
