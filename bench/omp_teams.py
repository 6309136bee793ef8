"""Why the service loads models on a thread that exits (service.engine.in_own_thread).

    python bench/omp_teams.py          # each case in its own process, side by side

Times 100 calls of eight 64-channel 3x3 convolutions at 16x16 on a worker thread, after
torch ran a parallel op elsewhere in the process: nowhere, on the main thread, on a
ThreadPoolExecutor thread (what asyncio.to_thread uses) or on a thread that has exited.
A live OpenMP team beside the worker's makes libgomp throttle its spin-wait once the
process holds more OpenMP threads than cores; an exited thread frees its team.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

CASES = ("nothing", "main thread", "pooled thread", "exited thread")


def run_case(case: str) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(8)])
    x = torch.randn(1, 64, 16, 16)

    def big() -> None:
        with torch.inference_mode():
            net(torch.randn(8, 64, 64, 64))  # large enough to open a parallel region

    def bench() -> float:
        with torch.inference_mode():
            for _ in range(5):
                net(x)
            t = time.perf_counter()
            for _ in range(100):
                net(x)
            return (time.perf_counter() - t) / 100 * 1000

    if case == "main thread":
        big()
    elif case == "pooled thread":
        pool = ThreadPoolExecutor(1)
        pool.submit(big).result()  # the pool's thread stays alive, and so does its team
    elif case == "exited thread":
        t = threading.Thread(target=big)
        t.start()
        t.join()
    out: dict[str, float] = {}
    worker = threading.Thread(target=lambda: out.update(ms=bench()))
    worker.start()
    worker.join()
    return out["ms"]


def main() -> None:
    if len(sys.argv) > 1:
        print(f"{run_case(sys.argv[1]):.2f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call on a worker thread")
    for case in CASES:
        ms = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, check=True).stdout
        print(f"  torch ran before on: {case:15s} {ms.strip()} ms")


if __name__ == "__main__":
    main()
