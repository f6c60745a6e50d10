"""Margin-based classification heads for training the global embedding: AdaFace, ArcFace, CosFace.

Provenance: AdaFace ``head.py`` (mk-minchul/AdaFace). The heads take L2-normalised embeddings and
their norms, and return scaled logits for ``CrossEntropyLoss``. Margins touch the target logit
only; every other logit is ``s * cos``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MarginHead", "AdaFace", "ArcFace", "CosFace", "build_head", "HEADS"]


class MarginHead(nn.Module):
    """Shared class-weight kernel and cosine computation.

    The kernel is stored ``[embedding_size, classnum]`` under the name ``kernel`` so AdaFace
    Lightning checkpoints' ``head.kernel`` maps onto it.
    """

    eps: float = 1e-4

    def __init__(self, embedding_size: int, classnum: int, s: float) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.classnum = classnum
        self.s = s
        self.kernel = nn.Parameter(torch.empty(embedding_size, classnum))
        # AdaFace's init: uniform, then every column renormalised to unit length.
        self.kernel.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        kernel = F.normalize(self.kernel, dim=0)
        return (embeddings.float() @ kernel.float()).clamp(-1 + self.eps, 1 - self.eps)

    @staticmethod
    def _target_mask(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(cosine, dtype=torch.bool)
        mask.scatter_(1, labels.reshape(-1, 1), True)
        return mask


class ArcFace(MarginHead):
    """Additive angular margin: target logit ``s * cos(theta + m)``."""

    def __init__(self, embedding_size: int = 512, classnum: int = 70722, m: float = 0.5, s: float = 64.0) -> None:
        super().__init__(embedding_size, classnum, s)
        self.m = m

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(embeddings)
        mask = self._target_mask(cosine, labels)
        theta = torch.acos(cosine)
        theta_m = (theta + self.m * mask).clamp(self.eps, math.pi - self.eps)
        return self.s * torch.cos(theta_m)


class CosFace(MarginHead):
    """Additive cosine margin: target logit ``s * (cos - m)``."""

    def __init__(self, embedding_size: int = 512, classnum: int = 70722, m: float = 0.4, s: float = 64.0) -> None:
        super().__init__(embedding_size, classnum, s)
        self.m = m

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(embeddings)
        mask = self._target_mask(cosine, labels)
        return self.s * (cosine - self.m * mask)


class AdaFace(MarginHead):
    """Quality-adaptive margin (Kim et al., CVPR 2022).

    The feature norm, standardised by EMA batch statistics and scaled by ``h``, gives a scaler
    ``z`` in [-1, 1]. On the target logit only: angular margin ``-m * z`` and additive margin
    ``m + m * z``, so ``logit = s * (cos(theta - m*z) - (m + m*z))``. High-norm (high-quality)
    samples (z -> 1) get an ArcFace-like angular margin; low-norm ones (z -> -1) a CosFace-like
    additive margin that de-emphasises hard, unrecognisable samples. With ``h = 0`` the margin
    is fixed: angular 0, additive ``m``.

    The EMA buffers ``batch_mean`` (init 20) and ``batch_std`` (init 100) are updated only in
    training mode (AdaFace updates them on every call; evaluation must not move them).
    """

    eps = 1e-3

    def __init__(
        self,
        embedding_size: int = 512,
        classnum: int = 70722,
        m: float = 0.4,
        h: float = 0.333,
        s: float = 64.0,
        t_alpha: float = 1.0,
    ) -> None:
        super().__init__(embedding_size, classnum, s)
        self.m = m
        self.h = h
        self.t_alpha = t_alpha
        self.register_buffer("t", torch.zeros(1))
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)
        self.t: torch.Tensor
        self.batch_mean: torch.Tensor
        self.batch_std: torch.Tensor

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """Update the EMA (in training mode) and return ``z`` in [-1, 1], shape ``[B, 1]``."""
        safe_norms = torch.clip(norms.float(), min=0.001, max=100).detach()
        if self.training:
            with torch.no_grad():
                mean = safe_norms.mean()
                std = safe_norms.std() if safe_norms.numel() > 1 else torch.zeros_like(mean)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h
        return torch.clip(scaler, -1, 1)

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(embeddings)
        scaler = self.margin_scaler(norms)
        mask = self._target_mask(cosine, labels)
        g_angular = -self.m * scaler * mask
        theta = torch.acos(cosine)
        theta_m = torch.clip(theta + g_angular, min=self.eps, max=math.pi - self.eps)
        g_add = (self.m + self.m * scaler) * mask
        return self.s * (torch.cos(theta_m) - g_add)


HEADS: dict[str, type[MarginHead]] = {"adaface": AdaFace, "arcface": ArcFace, "cosface": CosFace}


def build_head(
    head_type: str,
    embedding_size: int,
    class_num: int,
    m: float,
    t_alpha: float = 1.0,
    h: float = 0.333,
    s: float = 64.0,
) -> MarginHead:
    """Build a head by name (``'adaface'``, ``'arcface'``, ``'cosface'``), AdaFace's signature."""
    key = head_type.lower()
    if key == "adaface":
        return AdaFace(embedding_size, class_num, m=m, h=h, s=s, t_alpha=t_alpha)
    if key == "arcface":
        return ArcFace(embedding_size, class_num, m=m, s=s)
    if key == "cosface":
        return CosFace(embedding_size, class_num, m=m, s=s)
    raise ValueError(f"unknown head {head_type!r}; choose one of {sorted(HEADS)}")
