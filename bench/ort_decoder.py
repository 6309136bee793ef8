"""The VAE decoder alone: PyTorch eager vs ONNX Runtime, each in its own process.

    python bench/ort_decoder.py --model models/shapes64

Separates the decoder's own speed from thread-pool interplay inside one process
(see export.runtime.shared_thread_pool and docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1000


def run(runtime: str, model: Path, onnx_path: Path, batch: int) -> float:
    from export.onnx import VaeDecoderWrapper
    from flash.models import load_components

    c = load_components(model)
    x = torch.randn(batch, c.vae.config.latent_channels, 16, 16)
    if runtime == "torch":
        dec = VaeDecoderWrapper(c.vae).eval()
        with torch.inference_mode():
            return timed(lambda: dec(x))
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {"latents": x.numpy()}
    return timed(lambda: s.run(None, feed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes64")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runtime", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.runtime:
        print(f"{run(a.runtime, Path(a.model), Path(a.onnx), a.batch[0]):.1f}")
        return
    from export.onnx import VaeDecoderWrapper, onnx_export
    from flash.models import load_components

    c = load_components(Path(a.model))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vae_decoder.onnx"
        lat = torch.randn(1, c.vae.config.latent_channels, 16, 16)
        axes = {"latents": {0: "batch"}, "image": {0: "batch"}}
        onnx_export(VaeDecoderWrapper(c.vae), (lat,), path, ["latents"], ["image"], axes, 17)
        print("batch | torch eager ms | ONNX Runtime ms")
        for b in a.batch:
            ms = []
            for runtime in ("torch", "onnxruntime"):
                cmd = [sys.executable, __file__, "--model", a.model, "--batch", str(b), "--runtime", runtime,
                       "--onnx", str(path)]  # fmt: skip
                ms.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
            print(f"{b} | {ms[0]} | {ms[1]}")


if __name__ == "__main__":
    main()
