"""Teacher training steps with and without tcmalloc preloaded, alternating, side by side.

    python bench/tcmalloc_train.py [--steps 15] [--rounds 2] [--lib /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4]

Each measurement is a fresh process (the shipped teacher's architecture, random weights,
batch 64, latents drawn at random): the median seconds per AdamW step after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(steps: int) -> None:
    import torch

    from teacher.config import TeacherConfig
    from teacher.train import TeacherState, train_step

    class NoVae(torch.nn.Module):  # train_step never decodes; TeacherState only moves it
        pass

    cfg = TeacherConfig(caption_dropout=0.1)
    state = TeacherState(cfg, NoVae())
    gen = torch.Generator().manual_seed(0)
    prompts = ["a red circle above a blue square"] * cfg.batch_size
    times = []
    for i in range(steps + 3):
        latents = torch.randn(cfg.batch_size, 4, 16, 16, generator=gen)
        t = time.perf_counter()
        train_step(state, latents, prompts, cfg, gen)
        if i >= 3:
            times.append(time.perf_counter() - t)
    print(statistics.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lib", default="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.steps)
    if not Path(a.lib).is_file():
        sys.exit(f"{a.lib} not found (Debian: apt-get install libtcmalloc-minimal4)")
    res = {"glibc malloc": [], "tcmalloc": []}
    for _ in range(a.rounds):
        for name, preload in (("glibc malloc", ""), ("tcmalloc", a.lib)):
            env = {**os.environ, "LD_PRELOAD": preload, "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(a.steps)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            res[name].append(float(out.strip().splitlines()[-1]))
            print(f"{name:13s} {res[name][-1]:.3f} s/step")
    g, t = statistics.median(res["glibc malloc"]), statistics.median(res["tcmalloc"])
    print(f"median: glibc {g:.3f} s/step, tcmalloc {t:.3f} s/step, tcmalloc speed-up {g / t:.2f}x")


if __name__ == "__main__":
    main()
