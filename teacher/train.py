"""Train the default teacher on shapes-64: a VAE, then text encoder + U-Net jointly.

Stage 1 (`train_vae`): AutoencoderKL 64x64x3 -> 16x16x4, MSE + a tiny KL term; the
latent scaling factor is set to 1 / std of the latents, as in Stable Diffusion.
Stage 2 (`train_unet`): eps-prediction on the SD `scaled_linear` 1000-step schedule,
10% empty captions for classifier-free guidance, Min-SNR weighting, EMA weights.
Both stages checkpoint and resume; stage 2 writes sample grids with fixed seeds.
`export_teacher` writes the stock diffusers folder that ships in models/.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flash.checkpoint import EMA, load_checkpoint, save_checkpoint
from flash.data import shapes
from flash.images import save_png
from flash.models import Components, FamilyCard, save_components, write_card
from flash.pipeline import TextToImage
from flash.schedule import NoiseSchedule
from flash.tiny import SD_SCHEDULER_CONFIG
from flash.tokenizer import build_clip_tokenizer
from teacher.config import TeacherConfig

SAMPLE_PROMPTS = [
    "a red circle",
    "a small blue square",
    "a large green triangle",
    "a yellow square",
    "a red circle above a blue square",
    "a green triangle to the left of a magenta circle",
    "a cyan square below a yellow triangle",
    "a blue circle to the right of a red square",
]


def build_vae(cfg: TeacherConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=shapes.SIZE,
    )


def build_text_encoder(cfg: TeacherConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet(cfg: TeacherConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=32,
    )


def image_batches(seed: int, batch_size: int, p_two: float, workers: int = 1):
    """Rendered batches in [-1, 1] from worker processes (`shapes.worker_batches`)."""
    return shapes.worker_batches(seed, batch_size, p_two, workers, transform=shapes.to_tensor_range)


def resolve_device(name: str) -> torch.device:
    """TeacherConfig.device: "auto" is CUDA when present, else CPU; asking for CUDA on a machine
    without it is a ValueError naming the setting (before any model is built)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TeacherConfig.device is {name!r} but torch sees no CUDA device; use \"auto\" or \"cpu\"")
    return device


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


def train_vae(cfg: TeacherConfig) -> Path:
    out = Path(cfg.out) / "vae"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = Path(cfg.out) / "ckpt-vae"
    step = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})[0] if ckpt.is_dir() else 0
    data = image_batches(cfg.seed + step, cfg.vae_batch, cfg.p_two)
    bar = tqdm(range(step, cfg.vae_steps), initial=step, total=cfg.vae_steps, desc="vae", dynamic_ncols=True)
    for step in bar:
        x, _ = next(data)
        for g in opt.param_groups:  # cosine decay to 10%
            g["lr"] = cfg.vae_lr * (0.55 + 0.45 * math.cos(math.pi * step / max(1, cfg.vae_steps)))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, step + 1, {"vae": vae}, {"opt": opt})
    vae.eval()
    with torch.no_grad():  # SD convention: scale latents to unit variance
        xs = torch.cat([next(data)[0] for _ in range(8)])
        std = vae.encode(xs).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out, safe_serialization=True)
    (out / "train.json").write_text(json.dumps({"final_mse": mse.item(), "latent_std": std}))
    return out


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Loss weight for eps-prediction: min(SNR, gamma) / SNR (Min-SNR-gamma, Hang et al. 2023),
    with the x0-equivalent weight raised to `floor` at the noisy end when floor > 0:
    clamp(SNR, floor, gamma) / SNR (floor 1: truncated SNR, Salimans & Ho 2022)."""
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    if gamma <= 0 and floor <= 0:
        return torch.ones_like(snr)
    return torch.clamp(snr, min=floor if floor > 0 else None, max=gamma if gamma > 0 else None) / snr


class TeacherState:
    """The trainable parts of stage 2 and their optimiser, built from the config."""

    def __init__(self, cfg: TeacherConfig, vae):
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 training, tensor cores
        self.tokenizer = build_clip_tokenizer(cfg.max_length)
        self.text_encoder = build_text_encoder(cfg, self.tokenizer).to(self.device)
        self.unet = build_unet(cfg).to(self.device)
        self.vae = vae.eval().requires_grad_(False).to(self.device)
        self.ema_unet = EMA(self.unet, cfg.ema_decay)
        self.ema_text = EMA(self.text_encoder, cfg.ema_decay)
        self.relation_head = None  # training only: see TeacherConfig.relation_weight
        text_params = list(self.text_encoder.parameters())
        if cfg.relation_weight > 0:
            self.relation_head = torch.nn.Linear(cfg.text_hidden, len(RELATION_CLASSES)).to(self.device)
            text_params += list(self.relation_head.parameters())
        self.opt = torch.optim.AdamW(
            [
                {"params": self.unet.parameters(), "lr": cfg.lr},
                {"params": text_params, "lr": cfg.text_lr},
            ],
            weight_decay=0.01,
        )
        self.schedule = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)

    def load_weights(self, folder: Path) -> None:
        """Start (weights and EMA) from a diffusers teacher folder of the same architecture."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
        self.unet.load_state_dict(unet.state_dict())
        self.text_encoder.load_state_dict(text.state_dict())
        self.ema_unet = EMA(self.unet, self.ema_unet.decay)
        self.ema_text = EMA(self.text_encoder, self.ema_text.decay)

    def modules(self) -> dict:
        m = {"unet": self.unet, "text": self.text_encoder, "ema_unet": self.ema_unet, "ema_text": self.ema_text}
        return m | ({"relation_head": self.relation_head} if self.relation_head is not None else {})

    def components(self, ema: bool = True) -> Components:
        """Copies of the current (EMA) weights as pipeline components."""
        import copy

        unet, text = copy.deepcopy(self.unet).eval(), copy.deepcopy(self.text_encoder).eval()
        if ema:
            self.ema_unet.copy_to(unet)
            self.ema_text.copy_to(text)
        return Components(self.tokenizer, text, unet, self.vae, dict(SD_SCHEDULER_CONFIG))


