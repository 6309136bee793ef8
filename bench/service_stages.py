"""Where a served image's time goes under load, stage by stage, against the same stages in-process.

    python bench/service_stages.py --model models/shapes64 --decoder tiny --rounds 3
    python bench/service_stages.py --tiny --decoder full --requests 16 --concurrency 4 --rounds 1   # smoke

The throughput ratio of bench/bench_service.py (16 clients over HTTP / the in-process
pipeline at batch 16) is one number; this script splits both sides. Each round sends
`--requests` 3-step requests from `--concurrency` raw keep-alive clients to one server
(the torch backend) and reads the server's own stage timings from /metrics before and
after (`flash_compute_duration_seconds` by stage, `flash_batch_size_images`); then, with
the server idle, it times the same stages in-process at batch `--concurrency`
(text encoder, the three U-Net calls, the decoder). Per image, side by side:

    stage          service ms/img (images per call)    in-process ms/img (batch k)    ratio

and the stages' sum against the service's wall time per image (what the device thread
spent outside the three stages: bookkeeping, waiting for work, the GIL). The service's
text encoder and decoder run once per group of requests that arrive or finish together,
so their batch is the group's size, not k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import STUDENT, bench_family, body, histogram_totals, http_throughput, server  # noqa: E402
from service.metrics import STAGES  # noqa: E402


def stage_seconds(metrics_text: str) -> dict[str, tuple[float, float]]:
    """{stage: (seconds, calls)} from the flash_compute_duration_seconds histogram, and
    {"images": (images, unet calls)} of the 3-step student from flash_batch_size_images."""
    out = {stage: histogram_totals(metrics_text, "flash_compute_duration_seconds", stage=stage) for stage in STAGES}
    out["images"] = histogram_totals(metrics_text, "flash_batch_size_images", model=STUDENT)
    return out


def per_image(before: dict, after: dict, images: int) -> dict[str, tuple[float, float]]:
    """{stage: (ms per image, images per call)} between two `stage_seconds` readings."""
    # each image passes the text encoder and the decoder once, the U-Net once per step
    passed = {stage: images for stage in STAGES} | {"unet": after["images"][0] - before["images"][0]}
    rows = {}
    for stage in STAGES:
        (s0, c0), (s1, c1) = before[stage], after[stage]
        rows[stage] = ((s1 - s0) / images * 1e3, passed[stage] / max(c1 - c0, 1.0))
    return rows


def in_process_stages(model: Path, decoder: str, k: int, repeats: int):
    """A function -> ({stage: ms per image}, whole ms per image) at batch k, medians of `repeats`
    (TextToImage.student_latents' calls, each stage timed)."""
    from flash.models import load_family
    from flash.pipeline import TextToImage, unet_denoiser
    from flash.sampling import run_student

    fam = load_family(model, decoder=decoder)
    t2i = TextToImage(fam.teacher)
    student = fam.students[3]
    schedule = t2i.student_schedule(student.card.prediction_type)
    denoise = unet_denoiser(student.unet)
    prompts = [body(i)["prompt"] for i in range(k)]

    def once() -> dict[str, float]:
        t = {"unet": 0.0}

        def timed(x, tt, cond):
            t0 = time.perf_counter()
            out = denoise(x, tt, cond)
            t["unet"] += time.perf_counter() - t0
            return out

        t0 = time.perf_counter()
        cond = t2i.encode(prompts)
        t["text_encoder"] = time.perf_counter() - t0
        x = run_student(timed, t2i.noise(list(range(k))), cond, schedule, student.card.timesteps)
        t0 = time.perf_counter()
        t2i.decode(x)
        t["vae_decode"] = time.perf_counter() - t0
        return t

    def measure() -> tuple[dict[str, float], float]:
        with torch.inference_mode():
            once()  # warm this batch shape
            t0 = time.perf_counter()
            runs = [once() for _ in range(repeats)]
            whole = (time.perf_counter() - t0) / (repeats * k) * 1e3
        return {s: statistics.median(r[s] for r in runs) / k * 1e3 for s in STAGES}, whole

    return measure


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"))
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--decoder", choices=["full", "tiny"], default="tiny")
    p.add_argument("--requests", type=int, default=288, help="3-step requests per round over HTTP")
    p.add_argument("--concurrency", type=int, default=16, help="clients, and the in-process batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6, help="in-process batches per round")
    args = p.parse_args(argv)
    model, n, k = bench_family(args.model, args.tiny), args.requests, args.concurrency
    measure = in_process_stages(model, args.decoder, k, args.repeats)
    results = []
    with server(model, max_batch_size=k, decoder=args.decoder) as url:
        http_throughput(url, 2 * k, k, "raw")  # warm the connections and batch shapes
        for r in range(args.rounds):
            before = stage_seconds(httpx.get(f"{url}/metrics").text)
            rate, _ = http_throughput(url, n, k, "raw")
            after = stage_seconds(httpx.get(f"{url}/metrics").text)
            served = per_image(before, after, n)
            local, whole = measure()
            wall = 1e3 / rate
            busy = sum(ms for ms, _ in served.values())
            print(f"\nround {r + 1}: {k} clients {rate:.1f} img/s ({wall:.2f} ms/img), in-process batch {k} "
                  f"{1e3 / whole:.1f} img/s ({whole:.2f} ms/img): ratio {whole / wall:.3f}")
            print(f"{'stage':<14}{'service ms/img':>16}{'imgs/call':>11}{'in-process ms/img':>19}{'ratio':>8}")
            for stage in STAGES:
                ms, fill = served[stage]
                print(f"{stage:<14}{ms:>16.2f}{fill:>11.1f}{local[stage]:>19.2f}{ms / local[stage]:>8.2f}")
            print(f"{'three stages':<14}{busy:>16.2f}{'':>11}{sum(local.values()):>19.2f}"
                  f"{busy / sum(local.values()):>8.2f}")
            print(f"the service's stages are {busy / wall:.0%} of its wall time per image")
            results.append({"rate": rate, "in_process_rate": 1e3 / whole, "service": served, "in_process": local})
    return results


if __name__ == "__main__":
    main()
