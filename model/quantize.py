"""Static int8 for the backbone on CPUs without native bf16 (an AMD EPYC Milan computes fp32 or int8 there).

Why: on such a CPU the backbone's fp32 forward is most of ``/verify`` (issue #23). OpenVINO runs a graph
whose convolutions are wrapped in quantize/dequantize pairs (ONNX QDQ) as int8 convolutions: 1.8x the fp32
forward of four crops with AVX2 alone (bench/RESULTS.md, "int8").

The recipe (:class:`Int8Recipe`), fitted once on training crops by ``oaml quantize`` and kept in the weights'
metadata (the tensors stay as they are, and so does ``model_version``):

* **Equalisation.** Every convolution and the embedding's linear layer that follow a BatchNorm (directly, or
  through a PReLU, which is positively homogeneous) get their input channels rescaled: the BatchNorm's
  output divided by ``s_c``, the layer's weights multiplied by it, which changes nothing in fp32 (zero
  padding stays zero). ``s_c = a_c^alpha / w_c^(1 - alpha)`` for the channel's largest input ``a_c`` and
  weight ``w_c`` evens out the channels a per-tensor activation scale has to cover: the first unit's
  convolution, at 112x112, lost 0.0006 of cosine to int8 without it, 0.0002 with it.
* **Ranges.** Each quantised layer's input: asymmetric uint8 over its min..max on the fitting crops (a
  percentile clip measured worse); weights: symmetric int8 per output channel.
* The first convolution (three input channels, 1% of the work) stays in fp32.

:func:`quantised_copy` builds the fake-quantised network that is exported to ONNX (torch writes
``fake_quantize`` as QuantizeLinear/DequantizeLinear), which OpenVINO compiles to int8 kernels.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.align import to_input_tensor
from model.net import OAMLNet

__all__ = ["SCHEME", "Int8Recipe", "fit_int8", "input_ranges", "quantised_copy", "equalised_copy"]

#: What a recipe means; a recipe of another scheme is refused rather than misread.
SCHEME = "oaml-int8-v1: BN-equalised inputs (alpha), uint8 per-tensor min/max activations, int8 per-channel weights"

#: Layers left in fp32 (cheap, and their inputs are the photo's pixels).
FP32_LAYERS = ("input_layer.0",)


@dataclass(frozen=True)
class _Site:
    """A quantised layer and the BatchNorm whose output channels are its input channels (``None``: not
    equalised); ``repeat``: input features per channel (49 for the linear layer after a 7x7 map)."""

    name: str
    layer: nn.Conv2d | nn.Linear
    norm: nn.BatchNorm2d | None
    repeat: int = 1


def _sites(model: OAMLNet) -> Iterator[_Site]:
    """The backbone's convolutions and its linear layer, in network order (heads excluded: they are small)."""
    units = dict(model.body.named_children())
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name in FP32_LAYERS:
            continue
        if not name.startswith(("input_layer.", "body.", "output_layer.")):
            continue
        norm: nn.BatchNorm2d | None = None
        repeat = 1
        parts = name.split(".")
        if parts[0] == "body" and parts[2] == "res_layer":
            res = units[parts[1]].get_submodule("res_layer")
            assert isinstance(res, nn.Sequential)
            index = int(parts[3])
            # IR unit: BN, conv, BN, PReLU, conv, BN (the IR-SE unit adds SE after the last BN)
            if index == 1 and isinstance(res[0], nn.BatchNorm2d):
                norm = res[0]
            elif index == 4 and isinstance(res[2], nn.BatchNorm2d) and isinstance(res[3], nn.PReLU):
                norm = res[2]
        elif name == "output_layer.3" and isinstance(model.output_layer[0], nn.BatchNorm2d):
            norm = model.output_layer[0]
            repeat = model.map_size * model.map_size
        assert isinstance(module, (nn.Conv2d, nn.Linear))
        yield _Site(name, module, norm, repeat)


def _channel_absmax(t: torch.Tensor, repeat: int) -> torch.Tensor:
    """Largest magnitude per input channel (dimension 1) of a layer input ``[N, C, H, W]`` / ``[N, C * repeat]``
    or of its weights ``[O, C, kh, kw]`` / ``[O, C * repeat]``: the same reduction for both."""
    t = t.detach().abs()
    if t.dim() == 2:
        t = t.reshape(t.shape[0], -1, repeat)
    return t.amax(dim=tuple(d for d in range(t.dim()) if d != 1))


def _batches(crops: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(crops), batch):
        yield to_input_tensor(crops[start : start + batch])


