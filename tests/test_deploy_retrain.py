"""deploy/retrain.sh end to end on a tiny 64x64 family (the evaluator needs 64x64 images):
publish a first version, distil a student and publish it past the quality gate, and refuse
a deliberately worse model with exit 3 and a message naming the figure that dropped."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deploy import store
from flash.tiny import write_tiny_family

ROOT = Path(__file__).resolve().parents[1]
N = 4  # evaluation prompts: enough for the pipeline, not for a verdict on quality
# lr 0: the distilled student stays the teacher's U-Net, so its figures equal the first version's
TINY_DISTILL = {
    "steps": 3, "batch_size": 2, "teacher_steps": 1, "max_steps": 1, "lr": 0.0, "adv_weight": 0.0,
    "checkpoint_every": 1000, "sample_every": 1000, "log_every": 1, "eval_prompts": 0,
}  # fmt: skip


def retrain(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "FLASH_STORE": str(tmp / "store"),
           "FLASH_FAMILY": "tiny"}  # fmt: skip
    cmd = [
        "bash",
        str(ROOT / "deploy" / "retrain.sh"),
        "--n",
        str(N),
        "--batch",
        str(N),
        "--work",
        str(tmp / "work"),
        *args,
    ]
    return subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    write_tiny_family(tmp / "fam", image_size=64)
    (tmp / "tiny.json").write_text(json.dumps(TINY_DISTILL))
    return tmp


def test_first_version_is_published_with_its_figures(tmp):
    r = retrain(tmp, "--teacher", str(tmp / "fam"), "--version", "v1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no current figures" in r.stdout and "[6/6] publishing tiny/v1" in r.stdout
    card = store.read_card(tmp / "store" / "tiny" / "v1")
    assert card["version"] == "v1" and card["eval"]["n"] == N
    assert {"Imagine Flash, 3-step", "teacher, 25 DPM-Solver++ steps, CFG"} <= set(card["eval"]["rows"])
    assert "overall" in card["eval"]["rows"]["Imagine Flash, 3-step"]["alignment"]


def test_distilled_student_passes_the_gate_and_is_published(tmp):
    if "v1" not in store.versions(tmp / "store", "tiny"):
        assert retrain(tmp, "--teacher", str(tmp / "fam"), "--version", "v1").returncode == 0
    store.set_current(tmp / "store", "tiny", "v1")
    r = retrain(tmp, "--config", str(tmp / "tiny.json"), "--version", "v2")  # teacher: the current version
    assert r.returncode == 0, r.stdout + r.stderr
    assert "distilled" in r.stdout and "recorded figures (n=4)" in r.stdout and "passed" in r.stdout
    student = json.loads((tmp / "store/tiny/v2/students/3-step/flash.json").read_text())
    assert student["version"] == "v2" and student["distill"]["trained_steps"] == 1
    assert store.read_card(tmp / "store/tiny/v2")["eval"]["rows"]


def test_gate_refuses_a_deliberately_worse_model(tmp):
    s = tmp / "store"
    if "v1" not in store.versions(s, "tiny"):
        assert retrain(tmp, "--teacher", str(tmp / "fam"), "--version", "v1").returncode == 0
    # A random tiny family has no quality to lose, so the current version is given the figures of
    # a good model: its recorded 3-step row says 90% overall alignment (same n, so the gate uses it).
    if "good" not in store.versions(s, "tiny"):
        src = tmp / "good"
        shutil.copytree(s / "tiny" / "v1", src)
        card = store.read_card(src)
        card["eval"]["rows"]["Imagine Flash, 3-step"]["alignment"]["overall"] = 90.0
        store.write_json(src / "flash.json", card)
        store.publish(s, "tiny", src, "good")
    store.set_current(s, "tiny", "good")
    # the candidate: the current family with its 3-step student's weights zeroed
    bad = tmp / "zeroed-3step"
    if not bad.exists():
        shutil.copytree(s / "tiny" / "good" / "students" / "3-step", bad)
        f = bad / "diffusion_pytorch_model.safetensors"
        save_file({k: torch.zeros_like(v) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    r = retrain(tmp, "--student", str(bad), "--version", "worse")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "REFUSED by the quality gate" in r.stderr
    assert "Imagine Flash, 3-step: alignment.overall fell from 90" in r.stderr
    assert "worse" not in store.versions(s, "tiny") and store.current(s, "tiny") == "good"
    assert not [p for p in (s / "tiny").iterdir() if p.name.startswith(".")]  # staging removed


def test_a_student_init_inside_the_teacher_follows_the_staged_family(tmp_path, monkeypatch):
    """configs/shapes64-2step.json starts from models/shapes64/students/3-step: when retraining,
    that must be the 3-step student just made for the new version, not the old one."""
    import distill.trainer
    import flash.models
    from deploy import retrain as rt

    seen = {}
    monkeypatch.setattr(distill.trainer, "distill", lambda cfg: seen.setdefault("cfg", cfg) and tmp_path)
    monkeypatch.setattr(flash.models, "publish_student", lambda folder, family: folder)
    config = tmp_path / "c.json"
    for init, want in [("models/shapes64/students/3-step", str(tmp_path / "staging" / "students" / "3-step")),
                       ("elsewhere/3-step", "elsewhere/3-step")]:  # fmt: skip
        config.write_text(json.dumps({"teacher": "models/shapes64", "steps": 2, "student_init": init}))
        seen.clear()
        rt.distill_into(config, tmp_path / "staging", tmp_path / "work")
        assert seen["cfg"].student_init == want and seen["cfg"].teacher == str(tmp_path / "staging")


TINY_DECODER = {  # write_tiny_decoder's architecture, a pool and a run small enough for a test
    "channels": 8, "blocks": [1, 1, 0], "encoder_channels": 8, "encoder_blocks": [1, 1, 1], "latent_scale": 2.0,
    "pool_renders": 8, "pool_students": 8, "holdout": 4, "batch_size": 4, "steps": 3, "checkpoint_every": 1000,
}  # fmt: skip


def test_new_students_get_the_fast_decoder_re_fitted_on_their_latents(tmp_path):
    """The service serves a family's vae_tiny/ by default, so a version whose students changed
    re-fits it (from the current one) rather than carrying one fitted on other students."""
    from flash.tiny import write_tiny_decoder

    fam = write_tiny_family(tmp_path / "fam", image_size=64)
    write_tiny_decoder(fam)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_DISTILL))
    (tmp_path / "decoder.json").write_text(json.dumps(TINY_DECODER))
    weights = "vae_tiny/diffusion_pytorch_model.safetensors"
    before = load_file(fam / weights)

    def same(version: str) -> bool:
        after = load_file(tmp_path / "store" / "tiny" / version / weights)
        return all(torch.equal(before[k], after[k]) for k in before)

    r = retrain(tmp_path, "--teacher", str(fam), "--version", "v1")  # students unchanged: decoder too
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-fitting" not in r.stdout and same("v1")
    rows = store.read_card(tmp_path / "store/tiny/v1")["eval"]["rows"]  # what the service serves is gated too
    assert {"Imagine Flash, 3-step", "Imagine Flash, 3-step, fast decoder"} <= set(rows)
    assert "teacher, 25 DPM-Solver++ steps, CFG, fast decoder" not in rows  # students only
    store.set_current(tmp_path / "store", "tiny", "v1")
    r = retrain(tmp_path, "--config", str(tmp_path / "tiny.json"), "--decoder-config", str(tmp_path / "decoder.json"),
                "--version", "v2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-fitting the fast decoder" in r.stdout and "held-out PSNR" in r.stdout
    assert not same("v2")
    report = json.loads((tmp_path / "store/tiny/v2/vae_tiny/train.json").read_text())
    assert report["steps"] == 3 and report["init"].endswith("vae_tiny")  # started from the staged one
    r = retrain(tmp_path, "--config", str(tmp_path / "tiny.json"), "--no-refit-decoder", "--version", "v3",
                "--work", str(tmp_path / "work3"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept as it is" in r.stdout and same("v3")

    # The gate judges the fast-decoder rows: a current version (v1) whose recorded fast-decoder row
    # is a good model's refuses a candidate that falls below it, naming that row.
    card = store.read_card(tmp_path / "store/tiny/v1")
    card["eval"]["rows"]["Imagine Flash, 3-step, fast decoder"]["alignment"]["overall"] = 90.0
    store.write_json(tmp_path / "store/tiny/v1/flash.json", card)
    r = retrain(tmp_path, "--student", str(tmp_path / "store/tiny/v3/students/3-step"), "--no-refit-decoder",
                "--version", "v4", "--work", str(tmp_path / "work4"))  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Imagine Flash, 3-step, fast decoder: alignment.overall fell from 90" in r.stderr
