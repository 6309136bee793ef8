"""The torch backend's precision and torch.compile options, and the batch buckets they rely on.

On CPU, torch.compile is replaced by a recorder: what is checked here is the wiring (which
shapes the compiled U-Nets see, and that warm-up meets every one of them). The real
compile, in fp16 with CUDA graphs, runs in tests/test_gpu_torch.py.
"""

import httpx
import pytest
import torch
from pydantic import ValidationError

from flash.models import load_family
from flash.tiny import write_tiny_family
from service import backends
from service.backends import batch_buckets, padded_to_buckets, torch_backends, torch_dtype
from service.config import Settings
from service.testing import serve_in_thread


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("torch_backend") / "tiny")


def test_batch_buckets_are_powers_of_two_up_to_the_largest():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_padding_to_a_bucket_leaves_every_item_unchanged(family):
    unet = load_family(family).students[3].unet
    seen = []

    def denoise(x, t, cond):
        seen.append(x.shape[0])
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 12, 32, generator=g)
    t = torch.tensor([999, 750, 500])
    with torch.no_grad():
        want = denoise(x, t, cond)
        got = padded_to_buckets(denoise, [1, 2, 4])(x, t, cond)
        big = padded_to_buckets(denoise, [1, 2])(x, t, cond)  # above the largest bucket: as is
    assert seen == [3, 4, 3]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(big, want)


def test_dtype_setting():
    assert torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert torch_dtype("auto", torch.device("cuda")) == torch.float16
    assert torch_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for field, value in [("torch_dtype", "int8"), ("torch_compile", "fast")]:
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})


def test_bfloat16_weights_and_float32_at_the_boundary(family):
    b = torch_backends(load_family(family), Settings(model_dir=family, torch_dtype="bfloat16"))
    cond = b.students[3].encode(["a red circle"])
    out = b.students[3].denoise(torch.randn(1, 4, 8, 8), torch.tensor([999]), cond)
    assert cond.dtype == out.dtype == torch.float32 and out.shape == (1, 4, 8, 8)
    assert b.warm_batches == []  # nothing compiled, nothing extra to warm


def test_compiled_unets_meet_only_bucket_shapes_all_during_warm_up(family, monkeypatch):
    seen: list[tuple[int, str]] = []

    def fake_compile(module, mode, dynamic):
        assert mode == "reduce-overhead" and dynamic is False

        def call(x, t, encoder_hidden_states, return_dict):
            seen.append((x.shape[0], type(module).__name__))
            return module(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)

        return call

    monkeypatch.setattr(backends.torch, "compile", fake_compile)
    settings = Settings(model_dir=family, max_batch_size=4, max_wait_ms=50, torch_compile="reduce-overhead",
                        log_level="warning")  # fmt: skip
    with serve_in_thread(settings) as (url, srv):
        engine = srv.config.app.state.engine
        assert engine.models.warm_batches == [1, 2, 4, 8]
        warm = {n for n, _ in seen}
        assert warm == {1, 2, 4, 8}  # every bucket compiled before the server said ready
        seen.clear()
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "n": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"]) == 3
        r = httpx.post(f"{url}/v1/images/generations",
                       json={"prompt": "a red circle", "model": "teacher", "steps": 2, "n": 3}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
    assert seen and {n for n, _ in seen} <= {1, 2, 4, 8}  # 3 images -> bucket 4; guided 6 -> 8
    assert {n for n, _ in seen} >= {4, 8}
