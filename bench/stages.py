"""Where one image's time goes, in-process: text encoder, U-Net call, VAE decoder.

    python bench/stages.py --model models/shapes64 --batch 1 16
    python bench/stages.py --tiny                                   # smoke run

Prints the median of each stage per batch size (the student's U-Net at the batch,
the teacher's at twice the batch: classifier-free guidance runs both branches in
one call), whole 3-step and 25-step images at batch 1, and the arithmetic behind the
service's teacher/student target. Per image:

    teacher = F + 25 * teacher U-Net call (batch 2)
    student = F + 3 * student U-Net call (batch 1)

where F is what both pay once (text encoder, VAE decoder, sampler math; over HTTP
also the request and the PNG). The ratio is at least 10 only while
F <= (25 * teacher call - 30 * student call) / 9; the script prints that bound
next to the measured F.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flash.models import load_family  # noqa: E402
from flash.pipeline import TextToImage, unet_denoiser  # noqa: E402


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def fixed_cost_bound(
    teacher_call_ms: float,
    student_call_ms: float,
    ratio: float = 10.0,
    teacher_calls: int = 25,
    student_calls: int = 3,
) -> float:
    """The largest per-image fixed cost F with (F + 25 T) / (F + 3 S) >= ratio (negative: out of reach)."""
    return (teacher_calls * teacher_call_ms - ratio * student_calls * student_call_ms) / (ratio - 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"), help="family folder")
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--decoder", choices=["full", "tiny"], default="full",
                   help="the family's VAE decoder or its fast one (vae_tiny/)")
    args = p.parse_args(argv)
    model = args.model
    if args.tiny:
        from flash.tiny import write_tiny_family

        model = write_tiny_family(Path(tempfile.mkdtemp()) / "tiny")

    fam = load_family(model, decoder=args.decoder)
    student, t2i = fam.students[3], TextToImage(fam.teacher)
    s_unet, t_unet = unet_denoiser(student.unet), unet_denoiser(fam.teacher.unet)
    prompts = [f"a red circle above a blue square {i}" for i in range(max(args.batch))]
    n = args.repeats
    with torch.inference_mode():
        cond, x = t2i.encode(prompts), t2i.noise(list(range(len(prompts))))

        def stages(b: int) -> dict[str, float]:
            t, c2, x2 = torch.full((b,), 999), cond[:b].repeat(2, 1, 1), x[:b].repeat(2, 1, 1, 1)
            return {
                "text encoder": median_ms(lambda: t2i.encode(prompts[:b]), n),
                "student U-Net call": median_ms(lambda: s_unet(x[:b], t, cond[:b]), n),
                "teacher U-Net call (CFG, 2x batch)": median_ms(lambda: t_unet(x2, t.repeat(2), c2), n),
                "VAE decoder": median_ms(lambda: t2i.decode(x[:b]), n),
            }

        rows = {b: stages(b) for b in args.batch}
        one = prompts[:1]
        student_ms = median_ms(
            lambda: t2i.decode(t2i.student_latents(student.unet, one, [0], student.card.timesteps)), n
        )
        teacher_ms = median_ms(
            lambda: t2i.decode(t2i.teacher_latents(one, [0], 25)), max(3, n // 5), warmup=1
        )

    print(f"\nmodel {model}  decoder {args.decoder}  torch threads {torch.get_num_threads()}  medians of {n} (ms)")
    print(f"{'stage':<38}" + "".join(f"{f'batch {b}':>12}" for b in args.batch))
    for stage in rows[args.batch[0]]:
        print(f"{stage:<38}" + "".join(f"{rows[b][stage]:>12.2f}" for b in args.batch))
    if 1 in rows:
        s1, t2 = rows[1]["student U-Net call"], rows[1]["teacher U-Net call (CFG, 2x batch)"]
        fixed = student_ms - 3 * s1
        print(
            f"\none image, batch 1: 3-step {student_ms:.1f} ms, teacher 25 steps + CFG {teacher_ms:.1f} ms, "
            f"ratio {teacher_ms / student_ms:.2f}"
        )
        print(
            f"fixed cost F = 3-step image - 3 U-Net calls = {fixed:.1f} ms; 10x needs F <= "
            f"{fixed_cost_bound(t2, s1):.1f} ms (with no fixed cost at all: {25 * t2 / (3 * s1):.1f}x)"
        )
    return {"stages_ms": rows, "student_ms": student_ms, "teacher_ms": teacher_ms}


if __name__ == "__main__":
    main()
