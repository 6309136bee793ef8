"""One call that evaluates a batch of generated shapes-64 images: alignment, FD-rand, vividness, background."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flash.data.shapes import eval_scenes, render
from flash.eval.judge import CATEGORIES, score
from flash.eval.quality import background_cleanliness, frechet_distance, vividness

# Seed of the default FD reference set: different from eval_prompts' default seed (1234), so
# ground truth for the eval prompts scores the finite-sample floor rather than exactly 0.
REFERENCE_SEED = 4321


def reference_images(n: int, seed: int = REFERENCE_SEED) -> np.ndarray:
    """uint8 [n, 64, 64, 3]: rendered ground truth of n eval scenes (the default FD reference)."""
    return np.stack([render(scene) for scene in eval_scenes(n, seed=seed)])


def evaluate(images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None = None) -> dict:
    """Alignment percentages, FD-rand vs `reference`, vividness and background cleanliness of a batch."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (64, 64, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, 64, 64, 3] images, got {images.dtype} {images.shape}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if reference is None:
        reference = reference_images(len(images))
    alignment = score(images, prompts)
    return {
        "alignment": {cat: alignment[cat] for cat in CATEGORIES},
        "fid": frechet_distance(images, np.asarray(reference)),
        "vividness": vividness(images, prompts),
        "background": background_cleanliness(images),
        "n": len(images),
    }
