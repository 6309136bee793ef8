"""PNG for the answers: 8-bit images, one IDAT, each row "up"-filtered, then deflated.

Pillow writes the same kind of file for ~5x the CPU on the service's images (its encoder picks a
filter per row, goes through its tile machinery and deflates with zlib): 412 against 79 us for
a 64 px student image at level 1 (`bench/png_encode.py`, docs/benchmarks.md). That CPU is taken on the event loop, from
the cores the device thread computes on, so the service writes its PNGs here. Levels 1-3 deflate
with ISA-L (`isal`, ~3x faster than zlib's level 1 and a little smaller), level 0 stores, 4-9 use zlib.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
NONE, UP = 0, 2  # PNG row filters


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array as PNG bytes.

    Level 0 stores the rows unfiltered (least CPU, the pixels plus ~60 bytes of headers); levels
    1-9 deflate them after the "up" filter (each byte minus the one above it), which suits the
    smooth areas generated images have; files are ~5% larger than Pillow's at level 1."""
    if image.dtype != np.uint8:
        raise ValueError(f"PNG rows are uint8 here; got {image.dtype}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0-9; got {compress_level}")
    pixels = image[..., None] if image.ndim == 2 else image
    if pixels.ndim != 3 or pixels.shape[2] not in COLOR_TYPE or 0 in pixels.shape:
        raise ValueError(f"expected (H, W) or (H, W, 1 | 3 | 4) pixels; got shape {image.shape}")
    height, width, channels = pixels.shape
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), np.uint8)
    if compress_level == 0:
        rows[:, 0], rows[:, 1:] = NONE, flat
    else:
        rows[0, 0], rows[0, 1:] = NONE, flat[0]  # the first row has nothing above it
        rows[1:, 0] = UP
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # wraps modulo 256, as PNG's filter does
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPE[channels], 0, 0, 0)
    data = deflate(rows.tobytes(), compress_level)
    return SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def deflate(data: bytes, level: int) -> bytes:
    """A zlib stream: ISA-L's deflate at levels 1-3 (its range), zlib's at 0 (stored) and 4-9."""
    return isal_zlib.compress(data, level) if 1 <= level <= 3 else zlib.compress(data, level)


def chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
