"""A latent discriminator built from the teacher U-Net's encoder (SDXL-Lightning / UFOGen).

The backbone is a copy of the teacher's conv_in, time embedding, down blocks and mid
block, so it sees noised latents at a timestep and attends to the text through the
teacher's own cross-attention. Small trainable heads on every block's output give
patch logits; a projection term (Miyato & Koyama 2018) on pooled text features makes
the judgement explicitly text-conditional. The backbone is frozen by default (cheap on
CPU); `train_backbone=True` fine-tunes it too.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class Head(nn.Module):
    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 8
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
        )
        self.out = nn.Conv2d(channels, 1, 1)
        self.text_proj = nn.Linear(text_dim, channels)

    def forward(self, h: Tensor, text: Tensor) -> Tensor:
        h = self.body(h)  # (B, C, H, W)
        patch = self.out(h).flatten(1).mean(1)  # (B,)
        proj = (h.mean(dim=(2, 3)) * self.text_proj(text)).sum(1) / h.shape[1] ** 0.5  # (B,)
        return patch + proj


class Discriminator(nn.Module):
    def __init__(self, unet, train_backbone: bool = False):
        super().__init__()
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        for m in (self.conv_in, self.time_embedding, self.down_blocks, self.mid_block):
            m.requires_grad_(train_backbone)
        text_dim = unet.config.cross_attention_dim
        channels = list(unet.config.block_out_channels) + [unet.config.block_out_channels[-1]]
        self.heads = nn.ModuleList(Head(c, text_dim) for c in channels)

    def features(self, x: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        """Each down block's output and the mid block's output, as in UNet2DConditionModel.forward."""
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        feats = []
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            feats.append(h)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states=cond)
            feats.append(h)
        return feats

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Logits [B]: mean over heads of patch + projection scores."""
        text = cond.mean(dim=1)  # (B, D) pooled text
        feats = self.features(x, t, cond)
        return torch.stack([head(f, text) for head, f in zip(self.heads, feats, strict=False)]).mean(0)
