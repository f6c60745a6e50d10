"""Learned class maps for QAConv's class-neighbour loss (training only, never in a serving file).

QAConv's classification-style objective scores each training sample against a learned
``C x 7 x 7`` map of its own class and of its ``k`` most similar classes (by the cosine of the
flattened, location-normalised maps), so the matcher learns from hard negatives without a
batch holding them. The maps belong to the training identities, so they live beside the trainer
(like the margin head), not in :class:`model.qaconv.QAConv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.qaconv import QAConv

__all__ = ["ClassMemory"]


class ClassMemory(nn.Module):
    """``num_classes`` learnable maps and each class's ``k_nearest`` neighbour classes.

    Args:
        num_classes: training identities.
        num_features, height, width: the map shape QAConv matches.
        k_nearest: neighbours scored with each sample (capped at ``num_classes - 1``).
    """

    def __init__(
        self, num_classes: int, num_features: int = 512, height: int = 7, width: int = 7, k_nearest: int = 32
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Parameter(torch.randn(num_classes, num_features, height, width) / math.sqrt(num_features))
        k = min(k_nearest, max(num_classes - 1, 0))
        self.register_buffer("neighbors", torch.zeros(num_classes, k, dtype=torch.long))
        self.neighbors: torch.Tensor

    def candidates(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B, k + 1]`` class ids: own class first, then its nearest classes."""
        return torch.cat([labels[:, None], self.neighbors[labels]], dim=1)

    def scores(
        self, qaconv: QAConv, probe_fea: torch.Tensor, labels: torch.Tensor, probe_occ: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, k + 1]`` QAConv scores of each sample against its candidate classes (column 0 = own class)."""
        classes = self.candidates(labels)
        return qaconv.match_grouped(probe_fea, self.embed[classes], probe_occ)

    @torch.no_grad()
    def compute_neighbors(self, chunk_size: int = 1024) -> torch.Tensor:
        """Top-k most similar classes, excluding each class itself; stored in ``neighbors`` and returned."""
        k = self.neighbors.shape[1]
        n, c = self.embed.shape[:2]
        emb = F.normalize(self.embed.reshape(n, c, -1), dim=1)  # each location's C-vector normalised
        emb = F.normalize(emb.reshape(n, -1), dim=1)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sim = emb[start:stop] @ emb.T
            rows = torch.arange(stop - start, device=sim.device)
            sim[rows, rows + start] = float("-inf")
            self.neighbors[start:stop] = sim.topk(k, dim=1).indices
        return self.neighbors
