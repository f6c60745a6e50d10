"""Which people a model learnt from, its initial weights' included: what keeps its validation held out.

A run that starts from trained weights (a fine-tune, the background run of ``configs/oaml_ir18_v3_cpu.toml``)
splits its own data by identity, but the weights it starts from were split differently: some of the run's
validation people were training people of its initial weights. Validating (or calibrating) on them measures
what the starting point memorised, not what the model generalises, and favours the starting point: the
background run's first validation split held 33 such people of 124 (576 of its 1,046 faces). So a model's
*trained identities* are its own training split and, through ``init_from``, those of the weights it started
from; validation and calibration use only people outside them.

Identities are ``cache/identity`` names (:func:`model.training.train.load_training_data`), so they compare
across runs whose caches share a name. Exported weights carry theirs (``training.trained_identities``);
older weights' are rebuilt from their training config and the caches, without reading a crop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.training.face import AlignedCache, refuse_evaluation_data

logger = logging.getLogger(__name__)

__all__ = [
    "LineageUnknown",
    "cache_identities",
    "config_caches",
    "open_caches",
    "read_exclusions",
    "split_by_identity",
    "trained_identities",
    "unseen",
]

#: how far back ``init_from`` is followed (a chain longer than this is a loop or a mistake)
MAX_GENERATIONS = 8


def read_exclusions(files: Sequence[str | Path]) -> set[str]:
    """``cache/identity`` lines of identity-overlap lists (``#`` starts a comment): identities that are, or may
    be, people of an evaluation set under another spelling, left out of training."""
    excluded: set[str] = set()
    for path in files:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry and "/" not in entry:
                raise ValueError(f"{path}:{number}: {entry!r} is not `cache/identity`")
            if entry:
                excluded.add(entry)
    return excluded


def split_by_identity(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) with no identity in both; validation identities have >= 2 images."""
    classes, counts = np.unique(labels, return_counts=True)
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 7])
    eligible = rng.permutation(classes[counts >= 2])
    n_val = max(2, int(round(fraction * len(classes))))
    val_classes = set(eligible[:n_val].tolist())
    is_val = np.array([c in val_classes for c in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def open_caches(caches: Sequence[str | Path], exclude: set[str] | None = None) -> list[tuple[str, AlignedCache]]:
    """(name, cache) of each aligned cache, less its ``exclude`` identities (``cache/identity`` names): the
    manifests only, no crop read. A cache of evaluation data (``eval/``) is refused
    (:class:`model.training.face.EvaluationDataError`)."""
    opened = []
    for cache_path in caches:
        name = Path(cache_path).name
        cache = AlignedCache(cache_path)
        refuse_evaluation_data(cache_path, cache.records)
        dropped = {i.split("/", 1)[1] for i in exclude or () if i.split("/", 1)[0] == name}
        if dropped - set(cache.classes):
            logger.warning(
                "%s: identity-overlap entries match no identity: %s", name, sorted(dropped - set(cache.classes))
            )
        if dropped & set(cache.classes):
            logger.info("%s: %d identities left out (identity-overlap lists)", name, len(dropped & set(cache.classes)))
            cache = cache.without(dropped)
        opened.append((name, cache))
    return opened


def cache_identities(opened: Sequence[tuple[str, AlignedCache]]) -> tuple[list[str], np.ndarray]:
    """(label -> ``cache/identity`` name, one label per crop) of caches concatenated as training does."""
    identities: list[str] = []
    labels = []
    for name, cache in opened:
        labels.append(cache.labels + len(identities))
        identities += [f"{name}/{c}" for c in cache.classes]
    return identities, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)


def config_caches(training_config: Mapping[str, Any], data_root: str | Path | None) -> list[Path]:
    """A training config's labelled caches: absolute paths as written, relative ones by their name under
    ``data_root`` (the recipes name them under the folder a run was given)."""
    root = Path(data_root) if data_root is not None else None
    return [Path(p) if Path(p).is_absolute() or root is None else root / Path(p).name for p in training_config["train"]]


def own_training_identities(training_config: Mapping[str, Any], data_root: str | Path | None) -> set[str]:
    """The identities a training config's own split trained on (its caches under ``data_root``)."""
    opened = open_caches(
        config_caches(training_config, data_root),
        read_exclusions(training_config.get("exclude_identities") or []),
    )
    identities, labels = cache_identities(opened)
    train_idx, _ = split_by_identity(
        labels, float(training_config.get("val_fraction", 0.1)), int(training_config.get("seed", 0))
    )
    return {identities[int(c)] for c in np.unique(labels[train_idx])}


class LineageUnknown(ValueError):
    """A weights file's training people cannot be rebuilt here (its caches, overlap lists or initial weights are
    missing)."""


def trained_identities(
    meta: Mapping[str, Any], data_root: str | Path | None, strict: bool = False, _depth: int = 0
) -> set[str]:
    """Every ``cache/identity`` the weights with metadata ``meta`` learnt from, through their initial weights.

    ``training.trained_identities`` where the weights carry it; otherwise their training config's split (its
    caches under ``data_root``) and, through ``init_from``, their initial weights'. Weights without a training
    config (imported AdaFace checkpoints, trained on other data) count as nobody from these caches. What should
    be here and is not (the caches or overlap lists of the config, initial weights no longer on disk) raises
    :class:`LineageUnknown` when ``strict`` (a trainer, whose validation set depends on it); otherwise it is
    logged and counted as nobody.
    """
    training = meta.get("training") or {}
    if "trained_identities" in training:
        return set(training["trained_identities"])
    config = training.get("config")
    if not config:
        logger.info("weights without a training config: no identity of these caches is known to be theirs")
        return set()

    def unknown(why: str) -> set[str]:
        if strict:
            raise LineageUnknown(why)
        logger.warning("%s: counted as nobody", why)
        return set()

    try:
        seen = own_training_identities(config, data_root)
    except FileNotFoundError as e:
        return unknown(f"cannot rebuild the training split of weights that trained on {config.get('train')}: {e}")
    init = config.get("init_from")
    if init and str(init).endswith(".safetensors"):
        if _depth >= MAX_GENERATIONS:
            raise ValueError(f"init_from followed {MAX_GENERATIONS} generations back: a loop? ({init})")
        if not Path(init).exists():
            return seen | unknown(f"initial weights {init} are not here: the identities they trained on are unknown")
        from model.checkpoint import read_metadata

        seen |= trained_identities(read_metadata(init), data_root, strict, _depth + 1)
    return seen


def unseen(identities: Sequence[str], labels: np.ndarray, rows: np.ndarray, seen: set[str]) -> np.ndarray:
    """The ``rows`` (positions into ``labels``, which index ``identities``) of people not in ``seen``."""
    if not len(rows) or not seen:
        return rows
    keep = np.array([identities[int(c)] not in seen for c in labels[rows]], dtype=bool)
    return rows[keep]
