import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """Tiny random components shared by the session (read-only use)."""
    from flash.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A stock-loadable tiny diffusers folder on disk."""
    from flash.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def load_bench():
    """A script of bench/ (a folder of scripts, not a package) as a module, loaded once per name."""

    def load(name: str):
        key = f"flash_bench_{name}"
        if key not in sys.modules:
            path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(key, path)
            module = sys.modules[key] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
            spec.loader.exec_module(module)
        return sys.modules[key]

    return load
