"""Bounded load test of the service: many concurrent clients, mixed step counts, loopback only.

    python bench/load_test.py --tiny --clients 32 --duration 15           # smoke: a tiny random family
    python bench/load_test.py --model models/shapes64 --clients 32 --duration 60
    python bench/load_test.py --url http://127.0.0.1:8000 --pid 1234 --duration 60   # a running server

Without --url it starts `python -m service` itself on a free 127.0.0.1 port and stops it
at the end. Each client sends requests back to back until --duration has passed (or
--max-requests were sent); then the run waits for the requests still in flight, so it
always stops by itself. Reports p50/p95/p99 latency, throughput, status counts, 429s
next to the server's own queue-full count, and the server's resident memory (RSS) over
the first and the last thousand requests. Exits 1 when a pass condition fails:

  * no 5xx and no transport errors; every request not answered 429 answered 200
  * every 429 says queue_full, and as many as the server counted
    (flash_requests_rejected_total{reason="queue_full"}, when the server is ours)
  * RSS growth between the first and the last thousand requests under --max-rss-growth
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from service.testing import serve_in_process

GEN = "/v1/images/generations"
DEFAULT_MIX = "flash-1step=3,flash-2step=3,flash-3step=3,teacher:4=1"
PROMPTS = [
    "a red circle above a blue square",
    "a small green triangle on the left",
    "two yellow squares side by side",
    "a large purple circle in the middle",
    "an orange triangle below a grey circle",
]
WINDOW = 1000  # requests in the first and last memory windows


@dataclass(frozen=True)
class MixEntry:
    model: str
    steps: int | None
    weight: float


@dataclass
class Sample:
    done: int  # requests completed when the sample was taken
    t: float
    rss_kib: int | None
    pending: float | None = None


@dataclass
class Record:
    status: int | str  # HTTP status, or the transport error's name
    latency_s: float
    model: str
    code: str | None = None


@dataclass
class Report:
    url: str
    clients: int
    duration_s: float
    wall_s: float
    requests: int
    throughput_rps: float
    statuses: dict[str, int]
    latency_ms: dict[str, float]
    latency_ms_by_model: dict[str, dict[str, float]]
    accepted: int
    completed: int
    rejected_429: int
    rejected_429_queue_full: int
    server_queue_full: float | None
    max_pending_seen: float | None
    queue_size: int | None
    rss_kib_first_window: float | None
    rss_kib_last_window: float | None
    rss_growth: float | None
    rss_windows: str
    failures: list[str] = field(default_factory=list)


def parse_mix(text: str) -> list[MixEntry]:
    """`MODEL[:STEPS][=WEIGHT],...`, e.g. flash-1step=3,teacher:4=1."""
    entries = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([\w.-]+)(?::(\d+))?(?:=([\d.]+))?", part)
        if m is None:
            raise SystemExit(f"bad --mix entry {part!r}; expected MODEL[:STEPS][=WEIGHT]")
        entries.append(MixEntry(m[1], int(m[2]) if m[2] else None, float(m[3] or 1)))
    if not entries or sum(e.weight for e in entries) <= 0:
        raise SystemExit("--mix needs at least one entry with a positive weight")
    return entries


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.0/8, ::1)")


@contextmanager
def own_server(model: Path, queue_size: int, max_batch_size: int, timeout: float = 300):
    """`python -m service` on a free 127.0.0.1 port; yields (url, pid); SIGTERM at the end."""
    env = {
        "FLASH_QUEUE_SIZE": str(queue_size),
        "FLASH_MAX_BATCH_SIZE": str(max_batch_size),
        "FLASH_LOG_LEVEL": "warning",  # no access log line per request
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    try:
        with serve_in_process(model, env, timeout) as (url, proc):
            yield url, proc.pid
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(str(e)) from e


def rss_kib(pid: int | None) -> int | None:
    """Resident memory of a process in KiB (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m[1]) if m else None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

    return {
        "p50": pct(50) * 1e3,
        "p95": pct(95) * 1e3,
        "p99": pct(99) * 1e3,
        "max": ordered[-1] * 1e3,
        "mean": statistics.fmean(ordered) * 1e3,
    }


def body(rng: random.Random, mix: list[MixEntry], n: int) -> dict:
    entry = rng.choices(mix, weights=[e.weight for e in mix])[0]
    b = {"prompt": rng.choice(PROMPTS), "model": entry.model, "seed": rng.randrange(2**31), "n": n}
    if entry.steps is not None:
        b["steps"] = entry.steps
    return b


