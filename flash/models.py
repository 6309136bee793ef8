"""Model I/O: diffusers-format text-to-image folders, students and model families.

A *family* folder is a stock diffusers Stable Diffusion folder (the teacher) with
the students beside it:

    models/shapes64/
      model_index.json  tokenizer/  text_encoder/  unet/  vae/  scheduler/   # the teacher
      flash.json                                                              # family card
      vae_tiny/         (optional) a fast AutoencoderTiny decoder, `decoder="tiny"`
      students/3-step/  config.json  diffusion_pytorch_model.safetensors      # student U-Net
                        scheduler_config.json  flash.json                     # FlashScheduler, card

`StableDiffusionPipeline.from_pretrained("models/shapes64")` loads the teacher, and
`UNet2DConditionModel.from_pretrained("models/shapes64/students/3-step")` a student.
A student made from a large teacher elsewhere stores only its U-Net and card; the
card's `teacher` field points at the teacher folder for the other components.
Weights are read from safetensors only; a folder holding pickles is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flash.schedule import validate_timesteps

CARD = "flash.json"
STUDENTS = "students"
TINY_VAE = "vae_tiny"  # optional fast decoder beside the teacher (diffusers AutoencoderTiny, distill/decoder.py)
Decoder = Literal["full", "tiny"]  # the family's VAE decoder, or its fast one (TINY_VAE)
DECODERS: tuple[str, ...] = get_args(Decoder)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelError(ValueError):
    """A model folder that cannot be used (missing, incomplete, pickled or corrupt weights)."""


class StudentCard(BaseModel):
    """flash.json of a student: what it is, where it came from, how well it does."""

    model_config = ConfigDict(extra="allow")

    format: str = "imagine-flash/student"
    steps: int = Field(ge=1, le=8)
    timesteps: list[int]
    noise_correction: bool = True
    prediction_type: str = "epsilon"
    teacher: str = "../.."
    teacher_sha256: str | None = None
    version: str = "0"
    distill: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timesteps")
    @classmethod
    def _valid_timesteps(cls, v: list[int]) -> list[int]:
        return validate_timesteps(v)

    def model_post_init(self, __context) -> None:
        if len(self.timesteps) != self.steps:
            raise ValueError(f"steps={self.steps} but timesteps={self.timesteps}")


class FamilyCard(BaseModel):
    """flash.json at a family's root: name, version and the teacher's figures."""

    model_config = ConfigDict(extra="allow")

    format: str = "imagine-flash/family"
    name: str = "family"
    version: str = "0"
    teacher_steps: int = 25
    guidance_scale: float = 5.0
    eval: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Components:
    """The pieces of a latent text-to-image model (diffusers classes)."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict


@dataclass
class Student:
    unet: Any
    card: StudentCard
    path: Path | None = None


@dataclass
class Family:
    teacher: Components
    card: FamilyCard
    students: dict[int, Student] = field(default_factory=dict)
    path: Path | None = None


def check_weights(folder: Path) -> None:
    """Refuse pickles; require safetensors files that at least parse."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelError(f"{folder} holds pickled weights ({', '.join(pickles)}); only safetensors are loaded")
    tensors = list(folder.glob("*.safetensors"))
    if not tensors:
        raise ModelError(f"{folder} has no .safetensors weights")
    from safetensors import safe_open

    for f in tensors:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                    h.get_slice(key)
        except Exception as e:  # safetensors raises several types for truncated files
            raise ModelError(f"corrupt or truncated weights file {f}: {e}") from e


def load_unet(folder: Path, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    check_weights(folder)
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell of an AutoencoderKL or an AutoencoderTiny."""
    cfg = vae.config
    if "decoder_block_out_channels" in cfg:  # AutoencoderTiny
        return int(cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1))
    return 2 ** (len(cfg.block_out_channels) - 1)


def load_tiny_vae(path: Path, dtype: torch.dtype = torch.float32):
    """The family's fast decoder (`path/vae_tiny`, made by `flash distill-decoder`)."""
    from diffusers import AutoencoderTiny

    folder = Path(path) / TINY_VAE
    if not folder.is_dir():
        raise ModelError(f"{path} has no {TINY_VAE}/ (the fast decoder); make one with `flash distill-decoder`")
    check_weights(folder)
    return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()


