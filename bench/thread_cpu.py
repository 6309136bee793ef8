"""CPU per request of each of the server's threads under 16 clients, code trees in turns.

    python bench/thread_cpu.py --model models/shapes64 --decoder tiny --trials 3
    python bench/thread_cpu.py --model models/shapes64 --decoder tiny --tree . --tree /tmp/old --trials 3
    python bench/thread_cpu.py --tiny --requests 48 --trials 1

On these 2 cores the event loop's CPU (HTTP, validation, PNG, JSON) is taken from the two torch
threads, so it is the figure a change to the request path should move, and unlike a throughput
ratio it barely depends on the machine's minute-to-minute speed. Each trial starts `python -m
service` from each `--tree` (a checkout of this repository, e.g. a `git worktree` of an older
commit; default: this one), sends `--requests` 3-step requests from `--concurrency` raw
keep-alive clients after a warm-up, and reads every thread's CPU time from
`/proc/<pid>/task/<tid>/stat` before and after (Linux). The trees alternate trial by trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import bench_family, http_throughput  # noqa: E402
from service.testing import serve_in_process  # noqa: E402

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """{tid: CPU seconds (user + system)} of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended between listdir and read
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, utime 14, stime 15
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * TICK_S
    return out


def per_request(before: dict, after: dict, pid: int, n: int) -> dict[str, float]:
    """ms of CPU per request: the main thread (uvicorn's event loop), the two busiest others
    (the device thread and its OpenMP worker with torch), and the rest together."""
    used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    others = sorted((cpu for tid, cpu in used.items() if tid != pid), reverse=True)
    return {
        "event loop": used.get(pid, 0.0) / n * 1e3,
        "busiest other": (others[0] if others else 0.0) / n * 1e3,
        "second other": (others[1] if len(others) > 1 else 0.0) / n * 1e3,
        "the rest": sum(others[2:]) / n * 1e3,
    }


def measure(tree: Path, model: Path, env: dict[str, str], n: int, k: int) -> tuple[dict[str, float], float]:
    """One server started from `tree`: (ms of CPU per request by thread, images per second)."""
    command = [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1", "--port"]
    env = {**env, "PYTHONPATH": str(tree)}  # the tree's own packages, whatever is installed
    with serve_in_process(model, env, command=lambda port: ["env", "-C", str(tree), *command, str(port)]) as (url, proc):
        http_throughput(url, 4 * k, k, "raw")  # warm: connections, batch shapes
        before = thread_cpu(proc.pid)
        rate, _ = http_throughput(url, n, k, "raw")
        after = thread_cpu(proc.pid)
    return per_request(before, after, proc.pid, n), rate


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/shapes64"), help="family folder")
    p.add_argument("--tiny", action="store_true", help="a tiny random family instead (smoke run)")
    p.add_argument("--tree", type=Path, action="append", help="a checkout to serve from (repeatable; default: this one)")
    p.add_argument("--requests", type=int, default=384, help="requests per trial, after the warm-up")
    p.add_argument("--concurrency", type=int, default=16, help="raw keep-alive clients")
    p.add_argument("--trials", type=int, default=3, help="servers per tree, the trees in turns")
    p.add_argument("--decoder", choices=["full", "tiny"], default="full")
    args = p.parse_args(argv)

    model = bench_family(args.model, args.tiny)
    trees = [t.resolve() for t in args.tree or [ROOT]]
    env = {"FLASH_DECODER": args.decoder, "FLASH_QUEUE_SIZE": "1024", "FLASH_LOG_LEVEL": "warning",
           "FLASH_MAX_BATCH_SIZE": str(args.concurrency)}  # fmt: skip
    results: dict[str, list[tuple[dict[str, float], float]]] = {str(t): [] for t in trees}
    for trial in range(args.trials):
        for tree in trees if trial % 2 == 0 else trees[::-1]:
            ms, rate = measure(tree, model, env, args.requests, args.concurrency)
            results[str(tree)].append((ms, rate))
            cols = "  ".join(f"{k} {v:.2f}" for k, v in ms.items())
            print(f"trial {trial}  {tree}: ms of CPU per request: {cols}  ({rate:.1f} img/s)", flush=True)
    summary = {}
    for tree, runs in results.items():
        summary[tree] = {
            "event loop ms per request": [ms["event loop"] for ms, _ in runs],
            "images per second": [rate for _, rate in runs],
        }
        loop = statistics.median(summary[tree]["event loop ms per request"])
        print(f"{tree}: event loop, median {loop:.2f} ms of CPU per request over {len(runs)} trial(s)")
    return summary


if __name__ == "__main__":
    main()
