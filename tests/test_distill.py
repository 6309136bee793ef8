"""Imagine Flash distillation: losses, one step, the loop, resume, and DDP on 2 CPU processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import losses, trainer
from distill.config import DistillConfig
from distill.discriminator import Discriminator
from distill.losses import hinge_d_loss, hinge_g_loss, reconstruction_loss, shifted_timestep, srl_target
from flash.models import load_components, load_student
from flash.schedule import NoiseSchedule
from flash.tiny import SD_SCHEDULER_CONFIG, write_tiny_family

SCHED = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
PAPER_GAMMA = [[900, 990], [500, 950], [-1, 200]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("fam") / "tiny")


def test_gamma_matches_the_paper():
    t = torch.tensor([999, 901, 900, 750, 666, 501, 500, 200, 0])
    assert shifted_timestep(t, PAPER_GAMMA).tolist() == [990, 990, 950, 950, 950, 950, 200, 200, 200]
    with pytest.raises(ValueError, match="do not cover"):
        shifted_timestep(torch.tensor([100]), [[500, 950]])


def test_srl_target_with_an_exact_teacher_reconstructs_the_student_x0():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2)
    noise = torch.randn_like(x0)

    def exact(x, t, c):  # knows the noise that was added
        return noise

    gamma = torch.tensor([990, 950, 200])
    out = srl_target(exact, x0, gamma, torch.zeros(3, 1, 1), None, SCHED, 8, 1.0, noise)
    assert torch.allclose(out, x0, atol=1e-4)


def test_srl_target_runs_the_teacher_from_gamma_with_k_steps_and_cfg():
    calls = []

    def spy(x, t, c):
        calls.append((t.tolist(), c.shape[0]))
        return torch.zeros_like(x)

    x0 = torch.zeros(2, 4, 2, 2)
    srl_target(spy, x0, torch.tensor([990, 200]), torch.ones(2, 1, 1), torch.zeros(2, 1, 1), SCHED, 4, 5.0,
               torch.randn_like(x0))
    assert len(calls) == 4  # k teacher evaluations
    assert calls[0] == ([990, 200, 990, 200], 4)  # CFG: both branches batched, starting at gamma
    assert calls[-1][0][:2] == [247, 50]


def test_losses_are_per_sample():
    a, b = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    assert reconstruction_loss(a, b).tolist() == [1.0, 1.0, 1.0]
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])).tolist() == [0.0, 2.5]
    assert hinge_g_loss(torch.tensor([0.5])).tolist() == [-0.5]
    assert losses.pixel_loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), edge_weight=5.0).tolist() == [1.0, 1.0]


def test_discriminator_from_teacher_encoder(tiny):
    d = Discriminator(tiny.unet)
    assert torch.equal(d.conv_in.weight, tiny.unet.conv_in.weight)
    assert not d.conv_in.weight.requires_grad and all(p.requires_grad for p in d.heads.parameters())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 12, 32)
    logits = d(x, t, c)
    assert logits.shape == (2,)
    assert not torch.allclose(logits, d(x, t, torch.randn(2, 12, 32)))  # text-conditional


def _cfg(family, tmp_path, **kw):
    base = dict(teacher=str(family), out=str(tmp_path / "run"), steps=3, batch_size=2, teacher_steps=2, lr=1e-3,
                max_steps=2, eval_prompts=0, sample_every=2, checkpoint_every=1)
    return DistillConfig(**{**base, **kw})


def _run_step(family, tmp_path, monkeypatch, train_student=True, **kw):
    from accelerate import Accelerator

    cfg = _cfg(family, tmp_path, **kw)
    acc = Accelerator(cpu=True)
    m = trainer.build_models(cfg, acc)
    calls = []
    real_run_student = trainer.run_student
    monkeypatch.setattr(trainer, "run_student", lambda *a, **k: calls.append(a[5]) or real_run_student(*a, **k))
    before = [p.detach().clone() for p in m.student.parameters()]
    teacher_before = [p.detach().clone() for p in m.teacher.unet.parameters()]
    stream = trainer.make_stream(cfg, m.pipe.image_size, 0)
    prompts, images = next(stream)
    disc_before = [p.detach().clone() for p in m.disc.parameters()] if m.disc is not None else []
    logs = trainer.distill_step(m, prompts, images, cfg, torch.Generator().manual_seed(0), acc, train_student)
    if disc_before:
        logs["disc_changed"] = any(not torch.equal(a, p) for a, p in zip(disc_before, m.disc.parameters(), strict=True))
    changed = any(not torch.equal(a, p) for a, p in zip(before, m.student.parameters(), strict=True))
    teacher_same = all(torch.equal(a, p) for a, p in zip(teacher_before, m.teacher.unet.parameters(), strict=True))
    return logs, calls, changed, teacher_same


def test_distill_step_backward_trains_the_student_only(family, tmp_path, monkeypatch):
    logs, calls, changed, teacher_same = _run_step(family, tmp_path, monkeypatch)
    assert logs.pop("disc_changed")
    assert set(logs) == {"rec", "g", "d"} and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert len(calls) == 1 and calls[0].shape == (2,)  # per-item number of backward steps
    assert changed and teacher_same


def test_discriminator_warmup_step_trains_the_discriminator_on_the_students_own_trajectory(
    family, tmp_path, monkeypatch
):
    logs, calls, changed, teacher_same = _run_step(family, tmp_path, monkeypatch, train_student=False, adv_weight=0.5)
    assert logs.pop("disc_changed") and set(logs) == {"d"} and torch.isfinite(torch.tensor(logs["d"]))
    assert len(calls) == 1  # fakes come from the student's backward trajectory, as in a full step
    assert not changed and teacher_same  # the student is held still


def test_student_lr_holds_still_while_the_discriminator_warms_up_then_rises():
    cfg = DistillConfig(lr=1e-4, disc_warmup_steps=2, lr_warmup_steps=4)
    assert [trainer.student_lr(cfg, s) for s in range(8)] == pytest.approx(
        [0, 0, 2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    assert trainer.student_lr(DistillConfig(lr=1e-4), 0) == 1e-4  # no warm-up: the paper's constant rate


def test_distill_loop_warms_up_the_discriminator_then_the_students_lr(family, tmp_path):
    cfg = _cfg(family, tmp_path, max_steps=3, adv_weight=0.5, disc_warmup_steps=1, lr_warmup_steps=4, log_every=1)
    trainer.distill(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [sorted(x) for x in logged] == [["d", "step", "time"]] + [["d", "g", "rec", "step", "time"]] * 2
    groups = json.loads((tmp_path / "run" / "ckpt" / "state.json").read_text())["optimizers"]
    assert groups["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 2 / 4)  # the third step's rate


def test_real_latents_are_contiguous(family, tmp_path):
    from accelerate import Accelerator

    cfg = _cfg(family, tmp_path)
    m = trainer.build_models(cfg, Accelerator(cpu=True))
    _, images = next(trainer.make_stream(cfg, m.pipe.image_size, 0))
    real = trainer.encode_images(m.pipe, images, torch.Generator().manual_seed(0))
    assert real.shape == (2, *m.pipe.latent_shape) and real.is_contiguous()


def test_ablation_switches(family, tmp_path, monkeypatch):
    logs, calls, _, _ = _run_step(family, tmp_path, monkeypatch, backward=False, adv_weight=0.0)
    assert calls == [] and set(logs) == {"rec"}  # forward distillation, no discriminator


def test_pixel_loss_reaches_the_student_through_the_decoder(family, tmp_path, monkeypatch):
    seen = []
    real_decode = trainer.TextToImage.decode_pixels
    monkeypatch.setattr(trainer.TextToImage, "decode_pixels",
                        lambda pipe, z: seen.append(z.requires_grad) or real_decode(pipe, z))  # fmt: skip
    logs, _, changed, teacher_same = _run_step(family, tmp_path, monkeypatch, pixel_weight=1.0, pixel_edge_weight=1.0,
                                               adv_weight=0.0)  # fmt: skip
    assert set(logs) == {"rec", "pix"} and logs["pix"] > 0
    assert seen == [True, False]  # the student's x0 with grad, the target without
    assert changed and teacher_same
    _run_step(family, tmp_path, monkeypatch, adv_weight=0.0)
    assert len(seen) == 2  # off by default: no decoder call


@pytest.mark.parametrize("srl_noise", ["fresh", "x_T"])
def test_srl_noise_is_fresh_or_the_trajectory_x_T(family, tmp_path, monkeypatch, srl_noise):
    seen = {}
    real_run_student, real_srl_target = trainer.run_student, trainer.srl_target
    monkeypatch.setattr(trainer, "run_student", lambda *a, **k: seen.update(x_T=a[1]) or real_run_student(*a, **k))
    monkeypatch.setattr(trainer, "srl_target", lambda *a: seen.update(noise=a[-1]) or real_srl_target(*a))
    _run_step(family, tmp_path, monkeypatch, srl_noise=srl_noise)
    assert torch.equal(seen["noise"], seen["x_T"]) == (srl_noise == "x_T")


def test_data_workers_render_the_same_stream_beside_the_step(family, tmp_path):
    def first_batches(workers: int, n: int = 2):
        stream = trainer.make_stream(_cfg(family, tmp_path, batch_size=3, data_workers=workers), 64, 5)
        return [next(stream) for _ in range(n)]

    (p0, i0), (p1, i1) = first_batches(0)
    (q0, j0), (q1, j1) = first_batches(1)
    assert (p0, p1) == (q0, q1) and i0.dtype == j0.dtype == "uint8" and (i0 == j0).all() and (i1 == j1).all()
    (r0, _), (r1, _) = first_batches(2)
    assert r0 == p0 and r1 != p1  # the second worker draws its own stream


def test_compiled_teacher_makes_the_srl_target(family, tmp_path, monkeypatch):
    calls = []

    def fake_compile(module, mode, dynamic):
        assert mode == "reduce-overhead" and dynamic is False

        def call(x, t, encoder_hidden_states, return_dict):
            calls.append(x.shape[0])
            return module(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=return_dict)

        return call

    monkeypatch.setattr(trainer.torch, "compile", fake_compile)
    logs, _, changed, _ = _run_step(family, tmp_path, monkeypatch, compile_teacher="reduce-overhead")
    assert calls == [4, 4] and changed  # k = 2 guided teacher calls (both CFG branches of batch 2)


def test_a_teacher_that_fails_to_compile_runs_eagerly(family, tmp_path, monkeypatch):
    def broken_compile(module, mode, dynamic):
        def call(*a, **k):
            raise RuntimeError("no inductor backend here")

        return call

    monkeypatch.setattr(trainer.torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="no inductor backend here"):
        logs, _, changed, _ = _run_step(family, tmp_path, monkeypatch, compile_teacher="default")
    assert changed and torch.isfinite(torch.tensor(logs["rec"]))


def test_distill_loop_checkpoints_resumes_and_writes_a_student(family, tmp_path):
    cfg = _cfg(family, tmp_path)
    folder = trainer.distill(cfg, progress=False)
    assert (tmp_path / "run" / "samples" / "step000002.png").is_file()
    s = load_student(folder)
    assert s.card.steps == 3 and s.card.timesteps == [999, 750, 500] and s.card.distill["trained_steps"] == 2
    assert s.card.distill["device"] == "cpu" and s.card.distill["processes"] == 1
    state = tmp_path / "run" / "ckpt" / "state.json"  # say the first part had trained 100 minutes
    info = json.loads(state.read_text())
    assert info["meta"]["minutes"] > 0
    state.write_text(json.dumps({**info, "meta": {**info["meta"], "minutes": 100.0}}))
    resumed = load_student(trainer.distill(_cfg(family, tmp_path, max_steps=3), progress=False)).card
    assert resumed.distill["trained_steps"] == 3 and 100.0 <= resumed.distill["minutes"] < 110  # minutes add up


def test_resume_from_forks_another_runs_checkpoint_and_leaves_it_alone(family, tmp_path):
    trainer.distill(_cfg(family, tmp_path, max_steps=1), progress=False)
    source = tmp_path / "run" / "ckpt"
    info = json.loads((source / "state.json").read_text())  # say the source had trained 100 minutes
    (source / "state.json").write_text(json.dumps({**info, "meta": {**info["meta"], "minutes": 100.0}}))
    before = (source / "state.json").read_text()
    fork = _cfg(family, tmp_path / "fork", max_steps=2, adv_weight=0.5, lr=3e-4, disc_lr=2e-4, resume_from=str(source))
    card = load_student(trainer.distill(fork, progress=False)).card
    assert card.distill["trained_steps"] == 2 and card.distill["resume_from"] == str(source)
    assert 100.0 <= card.distill["minutes"] < 110 and card.distill["adv_weight"] == 0.5  # its minutes, new settings
    assert (tmp_path / "fork" / "run" / "ckpt").is_dir() and (source / "state.json").read_text() == before
    # the run it forked is a stage of its history, as far as the fork (and a fork of the fork keeps both)
    assert [(h["out"], h["trained_steps"], h["minutes"]) for h in card.distill["history"]] == [
        (str(tmp_path / "run"), 1, 100.0)]
    fork2 = _cfg(family, tmp_path / "fork2", max_steps=3, resume_from=str(tmp_path / "fork" / "run" / "ckpt"))
    history2 = load_student(trainer.distill(fork2, progress=False)).card.distill["history"]
    assert [(h["out"], h["trained_steps"]) for h in history2] == [
        (str(tmp_path / "run"), 1), (str(tmp_path / "fork" / "run"), 2)]
    # the fork's learning rates, not the source's (an optimizer's state carries its old ones)
    groups = json.loads((tmp_path / "fork" / "run" / "ckpt" / "state.json").read_text())["optimizers"]
    assert groups["opt"]["param_groups"][0]["lr"] == 3e-4 and groups["opt_d"]["param_groups"][0]["lr"] == 2e-4
    with pytest.raises(ValueError, match="does not fit this config"):  # a backbone the source did not train
        trainer.distill(_cfg(family, tmp_path / "bb", disc_train_backbone=True, resume_from=str(source)), progress=False)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        trainer.distill(_cfg(family, tmp_path / "none", resume_from=str(tmp_path / "missing")), progress=False)


def test_student_init_starts_from_another_student_and_save_dtype_casts(family, tmp_path):
    first = trainer.distill(_cfg(family, tmp_path, max_steps=1, save_dtype="float16"), progress=False)
    weights = next(first.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    cfg = _cfg(family, tmp_path / "b", steps=1, student_init=str(first))
    init = trainer.init_unet(Path(cfg.student_init), load_components(Path(family)).unet)
    ref = load_student(first).unet
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), ref.state_dict().values(), strict=True))
    second = load_student(trainer.distill(cfg, progress=False)).card
    assert second.steps == 1
    # the stage it started from is on its card: a student trained in stages keeps its history
    assert second.distill["history"] == [{"out": str(tmp_path / "run"), "steps": 3, "student_init": "", "batch_size": 2,
                                          "srl": True, "srl_noise": "fresh", "trained_steps": 1,
                                          "minutes": load_student(first).card.distill["minutes"], "device": "cpu"}]


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_a_student_in_its_own_parameterisation_trains_samples_and_saves_it(family, tmp_path, prediction_type):
    from flash.pipeline import TextToImage
    from flash.sampling import ddim_step
    from flash.scheduler import FlashScheduler

    cfg = _cfg(family, tmp_path, steps=1, max_steps=1, prediction_type=prediction_type)
    s = load_student(trainer.distill(cfg, progress=False))
    assert s.card.prediction_type == prediction_type  # the teacher's is "epsilon"
    assert FlashScheduler.from_pretrained(s.path).config.prediction_type == prediction_type
    pipe = TextToImage(load_components(Path(family)))
    assert pipe.schedule.prediction_type == "epsilon"
    # one step from x_T reads the output as x0 / v: x0 = out, or alpha_T x_T - sigma_T out
    prompts, seeds = ["a red circle"], [0]
    x_T = pipe.noise(seeds)
    with torch.no_grad():
        out = s.unet(x_T, torch.tensor([999]), encoder_hidden_states=pipe.encode(prompts)).sample
    got = pipe.student_latents(s.unet, prompts, seeds, [999], True, s.card.prediction_type)
    alpha, sigma = SCHED.alpha_sigma(torch.tensor([999]), x_T)
    want = out if prediction_type == "sample" else alpha * x_T - sigma * out
    torch.testing.assert_close(got, want)
    as_eps, _ = ddim_step(SCHED, x_T, out, torch.tensor([999]), torch.tensor([-1]))  # read as eps: different
    assert not torch.allclose(got, as_eps, atol=1e-3)


def test_student_init_must_fit_the_teacher(family, tmp_path):
    from flash.models import save_components
    from flash.tiny import tiny_components

    save_components(tiny_components(image_size=64), tmp_path / "other")  # a U-Net for another latent size
    with pytest.raises(ValueError, match="sample_size"):
        trainer.init_unet(tmp_path / "other", load_components(Path(family)).unet)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(save_dtype="int8"), "int8"),
        (dict(steps=2, timesteps=[999, 750, 500]), "steps=2"),
        (dict(timesteps=[500, 999]), "descending"),
        (dict(prompts="web"), "'web'"),
        (dict(prompts="file"), "prompts_file"),
        (dict(gamma=[[500, 1200]]), "1200"),
        (dict(srl_noise="old"), "x_T"),
        (dict(compile_teacher="fast"), "reduce-overhead"),
        (dict(prediction_type="flow"), "v_prediction"),
        (dict(data_workers=-1), "data_workers"),
        (dict(pixel_edge_weight=-1.0), "pixel_edge_weight"),
        (dict(lr_warmup_steps=-1), "lr_warmup_steps"),
        (dict(disc_warmup_steps=10, adv_weight=0.0), "needs the discriminator"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kw)


def test_config_file_rejects_unknown_keys(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"steps": 2, "learning_rate": 1}')
    with pytest.raises(ValueError, match="learning_rate"):
        DistillConfig.load(f)


def test_ddp_two_cpu_processes_hold_the_same_weights(family, tmp_path):
    # without CUDA, accelerate's --multi_gpu launches torchrun processes on the gloo backend
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_cpu_threads_per_process", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "tests/dist_worker.py", str(family), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [(tmp_path / f"rank{i}.txt").read_text().split() for i in range(2)]
    assert ranks[0][:3] == ["2", "gloo", "True"]
    assert ranks[0][3] == ranks[1][3]  # identical weights after DDP steps on different data
