"""Training augmentation as batched tensor operations on the training device (GPU or CPU).

The per-sample NumPy augmenter (:mod:`model.training.augment`) runs in worker processes; on a GPU
host it caps training at the rate a few CPU cores can draw, crop and composite faces (about 2,000
images/s on a 16-core host). Here the whole training set is decoded once into device memory and
every step's batch is made there, as a handful of batched kernels:

- horizontal flip (the landmarks follow);
- occluders: a bank of RGBA layers rendered once at start by the same occluders as the NumPy path
  (masks, sunglasses, procedural hands, bars, scarves) at the canonical landmarks, each warped per
  sample by the similarity that takes the canonical landmarks to the sample's, and composited; the
  occluder's alpha is the visibility target, as in the NumPy path;
- AdaFace's crop (outside of a random box zeroed, and not visible), photometric jitter (brightness,
  contrast, saturation), low resolution (down and up again, by one of a few sizes and filters);
- Gaussian blur and JPEG-like blocking (8x8 DCT, quantised by the standard tables at a random
  quality), which the NumPy path does not have;
- mixup and cutmix views between faces of the batch (``mix`` of the batch size), appended after it:
  the teacher labels the mixed clean view (function matching), the identity losses never see them.

Every draw comes from one generator seeded by (seed, step): a batch is a function of the data, the
configuration and the step on a given device, so a resumed run makes the batches an uninterrupted
one would have made (on the same device kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.align import ARCFACE_TEMPLATE
from model.training.augment import AugmentConfig
from model.training.occlusion import OcclusionAugmenter

__all__ = ["OccluderBank", "DeviceAugmenter", "AugmentedBatch", "similarity_to", "jpeg_like", "dct_matrix"]

_GREY = (0.299, 0.587, 0.114)
#: The JPEG standard's luminance and chrominance quantisation tables (ITU T.81, Annex K).
_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)


_Rand = Callable[..., torch.Tensor]


@dataclass
class AugmentedBatch:
    """A batch made on the device: float RGB in [0, 255], ``[B, 3, H, W]``."""

    student: torch.Tensor
    teacher: torch.Tensor | None  # the same views without occluders (function matching), or None
    visible: torch.Tensor  # [B, H, W] in [0, 1]
    occluded: torch.Tensor  # [B] bool
    flipped: torch.Tensor  # [B] bool
    mixed_from: torch.Tensor  # [M, 2] batch positions each appended mixed view was made from


class OccluderBank:
    """RGBA occluder layers (colour premultiplied by alpha) rendered at the canonical landmarks.

    Every occluder of the NumPy path paints ``rgb`` over the face with an alpha (``composite``), so
    rendering it over black gives the premultiplied colour and its visibility mask gives the alpha:
    compositing a layer later over any face is exactly what the occluder would have painted there.
    """

    def __init__(self, layers: torch.Tensor) -> None:
        if layers.ndim != 4 or layers.shape[1] != 4:
            raise ValueError("layers must be [N, 4, H, W]: premultiplied RGB and alpha")
        self.layers = layers

    @classmethod
    def render(cls, occlusion: OcclusionAugmenter, count: int, seed: int, size: int = 112) -> OccluderBank:
        rng = np.random.default_rng([seed, 7919])
        black = np.zeros((size, size, 3), dtype=np.uint8)
        landmarks = ARCFACE_TEMPLATE * (size / 112.0)
        layers = np.empty((count, 4, size, size), dtype=np.uint8)
        for i in range(count):
            painted, visible, _ = occlusion.occlude(black, landmarks, rng)
            layers[i, :3] = painted.transpose(2, 0, 1)
            layers[i, 3] = np.clip((1.0 - visible) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return cls(torch.from_numpy(layers))

    def to(self, device: torch.device) -> OccluderBank:
        return OccluderBank(self.layers.to(device))

    def __len__(self) -> int:
        return len(self.layers)


def similarity_to(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (Umeyama, no reflection) taking ``src`` [B, P, 2] to ``dst``:
    ``[B, 2, 3]`` matrices ``A`` with ``dst ~ A @ [x, y, 1]``."""
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    # for 2-D similarities the optimum has a closed form: a = sum(s.d) / |s|^2, b = sum(s x d) / |s|^2
    norm = (s * s).sum((1, 2)).clamp_min(1e-9)
    a = (s * d).sum((1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # [B, 2, 2]
    shift = mu_d.squeeze(1) - (rot @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rot, shift.unsqueeze(-1)], dim=2)


def dct_matrix(n: int = 8, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (rows: frequencies): ``D @ x`` transforms, ``D.T @ X`` inverts."""
    k = torch.arange(n, dtype=torch.float32, device=device)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def _quality_scale(quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's quality -> table scale factor (percent)."""
    q = quality.clamp(1, 100)
    return torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100.0


def jpeg_like(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG's loss without the entropy coding: YCbCr, 8x8 block DCT, quantise by the standard tables at
    ``quality`` (per image), dequantise and back. ``images``: float RGB [B, 3, H, W] in [0, 255], H and W
    multiples of 8 (112 is). Chroma keeps full resolution (JPEG's 4:4:4)."""
    b, _, h, w = images.shape
    r, g, bl = images[:, 0], images[:, 1], images[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    ycc = torch.stack([y - 128.0, cb, cr], 1)
    d = dct_matrix(8, images.device).to(images.dtype)
    blocks = ycc.reshape(b, 3, h // 8, 8, w // 8, 8)
    coef = torch.einsum("ij,bcyjxk,lk->bcyixl", d, blocks, d)
    scale = _quality_scale(quality.to(images.dtype)).view(b, 1, 1, 1, 1, 1)
    luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
    chroma = torch.tensor(_CHROMA, dtype=images.dtype, device=images.device)
    table = torch.stack([luma, chroma, chroma]).view(1, 3, 1, 8, 1, 8)
    step = (table * scale).clamp_min(1.0)
    coef = torch.round(coef / step) * step
    ycc = torch.einsum("ji,bcyjxk,kl->bcyixl", d, coef, d).reshape(b, 3, h, w)
    y, cb, cr = ycc[:, 0] + 128.0, ycc[:, 1], ycc[:, 2]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return rgb.clamp(0, 255)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (separable, one grouped convolution per axis)."""
    b, c, h, w = images.shape
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return images
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


class DeviceAugmenter:
    """The NumPy augmenter's recipe, batched on one device (see the module's docstring)."""

    #: down-scaled sizes for the low-resolution augmentation (images in a batch share a few sizes)
    LOW_RES_BUCKETS = 8
    _MODES = ("nearest", "bilinear", "bicubic", "area")

    def __init__(self, config: AugmentConfig, bank: OccluderBank | None) -> None:
        self.config = config
        self.bank = bank
        self._template = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float32)

    def __call__(
        self, images: torch.Tensor, landmarks: torch.Tensor, generator: torch.Generator, teacher_view: bool = False
    ) -> AugmentedBatch:
        """``images``: uint8 RGB ``[B, H, W, 3]`` on the device; ``landmarks``: ``[B, 5, 2]`` pixels."""
        cfg, dev = self.config, images.device
        b, h, w, _ = images.shape

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=dev)

        x = images.permute(0, 3, 1, 2).float()
        flipped = rand(b) < cfg.flip
        x = torch.where(flipped.view(b, 1, 1, 1), x.flip(3), x)
        lm = landmarks.float().clone()
        mirrored = lm[:, [1, 0, 2, 4, 3]].clone()
        mirrored[..., 0] = w - 1 - mirrored[..., 0]
        lm = torch.where(flipped.view(b, 1, 1), mirrored, lm)
        clean = x
        visible = torch.ones(b, h, w, device=dev)

        occluded = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.bank is not None and cfg.occlusion > 0:
            occluded = rand(b) < cfg.occlusion
            pick = (rand(b) * len(self.bank)).long().clamp_max(len(self.bank) - 1)
            layer = self.bank.layers[pick].float() / 255.0  # [B, 4, H, W]
            layer = torch.where((rand(b) < 0.5).view(b, 1, 1, 1), layer.flip(3), layer)  # both sides of a mask
            layer = self._warp_to(layer, lm, h, w)
            alpha = layer[:, 3] * occluded.view(b, 1, 1)
            x = x * (1 - alpha[:, None]) + layer[:, :3] * 255.0 * occluded.view(b, 1, 1, 1)
            visible = visible * (1 - alpha)

        # AdaFace's crop: the face stays in place, the outside of a random box is zeroed and not visible
        crop = rand(b) < cfg.crop
        area = h * w * (cfg.crop_scale[0] + rand(b) * (cfg.crop_scale[1] - cfg.crop_scale[0]))
        aspect = torch.exp(math.log(3 / 4) + rand(b) * math.log(16 / 9))
        cw = torch.sqrt(area * aspect).round().clamp(1, w)
        ch = torch.sqrt(area / aspect).round().clamp(1, h)
        x0 = (rand(b) * (w - cw + 1)).floor()
        y0 = (rand(b) * (h - ch + 1)).floor()
        cols = torch.arange(w, device=dev).view(1, 1, w)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        inside = (
            (cols >= x0.view(b, 1, 1))
            & (cols < (x0 + cw).view(b, 1, 1))
            & (rows >= y0.view(b, 1, 1))
            & (rows < (y0 + ch).view(b, 1, 1))
        )
        keep = torch.where(crop.view(b, 1, 1), inside, torch.ones_like(inside)).float()
        visible = visible * keep

        views = [x, clean] if teacher_view else [x]
        views = [v * keep[:, None] for v in views]
        views = self._photometric(views, rand, b)
        views = self._low_res(views, rand, b)
        if cfg.blur > 0:
            on = rand(b) < cfg.blur
            sigma = (cfg.blur_sigma[0] + rand(b) * (cfg.blur_sigma[1] - cfg.blur_sigma[0])) * on
            if bool(on.any()):
                views = [torch.where(on.view(b, 1, 1, 1), _gaussian_blur(v, sigma.clamp_min(1e-3)), v) for v in views]
        if cfg.jpeg > 0:
            on = rand(b) < cfg.jpeg
            quality = cfg.jpeg_quality[0] + rand(b) * (cfg.jpeg_quality[1] - cfg.jpeg_quality[0])
            if bool(on.any()):
                views = [torch.where(on.view(b, 1, 1, 1), jpeg_like(v, quality), v) for v in views]
        views = [v.clamp(0, 255) for v in views]

        student, teacher = views[0], (views[1] if teacher_view else None)
        mixed_from = torch.zeros(0, 2, dtype=torch.long, device=dev)
        if cfg.mix > 0:
            student, teacher, visible, occluded, mixed_from = self._mix(student, teacher, visible, occluded, rand)
            flipped = torch.cat([flipped, torch.zeros(len(mixed_from), dtype=torch.bool, device=dev)])
        return AugmentedBatch(student, teacher, visible, occluded, flipped, mixed_from)

    def _warp_to(self, layer: torch.Tensor, landmarks: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Move each layer from the canonical landmarks to the sample's (grid_sample samples the layer at
        the inverse transform of every output pixel)."""
        b = len(layer)
        template = (self._template.to(layer.device) * (w / 112.0)).expand(b, 5, 2)
        inverse = similarity_to(landmarks, template)  # output pixel -> layer pixel
        # to normalised coordinates (align_corners=False): u = (2x + 1) / w - 1
        to_norm = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], device=layer.device)
        from_norm = torch.linalg.inv(to_norm)
        full = torch.cat([inverse, torch.tensor([0, 0, 1.0], device=layer.device).expand(b, 1, 3)], 1)
        theta = (to_norm @ full @ from_norm)[:, :2]
        grid = F.affine_grid(theta, [b, 4, h, w], align_corners=False)
        return F.grid_sample(layer, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _photometric(self, views: list[torch.Tensor], rand: _Rand, b: int) -> list[torch.Tensor]:
        cfg = self.config
        on = (rand(b) < cfg.photometric).view(b, 1, 1, 1)
        s = cfg.photometric_strength
        factors = max(0.0, 1 - s) + rand(3, b) * (1 + s - max(0.0, 1 - s))
        order = torch.argsort(rand(3)).tolist()  # one order per batch (the NumPy path draws one per face)
        grey_w = torch.tensor(_GREY, device=views[0].device).view(1, 3, 1, 1)
        out = []
        for v in views:
            img = v
            for op in order:
                f = factors[op].view(b, 1, 1, 1)
                if op == 0:
                    img = img * f
                elif op == 1:
                    mean = (img * grey_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
                    img = (img - mean) * f + mean
                else:
                    grey = (img * grey_w).sum(1, keepdim=True)
                    img = (img - grey) * f + grey
                img = img.clamp(0, 255)
            out.append(torch.where(on, img, v))
        return out

    def _low_res(self, views: list[torch.Tensor], rand: _Rand, b: int) -> list[torch.Tensor]:
        cfg = self.config
        on = rand(b) < cfg.low_res
        lo, hi = cfg.low_res_scale
        ratio = lo + rand(b) * (hi - lo)
        bucket = (ratio - lo) / max(hi - lo, 1e-9) * (self.LOW_RES_BUCKETS - 1)
        bucket = bucket.round().long()
        modes = (rand(self.LOW_RES_BUCKETS, 2) * len(self._MODES)).long().clamp_max(len(self._MODES) - 1).tolist()
        h, w = views[0].shape[2:]
        out = [v.clone() for v in views]
        for k in torch.unique(bucket[on]).tolist():
            idx = torch.nonzero(on & (bucket == k)).squeeze(1)
            r = lo + (hi - lo) * k / max(self.LOW_RES_BUCKETS - 1, 1)
            size = (max(1, int(h * r)), max(1, int(w * r)))
            down, up = self._MODES[modes[k][0]], self._MODES[modes[k][1]]
            up = "bilinear" if up == "area" else up
            for i, v in enumerate(views):
                small = F.interpolate(v[idx], size=size, mode=down, **_corners(down))
                out[i][idx] = F.interpolate(small, size=(h, w), mode=up, **_corners(up)).clamp(0, 255)
        return out

    def _mix(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        visible: torch.Tensor,
        occluded: torch.Tensor,
        rand: _Rand,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append mixed views: pairs of the batch, cutmix or mixup, student and teacher views alike."""
        b, _, h, w = student.shape
        cfg = self.config
        m = max(1, int(round(cfg.mix * b)))
        dev = student.device
        first = (rand(m) * b).long().clamp_max(b - 1)
        second = (first + 1 + (rand(m) * (b - 1)).long().clamp_max(b - 2)) % b  # never the same face
        lam = _beta_like(rand(m), cfg.mix_alpha)
        cut = rand(m) < cfg.mix_cutmix
        # cutmix box of area (1 - lam), centred uniformly, clipped
        cut_w, cut_h = w * torch.sqrt(1 - lam), h * torch.sqrt(1 - lam)
        cx, cy = rand(m) * w, rand(m) * h
        cols = torch.arange(w, device=dev).view(1, 1, w)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        box = (
            (cols >= (cx - cut_w / 2).view(m, 1, 1))
            & (cols < (cx + cut_w / 2).view(m, 1, 1))
            & (rows >= (cy - cut_h / 2).view(m, 1, 1))
            & (rows < (cy + cut_h / 2).view(m, 1, 1))
        ).float()
        # weight of the first face per pixel: lam everywhere (mixup) or 0 inside the box (cutmix)
        weight = torch.where(cut.view(m, 1, 1), 1 - box, lam.view(m, 1, 1).expand(m, h, w))

        def blend(t: torch.Tensor) -> torch.Tensor:
            wgt = weight if t.ndim == 3 else weight[:, None]
            return t[first] * wgt + t[second] * (1 - wgt)

        student = torch.cat([student, blend(student)])
        teacher = torch.cat([teacher, blend(teacher)]) if teacher is not None else None
        visible = torch.cat([visible, blend(visible)])
        occluded = torch.cat([occluded, occluded[first] | occluded[second]])
        return student, teacher, visible, occluded, torch.stack([first, second], 1)


def _beta_like(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """A mixing weight shaped like Beta(alpha, alpha) from uniforms: Kumaraswamy(alpha, alpha)'s quantile
    (torch's Beta sampler takes no generator, and the step's draws must all come from the seeded one)."""
    u = u.clamp(1e-6, 1 - 1e-6)
    return (1 - (1 - u) ** (1 / alpha)) ** (1 / alpha)


def _corners(mode: str) -> dict[str, bool]:
    return {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
