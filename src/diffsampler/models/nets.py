"""The networks of the shipped models: small enough to train on two CPU cores.

Every network takes ``(x, time, **cond)`` as a ``Denoiser`` hands them over:
``time`` is the process time (a float tensor of shape ``(batch,)`` in [0, 1]),
embedded with sinusoids as in DDPM (Ho et al., 2020) and the Transformer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TimeEmbedding", "ToyMLP", "DigitsUNet", "SelfAttention2d", "NoisyDigitsClassifier",
           "DigitsEvaluator", "NULL_LABEL"]

#: The label index of "no class" in the class-conditional digits models: the
#: embedding trained with label dropout, which makes the model unconditional.
NULL_LABEL = 10


def sinusoidal(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """``[cos(s t f_k), sin(s t f_k)]`` with frequencies ``f_k`` spaced geometrically from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoids of the time followed by a two-layer MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(t, self.dim))


class ToyMLP(nn.Module):
    """A residual MLP for 2-D data: ``x`` and the time embedding in, a 2-D prediction out."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.time = TimeEmbedding(32, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = self.inp(x.float()) + self.time(time)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).to(dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding added in between (the DDPM block)."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual.

    ``perturbed`` (False, True, or a bool tensor with one entry per sample)
    replaces the attention map by the identity (each pixel attends only to
    itself, so the layer returns its projected values) for all or the flagged
    samples: the perturbation of perturbed-attention guidance (Ahn et al., 2024),
    set by ``diffsampler.guidance.perturbed_attention``.
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid).unbind(1)
        perturbed = self.perturbed
        if perturbed is True:
            out = v
        else:
            out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                 v.transpose(-1, -2)).transpose(-1, -2)
            if isinstance(perturbed, torch.Tensor):
                out = torch.where(perturbed.reshape(-1, 1, 1, 1), v, out)
        return x + self.proj(out.reshape(b, c, hgt, wid))


class DigitsUNet(nn.Module):
    """A two-level class-conditional UNet for 8x8 images, self-attention at 4x4.

    ``label`` (a LongTensor of class indices, ``NULL_LABEL`` for none) is embedded
    and added to the time embedding; without ``label`` the null label is used.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), emb: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.num_classes = num_classes
        self.time = TimeEmbedding(64, emb)
        self.label = nn.Embedding(num_classes + 1, emb)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, emb)
        self.attn_down = SelfAttention2d(c2)
        self.mid = ResBlock(c2, c2, emb)
        self.attn_mid = SelfAttention2d(c2)
        self.up2 = ResBlock(2 * c2, c2, emb)
        self.attn_up = SelfAttention2d(c2)
        self.upsample = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.up1 = ResBlock(2 * c1, c1, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, time: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if label is None:
            label = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        emb = F.silu(self.time(time) + self.label(label))
        h1 = self.down1(self.inp(x), emb)
        h2 = self.attn_down(self.down2(self.downsample(h1), emb))
        h = self.attn_mid(self.mid(h2, emb))
        h = self.attn_up(self.up2(torch.cat([h, h2], 1), emb))
        h = self.up1(torch.cat([self.upsample(h), h1], 1), emb)
        return self.out(h).to(dtype)


class NoisyDigitsClassifier(nn.Module):
    """``log p(label | x_t)``: a time-conditioned classifier of noisy 8x8 digits (for guidance).

    With ``num_classes`` minority levels it is the noise-aware minority classifier ``p(l | x_t)`` of
    minority guidance (``digits-minority``)."""

    def __init__(self, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes  # read by minority_guidance for its default (highest) level
        self.time = TimeEmbedding(64, hidden)
        self.inp = nn.Linear(64, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                    for _ in range(3))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.float().flatten(1)) + self.time(time)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class DigitsEvaluator(nn.Module):
    """A classifier of clean 8x8 digits, trained on real digits only: the judge of generated ones.

    ``features(x)`` is its penultimate layer, the space of the Frechet distance.
    """

    def __init__(self, hidden: int = 128, features: int = 32, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
