"""Prompt (and optional real-image) streams for distillation.

- "shapes": the shapes-64 grammar; every prompt comes with its rendered image, so the
  adversarial loss and forward-distillation ablation have real data for free.
- "file": one prompt per line; data-free unless `real_images` names a folder of
  image files with same-name .txt captions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flash.data import shapes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

Batch = tuple[list[str], np.ndarray | None]  # prompts, uint8 images [B, H, W, 3] or None


def shapes_stream(seed: int, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """Shapes-64 prompts with their rendered images; `workers` > 0 renders them in that many
    processes beside the training step (worker 0 draws the same stream as `workers` = 0)."""
    if workers == 0:
        for images, prompts in shapes.batches(seed, batch_size):
            yield prompts, images
    else:
        for images, prompts in shapes.worker_batches(seed, batch_size, workers=workers):
            yield prompts, images.numpy()


def prompt_file_stream(path: str | Path, seed: int, batch_size: int) -> Iterator[Batch]:
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    rng = np.random.default_rng(seed)
    while True:
        yield [prompts[i] for i in rng.integers(0, len(prompts), batch_size)], None


def image_folder_stream(path: str | Path, seed: int, batch_size: int, size: int) -> Iterator[Batch]:
    from PIL import Image

    pairs = [
        (p, p.with_suffix(".txt")) for p in sorted(Path(path).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()
    ]
    if not pairs:
        raise ValueError(f"no image + .txt caption pairs in {path}")
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(pairs), batch_size)
        imgs = [np.asarray(Image.open(pairs[i][0]).convert("RGB").resize((size, size), Image.BICUBIC)) for i in idx]
        yield [pairs[i][1].read_text().strip() for i in idx], np.stack(imgs)


def make_stream(cfg, image_size: int, seed: int) -> Iterator[Batch]:
    if cfg.prompts == "shapes":
        return shapes_stream(seed, cfg.batch_size, cfg.data_workers)
    if cfg.real_images:
        return image_folder_stream(cfg.real_images, seed, cfg.batch_size, image_size)
    return prompt_file_stream(cfg.prompts_file, seed, cfg.batch_size)
