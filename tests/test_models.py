"""Model I/O: diffusers folders, students, families, refusal of pickles and corrupt files; checkpoints."""

import json

import pytest
import torch

from flash.checkpoint import EMA, load_checkpoint, save_checkpoint
from flash.models import (
    ModelError,
    StudentCard,
    load_components,
    load_family,
    load_student,
    publish_student,
    read_family_card,
)
from flash.tiny import write_tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("fam") / "tiny")


def test_family_loads_teacher_and_three_students(family):
    f = load_family(family)
    assert sorted(f.students) == [1, 2, 3]
    assert f.students[2].card.timesteps == [999, 666]
    assert f.card.name == "tiny"
    for s in f.students.values():
        assert not s.unet.training


def test_student_folder_is_stock_diffusers(family):
    from diffusers import UNet2DConditionModel

    from flash.scheduler import FlashScheduler

    unet = UNet2DConditionModel.from_pretrained(family / "students" / "3-step")
    sched = FlashScheduler.from_pretrained(family / "students" / "3-step")
    assert unet.config.sample_size == 8 and sched.config.timesteps == [999, 750, 500]


def test_pickled_weights_are_refused(family, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(family / "students" / "1-step", bad)
    (bad / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickled weights"):
        load_student(bad)


def test_truncated_safetensors_are_refused(family, tmp_path):
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(family / "students" / "1-step", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_student(bad)


def test_missing_component_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="missing tokenizer/"):
        load_components(tmp_path)


def test_family_card_defaults_without_a_file_and_refuses_a_bad_one(tmp_path):
    card = read_family_card(tmp_path / "fam")
    assert card.name == "fam" and card.guidance_scale == 5.0
    (tmp_path / "flash.json").write_text('{"guidance_scale": "strong"}')
    with pytest.raises(ModelError, match="invalid"):
        read_family_card(tmp_path)


def test_student_card_validation():
    with pytest.raises(ValueError, match="descending"):
        StudentCard(steps=2, timesteps=[666, 999])
    with pytest.raises(ValueError, match="steps=3"):
        StudentCard(steps=3, timesteps=[999, 666])


def test_publish_student_replaces_atomically(family, tmp_path):
    import shutil

    fam = tmp_path / "fam"
    shutil.copytree(family, fam)
    new = tmp_path / "new"
    shutil.copytree(family / "students" / "2-step", new)
    card = json.loads((new / "flash.json").read_text())
    (new / "flash.json").write_text(json.dumps({**card, "version": "v2", "teacher": "/somewhere"}))
    dest = publish_student(new, fam)
    assert dest == fam / "students" / "2-step"
    published = load_student(dest).card
    assert published.version == "v2" and published.teacher == "../.."
    assert not any(p.name.endswith((".tmp", ".old")) for p in (fam / "students").iterdir())


def test_checkpoint_round_trip_without_pickles(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ema.update(model)
    save_checkpoint(tmp_path / "ck", 3, {"model": model, "ema": ema}, {"opt": opt}, {"note": "x"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "state.safetensors"]
    model2, opt2 = torch.nn.Linear(3, 2), None
    ema2 = EMA(model2, 0.9)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    step, meta = load_checkpoint(tmp_path / "ck", {"model": model2, "ema": ema2}, {"opt": opt2})
    assert step == 3 and meta == {"note": "x"}
    assert torch.equal(model.weight, model2.weight) and torch.equal(ema.shadow[0], ema2.shadow[0])
    # the restored optimizer continues exactly like the original
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)