def load_components(path: Path, dtype: torch.dtype = torch.float32, decoder: str = "full") -> Components:
    """Load tokenizer, text encoder, U-Net, VAE and scheduler config from a local diffusers folder.

    `decoder="tiny"` puts the family's fast decoder (`vae_tiny/`) in place of the full VAE.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    if decoder not in DECODERS:
        raise ModelError(f"unknown decoder {decoder!r}; allowed: {', '.join(DECODERS)}")

    path = Path(path)
    for sub in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelError(f"{path} is not a diffusers text-to-image folder: missing {sub}/")
    for sub in ("text_encoder", "unet", "vae"):
        check_weights(path / sub)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, use_safetensors=True)
    unet = load_unet(path / "unet", dtype)
    if decoder == "tiny":
        vae = load_tiny_vae(path, dtype)
    else:
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return Components(tokenizer, text_encoder.eval(), unet, vae.eval(), sched)


def save_components(c: Components, path: Path, scheduler=None, dtype: torch.dtype | None = None) -> None:
    """Write a stock-loadable diffusers StableDiffusionPipeline folder (safetensors)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(c.scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=c.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    if dtype is not None:
        # Weights are stored narrow to save space, but load in float32 by default: transformers
        # otherwise loads the text encoder in its stored dtype while diffusers loads the U-Net in
        # float32, and a plain StableDiffusionPipeline.from_pretrained(path) fails on mixed dtypes.
        cfg = Path(path) / "text_encoder" / "config.json"
        data = json.loads(cfg.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = "float32"
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def save_student(unet, card: StudentCard, folder: Path, scheduler_config: dict, dtype=None) -> None:
    """U-Net (safetensors) + FlashScheduler config + flash.json in one folder."""
    from flash.scheduler import FlashScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_save = unet if dtype is None else _cast_copy(unet, dtype)
    to_save.save_pretrained(folder, safe_serialization=True)
    schedule_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    FlashScheduler(
        **{k: scheduler_config[k] for k in schedule_keys if k in scheduler_config},
        prediction_type=card.prediction_type,  # the student's own, which may differ from its teacher's
        timesteps=card.timesteps,
        noise_correction=card.noise_correction,
    ).save_pretrained(folder)
    write_card(folder, card)


def _cast_copy(module, dtype):
    import copy

    return copy.deepcopy(module).to(dtype)


def write_card(folder: Path, card: BaseModel) -> None:
    tmp = Path(folder) / (CARD + ".tmp")
    tmp.write_text(card.model_dump_json(indent=2) + "\n")
    tmp.replace(Path(folder) / CARD)


def read_family_card(path: Path) -> FamilyCard:
    """A family's flash.json, or the defaults (named after the folder) for a folder without one."""
    f = Path(path) / CARD
    if not f.is_file():
        return FamilyCard(name=Path(path).name)
    try:
        return FamilyCard.model_validate_json(f.read_text())
    except ValueError as e:
        raise ModelError(f"invalid {f}: {e}") from e


def read_student_card(folder: Path) -> StudentCard:
    f = Path(folder) / CARD
    if not f.is_file():
        raise ModelError(f"{folder} has no {CARD}; not a student folder")
    try:
        return StudentCard.model_validate_json(f.read_text())
    except ValueError as e:
        raise ModelError(f"invalid {f}: {e}") from e


def load_student(folder: Path, dtype: torch.dtype = torch.float32) -> Student:
    card = read_student_card(folder)
    return Student(load_unet(folder, dtype), card, Path(folder))


def list_students(path: Path) -> list[Path]:
    root = Path(path) / STUDENTS
    return sorted(p for p in root.iterdir() if (p / CARD).is_file()) if root.is_dir() else []


def load_family(path: Path, dtype: torch.dtype = torch.float32, decoder: str = "full") -> Family:
    """Teacher components + every student under students/ (keyed by step count)."""
    path = Path(path)
    teacher = load_components(path, dtype, decoder)
    card = read_family_card(path)
    students: dict[int, Student] = {}
    for folder in list_students(path):
        s = load_student(folder, dtype)
        if s.card.steps in students:
            raise ModelError(f"two students with {s.card.steps} steps under {path / STUDENTS}")
        students[s.card.steps] = s
    return Family(teacher, card, students, path)


def folder_sha256(folder: Path) -> str:
    """Hash of every weights and config file below a folder (the manifests' source hash)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".txt"):
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def publish_tiny_vae(folder: Path, family: Path) -> Path:
    """Copy a fast decoder (made by `flash distill-decoder`) into `family/vae_tiny`, atomically."""
    return _copy_into(folder, Path(family) / TINY_VAE)


def _copy_into(src: Path, dest: Path, card: BaseModel | None = None) -> Path:
    """Copy `src` to `dest` (weights checked first; `card` written into the copy), replacing any old
    `dest` atomically."""
    import shutil

    from flash.checkpoint import replace_dir

    check_weights(src)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if card is not None:
        write_card(tmp, card)
    replace_dir(tmp, dest)
    return dest


def publish_student(student_dir: Path, family: Path) -> Path:
    """Copy a finished student into `family/students/<n>-step`, replacing any old one atomically."""
    card = read_student_card(student_dir)
    dest = Path(family) / STUDENTS / f"{card.steps}-step"
    return _copy_into(student_dir, dest, card.model_copy(update={"teacher": "../.."}))
