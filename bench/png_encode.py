"""The service's PNG writer (service/png.py) against Pillow's, on images the 3-step student makes.

    python bench/png_encode.py --model models/shapes64 --decoder tiny --levels 0 1 6
    python bench/png_encode.py --tiny --images 2 --calls 20     # smoke

Generates `--images` images in-process (bench_service.local_generator), then for each zlib
level times both writers on every image (`--calls` calls each, after a warm-up) and prints
the medians over the images of the time per call and the mean file size.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import bench_family, local_generator  # noqa: E402
from service.png import encode_png  # noqa: E402


def pillow_png(image: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


WRITERS = {"service/png.py": encode_png, "Pillow": pillow_png}


def us_per_call(fn, image: np.ndarray, level: int, calls: int) -> float:
    for _ in range(max(1, calls // 10)):
        fn(image, level)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(image, level)
    return (time.perf_counter() - t0) / calls * 1e6


def compare(images: list[np.ndarray], levels: list[int], calls: int) -> list[dict]:
    """One row per (level, writer): median us per call over the images, mean bytes."""
    rows = []
    for level in levels:
        for name, fn in WRITERS.items():
            us = statistics.median(us_per_call(fn, im, level, calls) for im in images)
            size = statistics.mean(len(fn(im, level)) for im in images)
            rows.append({"level": level, "writer": name, "us": us, "bytes": size})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"))
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--decoder", choices=["full", "tiny"], default="tiny")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--calls", type=int, default=300, help="timed calls per image, writer and level")
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 6])
    args = p.parse_args(argv)
    model = bench_family(args.model, args.tiny)
    decoder = "full" if args.tiny else args.decoder  # a tiny family has no fast decoder
    images = list(local_generator(model, decoder=decoder)(list(range(args.images))))
    rows = compare(images, args.levels, args.calls)
    h, w = images[0].shape[:2]
    print(f"{len(images)} images {w}x{h} from the 3-step student; medians of {args.calls} calls each")
    print(f"{'level':>5}  {'writer':<16}{'us per image':>14}{'bytes':>9}")
    for r in rows:
        print(f"{r['level']:>5}  {r['writer']:<16}{r['us']:>14.0f}{r['bytes']:>9.0f}")
    return rows


if __name__ == "__main__":
    main()
