"""OAML checkpoints: safetensors + JSON metadata, with a content hash verified at load.

Our format is one ``.safetensors`` file. Its header metadata holds a single key, ``oaml``, whose
value is a JSON document (see :func:`default_metadata`, typed by :class:`model.card.WeightsCard`):
architecture, which heads are present, the input convention, the detector, calibration, training
data and metrics, and ``model_version``, a content hash of every tensor. The hash is recomputed at
load and must match, so a gallery built by one set of weights is never silently matched against
another. Official AdaFace ``.ckpt`` files convert with :mod:`model.training.adaface_import`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
    "trunk_digest",
    "derives_from",
    "content_hash",
    "default_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "export_backbone",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Submodules that are OAML additions; absent from AdaFace checkpoints.
HEAD_PREFIXES = ("occlusion_head.", "qaconv.", "qaconv_proj.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trunk_digest(model: OAMLNet) -> str:
    """:func:`content_hash` of everything but the heads (:data:`HEAD_PREFIXES`): two weights files with the same
    trunk digest give every face the same embedding, norm and trunk map, whatever their heads."""
    return content_hash({k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)})


def derives_from(source: OAMLNet, target: OAMLNet) -> bool:
    """Whether ``target``'s data for a face can be made from what ``source`` stored for it, without its crop:
    the same trunk (so the same embedding and norm; :func:`trunk_digest`), and ``source``
    storing the trunk's own map (no projection), from which ``target``'s occlusion head and QAConv projection
    compute theirs. A heads-only release (``oaml heads export``) moves every gallery this way
    (:mod:`service.migration`), and ``oaml eval --also`` scores it from the same pass."""
    return (
        source.qaconv_proj is None
        and source.embedding_size == target.embedding_size
        and source.feature_channels == target.feature_channels
        and trunk_digest(source) == trunk_digest(target)
    )


def default_metadata(model: OAMLNet) -> dict[str, Any]:
    """Metadata every OAML checkpoint carries; callers add calibration, training and metrics."""
    return {
        "format": "oaml",
        "format_version": FORMAT_VERSION,
        "architecture": model.arch,
        "embedding_size": model.embedding_size,
        "heads": {
            "occlusion": {
                "in_channels": model.feature_channels,
                "hidden_channels": model.occlusion_head.conv1.out_channels,
            },
            "qaconv": {
                "num_features": model.qaconv.num_features,
                "projected_from": model.feature_channels if model.qaconv_proj is not None else None,
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
    # safetensors creates its files 0600 whatever the umask: a weights file is data that a service running as
    # another user (the Docker image's) must read
    os.chmod(tmp, 0o644)
    tmp.replace(path)
    return meta


def rewrite_metadata(model: OAMLNet, path: str | Path, meta: dict[str, Any], what: str) -> dict[str, Any]:
    """Write ``meta`` into the weights file at ``path`` beside the same tensors, at the file's own dtype: how
    tools keep what they measured or fitted with the weights (``model_version`` must not change).

    Raises:
        CheckpointError: the tensors came out different (``what`` names the tool in the message).
    """
    keep = {k: v for k, v in meta.items() if k not in ("content_sha256", "model_version", "dtype")}
    written = save_checkpoint(model, path, keep, dtype=getattr(torch, str(meta.get("dtype", "float32"))))
    if written["model_version"] != meta["model_version"]:
        raise CheckpointError(
            f"{what} changed the tensors of {path}: {meta['model_version']} -> {written['model_version']}"
        )
    return written


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
            raise CheckpointError(
                f"{path}: content hash {digest[:12]} does not match metadata {str(meta.get('content_sha256'))[:12]}"
            )
        # the version names the tensors (galleries, collections and exported graphs are keyed by it): one that
        # names other tensors is refused, not trusted
        expected = f"{meta.get('architecture')}-{digest[:12]}"
        if meta.get("model_version") != expected:
            raise CheckpointError(
                f"{path}: model_version {meta.get('model_version')!r} does not name these tensors ({expected})"
            )
    heads = meta.get("heads", {})
    qa = heads.get("qaconv", {})
    model = build_model(
        meta["architecture"],
        embedding_size=meta.get("embedding_size", 512),
        input_size=meta.get("input", {}).get("size", [112])[0],
        occlusion_hidden=heads.get("occlusion", {}).get("hidden_channels", 256),
        occlusion_method=qa.get("occlusion_method", "scaling"),
        qaconv_channels=qa.get("num_features") if qa.get("projected_from") else None,
    )
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match architecture {meta['architecture']}: {exc}") from exc
    model = model.to(device=device, dtype=dtype).eval()
    return model, meta


def export_backbone(
    model: OAMLNet, path: str | Path, dtype: torch.dtype = torch.float16, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Save a half-precision copy (fp16 or bf16) for smaller downloads; loads back as fp32."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"export dtype must be float16 or bfloat16, got {dtype}")
    return save_checkpoint(model, path, metadata, dtype=dtype)
