"""Evaluate the latest teacher checkpoint (EMA weights) and append to the run's curve.jsonl.

    python -m teacher.curve runs/teacher --n 200

Used to record the training curve in docs/results.md while the run goes on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flash.checkpoint import load_checkpoint
from flash.eval.run import Row, evaluate_rows
from teacher.config import TeacherConfig
from teacher.train import TeacherState


def checkpoint_components(run: Path):
    from diffusers import AutoencoderKL

    cfg = TeacherConfig.load(run / "config.json")
    vae_dir = Path(cfg.init_from) / "vae" if cfg.init_from else run / "vae"  # as train_teacher picks it
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32)
    state = TeacherState(cfg, vae)
    step, _ = load_checkpoint(run / "ckpt-unet", state.modules(), {"opt": state.opt})
    return step, state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(1)
    step, state = checkpoint_components(a.run)
    row = Row(f"teacher@{step}", "teacher", a.steps, "dpmsolver++", 5.0)
    r = evaluate_rows(a.run, [row], n=a.n, components=state.components(ema=True), progress=False)[0]
    line = {"step": step, "n": a.n, **r.metrics}
    with open(a.run / "curve.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
