"""Every config under configs/ loads with its stage's typed config (unknown keys and bad values
raise), so a config kept for a later GPU session cannot rot unnoticed."""

from pathlib import Path

import pytest

from distill.config import DistillConfig
from distill.decoder import DecoderConfig
from teacher.config import TeacherConfig

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.json"))


def stage_config(path: Path):
    if path.name.startswith("teacher-"):
        return TeacherConfig
    return DecoderConfig if "decoder" in path.name else DistillConfig


def test_there_are_configs():
    assert len(CONFIGS) > 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_loads(path):
    cfg = stage_config(path).load(path)
    assert cfg.out.startswith("runs/")  # training output goes to the ignored runs/ folder
