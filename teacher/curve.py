"""Evaluate the latest teacher checkpoint (EMA weights) and append to the run's curve.jsonl.

    python -m teacher.curve runs/teacher --n 200 [--split validation] [--export FOLDER]

Used to record the training curve in docs/results.md while the run goes on; `--export` also
writes the checkpoint as a diffusers teacher folder (as `flash train-teacher --export` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flash.checkpoint import load_checkpoint
from flash.eval.run import Row, evaluate_rows
from teacher.config import TeacherConfig
from teacher.train import TeacherState, export_teacher


def checkpoint_components(run: Path):
    from diffusers import AutoencoderKL

    cfg = TeacherConfig.load(run / "config.json")
    vae_dir = Path(cfg.init_from) / "vae" if cfg.init_from else run / "vae"  # as train_teacher picks it
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32)
    state = TeacherState(cfg, vae)
    step, _ = load_checkpoint(run / "ckpt-unet", state.modules(), {"opt": state.opt})
    return step, state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--export", type=Path, default=None, help="also write the checkpoint as a teacher folder here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    step, state = checkpoint_components(a.run)
    cfg = TeacherConfig.load(a.run / "config.json")
    if a.export is not None:
        export_teacher(state, a.export, cfg, unet_steps=step, run=str(a.run))
    row = Row(f"teacher@{step}", "teacher", a.steps, "dpmsolver++", cfg.guidance_scale)
    r = evaluate_rows(a.run, [row], n=a.n, components=state.components(ema=True), progress=False, split=a.split)[0]
    line = {"step": step, "n": a.n, "split": a.split, **r.metrics}
    with open(a.run / "curve.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
