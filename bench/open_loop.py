"""Latency under open-loop load: 3-step requests sent at random times, not on answers.

    python bench/open_loop.py --model models/shapes64 --decoder tiny --rate 25 --duration 30 \\
        --env FLASH_MAX_WAIT_MS --values 2,10 --runs 2
    python bench/open_loop.py --tiny --rate 20 --duration 3 --env FLASH_PNG_COMPRESS_LEVEL --values 0,1 --runs 1

bench/bench_service.py's clients each send their next request when an answer arrives (a
closed loop), which is what a setting that waits for company is tuned on (the refill window
this script was written for, `FLASH_REFILL_MS`, measured and removed: docs/benchmarks.md). Traffic from many independent users arrives on its own clock:
here arrivals are a Poisson process at `--rate` requests per second, each sent on a free
keep-alive connection of a pool, whatever the server is doing. One server per (value, run),
the values alternating run by run; prints p50 / p95 latency and the rate achieved.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import bench_family, body, check, http_latencies, raw_senders  # noqa: E402
from service.testing import serve_in_process  # noqa: E402


def arrival_times(rate: float, duration: float, seed: int = 0) -> list[float]:
    """Poisson arrivals: offsets in seconds from the start, exponential gaps of mean 1 / rate."""
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


async def open_loop(url: str, times: list[float], connections: int) -> tuple[list[float], float]:
    """Send request i at `times[i]` on a free connection; (latencies in s, achieved requests/s)."""
    async with AsyncExitStack() as stack:
        free: asyncio.Queue = asyncio.Queue()
        for send in await raw_senders(url, connections, stack):
            free.put_nowait(send)
        latencies: list[float] = []

        async def one(i: int) -> None:
            send = await free.get()
            try:
                t0 = time.perf_counter()
                status, _ = await send(body(i))
                check(status, i)
                latencies.append(time.perf_counter() - t0)
            finally:
                free.put_nowait(send)

        start, tasks = time.perf_counter(), []
        for i, t in enumerate(times):
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return latencies, len(times) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"))
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--decoder", choices=["full", "tiny", "auto"], default="auto")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second (Poisson)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections in the pool")
    p.add_argument("--env", required=True, help="the server setting compared, e.g. FLASH_MAX_WAIT_MS")
    p.add_argument("--values", required=True, help="its values, comma-separated, alternating")
    p.add_argument("--runs", type=int, default=2, help="runs per value")
    args = p.parse_args(argv)
    model = bench_family(args.model, args.tiny)
    results = []
    for run in range(args.runs):
        for value in args.values.split(","):
            env = {"FLASH_DECODER": args.decoder, "FLASH_QUEUE_SIZE": "1024", "FLASH_REQUEST_TIMEOUT_S": "600",
                   "FLASH_LOG_LEVEL": "warning", args.env: value}  # fmt: skip
            with serve_in_process(model, env) as (url, _):
                http_latencies(url, 32, "raw")  # warm the path and the batch shapes a little
                times = arrival_times(args.rate, args.duration, seed=run)
                lat, achieved = asyncio.run(open_loop(url, times, args.connections))
            lat.sort()
            row = {"run": run + 1, args.env: value, "requests": len(lat), "rate": achieved,
                   "p50_ms": statistics.median(lat) * 1e3, "p95_ms": lat[int(0.95 * (len(lat) - 1))] * 1e3}  # fmt: skip
            print(f"run {run + 1} {args.env}={value}: {len(lat)} requests at {achieved:.1f}/s  "
                  f"p50 {row['p50_ms']:.1f} ms  p95 {row['p95_ms']:.1f} ms", flush=True)  # fmt: skip
            results.append(row)
    return results


if __name__ == "__main__":
    main()