async def drive(
    url: str, args, mix: list[MixEntry], pid: int | None
) -> tuple[list[Record], list[Sample], float]:
    """The clients and a sampler; returns (records in completion order, samples, wall seconds)."""
    records: list[Record] = []
    samples: list[Sample] = []
    sent = 0
    start = time.monotonic()
    stop_at = start + args.duration
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=headers) as c:

        async def client(i: int) -> None:
            nonlocal sent
            rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() < stop_at and sent < args.max_requests:
                sent += 1
                b = body(rng, mix, args.n)
                t0 = time.perf_counter()
                try:
                    r = await c.post(GEN, json=b)
                    code = None
                    if r.status_code != 200:
                        try:
                            code = r.json()["error"]["code"]
                        except (ValueError, KeyError, TypeError):
                            code = "not-the-error-shape"
                    records.append(Record(r.status_code, time.perf_counter() - t0, b["model"], code))
                except httpx.HTTPError as e:
                    records.append(Record(type(e).__name__, time.perf_counter() - t0, b["model"]))

        async def sampler() -> None:
            ticks = 0
            while True:
                pending = None
                if ticks % 5 == 0:  # the queue depth once a second, the memory five times
                    try:
                        text = (await c.get("/metrics", timeout=5)).text
                        pending = metric(text, "flash_pending_requests")
                    except httpx.HTTPError:
                        pass
                samples.append(Sample(len(records), time.monotonic() - start, rss_kib(pid), pending))
                ticks += 1
                await asyncio.sleep(0.2)

        sampling = asyncio.create_task(sampler())
        try:
            await asyncio.wait_for(
                asyncio.gather(*[client(i) for i in range(args.clients)]),
                timeout=args.duration + args.request_timeout + 30,  # hard stop, whatever happens
            )
        except TimeoutError:
            records.append(Record("HardStop", args.request_timeout, "-"))
        finally:
            sampling.cancel()
        samples.append(Sample(len(records), time.monotonic() - start, rss_kib(pid)))
        wall = time.monotonic() - start
    return records, samples, wall


def memory_windows(samples: list[Sample], total: int) -> tuple[float | None, float | None, str]:
    """Median RSS while the first WINDOW requests completed and while the last WINDOW did."""
    window = WINDOW if total >= 2 * WINDOW else total // 2
    label = f"first/last {window} requests" + ("" if window == WINDOW else f" (only {total} in all)")
    first = [s.rss_kib for s in samples if s.rss_kib is not None and s.done <= window]
    last = [s.rss_kib for s in samples if s.rss_kib is not None and s.done >= total - window]
    if not first or not last:
        return None, None, label
    return statistics.median(first), statistics.median(last), label


def summarise(url, args, records, samples, wall, final_metrics: str | None, queue_size) -> Report:
    statuses = Counter(str(r.status) for r in records)
    ok = [r.latency_s for r in records if r.status == 200]
    by_model = {
        m: percentiles([r.latency_s for r in records if r.status == 200 and r.model == m])
        for m in sorted({r.model for r in records})
    }
    too_many = [r for r in records if r.status == 429]
    accepted = [r for r in records if r.status != 429]
    first, last, label = memory_windows(samples, len(records))
    growth = (last - first) / first if first and last else None
    pendings = [s.pending for s in samples if s.pending is not None]
    server_full = None
    if final_metrics is not None and args.url is None:  # our own server: its counters start at 0
        server_full = metric(final_metrics, "flash_requests_rejected_total", '{reason="queue_full"}') or 0.0
    report = Report(
        url=url,
        clients=args.clients,
        duration_s=args.duration,
        wall_s=round(wall, 2),
        requests=len(records),
        throughput_rps=round(len(ok) / wall, 2) if wall else 0.0,
        statuses=dict(sorted(statuses.items())),
        latency_ms={k: round(v, 1) for k, v in percentiles(ok).items()},
        latency_ms_by_model={m: {k: round(v, 1) for k, v in p.items()} for m, p in by_model.items()},
        accepted=len(accepted),
        completed=len(ok),
        rejected_429=len(too_many),
        rejected_429_queue_full=sum(r.code == "queue_full" for r in too_many),
        server_queue_full=server_full,
        max_pending_seen=max(pendings) if pendings else None,
        queue_size=queue_size,
        rss_kib_first_window=first,
        rss_kib_last_window=last,
        rss_growth=round(growth, 4) if growth is not None else None,
        rss_windows=label,
    )
    f = report.failures
    if any(str(s).startswith("5") for s in statuses):
        f.append(f"5xx answers: {report.statuses}")
    if report.accepted != report.completed:
        f.append(f"{report.accepted - report.completed} accepted requests did not complete with 200")
    if report.rejected_429 != report.rejected_429_queue_full:
        f.append("a 429 that was not queue_full")
    if server_full is not None and server_full != report.rejected_429:
        f.append(f"clients saw {report.rejected_429} 429s, the server counted {server_full:g} queue-full")
    if growth is not None and growth >= args.max_rss_growth:
        f.append(f"RSS grew {growth:.1%} ({label}), limit {args.max_rss_growth:.0%}")
    if len(records) == 0:
        f.append("no request completed")
    return report