@torch.inference_mode()
def _collect(model: OAMLNet, crops: np.ndarray, batch: int, what: str) -> dict[str, Any]:
    """Per-channel input absmax (``what='channels'``) or input (min, max) (``what='ranges'``) of every site."""
    sites = {s.name: s for s in _sites(model)}
    seen: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].float()
            if what == "channels":
                a = _channel_absmax(x, sites[name].repeat)
                seen[name] = torch.maximum(seen[name], a) if name in seen else a
            else:
                lo, hi = float(x.min()), float(x.max())
                old = seen.get(name, (lo, hi))
                seen[name] = (min(old[0], lo), max(old[1], hi))

        return record

    handles = [site.layer.register_forward_pre_hook(hook(name)) for name, site in sites.items()]
    was_training = model.training
    model.eval()
    try:
        for x in _batches(crops, batch):
            model.forward_all(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


@dataclass(frozen=True)
class Int8Recipe:
    """How the backbone is quantised: per-site equalisation scales and input ranges (see the module docstring).

    Attributes:
        scales: site name -> per-input-channel ``s_c`` (sites without a preceding BatchNorm have none).
        ranges: site name -> ``(min, max)`` of its input after equalisation.
        alpha: the equalisation's balance between activations and weights.
        crops: how many crops it was fitted on; ``data``: where they came from.
    """

    scales: dict[str, list[float]]
    ranges: dict[str, tuple[float, float]]
    alpha: float
    crops: int
    data: list[str] = field(default_factory=list)
    date: str = ""

    def fingerprint(self) -> str:
        """Names the exported graph and the engine check that vouched for this recipe."""
        raw = json.dumps({"s": self.scales, "r": self.ranges, "a": self.alpha}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": SCHEME,
            "alpha": self.alpha,
            "crops": self.crops,
            "data": self.data,
            "date": self.date,
            "scales": {k: list(s) for k, s in self.scales.items()},
            "ranges": {k: [lo, hi] for k, (lo, hi) in self.ranges.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Int8Recipe:
        """Raises ValueError on a recipe of another scheme or a malformed one."""
        if raw.get("scheme") != SCHEME:
            raise ValueError(f"int8 recipe of an unknown scheme {raw.get('scheme')!r}; re-run `oaml quantize`")
        try:
            return cls(
                scales={str(k): [float(x) for x in v] for k, v in raw["scales"].items()},
                ranges={str(k): (float(v[0]), float(v[1])) for k, v in raw["ranges"].items()},
                alpha=float(raw["alpha"]),
                crops=int(raw["crops"]),
                data=[str(d) for d in raw.get("data") or []],
                date=str(raw.get("date", "")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"malformed int8 recipe: {exc}") from exc


@torch.no_grad()  # not inference mode: the copy's tensors are exported to ONNX, which tracks their versions
def equalised_copy(model: OAMLNet, scales: dict[str, list[float]]) -> OAMLNet:
    """A copy of ``model`` with ``scales`` moved from each site's BatchNorm into its weights: the same
    function in exact arithmetic (fp32: embeddings within 1e-6)."""
    out = copy.deepcopy(model).float().eval()
    for site in _sites(out):
        if site.name not in scales or site.norm is None:
            continue
        s = torch.tensor(scales[site.name], dtype=torch.float32)
        if s.numel() != site.norm.num_features:
            raise ValueError(f"int8 recipe: {site.name} has {s.numel()} scales for {site.norm.num_features} channels")
        assert site.norm.weight is not None and site.norm.bias is not None
        site.norm.weight.div_(s)
        site.norm.bias.div_(s)
        w = site.layer.weight
        w.mul_(s.repeat_interleave(site.repeat)[None, :] if w.dim() == 2 else s[None, :, None, None])
    return out


def fit_int8(
    model: OAMLNet, crops: np.ndarray, alpha: float = 0.5, batch: int = 64, data: list[str] | None = None
) -> Int8Recipe:
    """Fit the recipe on ``[N, 112, 112, 3]`` RGB uint8 training crops (a few hundred are enough)."""
    if len(crops) == 0:
        raise ValueError("fitting int8 needs crops")
    channels = _collect(model, crops, batch, "channels")
    scales: dict[str, list[float]] = {}
    for site in _sites(model):
        if site.norm is None:
            continue
        a = channels[site.name].clamp_min(1e-6)
        w = _channel_absmax(site.layer.weight, site.repeat).clamp_min(1e-8)
        scales[site.name] = (a**alpha / w ** (1 - alpha)).clamp(1e-3, 1e3).tolist()
    ranges = input_ranges(equalised_copy(model, scales), crops, batch)
    return Int8Recipe(scales, ranges, alpha, len(crops), list(data or []), time.strftime("%Y-%m-%d"))


def input_ranges(model: OAMLNet, crops: np.ndarray, batch: int = 64) -> dict[str, tuple[float, float]]:
    """``(min, max)`` of every quantised layer's input over ``crops`` (RGB uint8)."""
    return dict(_collect(model, crops, batch, "ranges"))


class FakeQuantised(nn.Module):
    """A convolution or linear layer whose input (uint8, per tensor) and weights (int8, per output channel)
    pass through quantize-dequantize: what the exported graph's QDQ pairs say, run by OpenVINO in int8."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, lo: float, hi: float) -> None:
        super().__init__()
        self.layer = layer
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        self.scale = max(hi - lo, 1e-8) / 255.0
        self.zero_point = int(min(255, max(0, round(-lo / self.scale))))
        w = layer.weight.detach()
        amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8)
        self.weight_scale: torch.Tensor
        self.weight_zero: torch.Tensor
        self.register_buffer("weight_scale", (amax / 127.0).float())
        self.register_buffer("weight_zero", torch.zeros(w.shape[0], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.weight_scale, self.weight_zero, 0, -128, 127)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        conv = self.layer
        return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def quantised_copy(model: OAMLNet, recipe: Int8Recipe) -> OAMLNet:
    """The equalised network with the recipe's layers fake-quantised (for export; in PyTorch it is slower, not
    int8). A layer the recipe gives no range stays in fp32."""
    out = equalised_copy(model, recipe.scales)
    names = {site.name for site in _sites(out)}
    if not set(recipe.ranges) <= names or not set(recipe.scales) <= names:
        raise ValueError("int8 recipe names layers this network does not have; re-run `oaml quantize`")
    for name, (lo, hi) in recipe.ranges.items():
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        setattr(parent, child, FakeQuantised(getattr(parent, child), lo, hi))
    return out
