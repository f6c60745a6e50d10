"""IR-ResNet backbones (AdaFace topology) with an occlusion head and an optional QAConv gallery.

Provenance: the topology and every parameter/buffer name follow AdaFace's ``net.py``
(mk-minchul/AdaFace), so an official AdaFace Lightning checkpoint loads strictly into the
backbone part of :class:`OAMLNet` (see :mod:`model.checkpoint`). The occlusion head and the QAConv
matcher are OAML additions that live beside the backbone under their own prefixes
(``occlusion_head.*``, ``qaconv.*``).

Input convention (AdaFace): aligned 112x112 faces, **BGR**, ``(x / 255 - 0.5) / 0.5``, NCHW.
A 112x112 input yields a 512x7x7 feature map (2048x7x7 for the bottleneck IR-152/200).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from model.qaconv import PreparedGallery, QAConv

__all__ = [
    "SEModule",
    "BasicBlockIR",
    "BasicBlockIRSE",
    "BottleneckIR",
    "BottleneckIRSE",
    "OcclusionHead",
    "OAMLNet",
    "OAMLOutput",
    "ArchSpec",
    "ARCHITECTURES",
    "build_model",
]

logger = logging.getLogger(__name__)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate; attribute names ``fc1``/``fc2`` match AdaFace's keys."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


def _shortcut(in_channel: int, depth: int, stride: int) -> nn.Module:
    """Parameter-free strided subsample when widths match (named ``MaxPool2d(1, s)`` in AdaFace)."""
    if in_channel == depth:
        return nn.MaxPool2d(1, stride)
    return nn.Sequential(nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))


class BasicBlockIR(nn.Module):
    """Improved-residual unit: BN-Conv-BN-PReLU-Conv(stride)-BN, no activation after the add."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BasicBlockIRSE(BasicBlockIR):
    """:class:`BasicBlockIR` with an SE gate appended inside ``res_layer`` (key ``res_layer.se_block``)."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__(in_channel, depth, stride)
        self.res_layer.add_module("se_block", SEModule(depth, 16))


class BottleneckIR(nn.Module):
    """1x1-3x3-1x1 improved-residual unit used by IR-152/IR-200 (stride on the last 1x1)."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        reduction_channel = depth // 4
        self.shortcut_layer = _shortcut(in_channel, depth, stride)
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, reduction_channel, (1, 1), (1, 1), 0, bias=False),
            nn.BatchNorm2d(reduction_channel),
            nn.PReLU(reduction_channel),
            nn.Conv2d(reduction_channel, reduction_channel, (3, 3), (1, 1), 1, bias=False),
            nn.BatchNorm2d(reduction_channel),
            nn.PReLU(reduction_channel),
            nn.Conv2d(reduction_channel, depth, (1, 1), stride, 0, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIRSE(BottleneckIR):
    """:class:`BottleneckIR` with an SE gate appended inside ``res_layer``."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__(in_channel, depth, stride)
        self.res_layer.add_module("se_block", SEModule(depth, 16))


class OcclusionHead(nn.Module):
    """Predicts a per-location visibility map (1 = visible) from the backbone's feature map.

    Conv3x3 -> BN -> ReLU -> Conv1x1 -> Sigmoid; output ``[B, 1, H, W]`` (7x7 for 112x112 input).
    """

    def __init__(self, in_channels: int = 512, hidden_channels: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden_channels, 1, kernel_size=1, bias=True)
        self.sigmoid = nn.Sigmoid()
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.sigmoid(self.conv2(self.relu(self.bn1(self.conv1(feature_map)))))


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture: unit type, units per stage and stage widths."""

    block: type[nn.Module]
    units: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    @property
    def feature_channels(self) -> int:
        return self.widths[-1]


_WIDE = (256, 512, 1024, 2048)
ARCHITECTURES: dict[str, ArchSpec] = {
    "ir_18": ArchSpec(BasicBlockIR, (2, 2, 2, 2)),
    "ir_34": ArchSpec(BasicBlockIR, (3, 4, 6, 3)),
    "ir_50": ArchSpec(BasicBlockIR, (3, 4, 14, 3)),
    # AdaFace's "IR-101" is built with num_layers=100 (insightface r100): 3-13-30-3 units.
    "ir_101": ArchSpec(BasicBlockIR, (3, 13, 30, 3)),
    "ir_152": ArchSpec(BottleneckIR, (3, 8, 36, 3), _WIDE),
    "ir_200": ArchSpec(BottleneckIR, (3, 24, 36, 3), _WIDE),
    "ir_se_18": ArchSpec(BasicBlockIRSE, (2, 2, 2, 2)),
    "ir_se_34": ArchSpec(BasicBlockIRSE, (3, 4, 6, 3)),
    "ir_se_50": ArchSpec(BasicBlockIRSE, (3, 4, 14, 3)),
    "ir_se_101": ArchSpec(BasicBlockIRSE, (3, 13, 30, 3)),
    "ir_se_152": ArchSpec(BottleneckIRSE, (3, 8, 36, 3), _WIDE),
    "ir_se_200": ArchSpec(BottleneckIRSE, (3, 24, 36, 3), _WIDE),
}


class OAMLOutput(NamedTuple):
    """Everything one backbone pass yields; the body runs once for all four."""

    embedding: torch.Tensor  # [B, 512], L2-normalised
    norm: torch.Tensor  # [B, 1], AdaFace feature norm (quality signal)
    occlusion: torch.Tensor  # [B, 1, 7, 7], 1 = visible
    feature_map: torch.Tensor  # [B, C, 7, 7]: what QAConv matches (the last body unit's map, or its projection)


class OAMLNet(nn.Module):
    """IR backbone + occlusion head + QAConv matcher.

    ``forward(x)`` returns ``(embedding, norm, occlusion)`` and, after
    :meth:`set_gallery_features`, a fourth element: QAConv scores of ``x`` against that gallery.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        embedding_size: size of the global embedding.
        input_size: square face size; 112 gives the 7x7 map QAConv and the occlusion head expect.
        occlusion_hidden: hidden channels of the occlusion head.
        occlusion_method: QAConv visibility weighting, ``'scaling'`` or ``'outer'``.
        qaconv_channels: QAConv's local descriptors: ``None`` (the last unit's own channels), or this many,
            projected from them by a learned 1x1 convolution and BatchNorm (:attr:`qaconv_proj`): a gallery keeps
            ``qaconv_channels x 7 x 7`` maps per face instead of ``512 x 7 x 7``.
        nan_guard: see :attr:`nan_guard`.
    """

    #: Number of deepest body units after which the NaN guard runs.
    NAN_GUARD_UNITS = 3

    def __init__(
        self,
        arch: str = "ir_50",
        embedding_size: int = 512,
        input_size: int = 112,
        occlusion_hidden: int = 256,
        occlusion_method: str = "scaling",
        qaconv_channels: int | None = None,
        nan_guard: bool = False,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        spec = ARCHITECTURES[arch]
        self.arch = arch
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.map_size = input_size // 16
        channels = spec.feature_channels
        self.feature_channels = channels
        #: Training safety net, **opt-in** (off by default, so serving never pays for it). When on,
        #: the outputs of the deepest units are passed through ``torch.nan_to_num`` and tiny
        #: magnitudes are flushed to zero. Both are element-wise ops with no host sync, so the
        #: guard stays cheap on GPU; the trainer turns it on.
        self.nan_guard = nan_guard

        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units: list[nn.Module] = []
        in_channel = 64
        for depth, count in zip(spec.widths, spec.units, strict=True):
            for i in range(count):
                units.append(spec.block(in_channel, depth, 2 if i == 0 else 1))
                in_channel = depth
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Dropout(0.4),
            nn.Flatten(),  # logical C,H,W order for any memory format, as AdaFace's x.view(B, -1)
            nn.Linear(channels * self.map_size * self.map_size, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )
        self._init_backbone_weights()
        self.occlusion_head = OcclusionHead(channels, occlusion_hidden)
        self.qaconv_proj: nn.Sequential | None = None
        if qaconv_channels is not None:
            self.qaconv_proj = nn.Sequential(
                nn.Conv2d(channels, qaconv_channels, kernel_size=1, bias=False), nn.BatchNorm2d(qaconv_channels)
            )
        local = qaconv_channels or channels
        self.qaconv = QAConv(local, self.map_size, self.map_size, occlusion_method=occlusion_method)
        self._gallery: PreparedGallery | None = None

    def _init_backbone_weights(self) -> None:
        """AdaFace's init: Kaiming fan-out for convs and linears, BN2d to identity."""
        for m in (*self.input_layer.modules(), *self.body.modules(), *self.output_layer.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- forward API -------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``C x 7 x 7`` map of the last body unit (before ``output_layer``)."""
        x = self.input_layer(x)
        guard_from = len(self.body) - self.NAN_GUARD_UNITS
        for i, unit in enumerate(self.body):
            x = unit(x)
            if self.nan_guard and i >= guard_from:
                x = _stabilise(x)
        return x

    get_feature_maps = forward_features

    def forward_head(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global embedding from the feature map: ``(x / ||x||, ||x||)`` as AdaFace returns them."""
        x = self.output_layer(feature_map)
        norm = torch.linalg.vector_norm(x.float(), ord=2, dim=1, keepdim=True)
        embedding = x.float() / norm.clamp_min(1e-12)
        return embedding, norm

    def forward_occlusion(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Visibility map. The input is detached: the occlusion loss must not shape the backbone."""
        return self.occlusion_head(feature_map.detach())

    def forward_local(self, feature_map: torch.Tensor) -> torch.Tensor:
        """What QAConv matches: the last unit's map, or its learned projection (:attr:`qaconv_proj`)."""
        return feature_map if self.qaconv_proj is None else self.qaconv_proj(feature_map)

    def forward_all(self, x: torch.Tensor) -> OAMLOutput:
        """Embedding, norm, occlusion map and QAConv's map from one pass through the body."""
        feature_map = self.forward_features(x)
        embedding, norm = self.forward_head(feature_map)
        occlusion = self.forward_occlusion(feature_map).float()
        return OAMLOutput(embedding, norm, occlusion, self.forward_local(feature_map))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.forward_all(x)
        if self._gallery is None:
            return out.embedding, out.norm, out.occlusion
        scores = self.qaconv.match(out.feature_map, self._gallery, probe_occ=out.occlusion)
        return out.embedding, out.norm, out.occlusion, scores

    def set_gallery_features(
        self, gallery_features: torch.Tensor | None, gallery_occ: torch.Tensor | None = None
    ) -> None:
        """Store gallery maps ``[G, C, 7, 7]`` (and visibility ``[G, 1, 7, 7]``) for ``forward``.

        Passing ``None`` clears the gallery so ``forward`` returns three outputs again.
        """
        if gallery_features is None:
            self._gallery = None
            return
        self._gallery = self.qaconv.prepare_gallery(gallery_features, gallery_occ)


def _stabilise(x: torch.Tensor, tiny: float = 1e-12) -> torch.Tensor:
    """Replace NaN/Inf and flush denormal-sized values; element-wise, so no device sync."""
    x = torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)
    return torch.where(x.abs() < tiny, torch.zeros_like(x), x)


def build_model(name: str = "ir_50", **kwargs: object) -> OAMLNet:
    """Build an :class:`OAMLNet` by architecture name (``'ir_18'``, ``'ir_50'``, ``'ir_se_50'``, ...)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return OAMLNet(name, **kwargs)  # type: ignore[arg-type]
