"""The `flash` command line: help with examples, generation, evaluation, one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flash.tiny import write_tiny_family


def flash(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flash.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def family64(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("fam") / "tiny64", image_size=64)


def test_help_lists_commands_with_examples():
    r = flash("--help")
    assert r.returncode == 0
    for cmd in ("generate", "train-teacher", "distill", "eval", "serve"):
        assert cmd in r.stdout
    assert "examples:" in r.stdout
    r = flash("generate", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--steps" in r.stdout


def test_generate_teacher_and_student(family64, tmp_path):
    out = tmp_path / "t.png"
    r = flash("generate", "a red circle above a blue square", "--model", "teacher", "--steps", "3",
              "--seed", "0", "--model-dir", str(family64), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    out2 = tmp_path / "s.png"
    r = flash("generate", "a red circle", "--model", "flash", "--steps", "2", "--n", "3",
              "--model-dir", str(family64), "--out", str(out2))
    assert r.returncode == 0, r.stderr
    assert Image.open(out2).size == (192, 64)


def test_generate_guides_the_teacher_with_the_family_cards_scale(family64, tmp_path):
    import shutil

    from flash.models import CARD

    fam = tmp_path / "fam"
    shutil.copytree(family64, fam)
    card = json.loads((fam / CARD).read_text())
    (fam / CARD).write_text(json.dumps({**card, "guidance_scale": 2.0}))
    images = {}
    for name, extra in [("card", []), ("same", ["--guidance-scale", "2"]), ("other", ["--guidance-scale", "5"])]:
        out = tmp_path / f"{name}.png"
        r = flash("generate", "a red circle", "--model", "teacher", "--steps", "2", "--model-dir", str(fam),
                  "--out", str(out), *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        images[name] = np.asarray(Image.open(out))
    assert np.array_equal(images["card"], images["same"]) and not np.array_equal(images["card"], images["other"])


def test_errors_are_one_line_and_nonzero(tmp_path):
    r = flash("generate", "a red circle", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "error:" in r.stderr and "nope" in r.stderr


def test_missing_student_is_explained(tmp_path):
    fam = write_tiny_family(tmp_path / "fam")
    shutil.rmtree(fam / "students" / "1-step")
    r = flash("generate", "a red circle", "--model", "flash", "--steps", "1", "--model-dir", str(fam),
              "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "no 1-step student" in r.stderr


def test_eval_writes_table_and_json(family64, tmp_path):
    out, report = tmp_path / "r.json", tmp_path / "results.md"
    report.write_text("# Results\n\nprose that must survive\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.jsonl").write_text('{"step": 10, "rec": 0.5}\n{"step": 20, "rec": 0.25}\n')
    r = flash("eval", str(family64), "--n", "8", "--batch", "4", "--rows", "3 DDIM", "3-step", "--json", str(out),
              "--report", str(report), "--runs", f"3-step={run}",
              "--student", f"no SRL={family64 / 'students' / '2-step'}")
    assert r.returncode == 0, r.stderr
    assert "| model | steps | FD-rand |" in r.stdout
    rows = json.loads(out.read_text())
    assert [x["row"]["steps"] for x in rows] == [3, 3, 2]
    assert rows[2]["row"]["name"] == "no SRL" and rows[2]["row"]["ablation"]
    assert set(rows[0]["metrics"]["alignment"]) >= {"color", "shape", "size", "spatial", "overall"}
    text = report.read_text()
    assert "prose that must survive" in text and "| model | steps |" in text and "img/grid.png" in text
    assert text.count("| model | steps |") == 2 and "| no SRL | 2 |" in text  # the ablation table
    for name in ("grid.png", "steps.png", "losses.png"):
        assert (tmp_path / "img" / name).stat().st_size > 1000
    assert Image.open(tmp_path / "img" / "grid.png").size[1] > 2 * 64  # two rows of images


def test_eval_writes_the_shipped_rows_into_the_family_card(family64, tmp_path):
    fam = shutil.copytree(family64, tmp_path / "fam")
    r = flash("eval", str(fam), "--n", "4", "--batch", "4", "--rows", "3-step", "--update-card")
    assert r.returncode == 2 and "leave out --rows" in r.stderr
    r = flash("eval", str(fam), "--n", "4", "--batch", "4", "--noise-correction-off", "--update-card",
              "--student", f"no SRL={fam / 'students' / '2-step'}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    figures = json.loads((fam / "flash.json").read_text())["eval"]
    assert set(figures) == {"teacher, 25 DPM-Solver++ steps, CFG", "teacher, 3 DDIM steps, CFG",
                            "Imagine Flash, 3-step", "Imagine Flash, 2-step", "Imagine Flash, 1-step", "command"}  # fmt: skip
    assert figures["Imagine Flash, 1-step"]["n"] == 4 and figures["Imagine Flash, 1-step"]["seconds_per_image"] > 0
    assert figures["command"].startswith("flash eval ") and "--update-card" in figures["command"]


def test_eval_validation_split_draws_other_prompts_and_noise(family64, tmp_path, monkeypatch):
    from flash.data import shapes
    from flash.eval import run

    test, test_seeds = run.split_prompts("test", 8)
    val, val_seeds = run.split_prompts("validation", 8)
    assert test == shapes.eval_prompts(8) and test_seeds == list(range(8))  # the reported figures' prompts
    assert val != test and not set(val_seeds) & set(test_seeds)
    seen = []
    monkeypatch.setattr(run, "generate", lambda pipe, row, ps, seeds, student=None: (
        seen.append((ps, seeds)) or np.zeros((len(ps), 64, 64, 3), np.uint8)))
    rows = [r for r in run.default_rows(family64) if r.name == "Imagine Flash, 3-step"]
    run.evaluate_rows(family64, rows, n=8, batch=4, progress=False, split="validation")
    assert [p for ps, _ in seen for p in ps] == val and [s for _, ss in seen for s in ss] == val_seeds
    with pytest.raises(ValueError, match="validation"):
        run.split_prompts("train", 4)
    later, later_seeds = run.split_prompts("validation", 4, skip=4)  # prompts no choice on the first 4 saw
    assert later == val[4:] and later_seeds == val_seeds[4:]
    r = flash("eval", str(family64), "--n", "4", "--split", "validation", "--report", str(tmp_path / "r.md"))
    assert r.returncode == 2 and "test split" in r.stderr and not (tmp_path / "r.md").exists()
    r = flash("eval", str(family64), "--n", "4", "--skip", "4", "--report", str(tmp_path / "r.md"))
    assert r.returncode == 2 and "--skip" in r.stderr and not (tmp_path / "r.md").exists()


def test_eval_guidance_scale_defaults_to_the_family_card(family64, tmp_path):
    from flash.models import CARD

    assert json.loads((family64 / CARD).read_text())["guidance_scale"] == 5.0
    guidance = {}
    for extra in ([], ["--guidance-scale", "7.5"]):
        out = tmp_path / f"e{len(extra)}.json"
        r = flash("eval", str(family64), "--n", "2", "--rows", "25 DPM", "--json", str(out), *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        guidance[len(extra)] = [row["row"]["guidance_scale"] for row in json.loads(out.read_text())]
        assert f"classifier-free guidance {guidance[len(extra)][0]:g}" in r.stdout
    assert guidance == {0: [5.0], 2: [7.5]}
    r = flash("eval", str(family64), "--n", "2", "--guidance-scale", "7.5", "--update-card")
    assert r.returncode == 2 and "guidance scale (5)" in r.stderr


def test_distill_publishes_a_student_into_the_family(tmp_path):
    fam = write_tiny_family(tmp_path / "fam", image_size=64)
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps({"steps": 2, "batch_size": 2, "teacher_steps": 1, "max_steps": 1,
                               "eval_prompts": 4, "sample_every": 100, "checkpoint_every": 100}))
    r = flash("distill", "--config", str(cfg), "--teacher", str(fam), "--out", str(tmp_path / "run"),
              "--publish", str(fam))
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((fam / "students" / "2-step" / "flash.json").read_text())
    assert card["distill"]["trained_steps"] == 1 and card["teacher"] == "../.."
    assert set(card["eval"]["alignment"]) >= {"overall", "spatial"} and card["eval"]["split"] == "validation"


def test_eval_decodes_with_the_fast_decoder_when_asked(family64, tmp_path, monkeypatch):
    import shutil

    from flash.eval import run
    from flash.tiny import write_tiny_decoder

    fam = tmp_path / "fam"
    shutil.copytree(family64, fam)
    write_tiny_decoder(fam)
    seen = []
    monkeypatch.setattr(run, "generate", lambda pipe, row, ps, seeds, student=None: (
        seen.append(type(pipe.c.vae).__name__) or np.zeros((len(ps), 64, 64, 3), np.uint8)))
    rows = [r for r in run.default_rows(fam) if r.name == "Imagine Flash, 3-step"]
    run.evaluate_rows(fam, rows, n=4, batch=4, progress=False, decoder="tiny")
    run.evaluate_rows(fam, rows, n=4, batch=4, progress=False)
    assert seen == ["AutoencoderTiny", "AutoencoderKL"]
    r = flash("eval", str(fam), "--n", "4", "--decoder", "tiny", "--update-card")
    assert r.returncode == 2 and "full decoder" in r.stderr


def test_loss_curves_are_running_means():
    from flash.eval.report import running_mean

    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0, 4.0], 20) == [2.0, 3.0]
