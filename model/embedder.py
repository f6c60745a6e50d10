"""The one path from aligned crops to features and from features to pair scores.

The service, ``oaml calibrate``, ``oaml eval`` and trainer validation all embed faces through
:class:`Embedder` and score pairs through :func:`score_pairs`. Calibration thresholds and
probabilities are only true for the score distribution they were fitted on, so the numbers a
user is shown must come from exactly the computation the calibration saw: same device rule,
same autocast precision, same flip decision, same QAConv path.

Flip test: on. Each face is embedded together with its mirror image and the two norm-weighted
embeddings are added (AdaFace's evaluation). Measured on the GPU-trained IR-18 with `oaml eval
--flip` / `--no-flip` (bench/RESULTS.md, "Flip test"): the AdaFace cosine on LFW gains 2.3 points
of accuracy (88.6% -> 90.9%, fold spread 1.0-1.2) and 8 points of TAR at FAR 1e-2 (0.606 ->
0.688), with similar gains on the masked and sunglasses protocols. It doubles the images per
forward pass (one pass over crops and mirrors): on the 2-core CPU the model step of a `/verify`
(two faces, bf16) goes from 60 to 89 ms, and a full batch costs twice the compute; two points of
accuracy are worth that. The embedding also becomes mirror
invariant, so a selfie camera's mirrored photo matches like the unmirrored one. The QAConv maps
and the visibility map stay those of the unflipped crop. ``flip=False`` remains for the
measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.align import to_input_tensor
from model.cpu import cpu_has_bf16
from model.engines import EngineName, OnnxBackbone, OpenVinoBackbone, select_engine, serve_int8
from model.net import OAMLNet
from model.qaconv import QAConv
from model.quantize import Int8Recipe

__all__ = [
    "FLIP_TEST",
    "Features",
    "Embedder",
    "BackbonePlan",
    "plan_backbone",
    "PairScores",
    "score_pairs",
    "select_device",
    "select_precision",
    "precision_name",
]

logger = logging.getLogger(__name__)

#: The served path's flip-test decision (see the module docstring for the measurement).
FLIP_TEST = True


def select_device(setting: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when it is visible, else the CPU; ``cpu``/``cuda`` are taken as given."""
    if isinstance(setting, torch.device):
        return setting
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting not in ("cpu", "cuda") and not setting.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {setting!r}")
    return torch.device(setting)


def select_precision(setting: str, device: torch.device, flags: str | None = None) -> torch.dtype | None:
    """Autocast dtype (``None`` = fp32). ``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32.

    The one rule for every path that runs the model (the service, the trainer, ``oaml calibrate`` and
    ``oaml eval``): emulated bf16 on a CPU without it is many times slower than fp32 (an AMD EPYC Milan
    trained at 0.3 img/s that way), hence the CPU-flag check. ``flags``: the CPU's flags (default: this
    CPU's; tests pass others).
    """
    if setting == "fp32":
        return None
    if setting in ("bf16", "fp16"):
        return torch.bfloat16 if setting == "bf16" else torch.float16
    if setting != "auto":
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {setting!r}")
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16(flags) else None


