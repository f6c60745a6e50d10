"""QAConv local matcher over 7x7 face feature maps, with occlusion weighting and a fast gallery path.

Provenance: QAConv (Liao and Shao, ECCV 2020; ShengcaiLiao/QAConv), original v1 tail: per-location
L2-normalised maps, correlation of every probe location with every gallery location, the maxima
in both directions concatenated (``[P, G, 2hw]``), then ``BatchNorm1d(1) -> Linear(2hw, 1) ->
BatchNorm1d(1)``, which gives one logit per pair (higher = more similar).

Occlusion weighting (OAML). Each location is weighted by the visibility of its *own* image: probe
location ``s`` by the probe's map ``v_s``, gallery location ``r`` by the gallery's map ``u_r``, so
the weighted correlation is ``w_p[s] * w_g[r] * c[s, r]``. Two weightings are offered:

* ``'scaling'``: ``w = v`` (the visibility itself). Scores fall as faces get more occluded.
* ``'outer'``: ``w = v / mean(v)``: the outer product of the two maps, renormalised so that the
  mean weight of each image is 1. Visible regions still dominate the maxima, but the score scale
  stays comparable between clean and occluded faces (useful for one fused threshold).

Both are products of a per-probe and a per-gallery factor, so they fold into the features: the
stored gallery maps are pre-multiplied by their weights and matching costs nothing extra.

Negative correlations: after weighting, correlations are clamped at 0 (ReLU) before the maxima.
A small weight pulls a negative correlation up toward 0, which could otherwise let an occluded
location win the max over visible locations whose (unweighted) correlation is negative. With the
clamp every negative correlation becomes exactly 0 whatever its weight, so down-weighting can only
lower a location's contribution. Because weights are non-negative, ``relu(w * c) = w * relu(c)``
and ``max(relu(x)) = relu(max(x))``, so the fast path clamps the maxima instead of the full
correlation tensor. Training (:meth:`QAConv.forward`) and serving (:meth:`QAConv.match`) share the
rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QAConv",
    "PreparedGallery",
    "PairExplanation",
    "OCCLUSION_METHODS",
    "MAP_STORAGES",
    "quantise_maps",
    "dequantise_maps",
]

#: How an index may keep prepared gallery maps: ``native`` in the matching dtype (bf16 on a CPU, fp16 on
#: CUDA: 2 bytes a value), ``int8`` as int8 with one fp32 scale per face and channel (1 byte a value, plus
#: 4 bytes a channel).
MAP_STORAGES = ("native", "int8")


def quantise_maps(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared maps ``[N, C, hw]`` -> int8 values ``[N, C, hw]`` and scales ``[N, C]`` (fp32).

    Symmetric, one scale per face and channel (the channel's largest magnitude over the face's locations maps
    to 127): channels differ in range by an order of magnitude after a principal-direction projection, and a
    face's own range is what its values span, so neither a per-face nor a global scale wastes fewer levels.
    Each value is off by at most half a step, ``scale / 2``.
    """
    if rows.dim() != 3:
        raise ValueError(f"expected maps [N, C, hw], got {list(rows.shape)}")
    x = rows.float()
    scale = x.abs().amax(dim=2) / 127.0
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantise_maps(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Int8 values ``[N, C, hw]`` (or QAConv's column layout ``[C, N, hw]`` with scales ``[C, N]``) times their
    scales, in ``dtype``."""
    # converted, then scaled in place: one pass each (an out-of-place broadcast product is ~25x slower on a CPU)
    return values.to(torch.float32).mul_(scales[..., None]).to(dtype)


OCCLUSION_METHODS = ("scaling", "outer")


@dataclass
class PreparedGallery:
    """Gallery maps ready for one-GEMM matching.

    Attributes:
        maps: ``[C, G * hw]``: each location L2-normalised and multiplied by its visibility
            weight, gallery item ``g`` occupying columns ``g*hw .. (g+1)*hw - 1``.
        count: number of gallery items ``G``.
        hw: locations per map.
    """

    maps: torch.Tensor
    count: int
    hw: int

    def __len__(self) -> int:
        return self.count


@dataclass
class PairExplanation:
    """One pair's QAConv score taken apart (see :meth:`QAConv.explain_pair`); tensors of ``hw`` values.

    For each probe location: ``probe_match``, the gallery location it matched best;
    ``probe_similarity``, that visibility-weighted, clamped local correlation; ``probe_weight``, the
    probe's own visibility weight at that location; ``probe_shares``, its contribution to the
    score. The ``gallery_*`` fields read the same from the other side.
    """

    probe_match: torch.Tensor
    probe_similarity: torch.Tensor
    probe_weight: torch.Tensor
    probe_shares: torch.Tensor
    gallery_match: torch.Tensor
    gallery_similarity: torch.Tensor
    gallery_weight: torch.Tensor
    gallery_shares: torch.Tensor
    bias: float

    @property
    def score(self) -> float:
        return float(self.probe_shares.sum() + self.gallery_shares.sum()) + self.bias


class QAConv(nn.Module):
    """Query-adaptive convolution matcher (see module docstring for the occlusion rules).

    Args:
        num_features: channels of the feature maps.
        height, width: spatial size of the feature maps (7x7 for 112x112 faces).
        occlusion_method: ``'scaling'`` or ``'outer'``.
    """

    def __init__(
        self,
        num_features: int = 512,
        height: int = 7,
        width: int = 7,
        occlusion_method: str = "scaling",
    ) -> None:
        super().__init__()
        if occlusion_method not in OCCLUSION_METHODS:
            raise ValueError(f"occlusion_method must be one of {OCCLUSION_METHODS}, got {occlusion_method!r}")
        self.num_features = num_features
        self.height = height
        self.width = width
        self.hw = height * width
        self.occlusion_method = occlusion_method
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(2 * self.hw, 1)
        self.logit_bn = nn.BatchNorm1d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        self.logit_bn.reset_parameters()
        # The logit BatchNorm's scale stays fixed at 1: training it lets the batch-hard ranking and the
        # pairwise BCE reach their trivial values (margin, ln 2) by shrinking every score to 0, which is
        # what happened in the first CPU runs. Its shift and the running statistics still train.
        self.logit_bn.weight.requires_grad_(False)
        # Start as the mean of the 2hw best local matches, as QAConv's init does.
        nn.init.constant_(self.fc.weight, 1.0 / (2 * self.hw))
        nn.init.zeros_(self.fc.bias)

    # -- shared pieces ----------------------------------------------------------------------

    def visibility_weights(self, occ: torch.Tensor | None, count: int, device: torch.device) -> torch.Tensor:
        """Per-location weights ``[N, hw]`` from visibility maps ``[N, 1, H, W]`` (ones if None)."""
        if occ is None:
            return torch.ones(count, self.hw, device=device)
        v = occ.reshape(occ.shape[0], self.hw).float().clamp(0.0, 1.0)
        if self.occlusion_method == "outer":
            v = v / v.mean(dim=1, keepdim=True).clamp_min(1e-3)
        return v

    def _locations(self, fea: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, hw, C]``, each location's C-vector L2-normalised (fp32)."""
        n, c = fea.shape[:2]
        if c != self.num_features or fea.shape[2] * fea.shape[3] != self.hw:
            raise ValueError(
                f"expected maps [N, {self.num_features}, {self.height}, {self.width}], got {list(fea.shape)}"
            )
        return F.normalize(fea.float().reshape(n, c, self.hw), dim=1).transpose(1, 2)

    def _tail(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[..., 2hw]`` maxima -> ``[...]`` logits through BN -> FC -> BN (train or eval stats)."""
        shape = pooled.shape[:-1]
        x = self.bn(pooled.reshape(-1, 1, 2 * self.hw)).reshape(-1, 2 * self.hw)
        x = self.logit_bn(self.fc(x))
        return x.reshape(shape)

    @staticmethod
    def _pool(corr: torch.Tensor) -> torch.Tensor:
        """Correlations ``[..., hw_probe, hw_gallery]`` -> clamped maxima in both directions ``[..., 2hw]``."""
        best_for_probe = corr.amax(dim=-1)  # each probe location's best gallery location
        best_for_gallery = corr.amax(dim=-2)  # each gallery location's best probe location
        return torch.cat([best_for_probe, best_for_gallery], dim=-1).clamp_min(0.0)

    def folded_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode tail as one affine map: ``score = pooled @ weight + bias``.

        BN1d(1) at eval is ``a1 * x + b1``; then ``fc``; then ``a2 * z + b2``.
        """
        bn, logit_bn = self.bn, self.logit_bn
        assert bn.running_var is not None and bn.running_mean is not None  # built with running statistics
        assert logit_bn.running_var is not None and logit_bn.running_mean is not None
        a1 = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        b1 = bn.bias - bn.running_mean * a1
        a2 = logit_bn.weight / torch.sqrt(logit_bn.running_var + logit_bn.eps)
        b2 = logit_bn.bias - logit_bn.running_mean * a2
        w = self.fc.weight[0]
        weight = (a2 * a1) * w
        bias = a2 * (b1 * w.sum() + self.fc.bias) + b2
        return weight.detach().float(), bias.detach().float().reshape(())

    # -- literal definition (training, reference) -------------------------------------------

    def forward(
        self,
        probe_fea: torch.Tensor,
        gal_fea: torch.Tensor,
        probe_occ: torch.Tensor | None = None,
        gal_occ: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score probes against gallery maps: ``[P, G]``.

        The literal definition: ``[P, G, hw, hw]`` correlations weighted by the outer product of
        the two visibility weightings, clamped maxima in both directions, then the tail.
        """
        p = self._locations(probe_fea)
        g = self._locations(gal_fea)
        wp = self.visibility_weights(probe_occ, p.shape[0], p.device)
        wg = self.visibility_weights(gal_occ, g.shape[0], g.device)
        # the outer product of the weightings, folded into each side's locations first: the same numbers as
        # weighting the [P, G, hw, hw] correlations, without a second tensor of that size (and its backward)
        corr = torch.einsum("psc,grc->pgsr", p * wp[:, :, None], g * wg[:, :, None])
        return self._tail(self._pool(corr))

    def match_grouped(
        self, probe_fea: torch.Tensor, groups: torch.Tensor, probe_occ: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each probe against its own ``K`` maps: ``[B, C, H, W]`` x ``[B, K, C, H, W]`` -> ``[B, K]``.

        The literal, differentiable definition with only the probe's visibility weighting (the
        group maps are taken as fully visible). Training scores samples against learned class
        maps with it (:mod:`model.training.class_memory`).
        """
        b, k = groups.shape[:2]
        p = self._locations(probe_fea)  # [B, hw, C]
        g = self._locations(groups.reshape(b * k, *groups.shape[2:])).reshape(b, k, self.hw, self.num_features)
        corr = torch.einsum("bsc,bkrc->bksr", p, g)
        wp = self.visibility_weights(probe_occ, b, p.device)
        return self._tail(self._pool(corr * wp[:, None, :, None]))

    # -- fast paths --------------------------------------------------------------------------

    @torch.no_grad()
    def explain_pair(
        self,
        probe: torch.Tensor,
        gallery: torch.Tensor,
        probe_occ: torch.Tensor | None = None,
        gallery_occ: torch.Tensor | None = None,
    ) -> PairExplanation:
        """Where one pair's eval-mode score comes from, location by location.

        ``probe``/``gallery``: ``[C, H, W]`` maps, occlusions ``[H, W]``. The score is
        ``sum(probe_shares) + sum(gallery_shares) + bias``: each probe location contributes its best
        weighted correlation with any gallery location times its tail weight, and each gallery
        location likewise. These are the numbers :meth:`match_pairs` adds up, not a re-estimate.
        """
        wp = self.visibility_weights(None if probe_occ is None else probe_occ[None], 1, probe.device)[0]
        wg = self.visibility_weights(None if gallery_occ is None else gallery_occ[None], 1, gallery.device)[0]
        p = self._locations(probe[None])[0] * wp[:, None]
        g = self._locations(gallery[None])[0] * wg[:, None]
        corr = (p @ g.T).clamp_min(0.0)  # [hw probe, hw gallery], weighted and clamped as in _pool
        weight, bias = self.folded_tail()
        weight = weight.to(corr.device)
        best_for_probe, probe_match = corr.max(dim=1)
        best_for_gallery, gallery_match = corr.max(dim=0)
        return PairExplanation(
            probe_match=probe_match.cpu(),
            probe_similarity=best_for_probe.cpu(),
            probe_weight=wp.cpu(),
            probe_shares=(best_for_probe * weight[: self.hw]).cpu(),
            gallery_match=gallery_match.cpu(),
            gallery_similarity=best_for_gallery.cpu(),
            gallery_weight=wg.cpu(),
            gallery_shares=(best_for_gallery * weight[self.hw :]).cpu(),
            bias=float(bias),
        )

    def match_pairs(
        self,
        probe: torch.Tensor,
        gallery: torch.Tensor,
        query_occ: torch.Tensor | None = None,
        gallery_occ: torch.Tensor | None = None,
        chunk_size: int = 4096,
        gallery_storage: str = "native",
    ) -> torch.Tensor:
        """Scores of aligned pairs ``probe[i]`` vs ``gallery[i]`` -> ``[N]``, batched (no per-pair loop).

        ``gallery_storage="int8"`` scores the gallery side as an int8 index keeps it (:func:`quantise_maps`),
        to measure what that storage costs."""
        if gallery_storage not in MAP_STORAGES:
            raise ValueError(f"gallery_storage must be one of {MAP_STORAGES}, got {gallery_storage!r}")
        if probe.shape != gallery.shape:
            raise ValueError(f"pair lists differ in shape: {list(probe.shape)} vs {list(gallery.shape)}")
        n = probe.shape[0]
        p = self._locations(probe) * self.visibility_weights(query_occ, n, probe.device)[..., None]
        g = self._locations(gallery) * self.visibility_weights(gallery_occ, n, gallery.device)[..., None]
        if gallery_storage == "int8":  # [n, hw, C]: quantised per channel over the locations, as the index does
            g = dequantise_maps(*quantise_maps(g.transpose(1, 2)), torch.float32).transpose(1, 2)
        pooled = [
            self._pool(torch.bmm(p[i : i + chunk_size], g[i : i + chunk_size].transpose(1, 2)))
            for i in range(0, n, chunk_size)
        ]
        return self._tail(torch.cat(pooled)) if pooled else probe.new_zeros(0)

    def prepare_probe(self, probe_fea: torch.Tensor, probe_occ: torch.Tensor | None = None) -> torch.Tensor:
        """``[P, C, H, W]`` -> ``[P * hw, C]`` normalised, visibility-weighted rows (fp32)."""
        p = self._locations(probe_fea)
        p = p * self.visibility_weights(probe_occ, p.shape[0], p.device)[..., None]
        return p.reshape(-1, self.num_features)

    @torch.no_grad()
    def prepare_gallery(
        self, gal_fea: torch.Tensor, gal_occ: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> PreparedGallery:
        """Normalise, weight and lay out gallery maps as ``[C, G * hw]`` (``dtype`` defaults to the input's)."""
        g = self._locations(gal_fea) * self.visibility_weights(gal_occ, gal_fea.shape[0], gal_fea.device)[..., None]
        maps = g.permute(2, 0, 1).reshape(self.num_features, -1)
        return PreparedGallery(maps.to(dtype or gal_fea.dtype).contiguous(), gal_fea.shape[0], self.hw)

    @torch.no_grad()
    def match(
        self,
        probe_fea: torch.Tensor,
        gallery: PreparedGallery,
        probe_occ: torch.Tensor | None = None,
        chunk_size: int = 256,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eval-mode scores of probes against a prepared gallery -> ``[P, G]`` (fp32).

        One GEMM per gallery chunk (probe rows ``[P*hw, C]`` times ``[C, n*hw]``), two max
        reductions and the folded tail; memory stays at ``P*hw*chunk*hw`` elements. ``indices``
        restricts matching to a subset of gallery items (a shortlist) without copying the rest.
        Running statistics are used whatever the module's mode.
        """
        weight, bias = self.folded_tail()
        weight = weight.to(probe_fea.device)
        w_probe, w_gallery = weight[: self.hw], weight[self.hw :]
        probe = self.prepare_probe(probe_fea, probe_occ).to(gallery.maps.dtype)
        n_probe, hw = probe_fea.shape[0], self.hw
        if indices is not None:
            # Gather whole 49-column blocks through a [C, G, hw] view: a copy of k*hw*C values. (index_select
            # on dim 1 of the strided [C, G*hw] matrix is ~40x slower on CPU.)
            maps = gallery.maps.unflatten(1, (-1, hw))[:, indices.to(gallery.maps.device)].reshape(
                self.num_features, -1
            )
            total = indices.numel()
        else:
            maps, total = gallery.maps, gallery.count
        out = torch.empty(n_probe, total, dtype=torch.float32, device=probe.device)
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            corr = (probe @ maps[:, start * hw : stop * hw]).view(n_probe, hw, stop - start, hw)
            best_for_probe = corr.amax(dim=3).float().clamp_min_(0.0)  # [P, hw, n]
            best_for_gallery = corr.amax(dim=1).float().clamp_min_(0.0)  # [P, n, hw]
            out[:, start:stop] = (
                torch.einsum("psn,s->pn", best_for_probe, w_probe) + best_for_gallery @ w_gallery + bias
            )
        return out
