"""Import of official AdaFace ``.ckpt`` files (training side: a backbone to fine-tune from).

AdaFace's released checkpoints are PyTorch Lightning ``.ckpt`` pickles: backbone keys under the
prefix ``model.``, the margin head under ``head.``. They are read with ``weights_only=True`` first;
Lightning's pickled hyper-parameters often need classes that torch's safe loader refuses, so the
fallback is a restricted unpickler that rebuilds tensors but turns every other global into an inert
placeholder: no code from the file is ever run. The backbone loads strictly; the OAML heads are
reported as untrained. ``oaml import-adaface`` writes the result in the serving format.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import HEAD_PREFIXES
from model.errors import CheckpointError
from model.net import OAMLNet, build_model

__all__ = ["ImportReport", "import_adaface_ckpt", "checkpoint_filter_fn"]

logger = logging.getLogger(__name__)


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
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
for _name in (
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "LongStorage",
    "IntStorage",
    "ByteStorage",
    "BoolStorage",
):
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
        logger.info(
            "weights_only load of %s refused (%s); using the restricted unpickler", path, str(exc).splitlines()[0]
        )
    _RestrictedUnpickler.stubbed = set()
    ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    if _RestrictedUnpickler.stubbed:
        logger.info("replaced non-tensor globals with placeholders: %s", sorted(_RestrictedUnpickler.stubbed))
    return ckpt


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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


_KEYS_TO_ARCH = {
    179: "ir_18",
    323: "ir_34",
    467: "ir_50",
    917: "ir_101",
    195: "ir_se_18",
    355: "ir_se_34",
    515: "ir_se_50",
    1015: "ir_se_101",
}


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
