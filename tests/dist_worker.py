"""Run by tests/test_distill.py under `accelerate launch` (2 CPU processes, gloo):
a few distillation steps, then each rank writes a hash of the student weights it holds."""

import hashlib
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from distill.config import DistillConfig
from distill.data import make_stream
from distill.trainer import build_models, distill_step

family, out = sys.argv[1], Path(sys.argv[2])
cfg = DistillConfig(teacher=family, out=str(out), steps=2, batch_size=2, teacher_steps=2, lr=1e-3)
acc = Accelerator(cpu=True)
set_seed(cfg.seed)
m = build_models(cfg, acc)
rank = acc.process_index
stream = make_stream(cfg, m.pipe.image_size, seed=100 + rank)  # different data on each rank
gen = torch.Generator().manual_seed(rank)
before = [p.detach().clone() for p in acc.unwrap_model(m.student).parameters()]
for _ in range(2):
    prompts, images = next(stream)
    distill_step(m, prompts, images, cfg, gen, acc)
student = acc.unwrap_model(m.student)
changed = any(not torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True))
h = hashlib.sha256()
for p in list(student.parameters()) + list(acc.unwrap_model(m.disc).heads.parameters()):
    h.update(p.detach().numpy().tobytes())
(out / f"rank{rank}.txt").write_text(f"{acc.num_processes} {torch.distributed.get_backend()} {changed} {h.hexdigest()}")
