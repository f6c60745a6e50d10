"""OAML checkpoints (safetensors + JSON metadata) and import of official AdaFace ``.ckpt`` files.

Our format is one ``.safetensors`` file. Its header metadata holds a single key, ``oaml``, whose
value is a JSON document (see :func:`default_metadata`): architecture, which heads are present,
the input convention, the detector, calibration, training data and metrics, and ``model_version``,
a content hash of every tensor. The hash is recomputed at load and must match, so a gallery built
by one set of weights is never silently matched against another.

AdaFace's released checkpoints are PyTorch Lightning ``.ckpt`` pickles: backbone keys under the
prefix ``model.``, the margin head under ``head.``. They are read with ``weights_only=True`` first;
Lightning's pickled hyper-parameters often need classes that torch's safe loader refuses, so the
fallback is a restricted unpickler that rebuilds tensors but turns every other global into an inert
placeholder: no code from the file is ever run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.align import ARCFACE_TEMPLATE, DETECTOR_SHA256
from model.errors import CheckpointError
from model.net import OAMLNet, build_model

__all__ = [
    "FORMAT_VERSION",
    "HEAD_PREFIXES",
    "content_hash",
    "default_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "export_backbone",
    "ImportReport",
    "import_adaface_ckpt",
    "checkpoint_filter_fn",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Submodules that are OAML additions; absent from AdaFace checkpoints.
HEAD_PREFIXES = ("occlusion_head.", "qaconv.")
#: Training-only tensors (QAConv class embeddings): never part of a serving checkpoint.
TRAINING_ONLY_PREFIXES = ("qaconv.class_embed", "qaconv.class_neighbors")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_metadata(model: OAMLNet) -> dict[str, Any]:
    """Metadata every OAML checkpoint carries; callers add calibration, training and metrics."""
    return {
        "format": "oaml",
        "format_version": FORMAT_VERSION,
        "architecture": model.arch,
        "embedding_size": model.embedding_size,
        "heads": {
            "occlusion": {"in_channels": model.feature_channels, "hidden_channels": model.occlusion_head.conv1.out_channels},
            "qaconv": {
                "num_features": model.qaconv.num_features,
                "height": model.qaconv.height,
                "width": model.qaconv.width,
                "occlusion_method": model.qaconv.occlusion_method,
            },
        },
        "input": {
            "size": [model.input_size, model.input_size],
            "channel_order": "BGR",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "scale": "x / 255",
            "layout": "NCHW",
            "alignment": {"method": "similarity-5pt", "template": ARCFACE_TEMPLATE.round(4).tolist()},
        },
        "detector": {"name": "retinaface_mnet025", "sha256": DETECTOR_SHA256},
    }


def _serialisable_state(model: OAMLNet, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(TRAINING_ONLY_PREFIXES):
            continue
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


def save_checkpoint(
    model: OAMLNet, path: str | Path, metadata: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Write ``model`` (floating tensors cast to ``dtype`` if given) with metadata; returns the metadata.

    ``metadata`` is merged over :func:`default_metadata`; ``model_version`` and ``dtype`` are set here.
    """
    state = _serialisable_state(model, dtype)
    meta = default_metadata(model)
    meta.update(metadata or {})
    digest = content_hash(state)
    meta["content_sha256"] = digest
    meta["model_version"] = f"{model.arch}-{digest[:12]}"
    meta["dtype"] = str(dtype or torch.float32).removeprefix("torch.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"oaml": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of an OAML safetensors file, without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("oaml")
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without OAML metadata")
    return json.loads(raw)


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> tuple[OAMLNet, dict[str, Any]]:
    """Build the model described by the metadata, load the tensors strictly, return it in eval mode.

    Raises:
        CheckpointError: unreadable file, missing metadata, content hash mismatch, or keys that do
            not match the architecture.
    """
    meta = read_metadata(path)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            state[name] = f.get_tensor(name)
    if verify:
        digest = content_hash(state)
        if digest != meta.get("content_sha256"):
            raise CheckpointError(f"{path}: content hash {digest[:12]} does not match metadata {str(meta.get('content_sha256'))[:12]}")
    heads = meta.get("heads", {})
    qa = heads.get("qaconv", {})
    model = build_model(
        meta["architecture"],
        embedding_size=meta.get("embedding_size", 512),
        input_size=meta.get("input", {}).get("size", [112])[0],
        occlusion_hidden=heads.get("occlusion", {}).get("hidden_channels", 256),
        occlusion_method=qa.get("occlusion_method", "scaling"),
    )
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match architecture {meta['architecture']}: {exc}") from exc
    model = model.to(device=device, dtype=dtype).eval()
    return model, meta


def export_backbone(model: OAMLNet, path: str | Path, dtype: torch.dtype = torch.float16, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save a half-precision copy (fp16 or bf16) for smaller downloads; loads back as fp32."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"export dtype must be float16 or bfloat16, got {dtype}")
    return save_checkpoint(model, path, metadata, dtype=dtype)


# -- AdaFace Lightning import ------------------------------------------------------------------


class _Placeholder:
    """Inert stand-in for any pickled global outside the allow-list (e.g. Lightning's AttributeDict)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        # Pickle's NEWOBJ opcode calls __new__ without __init__, so set everything here.
        self = super().__new__(cls)
        self.args, self.kwargs, self.state = args, dict(kwargs), None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses are rebuilt via SETITEMS
        self.kwargs[str(key)] = value

    def append(self, value: Any) -> None:  # list subclasses are rebuilt via APPENDS
        self.args = (*self.args, value)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,  # type: ignore[attr-defined]
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,  # type: ignore[attr-defined]
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
for _name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage", "ByteStorage", "BoolStorage"):
    _ALLOWED_GLOBALS[("torch", _name)] = getattr(torch, _name)


class _RestrictedUnpickler(pickle.Unpickler):
    stubbed: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        type(self).stubbed.add(f"{module}.{name}")
        return _Placeholder


class _RestrictedPickleModule:
    """Passed to ``torch.load(pickle_module=...)``: tensors load, nothing else executes."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)
    __name__ = "oaml_restricted_pickle"


def _load_lightning(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        logger.info("weights_only load of %s refused (%s); using the restricted unpickler", path, str(exc).splitlines()[0])
    _RestrictedUnpickler.stubbed = set()
    ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)  # type: ignore[arg-type]
    if _RestrictedUnpickler.stubbed:
        logger.info("replaced non-tensor globals with placeholders: %s", sorted(_RestrictedUnpickler.stubbed))
    return ckpt


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an AdaFace Lightning ``state_dict`` into (backbone keys without ``model.``, head keys)."""
    backbone, head = {}, {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            backbone[key[len("model.") :]] = value
        elif key.startswith("head."):
            head[key[len("head.") :]] = value
    return backbone, head


@dataclass
class ImportReport:
    """What an AdaFace import found: architecture, missing OAML heads, head statistics."""

    architecture: str
    backbone_keys: int
    missing_heads: list[str]
    head_batch_mean: float | None = None
    head_batch_std: float | None = None
    hyper_parameters: dict[str, Any] = field(default_factory=dict)


_KEYS_TO_ARCH = {179: "ir_18", 323: "ir_34", 467: "ir_50", 917: "ir_101", 195: "ir_se_18", 355: "ir_se_34", 515: "ir_se_50", 1015: "ir_se_101"}


def _hparams(ckpt: dict[str, Any]) -> dict[str, Any]:
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict):
        return dict(hp)
    if isinstance(hp, _Placeholder):
        merged = dict(hp.kwargs)
        if isinstance(hp.state, dict):
            merged.update(hp.state)
        return merged
    return {}


def import_adaface_ckpt(path: str | Path, arch: str | None = None) -> tuple[OAMLNet, ImportReport]:
    """Load an official AdaFace Lightning checkpoint into an :class:`OAMLNet`.

    The backbone loads strictly: every ``model.*`` key must exist in our backbone with the same
    shape, and every backbone key must be present. The QAConv and occlusion heads keep their
    fresh initialisation and are reported as missing (train them with ``finetune-heads``).

    Raises:
        CheckpointError: not a Lightning checkpoint, unknown architecture, or key mismatch.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path) and not _is_legacy_pickle(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint")
    ckpt = _load_lightning(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    backbone, head = checkpoint_filter_fn(ckpt["state_dict"])
    if not backbone:
        raise CheckpointError(f"{path} has no 'model.'-prefixed backbone keys")
    hparams = _hparams(ckpt)
    arch = arch or hparams.get("arch") or _KEYS_TO_ARCH.get(len(backbone))
    if arch is None:
        raise CheckpointError(f"cannot infer the architecture of {path} ({len(backbone)} backbone keys); pass arch=")
    model = build_model(str(arch))
    expected = {k for k in model.state_dict() if not k.startswith(HEAD_PREFIXES)}
    missing, unexpected = sorted(expected - set(backbone)), sorted(set(backbone) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    result = model.load_state_dict(backbone, strict=False)
    if result.unexpected_keys or any(not k.startswith(HEAD_PREFIXES) for k in result.missing_keys):
        raise CheckpointError(f"{path}: backbone did not load strictly: {result}")
    heads_missing = sorted({k.split(".")[0] for k in result.missing_keys})
    logger.info("imported AdaFace %s from %s; untrained OAML heads: %s", arch, path, heads_missing)
    report = ImportReport(
        architecture=str(arch),
        backbone_keys=len(backbone),
        missing_heads=heads_missing,
        head_batch_mean=float(head["batch_mean"].reshape(-1)[0]) if "batch_mean" in head else None,
        head_batch_std=float(head["batch_std"].reshape(-1)[0]) if "batch_std" in head else None,
        hyper_parameters={k: v for k, v in hparams.items() if isinstance(v, (str, int, float, bool))},
    )
    return model.eval(), report


def _is_legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) in (b"\x80\x02", b"\x80\x04", b"\x80\x05")