RELATION_CLASSES = (None, *shapes.RELATIONS)  # the auxiliary head's classes; None: one object


def relation_labels(prompts: list[str]) -> torch.Tensor:
    """[B] class index of each prompt's relation in RELATION_CLASSES; -100 (ignored) for an
    empty (dropped) caption."""
    return torch.tensor(
        [RELATION_CLASSES.index(shapes.parse_prompt(p).relation) if p else -100 for p in prompts]
    )


def snr_floor_at(cfg: TeacherConfig, step: int) -> float:
    """The x0-weight floor in force at U-Net step `step` (0: none yet)."""
    return cfg.snr_floor if step >= cfg.snr_floor_start else 0.0


def train_step(
    state: TeacherState,
    latents: torch.Tensor,
    prompts: list[str],
    cfg: TeacherConfig,
    gen: torch.Generator,
    step: int = 0,
) -> dict[str, float]:
    """One denoising-score-matching step on scaled VAE latents [B, 4, 16, 16] at U-Net step
    `step`; returns {"loss": the diffusion loss} (plus "relation", the auxiliary loss, when it is
    on). The random draws come from the CPU generator `gen` and are then moved: the same draws on
    every device."""
    b, dev = latents.shape[0], state.device
    drop = torch.rand(b, generator=gen) < cfg.caption_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
    ids = state.tokenizer(
        prompts, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt"
    ).input_ids
    cond, pooled = state.text_encoder(ids.to(dev))[:2]
    t = torch.randint(0, state.schedule.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen).to(dev)
    latents = latents.to(dev)
    x_t = state.schedule.add_noise(latents, noise, t)
    pred = state.unet(x_t, t.to(dev), encoder_hidden_states=cond, return_dict=False)[0]
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # [B]
    loss = (per_sample * min_snr_weight(state.schedule, t, cfg.min_snr_gamma, snr_floor_at(cfg, step)).to(dev)).mean()
    out = {"loss": loss.item()}
    if state.relation_head is not None and step >= cfg.relation_start:
        rel = F.cross_entropy(state.relation_head(pooled), relation_labels(prompts).to(dev), ignore_index=-100)
        out["relation"] = rel.item()
        loss = loss + cfg.relation_weight * rel
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in state.opt.param_groups for p in g["params"]], 1.0)
    state.opt.step()
    state.ema_unet.update(state.unet)
    state.ema_text.update(state.text_encoder)
    return out


