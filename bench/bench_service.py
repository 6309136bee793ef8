"""Service overhead and batching, measured from one run on this machine.

    python bench/bench_service.py --model models/shapes64 --requests 64 --concurrency 16
    python bench/bench_service.py --tiny --requests 8 --concurrency 4     # smoke run

Prints six ratios side by side, and how full the U-Net calls were during the
concurrent run (images per call, read from the server's /metrics):
  1. p50 latency of one 3-step request over HTTP / the same generation in-process
     (TextToImage.student_latents + decode, batch 1), the two taken in turns  target <= 1.10
     It also splits the HTTP side: the server's own generation (the response's
     timings.compute_ms) against the in-process one, and what is left per request
     (HTTP, validation, hand-offs, PNG, JSON).
  2. throughput with `concurrency` clients over HTTP / the in-process pipeline at
     batch size `concurrency`, rounds of the two taken in turns               target >= 0.90
     (also printed the old way: one HTTP window, the in-process one after the servers stopped)
  3. throughput with `concurrency` clients, batching (max_batch_size = concurrency)
     / max_batch_size = 1                                                    reported
  4. per-image latency of the teacher (25 steps, CFG) / the 3-step student, both over HTTP,
     one request of each in turns
                                                                             target >= 10
  5. the same target read under load: seconds per image of the teacher / of the 3-step
     student, each with `concurrency` clients over HTTP (1 / throughput), windows of the two
     taken in turns                                                          target >= 10
Each server runs as its own process (`python -m service`), the clients here, on the same
cores: it also prints the clients' own CPU per image, and `--client raw` swaps httpx for
hand-written keep-alive connections that spend less of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from service.testing import serve_in_process

STUDENT = "flash-3step"
TEACHER = {"model": "teacher", "steps": 25}  # with the family's own guidance scale


@contextmanager
def server(model: Path, max_batch_size: int, timeout: float = 300, decoder: str = "full",
           backend: str = "torch", onnx_dir: Path | None = None):
    """`python -m service` in a subprocess; yields its base URL once /health/ready is 200."""
    env = {
        "FLASH_BACKEND": backend,
        **({"FLASH_ONNX_DIR": str(onnx_dir)} if onnx_dir else {}),
        "FLASH_DECODER": decoder,
        "FLASH_QUEUE_SIZE": "1024",
        "FLASH_REQUEST_TIMEOUT_S": "600",
        "FLASH_LOG_LEVEL": "warning",
        "FLASH_MAX_BATCH_SIZE": str(max_batch_size),
    }
    with serve_in_process(model, env, timeout) as (url, _):
        yield url


def bench_family(model: Path, tiny: bool) -> Path:
    """The family a bench runs on, resolved: `model`, or with --tiny a random tiny one in a temp folder."""
    if tiny:
        from flash.tiny import write_tiny_family

        model = write_tiny_family(Path(tempfile.mkdtemp()) / "tiny")
    return model.resolve()


def body(i: int, model: str = STUDENT, **extra) -> dict:
    return {"prompt": f"a red circle above a blue square {i}", "model": model, "seed": i, **extra}


Send = Callable[[dict], Awaitable[tuple[int, bytes]]]  # posts one request body: (HTTP status, body)


async def httpx_senders(url: str, k: int, stack: AsyncExitStack) -> list[Send]:
    """k clients sharing one httpx connection pool (what a Python user would write)."""
    pool = await stack.enter_async_context(
        httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=k))
    )

    async def send(payload: dict) -> tuple[int, bytes]:
        response = await pool.post("/v1/images/generations", json=payload)
        return response.status_code, response.content

    return [send] * k


async def raw_senders(url: str, k: int, stack: AsyncExitStack) -> list[Send]:
    """k keep-alive HTTP/1.1 connections written by hand: about the least CPU a client can spend,
    to see how much of this machine's cores the load generator itself takes."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port
    senders = []
    for _ in range(k):
        reader, writer = await asyncio.open_connection(host, port)
        stack.callback(writer.close)
        senders.append(partial(raw_post, reader, writer, host))
    return senders


