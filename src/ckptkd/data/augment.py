"""Augmentation as batched tensor ops, described by compact per-image "views".

A view is three small integers per image: the crop offsets (dy, dx) into the zero-padded image and a flip bit. Drawing
views and applying them are separate steps, so the exact image a teacher saw can be named, stored and replayed.
"""

from __future__ import annotations

import torch


def sample_views(n: int, *, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random views for n images: int16 [n, 3] of (dy, dx, flip), drawn on the CPU so every device agrees."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, dtype=torch.int64)
    flips = torch.randint(0, 2, (n, 1), generator=generator, dtype=torch.int64) if hflip else torch.zeros(n, 1, dtype=torch.int64)
    return torch.cat([offsets, flips], dim=1).to(torch.int16)


def identity_views(n: int, *, pad: int) -> torch.Tensor:
    views = torch.zeros(n, 3, dtype=torch.int16)
    views[:, :2] = pad
    return views


def apply_views(images: torch.Tensor, views: torch.Tensor, *, pad: int) -> torch.Tensor:
    """Crop each zero-padded image at its offsets and flip it where asked; returns float32 in the input's scale."""
    x = images.float()
    b, c, h, w = x.shape
    views = views.to(device=x.device, dtype=torch.int64)
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = views[:, 0:1] + torch.arange(h, device=x.device)            # [B, H]
    cols = views[:, 1:2] + torch.arange(w, device=x.device)            # [B, W]
    flip = views[:, 2:3].bool()
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    # clone, not contiguous(): with one channel the permuted view already counts as contiguous, but its strides
    # read as channels-last, and convolutions then run (and pass on) that layout, 2x slower for few channels.
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x in 0..255 -> (x/255 - mean) / std, per channel."""
    mean = mean.to(x.device).view(1, -1, 1, 1)
    std = std.to(x.device).view(1, -1, 1, 1)
    return (x / 255.0 - mean) / std
