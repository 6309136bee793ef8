"""Generate images for the fixed evaluation prompts with a teacher or a student and score them.

A *row* is one line of the paper's Table 1 in miniature: the teacher with a solver and
step count, or a student (optionally with noise correction switched off, for Fig. 12).
Every row sees the same x_T for the same prompt (on the test split, seed = prompt index).

Two splits of the grammar: `test` (the fixed prompts every reported figure and target
uses) and `validation` (other prompts, other x_T) for choices such as which checkpoint
to ship or whether to keep noise correction, so the test prompts do not pick them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flash.data import shapes
from flash.eval.evaluate import evaluate
from flash.models import Components, load_components, load_student
from flash.pipeline import TextToImage

# split -> (prompt seed of shapes.eval_prompts, x_T seed of the first prompt)
SPLITS = {"test": (1234, 0), "validation": (4321, 1_000_000)}


def split_prompts(split: str, n: int, skip: int = 0) -> tuple[list[str], list[int]]:
    """The split's prompts `skip` .. `skip + n` and their x_T seeds: `skip` > 0 scores prompts that
    no choice made on the first ones has seen."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    prompt_seed, first = SPLITS[split]
    return shapes.eval_prompts(skip + n, seed=prompt_seed)[skip:], list(range(first + skip, first + skip + n))


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "teacher" or "student"
    steps: int
    scheduler: str = "dpmsolver++"  # teacher rows
    guidance_scale: float = 5.0  # teacher rows
    student_dir: str = ""  # student rows
    noise_correction: bool | None = None  # None: the student's own setting
    ablation: bool = False  # an extra student (Table 3), reported in its own table


@dataclass
class RowResult:
    row: Row
    metrics: dict
    seconds_per_image: float
    images: np.ndarray = field(repr=False)


def generate(pipe: TextToImage, row: Row, prompts: list[str], seeds: list[int], student=None) -> np.ndarray:
    if row.kind == "teacher":
        lat = pipe.teacher_latents(prompts, seeds, row.steps, row.guidance_scale, row.scheduler)
    else:
        nc = student.card.noise_correction if row.noise_correction is None else row.noise_correction
        lat = pipe.student_latents(student.unet, prompts, seeds, student.card.timesteps, nc, student.card.prediction_type)
    return pipe.decode(lat)


def default_rows(family: Path, guidance_scale: float = 5.0, noise_correction_off: bool = False) -> list[Row]:
    """Teacher at 25 DPM-Solver++ steps and at 3 DDIM steps, then every student of the family
    (and each student again without noise correction, for the paper's Fig. 12)."""
    rows = [
        Row("teacher, 25 DPM-Solver++ steps, CFG", "teacher", 25, "dpmsolver++", guidance_scale),
        Row("teacher, 3 DDIM steps, CFG", "teacher", 3, "ddim", guidance_scale),
    ]
    students = Path(family) / "students"
    if students.is_dir():
        for d in sorted(students.iterdir(), key=lambda p: p.name, reverse=True):
            if (d / "flash.json").is_file():
                rows.append(Row(f"Imagine Flash, {d.name}", "student", 0, student_dir=str(d)))
                if noise_correction_off:
                    rows.append(Row(f"Imagine Flash, {d.name}, no noise correction", "student", 0,
                                    student_dir=str(d), noise_correction=False))
    return rows


def evaluate_rows(
    teacher_dir: Path, rows: list[Row], n: int = 500, batch: int = 50, components: Components | None = None,
    progress: bool = True, split: str = "test", decoder: str = "full", skip: int = 0,
) -> list[RowResult]:
    components = components or load_components(Path(teacher_dir), decoder=decoder)
    pipe = TextToImage(components)
    prompts, seeds = split_prompts(split, n, skip)
    results = []
    for row in rows:
        student = load_student(Path(row.student_dir)) if row.kind == "student" else None
        make_images = partial(generate, pipe, row, student=student)
        imgs, seconds = generate_in_batches(make_images, prompts, seeds, batch, row.name, progress)
        steps = student.card.steps if student else row.steps
        results.append(RowResult(Row(**{**row.__dict__, "steps": steps}), evaluate(imgs, prompts), seconds, imgs))
    return results


def generate_in_batches(
    make_images: Callable[[list[str], list[int]], np.ndarray], prompts: list[str], seeds: list[int], batch: int = 50,
    desc: str = "", progress: bool = False,
) -> tuple[np.ndarray, float]:
    """Every prompt's image from `make_images(prompts, seeds)`, called batch by batch in
    inference mode, and the generation time per image in seconds."""
    from tqdm import tqdm

    images, elapsed = [], 0.0
    for k in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress, leave=False):
        ps = prompts[k : k + batch]
        t0 = time.perf_counter()
        with torch.inference_mode():
            images.append(make_images(ps, seeds[k : k + len(ps)]))
        elapsed += time.perf_counter() - t0
    return np.concatenate(images), elapsed / len(prompts)


def extra_student_rows(specs: list[str]) -> list[Row]:
    """`NAME=DIR` or `DIR` (named after the folder, or its parent for a run's `student/`) per extra student."""
    rows = []
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(folder)
        name = name or (path.parent.name if path.name == "student" else path.name)
        rows.append(Row(name, "student", 0, student_dir=folder, ablation=True))
    return rows


def card_figures(results: list[RowResult], command: str) -> dict:
    """The family card's `eval`: the shipped rows (teacher and its own students, noise
    correction as trained), each row's metrics and seconds per image, and the command."""
    rows = {
        r.row.name: {**r.metrics, "seconds_per_image": r.seconds_per_image}
        for r in results
        if not r.row.ablation and r.row.noise_correction is None
    }
    return {**rows, "command": command}


def results_table(results: list[RowResult]) -> str:
    """Markdown table of the paper's Table 1 columns."""
    head = "| model | steps | FD-rand | color | shape | size | spatial | overall | vividness | ms / image |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        a = r.metrics["alignment"]
        lines.append(
            f"| {r.row.name} | {r.row.steps} | {r.metrics['fid']:.1f} | {a['color']:.1f} | {a['shape']:.1f} | "
            f"{a['size']:.1f} | {a['spatial']:.1f} | {a['overall']:.1f} | {r.metrics['vividness']:.3f} | "
            f"{1000 * r.seconds_per_image:.1f} |"
        )
    return "\n".join(lines)
