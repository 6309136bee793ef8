"""The Imagine Flash training loop: backward distillation + SRL + adversarial loss.

`distill_step` is one step of the method (issue 4, steps 1-6); `distill` runs the loop
with checkpoints, resume, sample grids and the final student folder. Multi-GPU and
multi-node go through `accelerate launch` (DDP): the student and discriminator are
prepared by the Accelerator, everything else is per-process and frozen.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.config import DistillConfig
from distill.data import make_stream
from distill.discriminator import Discriminator
from distill.losses import (
    hinge_d_loss,
    hinge_g_loss,
    pixel_loss,
    reconstruction_loss,
    shifted_timestep,
    srl_target,
)
from flash.checkpoint import EMA, load_checkpoint, save_checkpoint
from flash.data import shapes
from flash.images import save_png
from flash.models import (
    CARD,
    Components,
    StudentCard,
    folder_sha256,
    load_components,
    load_unet,
    read_student_card,
    save_student,
)
from flash.pipeline import TextToImage, compiled_unet_denoiser, unet_denoiser
from flash.sampling import Denoiser, run_student
from flash.schedule import NoiseSchedule

SAMPLE_PROMPTS = [
    "a red circle",
    "a small blue square",
    "a large green triangle",
    "a red circle above a blue square",
    "a green triangle to the left of a magenta circle",
    "a cyan square below a yellow triangle",
]


@dataclass
class Models:
    teacher: Components
    pipe: TextToImage  # teacher text encoder / VAE / schedule (frozen)
    student_schedule: NoiseSchedule  # the teacher's schedule, read in the student's parameterisation
    student: torch.nn.Module  # possibly DDP-wrapped
    ema: EMA
    opt: torch.optim.Optimizer
    teacher_denoise: Denoiser  # the frozen teacher U-Net, compiled when cfg.compile_teacher says so
    disc: torch.nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None


def build_models(cfg: DistillConfig, accelerator) -> Models:
    teacher = load_components(Path(cfg.teacher))
    for m in (teacher.text_encoder, teacher.unet, teacher.vae):
        m.requires_grad_(False).to(accelerator.device)
    pipe = TextToImage(teacher, accelerator.device)
    if cfg.student_init:  # e.g. a 3-step student as the start of the 2- and 1-step ones
        student = init_unet(Path(cfg.student_init), teacher.unet)
    else:  # the paper: the student starts from the teacher
        student = copy.deepcopy(teacher.unet)
    student.train().requires_grad_(True).to(accelerator.device)
    ema = EMA(student, cfg.ema_decay)  # on the student's device: one fused update per step
    settings = optimizer_settings(cfg)
    opt = torch.optim.Adam(student.parameters(), **settings["opt"])
    disc = opt_d = None
    if cfg.use_discriminator:
        disc = Discriminator(teacher.unet, cfg.disc_train_backbone)
        opt_d = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], **settings["opt_d"])
        student, opt, disc, opt_d = accelerator.prepare(student, opt, disc, opt_d)
    else:
        student, opt = accelerator.prepare(student, opt)
    student_schedule = pipe.student_schedule(cfg.prediction_type or None)
    teacher_denoise = teacher_denoiser(teacher.unet, cfg.compile_teacher)
    return Models(teacher, pipe, student_schedule, student, ema, opt, teacher_denoise, disc, opt_d)


def optimizer_settings(cfg: DistillConfig) -> dict[str, dict]:
    """Each optimizer's hyper-parameters from the config: set at start, and again after a resume
    or fork (a checkpoint's optimizer state carries the old run's learning rates)."""
    return {"opt": {"lr": cfg.lr, "betas": cfg.adam_betas}, "opt_d": {"lr": cfg.disc_lr, "betas": (0.0, 0.99)}}


def restore(m: Models, cfg: DistillConfig, folder: Path, accelerator) -> tuple[int, dict]:
    """Load a checkpoint (this run's, or another's to fork) under this config's optimizer settings."""
    try:
        step, meta = load_checkpoint(folder, _modules(m, accelerator), _optimizers(m))
    except (KeyError, RuntimeError, ValueError) as e:  # e.g. a discriminator with(out) its backbone
        raise ValueError(f"checkpoint {folder} does not fit this config's models or optimizers ({e}); "
                         "a fork may change losses and learning rates, not what is trained") from e  # fmt: skip
    settings = optimizer_settings(cfg)
    for name, opt in _optimizers(m).items():
        for group in opt.param_groups:
            group.update(settings[name])
    return step, meta


