"""Weight averaging of students fine-tuned from one start ("model soups", Wortsman et al., 2022).

Not part of Imagine Flash. Runs that continue the same student with different settings end in
nearby weights, and their average can beat every one of them (docs/results.md, "Version
2026-11-27.6"). `soup` averages the U-Nets parameter by parameter in fp32 and writes an
ordinary student folder; its card is the first ingredient's, with the ingredients listed under
`distill.soup` and no `eval` (the average has not been scored).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flash.models import ModelError, StudentCard, load_student, save_student

# what every ingredient's card must agree on: a soup of different samplers means nothing
SAME = ("steps", "timesteps", "noise_correction", "prediction_type", "teacher_sha256")


def check_compatible(cards: list[StudentCard], names: list[str]) -> None:
    for field in SAME:
        values = {repr(getattr(c, field)) for c in cards}
        if len(values) > 1:
            detail = ", ".join(f"{n}: {getattr(c, field)!r}" for n, c in zip(names, cards, strict=True))
            raise ModelError(f"students differ in {field} ({detail}); only students of one sampler and teacher average")


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i, in fp32; the states must hold the same names and shapes."""
    names = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != names:
            raise ModelError(f"ingredient {i} has other parameters than ingredient 0 ({len(set(s) ^ names)} differ)")
    out = {}
    for name in states[0]:
        shapes = {tuple(s[name].shape) for s in states}
        if len(shapes) > 1:
            raise ModelError(f"parameter {name} has different shapes across ingredients: {sorted(shapes)}")
        out[name] = sum(w * s[name].float() for w, s in zip(weights, states, strict=True))
    return out


def soup(students: list[Path], out: Path, weights: list[float] | None = None) -> Path:
    """Average `students` (uniformly, or by `weights`, which are normalised) into `out`."""
    if len(students) < 2:
        raise ValueError(f"a soup needs at least two students, got {len(students)}")
    weights = [1.0] * len(students) if weights is None else list(weights)
    if len(weights) != len(students) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need one non-negative weight per student ({len(students)}), not all zero; got {weights}")
    total = sum(weights)
    weights = [w / total for w in weights]
    loaded = [load_student(Path(s)) for s in students]  # fp32
    names = [str(s) for s in students]
    check_compatible([s.card for s in loaded], names)
    first = loaded[0]
    first.unet.load_state_dict(average_state_dicts([s.unet.state_dict() for s in loaded], weights))
    ingredients = [
        {"student": n, "weight": round(w, 6), "distill": s.card.distill}
        for n, w, s in zip(names, weights, loaded, strict=True)
    ]
    card = first.card.model_copy(update={"distill": {"soup": ingredients}, "eval": {}})
    schedule = json.loads((Path(students[0]) / "scheduler_config.json").read_text())
    save_student(first.unet, card, Path(out), schedule, dtype=stored_dtype(Path(students[0])))
    return Path(out)


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of a student's saved weights (the soup is saved the same way)."""
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype
