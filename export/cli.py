"""`flash export onnx|tensorrt`: parse, build an ExportConfig, call export_family / build_engines.

`flash.cli` calls `add_subparsers(export_parser)`; the handlers raise ValueError or
RuntimeError subclasses that `flash.cli.main` prints as one line with a non-zero exit.
`python -m export.cli onnx ...` runs the same commands on their own (exit 2 on error).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

ONNX_EXAMPLES = """examples:
  flash export onnx models/shapes64 --out models/shapes64/onnx
  flash export onnx models/shapes64 --out onnx/shapes64 --opset 18 --exporter dynamo
  FLASH_BACKEND=onnxruntime flash serve --model models/shapes64   # serves <model>/onnx
"""
TRT_EXAMPLES = """examples:
  flash export tensorrt models/shapes64/onnx --out models/shapes64/tensorrt --max-batch 16
  flash export tensorrt onnx/shapes64 --out engines/shapes64 --bf16 --timing-cache /var/cache/trt/timing.cache
"""


def _fmt(description: str, examples: str) -> dict[str, Any]:
    return dict(
        help=description,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_subparsers(parser: argparse.ArgumentParser) -> None:
    """Add `onnx` and `tensorrt` under an `export` parser; each sets `func(args)`."""
    sub = parser.add_subparsers(dest="export_format", required=True, metavar="FORMAT")

    o = sub.add_parser("onnx", **_fmt("export text encoder, VAE decoder and every U-Net to ONNX, check parity with ONNX Runtime", ONNX_EXAMPLES))  # fmt: skip
    o.add_argument("model_dir", help="family folder (teacher + students/)")
    o.add_argument(
        "--out",
        required=True,
        help="output folder (graphs + manifest.json); <model_dir>/onnx is served by default",
    )
    o.add_argument("--config", default=None, help="JSON ExportConfig; flags below override it")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; dynamo: 18..23)")
    o.add_argument(
        "--exporter", choices=["legacy", "dynamo"], default=None, help="torch.onnx exporter (default legacy)"
    )
    o.add_argument(
        "--static-batch", type=int, default=None, metavar="N", help="fixed batch N instead of a dynamic axis"
    )
    o.add_argument("--components", nargs="+", default=None, help="subset of: text_encoder vae_decoder unet")
    o.add_argument(
        "--unet-atol", type=float, default=None, help="U-Net parity bar, max abs diff (default 1e-3)"
    )
    o.add_argument("--image-atol", type=float, default=None, help="pipeline parity bar in 1/255 (default 2)")
    o.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: theirs)"
    )
    o.set_defaults(func=main_onnx)

    t = sub.add_parser("tensorrt", **_fmt("build TensorRT engines from an ONNX export (needs CUDA and tensorrt)", TRT_EXAMPLES))  # fmt: skip
    t.add_argument("onnx_dir", help="folder written by `flash export onnx`")
    t.add_argument("--out", required=True, help="engine folder (engines + manifest.json)")
    t.add_argument("--config", default=None, help="JSON ExportConfig; flags below override it")
    t.add_argument("--min-batch", type=int, default=None)
    t.add_argument("--opt-batch", type=int, default=None)
    t.add_argument("--max-batch", type=int, default=None)
    t.add_argument("--no-fp16", dest="fp16", action="store_false", default=None, help="no fp16 kernels")
    t.add_argument(
        "--bf16",
        action="store_true",
        default=None,
        help="also allow bf16 kernels (compute capability >= 8.0)",
    )
    t.add_argument("--workspace-gb", type=float, default=None)
    t.add_argument(
        "--timing-cache",
        default=None,
        help="timing cache file, outside --out (default: ~/.cache/imagine-flash/tensorrt/)",
    )
    t.add_argument("--components", nargs="+", default=None, help="subset of: text_encoder vae_decoder unet")
    t.set_defaults(func=main_tensorrt)


def _config(args: argparse.Namespace, **flags: Any):
    from export.config import ExportConfig

    if flags.get("components") is not None:
        flags["components"] = tuple(flags["components"])
    return ExportConfig.load(args.config, **flags)


def _quiet_loading() -> None:
    """No weight-loading progress bars on stderr: a failing command's stderr is its one error line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main_onnx(args: argparse.Namespace) -> None:
    from export.onnx import export_family

    _quiet_loading()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    static = args.static_batch
    cfg = _config(
        args,
        opset=args.opset,
        exporter=args.exporter,
        dynamic_batch=False if static is not None else None,
        static_batch=static,
        components=args.components,
        unet_atol=args.unet_atol,
        image_atol=args.image_atol,
        parity_threads=args.threads,
    )
    manifest = export_family(args.model_dir, args.out, cfg)
    parity = manifest["parity"]
    for name, info in manifest["models"].items():
        figure = parity["unet_max_abs"].get(name)
        note = f"  max abs diff {max(figure.values()):.2e}" if figure else ""
        print(f"{info['file']:<22} {info['export_seconds']:>6.2f} s{note}")
    pipe = ", ".join(f"{k} {v:g}/255" for k, v in parity["pipeline_max_diff_255"].items())
    print(f"pipeline parity (max pixel diff): {pipe}")
    print(f"wrote {args.out}/manifest.json (opset {manifest['opset']}, {manifest['exporter']} exporter)")


def main_tensorrt(args: argparse.Namespace) -> None:
    from export.tensorrt import build_engines

    cfg = _config(
        args,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        fp16=args.fp16,
        bf16=args.bf16,
        workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache,
        components=args.components,
    )
    manifest = build_engines(args.onnx_dir, args.out, cfg)
    for info in manifest["models"].values():
        print(f"{info['file']:<22} built in {info['build_seconds']:.1f} s")
    gpu = manifest["gpu"]
    print(
        f"wrote {args.out}/manifest.json (TensorRT {manifest['tensorrt']}, {gpu['name']} "
        f"sm{gpu['compute_capability']}, timing cache {manifest['timing_cache']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flash export", description="compile models for serving")
    add_subparsers(parser)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # FLASH_DEBUG=1 shows the traceback
        if os.environ.get("FLASH_DEBUG"):
            raise
        print(f"flash export {args.export_format}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
