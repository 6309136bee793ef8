"""The service's PNG writer (service/png.py) and its one-task disconnect watch (routes.until_disconnect)."""

import asyncio
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from service import errors
from service.png import encode_png
from service.routes import until_disconnect

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


class FakeRequest:
    """`receive()` reports a disconnect once `hang_up` is set."""

    def __init__(self):
        self.hang_up = asyncio.Event()

    async def receive(self):
        await self.hang_up.wait()
        return {"type": "http.disconnect"}


def test_the_result_comes_back_and_a_later_hang_up_cancels_nothing():
    async def main():
        request = FakeRequest()
        result = await until_disconnect(request, asyncio.sleep(0.01, result="done"))
        request.hang_up.set()  # after the answer: must not cancel this task
        await asyncio.sleep(0.02)
        return result, asyncio.current_task().cancelling()

    assert asyncio.run(main()) == ("done", 0)


def test_a_hang_up_cancels_the_work_and_raises_client_gone():
    async def main():
        request, cancelled = FakeRequest(), asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        asyncio.get_running_loop().call_later(0.01, request.hang_up.set)
        with pytest.raises(errors.ClientGone):
            await until_disconnect(request, work())
        assert cancelled.is_set()
        assert asyncio.current_task().cancelling() == 0  # our own cancel is taken back
        await asyncio.sleep(0.01)  # and the task goes on without a stray cancellation

    asyncio.run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel():
    async def main():
        task = asyncio.ensure_future(until_disconnect(FakeRequest(), asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        task.cancel()  # e.g. the server shutting down: not a client that left
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
