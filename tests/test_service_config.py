"""Settings from FLASH_* variables, validated when built; the backend registry; `serve` entry."""

import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.backends import BACKENDS, BackendError, make_backend, torch_device
from service.config import Settings
from service.server import parse_args, serve


def test_settings_come_from_flash_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("FLASH_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("FLASH_API_KEYS", "key-a, key-b")
    monkeypatch.setenv("FLASH_ADMIN_TOKEN", "s3cr3t-admin")
    monkeypatch.setenv("FLASH_WARMUP", "false")
    s = Settings()
    assert (s.model_dir, s.max_batch_size, s.max_wait_ms, s.warmup) == (tmp_path, 3, 7.5, False)
    assert [k.get_secret_value() for k in s.api_keys] == ["key-a", "key-b"]
    assert s.admin_token.get_secret_value() == "s3cr3t-admin" and "s3cr3t" not in repr(s)
    monkeypatch.setenv("FLASH_API_KEYS", '["k1", "k2"]')
    assert [k.get_secret_value() for k in Settings().api_keys] == ["k1", "k2"]


def test_defaults_serve_the_shipped_family_on_localhost(monkeypatch):
    for name in [k for k in os.environ if k.startswith("FLASH_")]:
        monkeypatch.delenv(name)
    s = Settings()
    assert s.model_dir == Path("models/shapes64") and s.host == "127.0.0.1" and s.port == 8000
    assert s.backend == "auto" and s.device == "cpu" and s.api_keys == [] and s.admin_token is None
    assert all(f.description for f in Settings.model_fields.values())  # every variable is documented


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("device", "tpu", "allowed: cpu, cuda, cuda:N, mps"),
        ("backend", "openvino", "allowed: auto, onnxruntime, tensorrt, torch"),
        ("log_level", "loud", "allowed: critical"),
        ("max_batch_size", 0, "greater than or equal to 1"),
        ("queue_size", 0, "greater than or equal to 1"),
        ("request_timeout_s", 0, "greater than 0"),
        ("port", 70000, "less than or equal to 65535"),
        ("max_batch_sise", 4, "Extra inputs"),
    ],
)
def test_bad_settings_name_the_allowed_values(field, value, match):
    with pytest.raises(ValidationError, match=match):
        Settings(**{field: value})


def test_backend_registry_names_what_is_available(monkeypatch):
    with pytest.raises(BackendError, match="unknown backend 'openvino'; available: auto, onnxruntime, tensorrt, torch"):
        make_backend("openvino", None, Settings())
    monkeypatch.setitem(BACKENDS, "fake", lambda family, settings: ("built", family))
    assert Settings(backend="fake").backend == "fake"  # a registered backend becomes a valid setting
    assert make_backend("fake", "fam", Settings()) == ("built", "fam")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_a_clear_error():
    with pytest.raises(BackendError, match="no CUDA device; use device=cpu"):
        torch_device("cuda:0")


def test_serve_refuses_a_missing_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="model folder .*missing not found"):
        serve(Settings(model_dir=tmp_path / "missing"))


def test_command_line_overrides_only_what_is_given():
    assert parse_args(["--model", "m", "--port", "9000"]) == {"model_dir": "m", "port": 9000}
    assert parse_args([]) == {}
