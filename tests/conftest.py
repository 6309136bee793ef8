import os

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
