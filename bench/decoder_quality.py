"""The fast decoder (vae_tiny/) against the full VAE decoder, side by side in one run.

    python bench/decoder_quality.py --model models/shapes64 --n 100 --grid docs/img/tiny-decoder.png
    python bench/decoder_quality.py --tiny                                # smoke run

For the teacher (25 DPM-Solver++ steps, CFG) and each student, the first `n` test-split
prompts' latents are decoded by both decoders: PSNR of the fast decoder's uint8 images
against the full decoder's, and the 99th percentile / max of the per-pixel difference.
Then both decoders are timed at batch 1 and 16 (medians). Prompt alignment and FD of the
fast decoder's images come from `flash eval MODEL --decoder tiny`, not from here.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stages import median_ms  # noqa: E402
from flash.eval.run import split_prompts  # noqa: E402
from flash.images import grid, save_png  # noqa: E402
from flash.models import load_family, load_tiny_vae  # noqa: E402
from flash.pipeline import TextToImage  # noqa: E402


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"), help="family folder with vae_tiny/")
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--n", type=int, default=100, help="test-split prompts per model")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--grid", type=Path, help="write full/fast pairs of the 3-step student's first 8 images here")
    args = p.parse_args(argv)
    model = args.model
    if args.tiny:
        from flash.tiny import write_tiny_decoder, write_tiny_family

        model = write_tiny_family(Path(tempfile.mkdtemp()) / "tiny")
        write_tiny_decoder(model)

    fam = load_family(model)
    full = TextToImage(fam.teacher)
    fast = TextToImage(replace(fam.teacher, vae=load_tiny_vae(model)))
    prompts, seeds = split_prompts("test", args.n)
    rows, pairs = {}, None
    with torch.inference_mode():
        latents = {"teacher, 25 steps, CFG": full.teacher_latents(prompts, seeds, 25)}
        for steps, s in sorted(fam.students.items(), reverse=True):
            latents[f"{steps}-step student"] = full.student_latents(
                s.unet, prompts, seeds, s.card.timesteps, s.card.noise_correction, s.card.prediction_type
            )
        for name, lat in latents.items():
            a, b = full.decode(lat), fast.decode(lat)
            diff = np.abs(a.astype(int) - b.astype(int))
            rows[name] = {
                "psnr_db": float(np.mean([image_psnr(x, y) for x, y in zip(a, b, strict=True)])),
                "p99_abs": float(np.percentile(diff, 99)),
                "max_abs": int(diff.max()),
            }
            if name == "3-step student":
                pairs = np.stack([a[:8], b[:8]])
        x = latents["teacher, 25 steps, CFG"]
        timing = {
            bsz: (median_ms(lambda b=bsz: full.decode(x[:b]), args.repeats),
                  median_ms(lambda b=bsz: fast.decode(x[:b]), args.repeats))
            for bsz in (1, min(16, args.n))
        }  # fmt: skip

    print(f"\nmodel {model}  {args.n} test prompts  torch threads {torch.get_num_threads()}")
    print(f"{'latents':<26}{'PSNR dB':>10}{'p99 |diff|':>12}{'max |diff|':>12}   (fast vs full decoder, uint8)")
    for name, r in rows.items():
        print(f"{name:<26}{r['psnr_db']:>10.2f}{r['p99_abs']:>12.0f}{r['max_abs']:>12d}")
    print(f"\n{'decode (ms, median)':<26}{'full':>10}{'fast':>12}{'speed-up':>12}")
    for bsz, (tf, tt) in timing.items():
        print(f"{f'batch {bsz}':<26}{tf:>10.2f}{tt:>12.2f}{tf / tt:>11.2f}x")
    if args.grid is not None and pairs is not None:
        save_png(grid(pairs.reshape(-1, *pairs.shape[2:]), cols=pairs.shape[1]), args.grid, scale=2)
        print(f"wrote {args.grid} (top: full decoder, bottom: fast decoder; 3-step student)")
    return {"quality": rows, "decode_ms": {b: {"full": f, "fast": t} for b, (f, t) in timing.items()}}


if __name__ == "__main__":
    main()
