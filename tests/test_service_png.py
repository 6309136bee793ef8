"""The service's PNG writer (service/png.py)."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from service.png import encode_png

RNG = np.random.default_rng(0)
SMOOTH = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)  # wide, not square


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_pillow_reads_back_the_exact_pixels(level, channels):
    shape = (37, 53) if channels is None else (37, 53, channels)
    image = RNG.integers(0, 256, shape, dtype=np.uint8)  # every byte difference, so the filter must wrap
    back = decode(encode_png(image, level))
    np.testing.assert_array_equal(back, image if channels != 1 else image[..., 0])


def test_strided_views_are_written_as_their_pixels():
    batch = RNG.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for view in (batch[2], batch[1, :, ::-1], batch[0].transpose(1, 0, 2)):
        np.testing.assert_array_equal(decode(encode_png(view)), view)


def test_level_zero_stores_and_deflate_shrinks_smooth_images():
    h, w, c = SMOOTH.shape
    stored, deflated = encode_png(SMOOTH, 0), encode_png(SMOOTH, 1)
    rows = h * (1 + w * c)
    assert rows < len(stored) < rows + 200  # the pixels, a filter byte per row, headers
    assert len(deflated) < rows / 4  # the "up" filter turns the gradient into runs
    idat = stored[stored.index(b"IDAT") + 4 :]
    assert zlib.decompress(idat[: idat.index(b"IEND") - 8])[0] == 0  # rows unfiltered at level 0


@pytest.mark.parametrize(
    "image, level, message",
    [
        (np.zeros((8, 8, 3), np.float32), 1, "uint8"),
        (np.zeros((8, 8, 2), np.uint8), 1, "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), 1, "shape"),
        (np.zeros((0, 8, 3), np.uint8), 1, "shape"),
        (np.zeros((8, 8, 3), np.uint8), 10, "0-9"),
    ],
)
def test_bad_input_is_named(image, level, message):
    with pytest.raises(ValueError, match=message):
        encode_png(image, level)


def test_png_bench_times_both_writers_on_the_students_images(load_bench):
    """bench/png_encode.py: a row per level and writer, both writers' files decode to the same pixels."""
    bench = load_bench("png_encode")
    rows = bench.main(["--tiny", "--images", "2", "--calls", "3", "--levels", "0", "1"])
    assert [(r["level"], r["writer"]) for r in rows] == [
        (0, "service/png.py"),
        (0, "Pillow"),
        (1, "service/png.py"),
        (1, "Pillow"),
    ]
    assert all(r["us"] > 0 and r["bytes"] > 0 for r in rows)
    image = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for write in bench.WRITERS.values():
        np.testing.assert_array_equal(decode(write(image, 1)), image)