async def raw_post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, payload: dict
) -> tuple[int, bytes]:
    """POST /v1/images/generations; returns the status and the body (read, not parsed)."""
    data = json.dumps(payload).encode()
    head = f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    response = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", response)
    if length is None:
        raise RuntimeError("the server's response has no Content-Length")
    content = await reader.readexactly(int(length.group(1)))
    return int(response.split(b" ", 2)[1]), content


CLIENTS = {"httpx": httpx_senders, "raw": raw_senders}


def check(status: int, i: int) -> None:
    if status != 200:
        raise RuntimeError(f"request {i}: HTTP {status}")


def http_latencies(url: str, n: int, client: str = "httpx", **extra) -> list[float]:
    """Sequential requests from one client: wall seconds each."""
    (times,) = on_one_connection(url, client, n, 0.0, lambda send: [http_side(send, **extra)])
    return times


async def concurrent_requests(senders: Sequence[Send], ids: Sequence[int], **extra) -> None:
    """Requests `body(i, **extra)` for every i in `ids`, each client sending its next one as soon
    as its last one is answered."""
    todo = iter(ids)

    async def one(send: Send) -> None:
        for i in todo:
            check((await send(body(i, **extra)))[0], i)

    await asyncio.gather(*[one(send) for send in senders])


def http_throughput(url: str, n: int, concurrency: int, client: str = "httpx", **extra) -> tuple[float, float]:
    """Images per second with `concurrency` clients each sending requests back to back (bodies
    `body(i, **extra)`), and the clients' own CPU seconds per image (they share this machine's
    cores with the server)."""

    async def run() -> tuple[float, float]:
        async with AsyncExitStack() as stack:
            senders = await CLIENTS[client](url, concurrency, stack)
            t0, cpu0 = time.perf_counter(), time.process_time()
            await concurrent_requests(senders, range(n), **extra)
            return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n

    return asyncio.run(run())


def http_window(url: str, n: int, k: int, client: str, **extra) -> Side:
    """Round i: requests i*n .. (i+1)*n - 1 (bodies `body(j, **extra)`) from `k` clients over HTTP,
    on connections of its own (~1 ms on loopback): the server drops keep-alive connections left
    idle for 5 s, as they are while the other side of a turn runs."""

    async def side(i: int) -> None:
        async with AsyncExitStack() as stack:
            await concurrent_requests(await CLIENTS[client](url, k, stack), range(i * n, (i + 1) * n), **extra)

    return side


def rates_in_turns(sides: Sequence[tuple[Side, int]], rounds: int, gap_s: float) -> list[float]:
    """Images per second of each (side, images per round), the sides taken in turns for `rounds`
    rounds (`in_turns`), so that all of them meet the same minutes of a noisy machine; each rate
    is over all of its rounds."""
    times = asyncio.run(in_turns([side for side, _ in sides], rounds, gap_s))
    return [rounds * images / sum(t) for (_, images), t in zip(sides, times, strict=True)]


