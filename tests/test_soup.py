"""`flash soup`: students averaged parameter by parameter into one student folder."""

import json

import pytest
import torch

from flash.cli import main
from flash.models import ModelError, load_student, save_student
from flash.tiny import write_tiny_family


@pytest.fixture(scope="module")
def two_students(tmp_path_factory):
    """The tiny family's 1-step student (fp16, as shipped students are) and a perturbed copy."""
    root = tmp_path_factory.mktemp("soup")
    fam = write_tiny_family(root / "fam")
    a = load_student(fam / "students" / "1-step")
    sched = json.loads((a.path / "scheduler_config.json").read_text())
    save_student(a.unet, a.card, root / "a", sched, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in a.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_student(a.unet, a.card.model_copy(update={"distill": {"lr": 1e-4}}), root / "b", sched, dtype=torch.float16)
    return root, fam


def state(folder):
    return {k: v.float() for k, v in load_student(folder).unet.state_dict().items()}


def test_a_soup_is_the_weighted_mean_and_an_ordinary_student(two_students, capsys):
    root, _ = two_students
    main(["soup", str(root / "a"), str(root / "b"), "--out", str(root / "ab")])
    assert "the average of 2" in capsys.readouterr().out
    a, b, ab = state(root / "a"), state(root / "b"), state(root / "ab")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in a:  # the mean in fp32, stored in fp16 like the ingredients
        torch.testing.assert_close(ab[k], ((a[k] + b[k]) / 2).half().float(), rtol=0, atol=1e-3)
    s = load_student(root / "ab")
    assert next(s.unet.parameters()).dtype == torch.float32  # loads like any student
    assert (s.card.steps, s.card.timesteps, s.card.eval) == (1, [999], {})
    soup = s.card.distill["soup"]
    assert [i["weight"] for i in soup] == [0.5, 0.5] and soup[1]["distill"] == {"lr": 1e-4}
    assert soup[0]["student"] == str(root / "a")

    from distill.trainer import init_history

    assert init_history(str(root / "ab"))[-1]["soup"] == soup  # a run continuing the soup keeps its lineage

    main(["soup", str(root / "a"), str(root / "b"), "--weights", "3", "1", "--out", str(root / "a3b1")])
    w = state(root / "a3b1")
    for k in a:
        torch.testing.assert_close(w[k], (0.75 * a[k] + 0.25 * b[k]).half().float(), rtol=0, atol=1e-3)


def test_students_of_different_samplers_do_not_average(two_students, tmp_path):
    from distill.soup import soup

    root, fam = two_students
    with pytest.raises(ModelError, match="differ in steps"):
        soup([root / "a", fam / "students" / "2-step"], tmp_path / "x")
    other = load_student(root / "a")
    sched = json.loads((other.path / "scheduler_config.json").read_text())
    save_student(other.unet, other.card.model_copy(update={"prediction_type": "sample"}), tmp_path / "x0", sched)
    with pytest.raises(ModelError, match="prediction_type"):
        soup([root / "a", tmp_path / "x0"], tmp_path / "y")
    with pytest.raises(ValueError, match="at least two"):
        soup([root / "a"], tmp_path / "z")
    with pytest.raises(ValueError, match="one non-negative weight per student"):
        soup([root / "a", root / "b"], tmp_path / "z", weights=[1.0])
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