def precision_setting(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the setting that selects ``dtype``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32") if dtype is not None else "fp32"


def precision_name(dtype: torch.dtype | None) -> str:
    """``float32``, ``bfloat16`` or ``float16``: how responses and metadata name a precision."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


@dataclass
class Features:
    """What the model says about ``N`` aligned faces (CPU tensors, float32).

    Attributes:
        embedding: ``[N, 512]``, L2-normalised.
        norm: ``[N]``, AdaFace feature norm of the unflipped crop (the quality signal).
        occlusion: ``[N, 7, 7]``, 1 = visible.
        feature_map: ``[N, C, 7, 7]``, QAConv input.
    """

    embedding: torch.Tensor
    norm: torch.Tensor
    occlusion: torch.Tensor
    feature_map: torch.Tensor

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    @property
    def visibility(self) -> torch.Tensor:
        """``[N]`` mean visibility of each face."""
        return self.occlusion.reshape(len(self), -1).mean(1)

    def take(self, index: Any) -> Features:
        """The faces at ``index`` (an int, slice, or integer array), as a new :class:`Features`."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        return Features(self.embedding[index], self.norm[index], self.occlusion[index], self.feature_map[index])

    @torch.inference_mode()
    def through(self, net: OAMLNet) -> Features:
        """These faces as ``net`` sees them, made from these features instead of the crops: the embedding and norm
        as they are, the visibility and QAConv's map from ``net``'s heads applied to :attr:`feature_map`. True when
        :func:`model.checkpoint.derives_from` holds for the model that made them and ``net`` (the same trunk, and
        this map the trunk's own); the maps are then exactly those ``net``'s own pass makes, at this precision."""
        param = next(net.occlusion_head.parameters())
        maps = self.feature_map.to(param.device, param.dtype)
        return Features(
            self.embedding,
            self.norm,
            net.eval().forward_occlusion(maps)[:, 0].float().cpu(),
            net.forward_local(maps).float().cpu(),
        )

    def split(self) -> list[Features]:
        """One :class:`Features` per face (views, no copies)."""
        return [self.take(i) for i in range(len(self))]

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        return Features(
            torch.cat([p.embedding for p in parts]),
            torch.cat([p.norm for p in parts]),
            torch.cat([p.occlusion for p in parts]),
            torch.cat([p.feature_map for p in parts]),
        )


@dataclass(frozen=True)
class BackbonePlan:
    """What runs the backbone: the engine, the autocast dtype (None: fp32) and whether it runs int8."""

    engine: EngineName
    autocast: torch.dtype | None
    int8: bool

    @property
    def path(self) -> str:
        return f"{self.engine} {'int8' if self.int8 else precision_name(self.autocast)}"


def plan_backbone(
    precision: str,
    engine: str,
    device: torch.device,
    vouched: Collection[tuple[str, str]] = (),
    has_recipe: bool = False,
    flags: str | None = None,
) -> BackbonePlan:
    """The one rule for what runs the backbone (:func:`select_precision`, :func:`model.engines.serve_int8`,
    :func:`model.engines.select_engine`), without building it: the embedder follows it, and the service asks it
    what ``auto`` would serve under other checks (:mod:`model.selfcheck`). ``flags``: the CPU's (default this
    one's)."""
    autocast = None if precision == "int8" else select_precision(precision, device, flags)
    int8 = serve_int8(precision, engine, device, autocast, vouched, has_recipe, flags)
    if int8:
        return BackbonePlan("openvino", None, True)  # int8 layers, the rest in fp32
    return BackbonePlan(select_engine(engine, device, autocast, vouched), autocast, False)


class Embedder:
    """Aligned RGB crops -> :class:`Features`, on one device at one precision.

    Args:
        model: the network; moved to ``device`` (channels-last on the CPU, where oneDNN is faster
            with it). The embedder never changes the model's weights; it puts it in eval mode for
            each call, which the trainer undoes at its next step.
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16`` (see :func:`select_precision`), or ``int8``
            (OpenVINO, with ``int8``'s recipe; ``auto`` chooses it where :func:`model.engines.serve_int8` says).
        flip: add the mirrored crop's norm-weighted embedding (AdaFace's flip test).
        batch_size: faces per forward pass in :meth:`__call__`.
        engine: ``torch``, ``onnxruntime``, ``openvino`` or ``auto`` (:func:`model.engines.select_engine`:
            on a CPU the exported graph in fp32, and in bf16 where ``vouched`` allows it); ``version`` names its
            exported graph (the weights' model_version), ``threads`` are its threads.
        vouched: the ``(engine, precision)`` pairs the weights' calibration was checked for on this CPU's class
            (:meth:`model.card.WeightsCard.vouched_for`).
        int8: the weights' int8 recipe (:class:`model.quantize.Int8Recipe`), if they carry one.
        flags: the CPU's flags the plan is made for (default this CPU's; :func:`model.selfcheck.serve_backbone`
            passes the ones it was told, so that what it builds is what it planned).
    """

    def __init__(
        self,
        model: OAMLNet,
        device: str | torch.device = "auto",
        precision: str = "auto",
        flip: bool = FLIP_TEST,
        batch_size: int = 64,
        engine: str = "torch",
        version: str | None = None,
        threads: int = 1,
        vouched: Collection[tuple[str, str]] = (),
        int8: Int8Recipe | None = None,
        flags: str | None = None,
    ) -> None:
        self.device = select_device(device)
        plan = plan_backbone(precision, engine, self.device, vouched, int8 is not None, flags)
        self.autocast, self.int8, self.engine = plan.autocast, plan.int8, plan.engine
        self._onnx: OnnxBackbone | OpenVinoBackbone | None = None
        if self.engine == "onnxruntime":
            self._onnx = OnnxBackbone(model, version, threads)
        elif self.engine == "openvino":
            recipe = int8 if self.int8 else None
            self._onnx = OpenVinoBackbone(model, version, threads, bf16=self.autocast is torch.bfloat16, int8=recipe)
        self.flip = flip
        self.batch_size = batch_size
        self.model = model.to(self.device)
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def precision(self) -> str:
        """``float32``, ``bfloat16``, ``float16`` or ``int8``: how the backbone computes."""
        return "int8" if self.int8 else precision_name(self.autocast)

    @property
    def path(self) -> str:
        """``"<engine> <precision>"``, e.g. ``openvino int8``."""
        return f"{self.engine} {self.precision}"

    def describe(self) -> dict[str, Any]:
        """How features are computed, for metadata and reports."""
        return {"device": self.device.type, "precision": self.precision, "flip": self.flip, "engine": self.engine}

    @torch.inference_mode()
    def forward(self, crops: np.ndarray) -> Features:
        """One forward pass over ``[n, 112, 112, 3]`` RGB uint8 crops (no batching of its own)."""
        self.model.eval()
        x = to_input_tensor(crops).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.flip:  # one pass over [crops; mirrors]: a larger batch costs less than two
            x = torch.cat([x, torch.flip(x, dims=[3])])
        if self._onnx is not None:
            out = self._onnx.forward_all(x)
        else:
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ):
                out = self.model.forward_all(x)
        emb, norm = out.embedding.float(), out.norm.float()
        vec = emb[:n]
        if self.flip:
            vec = torch.nn.functional.normalize(emb[:n] * norm[:n] + emb[n:] * norm[n:], dim=1)
        return Features(
            embedding=vec.cpu(),
            norm=norm[:n].reshape(-1).cpu(),
            occlusion=out.occlusion[:n, 0].float().cpu(),
            feature_map=out.feature_map[:n].float().cpu(),
        )

    def __call__(self, crops: np.ndarray | Sequence[np.ndarray]) -> Features:
        """Features of any number of crops, ``batch_size`` at a time."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        parts = [self.forward(crops[s : s + self.batch_size]) for s in range(0, len(crops), self.batch_size)]
        if not parts:
            c = self.model.qaconv.num_features
            return Features(
                torch.zeros(0, self.model.embedding_size), torch.zeros(0), torch.zeros(0, 7, 7), torch.zeros(0, c, 7, 7)
            )
        return Features.cat(parts)


@dataclass
class PairScores:
    """Component scores of pairs ``(a[i], b[i])`` as float64 arrays."""

    cos: np.ndarray
    qa: np.ndarray
    visibility: np.ndarray  # of the less visible face of each pair
    norm: np.ndarray  # the lower AdaFace feature norm of each pair: the less certain face's quality

    def __len__(self) -> int:
        return len(self.cos)


@torch.inference_mode()
def score_pairs(
    qaconv: QAConv,
    a: Features,
    b: Features,
    ia: np.ndarray | None = None,
    ib: np.ndarray | None = None,
    chunk: int = 1024,
) -> PairScores:
    """AdaFace cosine, occlusion-weighted QAConv and pair visibility of ``(a[ia[k]], b[ib[k]])``.

    Without indices, pairs are ``(a[k], b[k])``. Maps are gathered a chunk at a time (bounded
    memory) and moved to the matcher's device, so CPU-held features score on a CUDA matcher.
    """
    ia = np.arange(len(a)) if ia is None else np.asarray(ia)
    ib = np.arange(len(b)) if ib is None else np.asarray(ib)
    if len(ia) != len(ib):
        raise ValueError(f"pair index lists differ in length: {len(ia)} vs {len(ib)}")
    qaconv = qaconv.eval()
    device = next(qaconv.parameters()).device
    cos = (a.embedding[ia] * b.embedding[ib]).sum(1).double().numpy()
    qa = []
    for s in range(0, len(ia), chunk):
        sa, sb = torch.from_numpy(ia[s : s + chunk]), torch.from_numpy(ib[s : s + chunk])
        qa.append(
            qaconv.match_pairs(
                a.feature_map[sa].to(device),
                b.feature_map[sb].to(device),
                a.occlusion[sa][:, None].to(device),
                b.occlusion[sb][:, None].to(device),
            )
            .double()
            .cpu()
            .numpy()
        )
    vis = torch.minimum(a.visibility[ia], b.visibility[ib]).double().numpy()
    norm = torch.minimum(a.norm[ia], b.norm[ib]).double().numpy()
    return PairScores(cos, np.concatenate(qa) if qa else np.zeros(0), vis, norm)