def throughput_in_turns(
    url: str, n: int, k: int, client: str, gen: Callable[[list[int]], object], rounds: int, gap_s: float = 0.01
) -> tuple[float, float]:
    """Images per second of the 3-step student over HTTP (`n` requests from `k` clients) and
    in-process (the same `n` images at batch `k`), taken in turns (`rates_in_turns`)."""
    batches = [list(range(b * k, (b + 1) * k)) for b in range(max(1, n // k))]

    async def local(i: int) -> None:
        for ids in batches:
            gen(ids)

    http, in_process = rates_in_turns([(http_window(url, n, k, client), n), (local, len(batches) * k)], rounds, gap_s)
    return http, in_process


def teacher_and_student_under_load(
    url: str, n_teacher: int, n: int, k: int, client: str, rounds: int, gap_s: float = 0.01
) -> tuple[float, float]:
    """Images per second of the teacher (25 steps, CFG; `n_teacher` requests a round) and of the
    3-step student (`n` a round), each from `k` clients over HTTP, their windows taken in turns."""
    teacher, student = rates_in_turns(
        [(http_window(url, n_teacher, k, client, **TEACHER), n_teacher), (http_window(url, n, k, client), n)],
        rounds, gap_s,
    )  # fmt: skip
    return teacher, student


def histogram_totals(metrics_text: str, histogram: str, **labels: str) -> tuple[float, float]:
    """(sum, count) of a histogram in a /metrics exposition, over its series with `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            part = sample.name.removeprefix(histogram + "_")
            if part in found and sample.name != part and labels.items() <= sample.labels.items():
                found[part] += sample.value
    return found["sum"], found["count"]


def images_per_unet_call(url: str, model: str = STUDENT) -> tuple[float, float]:
    """(images, calls) of `model` so far: the flash_batch_size_images histogram's sum and count."""
    return histogram_totals(httpx.get(f"{url}/metrics").text, "flash_batch_size_images", model=model)


def local_generator(model: Path, decoder: str = "full", backend: str = "torch", onnx_dir: Path | None = None):
    """The same generations without the service: a function of request ids -> images.

    torch: TextToImage.student_latents + decode. Another backend: its own encode / denoise /
    decode calls (what the service's batching loop makes) around the same student sampler.
    """
    import torch

    from flash.models import load_family
    from flash.pipeline import TextToImage
    from flash.sampling import run_student

    fam = load_family(model, decoder=decoder)
    student = fam.students[3]
    t2i = TextToImage(fam.teacher)
    ts = student.card.timesteps
    pt = student.card.prediction_type

    if backend == "torch":
        def gen(ids: list[int]):
            prompts = [body(i)["prompt"] for i in ids]
            return t2i.decode(t2i.student_latents(student.unet, prompts, ids, ts, prediction_type=pt))
    else:
        from service.backends import make_backend
        from service.config import Settings

        b = make_backend(backend, fam, Settings(backend=backend, onnx_dir=onnx_dir, decoder=decoder)).students[3]
        schedule = t2i.student_schedule(pt)

        def gen(ids: list[int]):
            cond = b.encode([body(i)["prompt"] for i in ids])
            return b.decode(run_student(b.denoise, t2i.noise(ids), cond, schedule, ts))

    def in_inference_mode(ids: list[int]):
        with torch.inference_mode():
            return gen(ids)

    in_inference_mode([0])  # warm up
    return in_inference_mode


def in_process_throughput(gen: Callable[[list[int]], object], n_images: int, batch: int) -> float:
    """Images per second of the in-process pipeline at `batch`."""
    gen(list(range(batch)))  # warm up this batch shape
    rounds = max(1, n_images // batch)
    t0 = time.perf_counter()
    for r in range(rounds):
        gen(list(range(r * batch, (r + 1) * batch)))
    return rounds * batch / (time.perf_counter() - t0)


Side = Callable[[int], Awaitable[None]]  # makes request / generation number i


async def in_turns(sides: Sequence[Side], n: int, gap_s: float) -> list[list[float]]:
    """Wall seconds of each side's call i, for i < n, the sides taken in turns (their order
    reversed every other round), so that all of them meet the same minutes of a noisy machine;
    `gap_s` of idle after each call lets the last one's spinning threads go to sleep."""
    times: list[list[float]] = [[] for _ in sides]
    for i in range(n):
        for k in range(len(sides)) if i % 2 == 0 else reversed(range(len(sides))):
            t0 = time.perf_counter()
            await sides[k](i)
            times[k].append(time.perf_counter() - t0)
            time.sleep(gap_s)
    return times


def http_side(send: Send, server_compute: list[float] | None = None, **extra) -> Side:
    """Request i over HTTP; appends the response's `timings.compute_ms` (admission to the last
    image, on the device thread) in seconds to `server_compute` when given."""

    async def side(i: int) -> None:
        status, content = await send(body(i, **extra))
        check(status, i)
        if server_compute is not None:
            server_compute.append(json.loads(content)["timings"]["compute_ms"] / 1e3)

    return side


@dataclass
class Paired:
    """Seconds per request of one run: the 3-step student over HTTP, the server's own generation
    inside it, and the same generation in-process (taken in turns with the HTTP request)."""

    http: list[float]
    server_compute: list[float]
    local: list[float]


def on_one_connection(
    url: str, client: str, n: int, gap_s: float, sides: Callable[[Send], list[Side]]
) -> list[list[float]]:
    """`in_turns` over the sides that `sides` builds around one keep-alive client connection."""

    async def run() -> list[list[float]]:
        async with AsyncExitStack() as stack:
            (send,) = await CLIENTS[client](url, 1, stack)
            return await in_turns(sides(send), n, gap_s)

    return asyncio.run(run())


def paired_latencies(
    url: str, n: int, client: str, gen: Callable[[list[int]], object], gap_s: float = 0.01
) -> Paired:
    """One 3-step request over HTTP and the same generation in-process, in turns (`in_turns`)."""
    server: list[float] = []

    async def local(i: int) -> None:
        gen([i])

    http, in_process = on_one_connection(url, client, n, gap_s, lambda send: [http_side(send, server), local])
    return Paired(http, server, in_process)


def teacher_and_student_latencies(
    url: str, n: int, client: str, gap_s: float = 0.01
) -> tuple[list[float], list[float]]:
    """The teacher (25 steps, CFG) and the 3-step student, one request each over HTTP, in turns:
    both meet the same idle gaps and the same cache state, as a user's lone requests would."""
    teacher, student = on_one_connection(
        url, client, n, gap_s, lambda send: [http_side(send, **TEACHER), http_side(send)]
    )
    return teacher, student


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"), help="family folder")
    p.add_argument("--tiny", action="store_true", help="bench a tiny random family instead (smoke run)")
    p.add_argument("--requests", type=int, default=64, help="requests per throughput run and latency samples")
    p.add_argument(
        "--concurrency", type=int, default=16, help="concurrent clients (and the in-process batch)"
    )
    p.add_argument("--teacher-requests", type=int, default=20,
                   help="teacher (25 steps, CFG) latency samples, each taken in turn with a 3-step one")
    p.add_argument("--throughput-rounds", type=int, default=4,
                   help="rounds of the two ratios under load, each pair of windows taken in turns")
    p.add_argument("--teacher-load-requests", type=int, default=0,
                   help="teacher requests per round under load, `concurrency` clients (default: concurrency)")
    p.add_argument("--decoder", choices=["full", "tiny"], default="full",
                   help="the family's VAE decoder or its fast one (vae_tiny/), on both sides")
    p.add_argument("--client", choices=sorted(CLIENTS), default="httpx",
                   help="the load generator: httpx, or hand-written keep-alive connections (raw) that spend "
                        "less of the cores the server shares with them")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="the service's backend, and the in-process baseline's calls, on both sides")
    p.add_argument("--onnx-dir", type=Path, help="the export the onnxruntime backend serves (default <model>/onnx)")
    p.add_argument("--gap-ms", type=float, default=10.0,
                   help="idle after each latency sample taken in turns (lets spinning thread pools sleep)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    model = bench_family(args.model, args.tiny)
    n, k = args.requests, args.concurrency

    c = args.client
    on = {"decoder": args.decoder, "backend": args.backend, "onnx_dir": args.onnx_dir}
    gen = local_generator(model, **on)
    with server(model, max_batch_size=k, **on) as url:
        http_latencies(url, 2, c)  # warm the connection path
        paired = paired_latencies(url, n, c, gen, args.gap_ms / 1e3)
        http_p50, local_p50 = statistics.median(paired.http), statistics.median(paired.local)
        server_p50 = statistics.median(paired.server_compute)
        own_p50 = statistics.median(h - g for h, g in zip(paired.http, paired.server_compute, strict=True))
        teacher_lat, student_lat = teacher_and_student_latencies(url, args.teacher_requests, c, args.gap_ms / 1e3)
        teacher_p50, student_p50 = statistics.median(teacher_lat), statistics.median(student_lat)
        http_throughput(url, 2 * k, k, c)  # warm up like the in-process side: connections, batch shapes
        gen(list(range(k)))  # the in-process batch shape, warm for the rounds in turns
        images0, calls0 = images_per_unet_call(url)
        batched, client_cpu = http_throughput(url, n, k, c)
        images1, calls1 = images_per_unet_call(url)
        fill = (images1 - images0) / max(1.0, calls1 - calls0)
        turns_http, turns_local = throughput_in_turns(url, n, k, c, gen, args.throughput_rounds, args.gap_ms / 1e3)
        http_throughput(url, k, k, c, **TEACHER)  # warm the teacher's batch shapes
        teacher_rate, student_rate = teacher_and_student_under_load(
            url, args.teacher_load_requests or k, n, k, c, args.throughput_rounds, args.gap_ms / 1e3)
    with server(model, max_batch_size=1, **on) as url:
        http_throughput(url, 2 * k, k, c)
        unbatched, _ = http_throughput(url, n, k, c)
    local_throughput = in_process_throughput(gen, n, k)

    rows = [
        ("p50 latency, 3-step, 1 client (ms)", http_p50 * 1e3, local_p50 * 1e3, http_p50 / local_p50, "<= 1.10"),
        (f"throughput, {k} clients (img/s), in turns", turns_http, turns_local, turns_http / turns_local, ">= 0.90"),
        (f"throughput, {k} clients (img/s), one window each", batched, local_throughput, batched / local_throughput, "(old way)"),
        (f"throughput, {k} clients, batching vs max_batch_size=1", batched, unbatched, batched / unbatched, "report"),
        ("per image: teacher 25 steps + CFG vs 3-step (ms)", teacher_p50 * 1e3, student_p50 * 1e3, teacher_p50 / student_p50, ">= 10"),
        (f"per image at {k} clients: teacher vs 3-step (ms), in turns", 1e3 / teacher_rate, 1e3 / student_rate, student_rate / teacher_rate, ">= 10"),
    ]  # fmt: skip
    print(f"\nmodel {model}  backend {args.backend}  decoder {args.decoder}  client {c}  requests {n}  concurrency {k}  torch threads: default")
    print(f"{'measure':<60}{'service':>12}{'baseline':>12}{'ratio':>9}  target")
    for name, a, b, ratio, target in rows:
        print(f"{name:<60}{a:>12.2f}{b:>12.2f}{ratio:>9.2f}  {target}")
    print(f"of the HTTP p50: the server's own generation (timings.compute_ms) p50 {server_p50 * 1e3:.2f} ms "
          f"({server_p50 / local_p50:.2f}x in-process); per request, HTTP minus it: p50 {own_p50 * 1e3:.2f} ms")
    print(f"images per U-Net call during the {k}-client run: {fill:.1f} (in-process: {k})")
    print(f"the clients' own CPU per image during that run: {client_cpu * 1e3:.2f} ms "
          f"(on this machine's cores, beside the server; in-process: {1e3 / local_throughput:.2f} ms wall per image)")
    results = {
        name: {"service": a, "baseline": b, "ratio": ratio, "target": t} for name, a, b, ratio, t in rows
    }
    results["p50 server generation ms (timings.compute_ms)"] = server_p50 * 1e3
    results["p50 HTTP minus server generation ms"] = own_p50 * 1e3
    results["images per U-Net call, concurrent run"] = fill
    results["client CPU ms per image, concurrent run"] = client_cpu * 1e3
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
