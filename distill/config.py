"""One typed config for Imagine Flash distillation.

Defaults are the paper's settings for large teachers (Adam, lr 5e-6 for the U-Net and
1e-4 for the discriminator, k = 8 teacher steps); the default shapes-64 family uses
the values in `configs/shapes64-*.json`, recorded in each student's flash.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from flash.config import load_config
from flash.pipeline import COMPILE_MODES
from flash.schedule import PREDICTION_TYPES, validate_timesteps
from flash.scheduler import DEFAULT_TIMESTEPS

PROMPT_SOURCES = ("shapes", "file")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
SRL_NOISES = ("fresh", "x_T")


@dataclass
class DistillConfig:
    teacher: str = "models/shapes64"
    out: str = "runs/distill"
    steps: int = 3  # student step count
    timesteps: list[int] = field(default_factory=list)  # empty: the paper's schedule for `steps`
    seed: int = 0
    student_init: str = ""  # U-Net or student folder to start from; "": the teacher's U-Net (the paper)
    # another run's checkpoint folder (its ckpt/) to continue from while `out` has none: a fork of
    # that run (weights, EMA, discriminator, optimizers, step, minutes) under this config's settings
    resume_from: str = ""
    save_dtype: str = "float32"  # weights of the finished student: float32, float16 or bfloat16

    # data
    prompts: str = "shapes"  # "shapes" (the shapes-64 grammar) or "file" (prompts_file, one per line)
    prompts_file: str = ""
    real_images: str = ""  # folder of image + same-name .txt caption pairs; "" with prompts=file: data-free
    batch_size: int = 16
    # processes rendering shapes-64 images beside the step (0: in the training process); on a
    # GPU, rendering a batch of 256 (~0.4 s on one core) was up to half of a ~1 s step
    data_workers: int = 0

    # the method (paper sections 4.1-4.3); each switch reproduces an ablation of Table 3
    backward: bool = True  # False: forward distillation (x_t noised from real data)
    srl: bool = True  # False: identity gamma (re-noise to t itself)
    noise_correction: bool = True
    # the student's output: "" the teacher's parameterisation (the paper); "sample" or
    # "v_prediction" read it as x0 or v, so that at t = T an output error is not multiplied by
    # sigma_T / alpha_T (~15 for SD's schedule) on its way to x0 (not in the paper)
    prediction_type: str = ""
    gamma: list[list[int]] = field(default_factory=lambda: [[900, 990], [500, 950], [-1, 200]])
    # the noise that re-noises the student's x0 to gamma(t): "fresh" (the paper) or "x_T", the
    # trajectory's own starting noise (not in the paper): the target becomes a deterministic
    # function of x_T, the teacher's own sample from (nearly) that noise when gamma(t) ~ T
    srl_noise: str = "fresh"
    teacher_steps: int = 8  # k
    # > 0: the reconstruction loss also in pixel space, through the frozen VAE decoder (not in the
    # paper): MSE between the decoded student x0 and the decoded target, plus `pixel_edge_weight`
    # times the MSE of their image gradients (a soft outline costs more than a flat colour error)
    pixel_weight: float = 0.0
    pixel_edge_weight: float = 0.0
    guidance_scale: float = 5.0  # teacher CFG for the SRL target

    # adversarial loss (SDXL-Lightning / UFOGen style discriminator from the teacher's encoder)
    adv_weight: float = 0.1  # 0 disables the discriminator
    disc_lr: float = 1e-4
    disc_train_backbone: bool = False
    disc_t_min: int = 10
    disc_t_max: int = 750

    # optimisation
    lr: float = 5e-6
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 2000
    max_minutes: float = 0.0  # > 0: also stop after this many minutes
    # warm-ups for a run that starts from a trained student with fresh optimizer states (not in
    # the paper): the first `disc_warmup_steps` steps train only the discriminator (the student
    # is held still, so a fresh discriminator's random verdicts never reach it), then the
    # student's learning rate rises linearly from 0 to `lr` over `lr_warmup_steps` steps (a fresh
    # Adam's first updates are ~lr on every weight, whatever its gradient)
    disc_warmup_steps: int = 0
    lr_warmup_steps: int = 0

    # bookkeeping
    checkpoint_every: int = 100
    sample_every: int = 250
    log_every: int = 10
    # torch.compile mode for the frozen teacher's U-Net (the k guided calls of each SRL target,
    # about half of a step's U-Net calls): "reduce-overhead" captures CUDA graphs on a GPU
    compile_teacher: str = "off"
    eval_prompts: int = 200  # evaluated at the end with the shapes-64 judge, validation split (shapes prompts only)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.timesteps = list(self.timesteps) or list(DEFAULT_TIMESTEPS.get(self.steps, []))
        if not self.timesteps:
            raise ValueError(f"no default timesteps for steps={self.steps}; pass timesteps explicitly")
        validate_timesteps(self.timesteps)
        if len(self.timesteps) != self.steps:
            raise ValueError(f"steps={self.steps} but timesteps={self.timesteps}")
        if self.prompts not in PROMPT_SOURCES:
            raise ValueError(f"unknown prompts source {self.prompts!r}; allowed: {', '.join(PROMPT_SOURCES)}")
        if self.prompts == "file" and not self.prompts_file:
            raise ValueError("prompts='file' needs prompts_file")
        if self.data_workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {self.data_workers}")
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {self.teacher_steps}")
        if not self.backward and self.prompts == "file" and not self.real_images:
            raise ValueError("forward distillation (backward=false) needs real data: shapes prompts or real_images")
        for _threshold, g in self.gamma:
            if not 0 <= g <= 999:
                raise ValueError(f"gamma value {g} out of range [0, 999] in {self.gamma}")
        if self.pixel_weight < 0 or self.pixel_edge_weight < 0:
            raise ValueError(f"pixel_weight and pixel_edge_weight must be >= 0, got {self.pixel_weight}, "
                             f"{self.pixel_edge_weight}")  # fmt: skip
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"unknown save_dtype {self.save_dtype!r}; allowed: {', '.join(SAVE_DTYPES)}")
        if self.prediction_type and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; allowed: '' (the teacher's), "
                             f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
        if self.srl_noise not in SRL_NOISES:
            raise ValueError(f"unknown srl_noise {self.srl_noise!r}; allowed: {', '.join(SRL_NOISES)}")
        if self.compile_teacher not in COMPILE_MODES:
            raise ValueError(f"unknown compile_teacher {self.compile_teacher!r}; allowed: {', '.join(COMPILE_MODES)}")
        if self.disc_warmup_steps < 0 or self.lr_warmup_steps < 0:
            raise ValueError(f"disc_warmup_steps and lr_warmup_steps must be >= 0, got {self.disc_warmup_steps}, "
                             f"{self.lr_warmup_steps}")  # fmt: skip
        if self.disc_warmup_steps and not self.use_discriminator:
            raise ValueError("disc_warmup_steps needs the discriminator (adv_weight > 0 and real data)")
        self.adam_betas = tuple(self.adam_betas)

    @property
    def has_real_data(self) -> bool:
        return self.prompts == "shapes" or bool(self.real_images)

    @property
    def use_discriminator(self) -> bool:
        return self.adv_weight > 0 and self.has_real_data

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> DistillConfig:
        return load_config(cls, path, "distill config", **overrides)

    def to_dict(self) -> dict:
        return asdict(self)