def print_report(r: Report) -> None:
    lat = r.latency_ms
    print(f"\nload test of {r.url}: {r.clients} clients, {r.duration_s:g} s asked, {r.wall_s:g} s wall")
    print(f"requests {r.requests}   completed (200) {r.completed}   throughput {r.throughput_rps:.1f} req/s")
    print(f"status counts {r.statuses}")
    if lat:
        print(
            f"latency ms (200s)  p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  "
            f"max {lat['max']:.1f}  mean {lat['mean']:.1f}"
        )
    for model, p in r.latency_ms_by_model.items():
        if p:
            print(f"  {model:<14} p50 {p['p50']:.1f}  p95 {p['p95']:.1f}  p99 {p['p99']:.1f}")
    print(
        f"429: {r.rejected_429} (queue_full code: {r.rejected_429_queue_full}; server queue_full counter: "
        f"{r.server_queue_full}; most pending seen {r.max_pending_seen}, queue {r.queue_size} "
        "+ the batch the device loop holds)"
    )
    if r.rss_growth is not None:
        print(
            f"server RSS, median over the {r.rss_windows}: {r.rss_kib_first_window / 1024:.1f} MiB -> "
            f"{r.rss_kib_last_window / 1024:.1f} MiB ({r.rss_growth:+.2%})"
        )
    else:
        print("server RSS: not measured (pass --pid for a server this script did not start)")
    print("PASS" if not r.failures else "FAIL: " + "; ".join(r.failures))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (loopback only); default: start one")
    where.add_argument("--model", type=Path, default=Path("models/shapes64"), help="family folder to serve")
    where.add_argument(
        "--tiny", action="store_true", help="serve a tiny random family (made in a temp folder)"
    )
    p.add_argument("--pid", type=int, help="the running server's pid, for its RSS (with --url)")
    p.add_argument("--api-key", help="bearer key for a server that requires one")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=60, help="seconds of load (default 60, at most 3600)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop sending after this many")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"MODEL[:STEPS][=WEIGHT],... (default {DEFAULT_MIX})")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed", type=int, default=0, help="seeds the bodies each client sends")
    p.add_argument("--request-timeout", type=float, default=120, help="client timeout per request, s")
    p.add_argument("--queue-size", type=int, default=64, help="FLASH_QUEUE_SIZE of a server started here")
    p.add_argument(
        "--max-batch-size", type=int, default=16, help="FLASH_MAX_BATCH_SIZE of a server started here"
    )
    p.add_argument(
        "--max-rss-growth", type=float, default=0.10, help="fail above this RSS growth (0.10: 10%%)"
    )
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 3600 or not 1 <= args.clients <= 1024:
        p.error("--duration must be in (0, 3600] and --clients in [1, 1024]")
    mix = parse_mix(args.mix)

    def run(url: str, pid: int | None, queue_size: int | None) -> Report:
        models = httpx.get(f"{url}/v1/models", timeout=10, headers=_auth(args)).json()
        served = {m["id"] for m in models["data"]}
        unknown = sorted({e.model for e in mix} - served)
        if unknown:
            raise SystemExit(f"--mix names {unknown}, not served; served: {sorted(served)}")
        print(
            f"{args.clients} clients for {args.duration:g} s against {url} ({models['version']}), mix {args.mix}"
        )
        records, samples, wall = asyncio.run(drive(url, args, mix, pid))
        final = httpx.get(f"{url}/metrics", timeout=10).text
        return summarise(url, args, records, samples, wall, final, queue_size)

    if args.url:
        require_loopback(args.url)
        report = run(args.url.rstrip("/"), args.pid, None)
    else:
        with tempfile.TemporaryDirectory(prefix="flash-load-") as tmp:
            model = args.model
            if args.tiny:
                from flash.tiny import write_tiny_family

                model = write_tiny_family(Path(tmp) / "tiny")
            if not model.is_dir():
                raise SystemExit(f"model folder {model} not found (use --tiny for a tiny random family)")
            with own_server(model.resolve(), args.queue_size, args.max_batch_size) as (url, pid):
                report = run(url, pid, args.queue_size)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 1 if report.failures else 0


def _auth(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


if __name__ == "__main__":
    sys.exit(main())
