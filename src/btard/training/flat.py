"""A model's parameters and gradients as one flat vector in a fixed order.

The order is ``model.named_parameters()`` (registration order), the same on every peer that builds the same
architecture. Buffers (e.g. batch-norm running statistics) are not part of the flat vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "flat_grad", "flat_params", "set_flat_params"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a model's parameters inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]  # start of each parameter; offsets[-1] + last numel == dim
    dim: int

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model`` (its parameters in ``named_parameters()`` order)."""
        names, shapes, offsets = [], [], []
        total = 0
        for name, p in model.named_parameters():
            names.append(name)
            shapes.append(p.shape)
            offsets.append(total)
            total += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), total)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` (shape ``(dim,)``) shaped like each parameter; no copy, gradients flow
        through."""
        if flat.dim() != 1 or flat.numel() != self.dim:
            raise ValueError(f"expected a flat vector of {self.dim} elements, got shape {tuple(flat.shape)}")
        out = {}
        for name, shape, start in zip(self.names, self.shapes, self.offsets):
            out[name] = flat[start : start + shape.numel()].view(shape)
        return out

    def flatten(self, tensors: dict[str, Tensor], *, batch_dims: int = 0) -> Tensor:
        """Concatenate ``tensors`` (keyed by parameter name) in layout order into shape ``(*batch, dim)``."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            batch = t.shape[:batch_dims]
            if t.shape[batch_dims:] != shape:
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape[batch_dims:])}")
            parts.append(t.reshape(*batch, shape.numel()))
        return torch.cat(parts, dim=batch_dims)


def flat_params(model: nn.Module) -> Tensor:
    """A new 1-D tensor with all parameters of ``model`` concatenated in `ParamLayout` order (detached)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_flat_params(model: nn.Module, flat: Tensor) -> None:
    """Copy ``flat`` into the parameters of ``model`` (in place); raises if the size or dtype does not
    match."""
    layout = ParamLayout.of(model)
    if flat.dim() != 1 or flat.numel() != layout.dim:
        raise ValueError(f"expected a flat vector of {layout.dim} elements, got shape {tuple(flat.shape)}")
    with torch.no_grad():
        for p, start in zip(model.parameters(), layout.offsets):
            if flat.dtype != p.dtype:
                raise ValueError(f"dtype mismatch: flat is {flat.dtype}, parameters are {p.dtype}")
            p.copy_(flat[start : start + p.numel()].view_as(p))


def flat_grad(model: nn.Module) -> Tensor:
    """All ``.grad`` of ``model`` as one flat vector in `ParamLayout` order; a missing grad counts as
    zeros."""
    return torch.cat(
        [
            (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    )