def teacher_denoiser(unet, mode: str) -> Denoiser:
    """The frozen teacher as a denoiser; with `mode` != "off", through torch.compile.

    If one of the first compiled calls fails (a backend missing on this
    machine), training goes on in eager mode with a warning rather than losing the run.
    """
    eager = unet_denoiser(unet)
    if mode == "off":
        return eager
    compiled = compiled_unet_denoiser(unet, mode)
    state = {"calls": 0, "eager": False}

    def denoise(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if state["eager"]:
            return eager(x, t, cond)
        try:
            return compiled(x, t, cond)
        except Exception as e:
            if state["calls"] >= 3:  # warm-up, recording and first replay are where compiling fails
                raise
            warnings.warn(f"compile_teacher={mode!r} failed ({type(e).__name__}: {e}); the teacher runs eagerly",
                          stacklevel=2)  # fmt: skip
            state["eager"] = True
            return eager(x, t, cond)
        finally:
            state["calls"] += 1

    return denoise


def init_unet(folder: Path, teacher_unet) -> torch.nn.Module:
    """A student's starting U-Net from a student folder or a diffusers folder; same interface as the teacher's."""
    folder = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = load_unet(folder, torch.float32).to(teacher_unet.device)
    keys = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")
    mismatched = {k: (unet.config[k], teacher_unet.config[k]) for k in keys if unet.config[k] != teacher_unet.config[k]}
    if mismatched:
        raise ValueError(f"student_init {folder} does not fit the teacher: {mismatched} (init, teacher)")
    return unet


@torch.no_grad()
def encode_images(pipe: TextToImage, images: np.ndarray, gen: torch.Generator) -> Tensor:
    vae = pipe.c.vae
    x = shapes.to_tensor_range(images).to(pipe.device, vae.dtype)  # (B, 3, H, W) in [-1, 1]
    if x.shape[-1] != pipe.image_size:
        x = torch.nn.functional.interpolate(x, size=pipe.image_size, mode="area")
    latents = vae.encode(x).latent_dist.sample(gen) * vae.config.scaling_factor
    # the sample comes back channels-last; a student step on channels-last x_t segfaults in
    # torch 2.13's CPU backward (forward-distillation ablation, 16x16x4 latents, batch 16)
    return latents.contiguous()


def student_lr(cfg: DistillConfig, step: int) -> float:
    """The student's learning rate at (0-based) `step` of the run: 0 while the discriminator warms
    up, then a linear rise to `cfg.lr` over `cfg.lr_warmup_steps` steps."""
    k = step - cfg.disc_warmup_steps
    if k < 0:
        return 0.0
    return cfg.lr * min(1.0, (k + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else cfg.lr


def noised_for_disc(x0: Tensor, cfg: DistillConfig, schedule, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Discriminator timesteps t_d in [disc_t_min, disc_t_max] and x0 noised to them."""
    t_d = torch.randint(cfg.disc_t_min, cfg.disc_t_max + 1, (len(x0),), generator=gen).to(x0.device)
    return t_d, schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0.device), t_d)


def discriminator_step(m: Models, real: Tensor, fake_t: Tensor, t_d: Tensor, cond: Tensor, schedule,
                       gen: torch.Generator, accelerator) -> float:  # fmt: skip
    """One hinge-loss update of the discriminator: real latents against the (detached) noised
    student x0, both at the same t_d; returns the loss."""
    real_t = schedule.add_noise(real, torch.randn(real.shape, generator=gen).to(real.device), t_d)
    logits = m.disc(torch.cat([real_t, fake_t.detach()]), torch.cat([t_d, t_d]), torch.cat([cond, cond]))
    loss_d = hinge_d_loss(*logits.chunk(2)).mean()
    m.opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    m.opt_d.step()
    return loss_d.item()


def distill_step(
    m: Models,
    prompts: list[str],
    images: np.ndarray | None,
    cfg: DistillConfig,
    gen: torch.Generator,
    accelerator,
    train_student: bool = True,
) -> dict[str, float]:
    """One Imagine Flash step on a batch of prompts (and real images when available); with
    `train_student` False (the discriminator's warm-up) only the discriminator learns."""
    pipe, schedule = m.pipe, m.pipe.schedule  # the teacher's: noising and the SRL target
    student = accelerator.unwrap_model(m.student)
    b, n, dev = len(prompts), len(cfg.timesteps), pipe.device
    ts = torch.tensor(cfg.timesteps, device=dev)
    cond = pipe.encode(prompts)  # (B, L, D), frozen text encoder
    uncond = pipe.encode([""] * b) if cfg.guidance_scale != 1.0 else None
    real = encode_images(pipe, images, gen) if images is not None else None

    # 1. a student step index per item, and pure noise x_T
    # (drawn from one CPU generator, then moved: the same draws on every device)
    i = torch.randint(0, n, (b,), generator=gen).to(dev)
    t = ts[i]
    x_T = torch.randn((b, *pipe.latent_shape), generator=gen).to(dev)
    # 2. backward distillation: the student's own trajectory x_{T->t}, no grad
    #    (forward ablation: x_t noised from real data instead)
    with torch.no_grad():
        if cfg.backward:
            x_t = run_student(unet_denoiser(student), x_T, cond, m.student_schedule, cfg.timesteps, i,
                              cfg.noise_correction)  # fmt: skip
        else:
            x_t = schedule.add_noise(real, x_T, t)
    # 3. the student's x0 prediction at t, with grad (held still while the discriminator warms up)
    with torch.set_grad_enabled(train_student):
        out = m.student(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    x0, _ = m.student_schedule.split(out, x_t, t)
    if not train_student:
        t_d, fake_t = noised_for_disc(x0, cfg, schedule, gen)
        return {"d": discriminator_step(m, real, fake_t, t_d, cond, schedule, gen, accelerator)}
    # 4. shifted reconstruction loss (eq. 8); srl=False: identity gamma
    gamma = shifted_timestep(t, cfg.gamma) if cfg.srl else t
    noise = torch.randn(x0.shape, generator=gen).to(dev)  # drawn either way: the same stream for both
    if cfg.srl_noise == "x_T":
        noise = x_T
    target = srl_target(m.teacher_denoise, x0, gamma, cond, uncond, schedule, cfg.teacher_steps, cfg.guidance_scale,
                        noise)  # fmt: skip
    loss_rec = reconstruction_loss(x0, target)  # (B,)
    logs = {"rec": loss_rec.mean().item()}
    loss = loss_rec.mean()
    if cfg.pixel_weight > 0:  # the same target in pixel space, through the frozen decoder
        pixels = pipe.decode_pixels(x0)
        with torch.no_grad():
            target_pixels = pipe.decode_pixels(target)
        loss_pix = pixel_loss(pixels, target_pixels, cfg.pixel_edge_weight)
        loss = loss + cfg.pixel_weight * loss_pix.mean()
        logs["pix"] = loss_pix.mean().item()
    # 5. adversarial loss: noised real latents vs noised student x0
    if m.disc is not None:
        disc = accelerator.unwrap_model(m.disc)
        t_d, fake_t = noised_for_disc(x0, cfg, schedule, gen)
        loss_g = hinge_g_loss(disc(fake_t, t_d, cond)).mean()
        loss = loss + cfg.adv_weight * loss_g
        logs["g"] = loss_g.item()
    m.opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(m.student.parameters(), cfg.grad_clip)
    m.opt.step()
    if m.disc is not None:
        logs["d"] = discriminator_step(m, real, fake_t, t_d, cond, schedule, gen, accelerator)
    # 6. EMA of the student weights
    m.ema.update(student)
    return logs


HISTORY_KEYS = ("out", "steps", "student_init", "batch_size", "srl", "srl_noise", "trained_steps", "minutes", "device",
                "soup")  # fmt: skip


def init_history(student_init: str) -> list[dict]:
    """The training stages a student_init went through (from its card), oldest first: a student
    trained in stages (say on a GPU, then on a CPU) keeps a record of every stage."""
    if not student_init or not (Path(student_init) / CARD).is_file():
        return []
    d = read_student_card(Path(student_init)).distill
    return [*d.get("history", []), {k: d[k] for k in HISTORY_KEYS if k in d}]


def fork_history(meta: dict, step: int) -> list[dict]:
    """The stages before a fork of another run's checkpoint: that run's own history (saved in its
    checkpoint; older checkpoints: its student_init's), then that run up to the fork."""
    source = meta.get("config", {})
    before = meta["history"] if "history" in meta else init_history(source.get("student_init", ""))
    stage = {k: source[k] for k in HISTORY_KEYS if k in source}
    return [*before, {**stage, "trained_steps": step, "minutes": round(meta.get("minutes", 0.0), 2)}]


def device_name(device: torch.device) -> str:
    """What trained a student, for its card: the GPU's name, or the CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def ema_student(m: Models, accelerator) -> torch.nn.Module:
    unet = copy.deepcopy(accelerator.unwrap_model(m.student)).eval().requires_grad_(False)
    m.ema.copy_to(unet)
    return unet


def sample_grid(m: Models, unet, cfg: DistillConfig, seeds=(0, 1)) -> np.ndarray:
    rows = []
    for s in seeds:
        lat = m.pipe.student_latents(unet, SAMPLE_PROMPTS, [s] * len(SAMPLE_PROMPTS), cfg.timesteps,
                                     cfg.noise_correction, m.student_schedule.prediction_type)  # fmt: skip
        rows.append(np.concatenate(list(m.pipe.decode(lat)), axis=1))
    return np.concatenate(rows, axis=0)


def evaluate_student(m: Models, unet, cfg: DistillConfig, n: int, batch: int = 50) -> dict:
    """Shapes-64 judge on the validation prompts (shapes teachers only): figures to choose runs
    by, while the test prompts stay with `flash eval` and the targets."""
    from flash.eval import evaluate
    from flash.eval.run import generate_in_batches, split_prompts

    def make_images(prompts: list[str], seeds: list[int]) -> np.ndarray:
        lat = m.pipe.student_latents(unet, prompts, seeds, cfg.timesteps, cfg.noise_correction,
                                     m.student_schedule.prediction_type)  # fmt: skip
        return m.pipe.decode(lat)

    prompts, seeds = split_prompts("validation", n)
    images, _ = generate_in_batches(make_images, prompts, seeds, batch)
    return {**evaluate(images, prompts), "split": "validation", "n": n}


def _modules(m: Models, accelerator) -> dict:
    mods = {"student": accelerator.unwrap_model(m.student), "ema": m.ema}
    if m.disc is not None:
        mods["disc"] = accelerator.unwrap_model(m.disc)
    return mods


def _optimizers(m: Models) -> dict:
    return {"opt": m.opt, **({"opt_d": m.opt_d} if m.opt_d is not None else {})}


def distill(cfg: DistillConfig, progress: bool = True) -> Path:
    """Train a student; returns the student folder (U-Net + FlashScheduler + flash.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)  # the same initial weights and data order on every rank...
    out = Path(cfg.out)
    m = build_models(cfg, accelerator)
    ckpt = out / "ckpt"
    step, earlier = 0, 0.0  # earlier: minutes trained before a resume
    start_from = ckpt if ckpt.is_dir() else Path(cfg.resume_from) if cfg.resume_from else None
    history = init_history(cfg.student_init)  # the stages before this run, for its card
    if start_from is not None:
        if not start_from.is_dir():
            raise ValueError(f"resume_from {start_from} is not a checkpoint folder (a run's ckpt/)")
        step, meta = restore(m, cfg, start_from, accelerator)
        earlier = meta.get("minutes", 0.0)
        history = meta.get("history", history) if start_from == ckpt else fork_history(meta, step)
    # ...but each rank draws its own noise and prompts
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step * 7 + accelerator.process_index)
    stream = make_stream(cfg, m.pipe.image_size, cfg.seed + 7919 * (step + 1) + accelerator.process_index)
    main = accelerator.is_main_process
    if main:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    log = open(out / "loss.jsonl", "a") if main else None  # noqa: SIM115 - open for the whole run
    start = time.time()

    def minutes() -> float:  # trained so far, resumes included
        return earlier + (time.time() - start) / 60

    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, desc=f"distill {cfg.steps}-step",
               disable=not (progress and main), dynamic_ncols=True)
    for step in bar:
        prompts, images = next(stream)
        for group in m.opt.param_groups:
            group["lr"] = student_lr(cfg, step)
        logs = distill_step(m, prompts, images, cfg, gen, accelerator, train_student=step >= cfg.disc_warmup_steps)
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        done = step + 1
        if main and done % cfg.log_every == 0:
            log.write(json.dumps({"step": done, "time": time.time() - start, **logs}) + "\n")
            log.flush()
        # max_minutes budgets this invocation (a resume gets its own); minutes() counts them all
        out_of_time = cfg.max_minutes > 0 and time.time() - start > cfg.max_minutes * 60
        if main and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps or out_of_time):
            meta = {"config": cfg.to_dict(), "minutes": minutes(), "history": history}
            save_checkpoint(ckpt, done, _modules(m, accelerator), _optimizers(m), meta)
        if main and done % cfg.sample_every == 0:
            save_png(sample_grid(m, ema_student(m, accelerator), cfg), out / "samples" / f"step{done:06d}.png")
        if out_of_time:
            break
    accelerator.wait_for_everyone()
    if log:
        log.close()
    folder = out / "student"
    if main:
        unet = ema_student(m, accelerator)
        figures = {}
        if cfg.prompts == "shapes" and cfg.eval_prompts > 0 and m.pipe.image_size == shapes.SIZE:
            figures = evaluate_student(m, unet, cfg, cfg.eval_prompts)
        card = StudentCard(
            steps=cfg.steps,
            timesteps=cfg.timesteps,
            noise_correction=cfg.noise_correction,
            prediction_type=m.student_schedule.prediction_type,
            teacher=str(Path(cfg.teacher).resolve()),
            teacher_sha256=folder_sha256(Path(cfg.teacher) / "unet"),
            distill={**cfg.to_dict(), "trained_steps": step + 1, "minutes": round(minutes(), 2),
                     "device": device_name(accelerator.device), "processes": accelerator.num_processes,
                     "history": history},  # fmt: skip
            eval=figures,
        )
        save_student(unet, card, folder, m.teacher.scheduler_config, dtype=getattr(torch, cfg.save_dtype))
    accelerator.wait_for_everyone()
    return folder
