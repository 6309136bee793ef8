"""Small image helpers shared by training, evaluation and the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def to_pil(array: np.ndarray, scale: int = 1):
    from PIL import Image

    img = Image.fromarray(array)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def save_png(array: np.ndarray, path: str | Path, scale: int = 2) -> None:
    """uint8 [H, W, 3] -> PNG, upscaled with nearest neighbour for viewing."""
    to_pil(array, scale).save(path)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    to_pil(array).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: np.ndarray, cols: int, pad: int = 2, value: int = 255) -> np.ndarray:
    """[N, H, W, 3] -> one uint8 grid image with `cols` columns and a white gutter."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return out
