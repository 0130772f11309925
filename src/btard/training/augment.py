"""Image augmentation drawn from a public-seed generator (so anyone can recompute a peer's batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RandomCropFlip"]


@dataclass(frozen=True)
class RandomCropFlip:
    """A random crop of the image zero-padded by ``padding`` (same size out), then a flip with chance 1/2.

    The torchvision CIFAR recipe (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``), vectorized over
    an (N, C, H, W) batch of any dtype. Draws, in order: N row offsets, N column offsets, N flip bits.
    """

    padding: int = 4
    flip: bool = True

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.padding
        padded = x.new_zeros((n, c, h + 2 * p, w + 2 * p))
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = dy[:, None] + torch.arange(h)[None, :]
        cols = dx[:, None] + torch.arange(w)[None, :]
        if self.flip:
            flips = torch.randint(0, 2, (n,), generator=generator).bool()
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        return padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(c)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
