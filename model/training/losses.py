"""Training objectives beyond the margin head: QAConv matching, occlusion, distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "pairwise_matching_loss",
    "triplet_ranking_loss",
    "class_neighbor_loss",
    "occlusion_loss",
    "relation_distillation_loss",
    "feature_distillation_loss",
]


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def pairwise_matching_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Balanced BCE on the ``[B, B]`` QAConv logits: same identity -> 1, different -> 0.

    Positives and negatives are averaged separately (a PK batch has far more negatives); the
    diagonal (an image against itself) is left out.
    """
    pos, neg = _pair_masks(labels)
    target = pos.float()
    bce = F.binary_cross_entropy_with_logits(scores.float(), target, reduction="none")
    parts = [bce[m].mean() for m in (pos, neg) if bool(m.any())]
    return torch.stack(parts).mean()


def triplet_ranking_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Batch-hard ranking on similarity scores: hardest positive must beat hardest negative by ``margin``."""
    pos, neg = _pair_masks(labels)
    s = scores.float()
    big = torch.finfo(s.dtype).max / 4
    hardest_pos = torch.where(pos, s, torch.full_like(s, big)).min(dim=1).values
    hardest_neg = torch.where(neg, s, torch.full_like(s, -big)).max(dim=1).values
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return s.sum() * 0.0
    return F.relu(margin - (hardest_pos - hardest_neg))[valid].mean()


def class_neighbor_loss(scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over ``[B, k + 1]`` class-embedding scores whose column 0 is the true class."""
    return F.cross_entropy(scores.float(), torch.zeros(len(scores), dtype=torch.long, device=scores.device))


def occlusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted ``[B, 1, 7, 7]`` visibility and the pixel-derived 7x7 target."""
    return F.mse_loss(pred.float().reshape(target.shape), target.float())


def relation_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's ``[B, B]`` cosine-similarity matrices.

    Dimension-free (512-d student, 128-d teacher) and it transfers how the teacher ranks
    identities, not its coordinates.
    """
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    return F.mse_loss(s @ s.T, t @ t.T)


def feature_distillation_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between the student's projected embedding and the teacher's embedding."""
    return (1 - F.cosine_similarity(projected.float(), teacher.float(), dim=1)).mean()
