"""Where a lone request's time goes in the service, stage by stage.

    python bench/service_timeline.py --model models/shapes64 --requests 500
    python bench/service_timeline.py --model models/shapes64 --backend onnxruntime --onnx-dir runs/onnx-shapes64 --decoder tiny

Starts the service in a subprocess with time marks added from outside (the app is wrapped,
and Engine.generate, Job.start, Job.finish and routes.encode_png are patched), sends
sequential 3-step requests from one raw keep-alive connection, and prints the median time
between marks. time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for both processes,
so the client's send and receive line up with the server's marks. The first 20 requests are
left out (warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path
from bench_service import body, check, raw_post  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKS = ["asgi_in", "enqueue", "start", "finish", "resumed", "png0", "png1", "resp_start", "body_sent"]
WHAT = {  # what happens between a mark and the next
    "asgi_in": "middlewares, routing, auth, body read, validation",
    "enqueue": "hand-off to the device thread",
    "start": "generation on the device thread (text encoder, U-Net calls, decoder)",
    "finish": "hand-off back to the event loop",
    "resumed": "metrics, disconnect watch",
    "png0": "PNG encoding",
    "png1": "base64, response model, JSON",
    "resp_start": "sending the response",
}


def serve(port: int, marks_file: str) -> None:
    """The service with time marks; SIGUSR1 writes them to `marks_file`."""
    sys.path.insert(0, str(ROOT))
    import service.engine as engine_mod
    import service.routes as routes
    from service.batching import Job
    from service.config import Settings
    from service.server import build_server

    pc, rows, cur = time.perf_counter, [], {}

    def patch(owner, name, before=None, after=None):
        orig = getattr(owner, name)

        def wrapped(*a, **k):
            if before:
                cur[before] = pc()
            out = orig(*a, **k)
            if after:
                cur[after] = pc()
            return out

        setattr(owner, name, wrapped)

    patch(Job, "start", before="start")
    patch(Job, "finish", before="finish")
    patch(routes, "encode_png", before="png0", after="png1")
    generate = engine_mod.Engine.generate

    async def timed_generate(self, job):
        cur["enqueue"] = pc()
        result = await generate(self, job)
        cur["resumed"] = pc()
        return result

    engine_mod.Engine.generate = timed_generate
    server = build_server(Settings(port=port))
    inner = server.config.app

    async def outer(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await inner(scope, receive, send)
        cur.clear()
        cur["asgi_in"] = pc()

        async def send_marked(message):
            if message["type"] == "http.response.start":
                cur["resp_start"] = pc()
            await send(message)
            if message["type"] == "http.response.body":
                cur["body_sent"] = pc()

        await inner(scope, receive, send_marked)
        rows.append(dict(cur))

    server.config.app = outer

    def dump(sig, frame) -> None:
        Path(f"{marks_file}.part").write_text(json.dumps(rows))
        os.replace(f"{marks_file}.part", marks_file)

    signal.signal(signal.SIGUSR1, dump)
    server.run()


async def client(url: str, n: int) -> list[tuple[float, float]]:
    """`n` sequential 3-step requests on one keep-alive connection: (sent, received) each."""
    u = httpx.URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        status, _ = await raw_post(reader, writer, u.host, body(i))
        out.append((t0, time.perf_counter()))
        check(status, i)
    writer.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"))
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--backend", default="torch")
    p.add_argument("--onnx-dir", type=Path)
    p.add_argument("--decoder", default="full")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "MARKS_FILE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(int(a.serve[0]), a.serve[1])
        return {}
    from service.testing import serve_in_process

    marks_file = tempfile.mktemp(suffix=".json")
    env = {"FLASH_MODEL_DIR": str(a.model), "FLASH_BACKEND": a.backend, "FLASH_DECODER": a.decoder,
           "FLASH_LOG_LEVEL": "warning", **({"FLASH_ONNX_DIR": str(a.onnx_dir)} if a.onnx_dir else {})}  # fmt: skip

    def command(port: int) -> list[str]:  # this file's serve(), in its own process
        return [sys.executable, __file__, "--serve", str(port), marks_file]

    with serve_in_process(a.model, env, command=command) as (url, proc):
        sent = asyncio.run(client(url, a.requests))
        time.sleep(0.5)  # the last request's marks are kept after its body is sent
        proc.send_signal(signal.SIGUSR1)
        while not Path(marks_file).is_file() and proc.poll() is None:
            time.sleep(0.1)
    marks = json.loads(Path(marks_file).read_text())
    rows = list(zip(sent, marks, strict=True))[20:]

    def med(f) -> float:
        return round(statistics.median(f(c, s) for c, s in rows) * 1000, 3)

    parts = {"client send -> server (loopback, HTTP parsing)": med(lambda c, s: s["asgi_in"] - c[0])}
    for m0, m1 in zip(MARKS, MARKS[1:], strict=False):
        parts[f"{m0} -> {m1}: {WHAT[m0]}"] = med(lambda c, s, m0=m0, m1=m1: s[m1] - s[m0])
    # "body_sent" is marked when the server's send returns, which can be after the client has
    # the bytes: this part is ~0 and may come out negative for small responses
    parts["body sent -> client has it"] = med(lambda c, s: c[1] - s["body_sent"])
    total, compute = med(lambda c, s: c[1] - c[0]), med(lambda c, s: s["finish"] - s["start"])
    for k, v in parts.items():
        print(f"{v:8.3f} ms  {k}")
    print(f"{total:8.3f} ms  client total (median); outside the generation: {total - compute:.3f} ms")
    return {"parts_ms": parts, "total_ms": total, "generation_ms": compute, "n": len(rows)}


if __name__ == "__main__":
    main()