def sample_grid(
    components: Components, prompts: list[str], steps: int, guidance: float, seed: int = 0, device="cpu"
) -> np.ndarray:
    """uint8 grid: one row per seed (2), one column per prompt."""
    pipe = TextToImage(components, device)
    rows = []
    for s in range(2):
        lat = pipe.teacher_latents(prompts, [seed + s] * len(prompts), steps=steps, guidance_scale=guidance)
        rows.append(np.concatenate(list(pipe.decode(lat)), axis=1))
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def build_latent_pool(cfg: TeacherConfig, vae) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Render and encode `cfg.latent_pool` scenes once (posterior mean and std, fp16), cached
    in the run folder: encoding 64x64 images costs about a third of a U-Net step on a CPU."""
    from safetensors.torch import load_file, save_file

    path = Path(cfg.out) / "latent-pool.safetensors"
    if path.is_file():
        t = load_file(str(path))
        prompts = json.loads(path.with_suffix(".json").read_text())
        if len(prompts) == cfg.latent_pool:
            return t["mean"], t["std"], prompts
    path.parent.mkdir(parents=True, exist_ok=True)
    means, stds, prompts = [], [], []
    batches = image_batches(cfg.seed + 104729, 256, cfg.p_two, cfg.data_workers)
    for _ in tqdm(range(-(-cfg.latent_pool // 256)), desc="latent pool", dynamic_ncols=True):
        x, ps = next(batches)
        post = vae.encode(x.to(vae.device)).latent_dist
        means.append(post.mean.half().cpu())
        stds.append(post.std.half().cpu())
        prompts += ps
    mean, std = torch.cat(means)[: cfg.latent_pool], torch.cat(stds)[: cfg.latent_pool]
    prompts = prompts[: cfg.latent_pool]
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(prompts))
    return mean, std, prompts


def latent_batches(cfg: TeacherConfig, vae, seed: int):
    """Endless (scaled latents, prompts): sampled from the pool, or encoded on the fly."""
    scale = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    if cfg.latent_pool > 0:
        mean, std, prompts = build_latent_pool(cfg, vae)
        while True:
            idx = torch.randint(0, len(prompts), (cfg.batch_size,), generator=gen)
            z = mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=gen)
            yield z * scale, [prompts[i] for i in idx.tolist()]
    data = image_batches(seed, cfg.batch_size, cfg.p_two, cfg.data_workers)
    while True:
        x, ps = next(data)
        with torch.no_grad():
            post = vae.encode(x.to(vae.device)).latent_dist
            yield (post.mean.cpu() + post.std.cpu() * torch.randn(post.mean.shape, generator=gen)) * scale, ps


def train_unet(cfg: TeacherConfig, vae) -> TeacherState:
    state = TeacherState(cfg, vae)
    ckpt = Path(cfg.out) / "ckpt-unet"
    step = 0
    if ckpt.is_dir():
        step, _ = load_checkpoint(ckpt, state.modules(), {"opt": state.opt})
    elif cfg.init_from:
        state.load_weights(Path(cfg.init_from))
    (Path(cfg.out) / "samples").mkdir(parents=True, exist_ok=True)
    log = open(Path(cfg.out) / "loss.jsonl", "a")  # noqa: SIM115 - open for the whole run
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    data = latent_batches(cfg, state.vae, cfg.seed * 7919 + step)
    start = time.time()
    bar = tqdm(range(step, cfg.unet_steps), initial=step, total=cfg.unet_steps, desc="unet", dynamic_ncols=True)
    smooth = None
    for step in bar:
        for g, base in zip(state.opt.param_groups, (cfg.lr, cfg.text_lr), strict=True):
            g["lr"] = _lr_at(step, base, cfg.warmup)
        latents, prompts = next(data)
        losses = train_step(state, latents, prompts, cfg, gen, step)
        smooth = losses if smooth is None else {k: 0.98 * smooth.get(k, v) + 0.02 * v for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in smooth.items()})
        done = step + 1
        if done % 20 == 0:
            log.write(json.dumps({"step": done, **smooth, "time": time.time() - start}) + "\n")
            log.flush()
        out_of_time = cfg.unet_minutes > 0 and time.time() - start > cfg.unet_minutes * 60
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps or out_of_time:
            save_checkpoint(ckpt, done, state.modules(), {"opt": state.opt}, {"config": cfg.to_dict()})
        if done % cfg.sample_every == 0:
            grid = sample_grid(state.components(), SAMPLE_PROMPTS, 20, cfg.guidance_scale, device=state.device)
            save_png(grid, Path(cfg.out) / "samples" / f"step{done:06d}.png")
        if out_of_time:
            break
    log.close()
    return state


def export_teacher(
    state: TeacherState, out_dir: Path, cfg: TeacherConfig, fp16: bool = True, version: str = "0", **training
) -> None:
    """The stock diffusers folder (EMA weights; fp16 on disk where it does not hurt) and its card;
    `training` (e.g. steps, minutes) is recorded in the card."""
    c = state.components(ema=True)
    save_components(c, out_dir, dtype=torch.float16 if fp16 else None)
    card = FamilyCard(
        name=cfg.name, version=version, guidance_scale=cfg.guidance_scale, teacher_config=cfg.to_dict(),
        teacher_training=training,
    )
    write_card(out_dir, card)


def train_teacher(cfg: TeacherConfig, export_to: Path | None = None) -> TeacherState:
    from diffusers import AutoencoderKL

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    # init_from: continue from a shipped teacher (its VAE as is; U-Net and text encoder
    # as the starting weights, fresh optimiser) when the run folder has no checkpoint
    vae_dir = Path(cfg.init_from) / "vae" if cfg.init_from else train_vae(cfg)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32)
    state = train_unet(cfg, vae)
    if export_to is not None:
        export_teacher(state, Path(export_to), cfg)
    return state
