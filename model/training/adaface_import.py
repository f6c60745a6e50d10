"""Import of official AdaFace ``.ckpt`` files (training side: a backbone to fine-tune from).

AdaFace's released checkpoints are PyTorch Lightning ``.ckpt`` files (torch's zip format):
backbone keys under the prefix ``model.``, the margin head under ``head.``. A checkpoint is
untrusted input, and a pickle can name any function for the loader to call, so nothing in it
may run:

1. ``torch.load(weights_only=True)``: torch's own restricted reader (tensors and plain containers
   only), for every format it knows (zip, legacy pickles).
2. Lightning's pickled hyper-parameters often name classes that reader refuses. For a zip
   checkpoint the fallback is this module's own reader: ``data.pkl`` is unpickled with an
   unpickler whose every global is either on a short allow-list (tensor rebuilding,
   ``OrderedDict``, ``torch.Size``, ``set``) or replaced by an inert placeholder, and tensors are
   rebuilt from the archive's records by this module, never through ``torch.load`` with a
   permissive pickle module (whose legacy path reads header pickles with plain ``pickle.load``).
3. Anything else is refused with one line: TorchScript archives (``torch.load`` would hand them
   to ``torch.jit.load``), tar archives, legacy pickles the safe reader refuses, big-endian
   archives.

The backbone loads strictly; the OAML heads are reported as untrained. ``oaml import-adaface``
writes the result in the serving format.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import HEAD_PREFIXES
from model.errors import CheckpointError
from model.net import OAMLNet, build_model

__all__ = ["ImportReport", "import_adaface_ckpt", "checkpoint_filter_fn", "read_checkpoint"]

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

    def extend(self, values: Any) -> None:
        self.args = (*self.args, *values)


@dataclass(frozen=True)
class _StorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) names: only the element type of a storage record."""

    dtype: torch.dtype


_STORAGE_TYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

#: The largest record (one tensor's storage) and pickle read from an archive: far beyond any face model,
#: far below what a crafted, highly compressed record could make the reader allocate.
MAX_RECORD_BYTES = 8 * 2**30
MAX_PICKLE_BYTES = 256 * 2**20

#: Callables the fallback reader may call: each builds a tensor or a plain container and nothing else.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Allow-listed globals, storage-type markers, placeholders for everything else (never an import)."""

    def __init__(self, file: io.BytesIO, records: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.records, self.prefix = records, prefix
        self.stubbed: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        self.stubbed.add(f"{module}.{name}")
        return _Placeholder

    def persistent_load(self, pid: Any) -> Any:
        """A tensor's storage: ``('storage', type, key, location, numel)``, read from ``data/<key>``."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {str(pid)[:60]!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not re.fullmatch(r"\w{1,64}", key):
            raise CheckpointError(f"unsupported storage record {key!r}")
        data = bytearray(self.records.read(f"{self.prefix}data/{key}"))
        itemsize = torch.empty(0, dtype=kind.dtype).element_size()
        if not isinstance(numel, int) or numel * itemsize != len(data):
            raise CheckpointError(f"storage record {key!r} has {len(data)} bytes, not {numel} x {itemsize}")
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)


def _archive_prefix(path: Path, records: zipfile.ZipFile) -> str:
    """The folder holding ``data.pkl`` in a torch zip archive; refuses TorchScript and big-endian archives."""
    names = records.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive (it carries code): refused")
    if len(pickles) != 1:
        raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no single data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    oversized = [i.filename for i in records.infolist() if i.file_size > MAX_RECORD_BYTES]
    if oversized or records.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path} holds records too large to read ({(oversized or pickles)[0]}): refused")
    if f"{prefix}byteorder" in names and records.read(f"{prefix}byteorder").strip() != b"little":
        raise CheckpointError(f"{path} was written on a big-endian machine: refused")
    return prefix


def _read_zip(path: Path) -> tuple[Any, set[str]]:
    """The object pickled in a torch zip archive, read by :class:`_RestrictedUnpickler`."""
    with zipfile.ZipFile(path) as records:
        prefix = _archive_prefix(path, records)
        unpickler = _RestrictedUnpickler(io.BytesIO(records.read(f"{prefix}data.pkl")), records, prefix)
        return unpickler.load(), unpickler.stubbed


def read_checkpoint(path: str | Path) -> Any:
    """The object in a torch checkpoint file, read without running anything the file names.

    Raises:
        CheckpointError: one line, when the file cannot be read safely (see the module docstring).
    """
    path = Path(path)
    try:
        if tarfile.is_tarfile(path):  # torch's legacy tar format extracts members to disk: never
            raise CheckpointError(f"{path} is a tar archive, not a PyTorch checkpoint (zip or pickle)")
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            with zipfile.ZipFile(path) as records:
                _archive_prefix(path, records)  # TorchScript is refused before torch sees the file
        elif not _is_legacy_pickle(path):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (zip or pickle)")
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if _torch_reader_is_safe():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's safe reader refused or failed: say why in one line
            refused = " ".join(str(exc).split())[:200]
    else:
        refused = f"torch {torch.__version__}'s weights_only reader has known escapes; needs 2.10"
    if not is_zip:
        raise CheckpointError(f"{path}: a legacy pickle that torch's safe reader refuses ({refused}): not loaded")
    logger.info("weights_only load of %s refused (%s); reading it with the restricted unpickler", path, refused)
    try:
        ckpt, stubbed = _read_zip(path)
    except CheckpointError:
        raise
    except Exception as exc:  # malformed pickle or archive: whatever the reason, one line
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path} cannot be read safely: {reason}") from exc
    if stubbed:
        logger.info("replaced non-tensor globals with inert placeholders: %s", sorted(stubbed))
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
    ckpt = read_checkpoint(path)
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


#: torch versions whose ``weights_only`` reader had known ways to run code or corrupt memory were fixed by 2.10
SAFE_TORCH = (2, 10)


def _torch_reader_is_safe() -> bool:
    numbers = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= SAFE_TORCH


def _is_legacy_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) in (b"\x80\x02", b"\x80\x04", b"\x80\x05")
