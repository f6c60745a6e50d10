"""The OAML trainer: AdaFace + QAConv + occlusion head, with SFace distillation, on CPU or CUDA.

One step, for a PK batch of aligned crops:

1. Augment (flip, AdaFace crop/photometric/low-res, synthetic occlusion with an exact visibility
   mask); the 7x7 visibility target is the visible fraction of each 16x16 cell.
2. One backbone pass gives embedding, norm, occlusion map and feature map.
3. Losses (weights in :class:`TrainConfig`):
   - margin head (AdaFace by default) on the embedding;
   - QAConv balanced pairwise BCE and batch-hard ranking over the batch, occlusion-weighted with
     the *detached* predicted visibility maps; class-embedding classification over the ``k``
     nearest classes;
   - occlusion head MSE to the target (clean faces target all ones; the head's input is
     detached, so this loss never shapes the backbone);
   - distillation from SFace: the teacher embeds the *clean* crop (same flip), the student sees
     the augmented, possibly occluded one; relation loss (batch cosine-similarity matrices) and a
     feature loss through a 512->128 projection.
4. SGD (or AdamW), warm-up then cosine decay, gradient clipping; bf16 autocast on CPUs with native
   bf16 (fp32 on others), fp16 AMP on CUDA.

Reproducibility: batches are a function of (seed, epoch) and every step's augmentation and dropout
are seeded from (seed, global step), so ``resume`` replays exactly. A checkpoint (``last.pt``) is
written every ``checkpoint_every`` steps and at each epoch end; ``best.safetensors`` is the model
with the best validation score, in the serving format.

Preemptible runs (``preemptible = true``, ``oaml train --preemptible``): checkpoints by the clock too
(``checkpoint_every_s``, 180 s), SIGTERM/SIGINT stop the run after its step with a checkpoint, and the
schedule is counted in steps (``max_samples`` or ``max_steps``; no time budget) and validations too
(``validate_every``), so interruptions never change what the run learns. Every run's checkpoints are
generations (``last.pt``, ``last.pt.1``, ...: ``keep_checkpoints``), each written whole or not at all and
carrying its content's SHA-256; a corrupt newest one is skipped on resume (:mod:`model.training.preempt`).
A checkpoint holds the model, optimiser, scaler, margin head, projector, class memory, graph neighbours,
progress (epoch, step, schedule length, best score, history), the losses since the last validation and
the global RNG states.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from model.embedder import precision_setting, select_device, select_precision
from model.net import OAMLNet, build_model
from model.training.adaface_import import import_adaface_ckpt
from model.training.augment import AugmentConfig, FaceAugmenter
from model.training.batches import BatchSource, DeviceBatch, DeviceBatchSource, Prefetcher
from model.training.class_memory import ClassMemory
from model.training.device_augment import DeviceAugmenter, OccluderBank
from model.training.head import AdaFace, build_head
from model.training.ledger import Ledger
from model.training.lineage import (
    cache_identities,
    open_caches,
    read_exclusions,
    split_by_identity,
    trained_identities,
    unseen,
)
from model.training.losses import (
    class_neighbor_loss,
    feature_distillation_loss,
    occlusion_loss,
    pairwise_matching_loss,
    relation_distillation_loss,
    triplet_ranking_loss,
)
from model.training.occlusion import OcclusionAugmenter
from model.training.offsite import Offsite, run_identity
from model.training.preempt import (
    STATUS_FILE,
    MemoryGuard,
    StopSignals,
    load_newest,
    read_offsite,
    restore_rng_states,
    rng_states,
    save_generation,
)
from model.training.sampler import GraphSampler, PKSampler
from model.training.validation import ValidationSet

__all__ = ["TrainConfig", "Trainer", "TrainingData", "load_training_data", "read_exclusions", "split_by_identity"]

logger = logging.getLogger(__name__)

#: how long the end of a run waits for the offsite copy of its last checkpoint (seconds)
OFFSITE_FINAL_WAIT_S = 600.0
#: a preemptible run's checkpoints by the clock (seconds), unless ``checkpoint_every_s`` says otherwise
PREEMPTIBLE_CHECKPOINT_S = 180.0


@dataclass
class TrainConfig:
    """Every training choice; load from TOML with :meth:`from_toml` (keys as below, ``[augment]`` table)."""

    train: list[str] = field(default_factory=list)  # aligned caches made by `oaml prepare`
    out: str = "runs/oaml"
    occluders: str | None = None  # folder with masks/ and sunglasses/ templates (optional)
    val_fraction: float = 0.1  # identities held out for validation and calibration
    arch: str = "ir_18"
    occlusion_method: str = "scaling"
    init_from: str | None = None  # OAML .safetensors or AdaFace .ckpt
    mode: str = "full"  # "full" or "finetune-heads" (frozen backbone: QAConv + occlusion heads only)
    head: str = "adaface"
    m: float = 0.4
    h: float = 0.333
    s: float = 64.0
    t_alpha: float = 0.01
    w_margin: float = 1.0
    w_qaconv_pair: float = 0.5
    w_qaconv_triplet: float = 0.5
    triplet_margin: float = 1.0
    w_qaconv_class: float = 0.1
    qaconv_k_nearest: int = 16
    w_occlusion: float = 1.0
    teacher: bool = True
    w_distill_relation: float = 2.0
    w_distill_feature: float = 1.0
    sampler: str = "pk"  # "pk" or "graph"
    p: int = 16
    k: int = 4
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    epochs: int = 10
    max_steps: int | None = None
    max_samples: int | None = None  # the run's length in faces drawn (p * k + unlabeled_per_batch a step)
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: str = "auto"  # "auto" (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), "fp32", "bf16", "fp16"
    threads: int = 2
    deterministic: bool = True  # bit-exact resume; costs little on CPU, some speed on CUDA
    checkpoint_every: int = 100
    # checkpoints by the clock too (seconds; default 180 for a preemptible run): at most this much work is lost
    checkpoint_every_s: float | None = None
    keep_checkpoints: int = 3  # checkpoint generations kept: last.pt, last.pt.1, ... (a corrupt newest is skipped)
    # a run that may be killed at any time: checkpoints by the clock, SIGTERM/SIGINT stop it after its step with a
    # checkpoint, and its schedule and validations are counted in steps (no budget_minutes, no validate_every_s)
    preemptible: bool = False
    # a folder on storage that outlives the machine (a mounted bucket, NFS, another disk): each checkpoint is copied
    # there in the background, and a run whose folder is behind or gone resumes from it (model/training/offsite.py)
    offsite: str | None = None
    offsite_wait_s: float = 60.0  # how long a stop signal waits for the copy of its checkpoint (a preemption notice)
    # before each step, give freed memory back to the system and wait while the machine has less available than a
    # step adds (a background run on a shared machine; model/training/preempt.py MemoryGuard)
    memory_guard: bool = False
    log_every: int = 10
    val_pairs: int = 3000  # genuine and impostor pairs each, for validation
    # a run from trained weights is a release candidate once its best validation score beats its initial
    # weights' on the same people by this much (`oaml train-release` then runs the public suite): 0.01 is about
    # twice the binomial standard error of one accuracy on the background run's 5,718 validation pairs at 83%;
    # the pairs share faces, so the error is larger: a trigger for the suite, which decides, not a test
    release_margin: float = 0.01
    # "clean": precomputed teacher embeddings of each un-augmented crop (and its mirror); "matched": the teacher
    # embeds the student's own view without the occluder, on the training device, every step (function matching)
    teacher_view: str = "clean"
    teacher_weights: str | None = None  # the "matched" teacher: None = SFace's ONNX file, or an `oaml bundle` export
    unlabeled: list[str] = field(default_factory=list)  # aligned caches without usable labels: teacher losses only
    exclude_identities: list[str] = field(default_factory=list)  # identity-overlap lists (cache/identity lines)
    unlabeled_per_batch: int = 0  # unlabeled faces added to each PK batch
    # how often a face of each unlabelled cache is drawn relative to others (default 1): aflw2000 = 3 shows the
    # only faces in every head pose three times as often
    unlabeled_weights: dict[str, float] = field(default_factory=dict)
    augment_workers: int = 0  # processes preparing the next batch during the step (0: in the training process)
    # "workers": NumPy augmentation per face (in augment_workers processes); "device": batched on the training
    # device from crops copied there once (model/training/device_augment.py: GPU hosts; blur, jpeg, mix)
    augment_on: str = "workers"
    occluder_bank: int = 2048  # occluder layers rendered at start for augment_on = "device"
    fused_optimizer: bool = False  # the optimiser's fused implementation (fewer kernel launches on a GPU)
    budget_minutes: float | None = None  # size the schedule from the measured step rate to end inside this time
    validate_every_s: float | None = None  # validate by time (short epochs) instead of at each epoch end
    validate_every: int | None = None  # validate every this many steps instead of at each epoch end
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        raw = tomllib.loads(Path(path).read_text())
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw)

    def with_data_root(self, root: str | Path) -> TrainConfig:
        """Relative cache, occluder and teacher paths resolved under ``root`` (``--data-root``, a bundle)."""

        def under(p: str) -> str:
            return p if Path(p).is_absolute() else str(Path(root) / p)

        return dataclasses.replace(
            self,
            train=[under(p) for p in self.train],
            unlabeled=[under(p) for p in self.unlabeled],
            teacher_weights=under(self.teacher_weights) if self.teacher_weights else None,
            occluders=under(self.occluders) if self.occluders else None,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}")
        aug = raw.pop("augment", {})
        if isinstance(aug, dict):
            aug_known = {f.name for f in dataclasses.fields(AugmentConfig)}
            if set(aug) - aug_known:
                raise ValueError(f"unknown augment options {sorted(set(aug) - aug_known)}")
            options: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
            aug = AugmentConfig(**options)
        cfg = cls(**raw, augment=aug)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mode not in ("full", "finetune-heads"):
            raise ValueError("mode must be 'full' or 'finetune-heads'")
        if self.sampler not in ("pk", "graph"):
            raise ValueError("sampler must be 'pk' or 'graph'")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError("optimizer must be 'sgd' or 'adamw'")
        if not self.train:
            raise ValueError("no training data: set `train` to one or more aligned caches")
        if self.teacher_view not in ("clean", "matched"):
            raise ValueError("teacher_view must be 'clean' or 'matched'")
        if bool(self.unlabeled) != (self.unlabeled_per_batch > 0):
            raise ValueError("unlabeled caches and unlabeled_per_batch > 0 go together")
        if self.unlabeled and not self.teacher:
            raise ValueError("unlabeled faces only train through the teacher: set teacher = true")
        unknown = set(self.unlabeled_weights) - {Path(p).name for p in self.unlabeled}
        if unknown:
            raise ValueError(f"unlabeled_weights names caches not in unlabeled: {sorted(unknown)}")
        if self.augment_on not in ("workers", "device"):
            raise ValueError("augment_on must be 'workers' or 'device'")
        if self.augment.device_only() and self.augment_on != "device":
            raise ValueError(f'augment {", ".join(self.augment.device_only())} need augment_on = "device"')
        if self.augment.mix > 0 and not (self.teacher and self.teacher_view == "matched"):
            raise ValueError('mixed views are labelled by the teacher only: set teacher_view = "matched"')
        if self.max_steps is not None and self.max_samples is not None:
            raise ValueError("set the run's length by max_steps or by max_samples, not both")
        if self.validate_every is not None and self.validate_every_s is not None:
            raise ValueError("validate by steps (validate_every) or by the clock (validate_every_s), not both")
        if self.validate_every is not None and self.validate_every < 1:
            raise ValueError("validate_every must be at least 1")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        if self.checkpoint_every_s is not None and self.checkpoint_every_s <= 0:
            raise ValueError("checkpoint_every_s must be positive")
        if self.preemptible and self.budget_minutes is not None:
            raise ValueError(
                "a preemptible run cannot have budget_minutes: a time budget sizes the schedule from the measured "
                "step rate, so interruptions would change what it learns; set its length by max_samples or max_steps"
            )
        if self.preemptible and self.validate_every_s is not None:
            raise ValueError(
                "a preemptible run validates by steps (validate_every), not by the clock, so that a resumed run "
                "validates, and keeps as best, what an uninterrupted one would"
            )

    @property
    def samples_per_step(self) -> int:
        """Faces drawn from the caches each step: the PK batch and the unlabelled share (mixed views are made
        from these, so they are not counted)."""
        return self.p * self.k + (self.unlabeled_per_batch if self.unlabeled else 0)

    @property
    def clock_checkpoint_s(self) -> float | None:
        """Seconds between checkpoints by the clock: ``checkpoint_every_s``, 180 for a preemptible run."""
        if self.checkpoint_every_s is not None:
            return self.checkpoint_every_s
        return PREEMPTIBLE_CHECKPOINT_S if self.preemptible else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainState(TypedDict):
    """Progress saved in ``last.pt`` (as JSON) and restored on resume."""

    epoch: int
    step_in_epoch: int
    global_step: int
    best_score: float
    history: list[dict[str, Any]]
    total_steps: int | None  # set by a time budget; otherwise the configured length decides
    validation_set: NotRequired[str]  # digest of the people validated (model.training.validation.ValidationSet)
    baseline: NotRequired[dict[str, Any]]  # the initial weights' validation on that set: the bar a release clears
    best_step: NotRequired[int]  # the step best.safetensors was exported at


@dataclass
class TrainingData:
    """All aligned crops in memory, with global identity labels and aligned landmarks."""

    images: np.ndarray  # [N, 112, 112, 3] uint8 RGB
    labels: np.ndarray  # [N] int64
    landmarks: np.ndarray  # [N, 5, 2] in crop coordinates
    identities: list[str]  # label -> "<cache>/<identity>"
    sources: list[str]  # cache names, one per dataset folder


def load_training_data(caches: Sequence[str | Path], exclude: set[str] | None = None) -> TrainingData:
    """Concatenate aligned caches; identities are namespaced by cache so two sets never merge. ``exclude``:
    ``cache/identity`` names left out. A cache of evaluation data (``eval/``) is refused
    (:class:`model.training.face.EvaluationDataError`)."""
    opened = open_caches(caches, exclude)
    identities, labels = cache_identities(opened)
    images = [cache.load_images() for _, cache in opened]
    landmarks = [np.array([r.aligned_landmarks for r in cache.records], dtype=np.float64) for _, cache in opened]
    return TrainingData(
        np.concatenate(images), labels, np.concatenate(landmarks), identities, [name for name, _ in opened]
    )


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def _seed_for(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(0, 2**31 - 1))


class Trainer:
    """Builds data, model and optimiser from a :class:`TrainConfig`, trains, validates, checkpoints."""

    def __init__(self, cfg: TrainConfig, data: TrainingData | None = None) -> None:
        self.created = time.perf_counter()  # a time budget counts from here: loading the data is part of the run
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._setup_runtime()
        excluded = read_exclusions(cfg.exclude_identities)
        self._split(data or load_training_data(cfg.train, excluded))
        self.w = self._loss_weights()
        distill = bool(self.w["distill_relation"] or self.w["distill_feature"])
        self.unlabeled = load_training_data(cfg.unlabeled) if cfg.unlabeled else None
        matched = distill and cfg.teacher_view == "matched"
        self.teacher_emb = self._teacher_embeddings(self.data) if distill and not matched else None
        self.teacher_net = self._teacher_network() if matched else None
        self._build_networks()
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        occlusion = OcclusionAugmenter.from_folder(cfg.occluders, probability=1.0)
        # the per-face augmenter (batches with augment_on = "workers"; the fixed occluded validation copies)
        plain = dataclasses.replace(cfg.augment, blur=0.0, jpeg=0.0, mix=0.0)
        self.augmenter = FaceAugmenter(plain, occlusion)
        unlabeled = self.unlabeled
        self.batch_source = BatchSource(
            augmenter=self.augmenter,
            images=self.data.images,
            landmarks=self.data.landmarks,
            rows=self.train_idx,
            labels=self.train_labels,
            seed=cfg.seed,
            teacher_view=("matched" if matched else "clean") if distill else None,
            teacher_table=self.teacher_emb,
            unlabeled_images=unlabeled.images if unlabeled is not None else None,
            unlabeled_landmarks=unlabeled.landmarks if unlabeled is not None else None,
            unlabeled_per_batch=cfg.unlabeled_per_batch,
            unlabeled_p=self._unlabeled_draw(unlabeled),
            unlabeled_teacher_table=(
                self._teacher_embeddings(unlabeled) if unlabeled is not None and distill and not matched else None
            ),
        )
        self.device_source: DeviceBatchSource | None = None
        if cfg.augment_on == "device":
            bank = OccluderBank.render(occlusion, cfg.occluder_bank, cfg.seed).to(self.device)
            self.device_source = DeviceBatchSource(self.batch_source, DeviceAugmenter(cfg.augment, bank), self.device)
        self._prefetcher: Prefetcher | None = None
        sampler_cls = GraphSampler if cfg.sampler == "graph" else PKSampler
        self.sampler = sampler_cls(self.train_labels, cfg.p, cfg.k, cfg.seed)
        self.steps_per_epoch = len(self.sampler.batches(0))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if cfg.max_samples is not None:
            self.total_steps = math.ceil(cfg.max_samples / cfg.samples_per_step)
        self.state: TrainState = {
            "epoch": 0,
            "step_in_epoch": 0,
            "global_step": 0,
            "best_score": -math.inf,
            "history": [],
            "total_steps": None,
        }
        self._val_cache: ValidationSet | None = None
        self.last_rows = 0
        self.step_rates: list[float] = []  # images/s of each step this process trained (validation excluded)
        # each loss of every step since the last validation: its history row's train_* means (checkpointed, so a
        # resumed run's rows are an uninterrupted one's)
        self.running: dict[str, list[float]] = {}
        self._saved_at = time.monotonic()
        self._saved_state = ""  # the progress the newest checkpoint holds (JSON of self.state)
        self.stopped_by: str | None = None  # the signal that stopped a preemptible run's fit()
        self.ledger = Ledger()  # where and how long each process trained (model/training/ledger.py)
        # held while a checkpoint is written, so the offsite copy never opens a half-rotated generation
        self._save_lock = threading.Lock()
        self.offsite = (
            Offsite(self.out, Path(cfg.offsite), cfg.keep_checkpoints, self._save_lock, run_identity(cfg.to_dict()))
            if cfg.offsite
            else None
        )
        if self.offsite is not None:
            self.offsite.restore()
        elif (kept := read_offsite(self.out)) is not None:  # resumed by a command that forgot its --offsite
            logger.warning("this run kept an offsite copy in %s; not copied there now (--offsite)", kept["folder"])
        self._maybe_resume()

    # -- set-up ------------------------------------------------------------------------------

    def _setup_runtime(self) -> None:
        """Threads, seeds, determinism, device and training precision."""
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # weight initialisation
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = select_device(cfg.device)
        # the service's rule (model.embedder.select_precision): fp16 with a grad scaler on CUDA, bf16 on CPUs that
        # compute it natively, fp32 on the others (emulated bf16 trains many times slower than fp32)
        self.autocast_dtype = select_precision(cfg.precision, self.device)
        self.precision = precision_setting(self.autocast_dtype)

    def _split(self, data: TrainingData) -> None:
        """Identity-disjoint train/validation split; training labels renumbered from 0."""
        self.data = data
        self.train_idx, self.val_idx = split_by_identity(data.labels, self.cfg.val_fraction, self.cfg.seed)
        train_classes = np.unique(data.labels[self.train_idx])
        self.label_map = {int(c): i for i, c in enumerate(train_classes)}
        self.train_labels = np.array([self.label_map[int(c)] for c in data.labels[self.train_idx]])
        self.num_classes = len(train_classes)
        logger.info(
            "%d training images of %d identities, %d validation images of %d identities",
            len(self.train_idx),
            self.num_classes,
            len(self.val_idx),
            len(np.unique(data.labels[self.val_idx])),
        )
        # validation measures people the model never learnt from: its initial weights' training people are
        # left out of it (model.training.lineage), and out of training too, as every validation person is
        self.inherited = self._inherited_identities()
        self.val_rows = unseen(data.identities, data.labels, self.val_idx, self.inherited)
        people, split_people = (len(np.unique(data.labels[r])) for r in (self.val_rows, self.val_idx))
        if len(self.val_rows) < len(self.val_idx):
            logger.info(
                "validation: %d of %d validation identities are training identities of the initial weights %s: "
                "%d of %d faces validated",
                split_people - people,
                split_people,
                self.cfg.init_from,
                len(self.val_rows),
                len(self.val_idx),
            )
        if split_people and people < 2:
            logger.warning(
                "validation: %d of the %d validation people are left to validate on (the others trained the initial "
                "weights): this run is not validated (raise val_fraction)",
                people,
                split_people,
            )
            self.val_rows = self.val_rows[:0]

    def _inherited_identities(self) -> set[str]:
        """The ``cache/identity`` people the initial weights trained on (none from scratch, and none known for an
        imported AdaFace checkpoint, which trained on other data)."""
        init = self.cfg.init_from
        if not init or not str(init).endswith(".safetensors"):
            return set()
        # the initial weights' caches are looked for beside this run's (a recipe names them under one data root);
        # strict: a validation set that depends on files that happen to be here would change between resumes
        root = Path(self.cfg.train[0]).parent if self.cfg.train else None
        return trained_identities(read_metadata(init), root, strict=True)

    def _loss_weights(self) -> dict[str, float]:
        """Each objective's weight; fine-tuning the heads turns off what shapes the backbone."""
        cfg, finetune = self.cfg, self.cfg.mode == "finetune-heads"
        return {
            "margin": 0.0 if finetune else cfg.w_margin,
            "qaconv_pair": cfg.w_qaconv_pair,
            "qaconv_triplet": cfg.w_qaconv_triplet,
            "qaconv_class": cfg.w_qaconv_class,
            "occlusion": cfg.w_occlusion,
            "distill_relation": 0.0 if finetune or not cfg.teacher else cfg.w_distill_relation,
            "distill_feature": 0.0 if finetune or not cfg.teacher else cfg.w_distill_feature,
        }

    def _build_networks(self) -> None:
        """The model (optionally initialised from weights) and the training-only heads, on the device."""
        cfg = self.cfg
        self.model = self._new_model(nan_guard=True)
        if cfg.init_from:
            self._init_weights(cfg.init_from)
        size = self.model.embedding_size
        self.head = build_head(cfg.head, size, self.num_classes, m=cfg.m, t_alpha=cfg.t_alpha, h=cfg.h, s=cfg.s)
        self.projector = nn.Linear(size, 128) if self.w["distill_feature"] else None
        qa = self.model.qaconv
        self.class_memory = (
            ClassMemory(self.num_classes, qa.num_features, qa.height, qa.width, cfg.qaconv_k_nearest)
            if self.w["qaconv_class"] > 0
            else None
        )
        self.model.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for extra in (self.head, self.projector, self.class_memory):
            if extra is not None:
                extra.to(self.device)
        if cfg.mode == "finetune-heads":
            for frozen in (self.model.input_layer, self.model.body, self.model.output_layer):
                frozen.requires_grad_(False)

    def _new_model(self, nan_guard: bool = False) -> OAMLNet:
        return build_model(self.cfg.arch, occlusion_method=self.cfg.occlusion_method, nan_guard=nan_guard)

    def _unlabeled_draw(self, unlabeled: TrainingData | None) -> np.ndarray | None:
        """Per-face draw probabilities from ``unlabeled_weights`` (None: uniform, the default draw)."""
        if unlabeled is None or not self.cfg.unlabeled_weights:
            return None
        cache_of_label = np.array([i.split("/", 1)[0] for i in unlabeled.identities])
        weights = np.array([self.cfg.unlabeled_weights.get(c, 1.0) for c in cache_of_label[unlabeled.labels]])
        return weights / weights.sum()

    def _teacher_embeddings(self, data: TrainingData) -> np.ndarray:
        from model.training.teacher import teacher_embeddings

        digest = "-".join(data.sources)
        return teacher_embeddings(data.images, self.out.parent / ".teacher" / f"sface-{digest}-{len(data.images)}.npy")

    def _teacher_network(self) -> torch.nn.Module:
        from model.training.teacher import SFaceTorch

        return SFaceTorch.load(self.cfg.teacher_weights).to(self.device)

    def _init_weights(self, path: str) -> None:
        self._load_initial(self.model, path)

    def _load_initial(self, model: OAMLNet, path: str) -> None:
        """``model`` <- the weights at ``path`` (OAML safetensors or an AdaFace ``.ckpt``), as a run starts."""
        if path.endswith(".ckpt"):
            source, report = import_adaface_ckpt(path)
            logger.info("initialised the backbone from AdaFace %s (%s)", path, report.architecture)
        else:
            source, _ = load_checkpoint(path)
        try:
            model.load_state_dict(source.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit {self.cfg.arch}: {exc}") from exc
        qa = model.qaconv
        if not bool(torch.all(qa.logit_bn.weight == 1)):
            # made before the logit scale was fixed at 1: a collapsed tail (scale near 0) would also
            # stay collapsed, since the scale no longer trains
            logger.warning(
                "%s has a trained QAConv logit scale (%.3g): resetting its QAConv tail", path, qa.logit_bn.weight.item()
            )
            qa.reset_parameters()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        modules = [m for m in (self.model, self.head, self.projector, self.class_memory) if m is not None]
        for module in modules:
            for name, param in module.named_parameters():
                if param.requires_grad:
                    (no_decay if _no_decay(name, param) else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = True if self.cfg.fused_optimizer else None  # one kernel for all parameters
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum, nesterov=True, fused=fused)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, fused=fused)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 1% of the peak over the whole run."""
        if step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        progress = (step - self.cfg.warmup_steps) / max(1, self.total_steps - self.cfg.warmup_steps)
        return self.cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "projector": self.projector.state_dict() if self.projector is not None else None,
            "class_memory": self.class_memory.state_dict() if self.class_memory is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "graph_neighbors": torch.from_numpy(self.sampler.neighbors)
            if isinstance(self.sampler, GraphSampler) and self.sampler.neighbors is not None
            else None,
            "scaler": self.scaler.state_dict(),
            "state": json.dumps(self.state),
            "running": json.dumps(self.running),
            "ledger": self.ledger.to_json(),
            "rng": rng_states(),
            "config": json.dumps(self.cfg.to_dict()),
        }

    def save(self) -> None:
        """The newest checkpoint generation (:func:`model.training.preempt.save_generation`: written whole or not
        at all, with its content's SHA-256), and ``status.json`` saying what it holds. Nothing is written when
        the newest checkpoint already holds this progress (a step's state decides the model's)."""
        if json.dumps(self.state) == self._saved_state:
            return
        with self._save_lock:
            save_generation(self._checkpoint_state(), self.out / "last.pt", self.cfg.keep_checkpoints)
            self._saved_at = time.monotonic()
            self._saved_state = json.dumps(self.state)
            self._write_status()
            if self.offsite is not None:
                self.offsite.push(self.state["global_step"])

    def _write_status(self) -> None:
        """``status.json``: the run's progress, best and baseline scores, for ``oaml train-status``."""
        step = self.state["global_step"]
        status = {
            "global_step": step,
            "epoch": self.state["epoch"],
            "samples": step * self.cfg.samples_per_step,
            "samples_per_step": self.cfg.samples_per_step,
            "total_steps": self.total_steps,
            "total_samples": self.total_steps * self.cfg.samples_per_step,
            "best_score": self.state["best_score"],
            "best_step": self.state.get("best_step"),
            "baseline": self.state.get("baseline"),
            "release_margin": self.cfg.release_margin,
            "validation_set": self.state.get("validation_set"),
            "validations": len(self.state["history"]),
            "compute": self.ledger.summary(self.cfg.samples_per_step, step),
            "saved": time.time(),
            "pid": os.getpid(),
        }
        tmp = self.out / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, self.out / STATUS_FILE)

    def _maybe_resume(self) -> None:
        path = self.out / "last.pt"
        found = load_newest(path, self.cfg.keep_checkpoints, map_location=self.device)
        if found is None:  # a fresh start, or a run killed before its first checkpoint: its logs start over too
            self._rewind_logs()
            return
        ckpt, path = found
        saved_cfg = json.loads(ckpt["config"])
        for key in ("arch", "seed", "p", "k", "sampler", "train"):
            if saved_cfg[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"{path} was made with {key}={saved_cfg[key]!r}, config says {getattr(self.cfg, key)!r}"
                )
        self.model.load_state_dict(ckpt["model"])
        self.head.load_state_dict(ckpt["head"])
        if self.projector is not None and ckpt["projector"] is not None:
            self.projector.load_state_dict(ckpt["projector"])
        if self.class_memory is not None and ckpt.get("class_memory") is not None:
            self.class_memory.load_state_dict(ckpt["class_memory"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if isinstance(self.sampler, GraphSampler) and ckpt.get("graph_neighbors") is not None:
            self.sampler.set_neighbors(ckpt["graph_neighbors"].numpy())
        self.state = cast(TrainState, {"total_steps": None, **json.loads(ckpt["state"])})
        if self.state["total_steps"]:  # a time-budgeted run keeps the schedule it sized
            self.total_steps = self.state["total_steps"]
        self.running = json.loads(ckpt.get("running", "{}"))
        self.ledger = Ledger.from_json(ckpt.get("ledger"))
        if ckpt.get("rng") is not None:
            restore_rng_states(ckpt["rng"])
        for key in ("max_steps", "max_samples", "epochs", "lr", "warmup_steps"):
            if saved_cfg.get(key) != getattr(self.cfg, key):
                logger.warning(
                    "%s: %s was %r, now %r: the schedule changes from here",
                    path,
                    key,
                    saved_cfg.get(key),
                    getattr(self.cfg, key),
                )
        self._rewind_logs()
        self._saved_state = json.dumps(self.state)
        logger.info("resumed from %s at epoch %d, step %d", path, self.state["epoch"], self.state["global_step"])

    def _rewind_logs(self) -> None:
        """Logs back to the checkpoint: steps.jsonl rows after its step are dropped (they are replayed), and
        epochs.csv is the checkpoint's history (a validation after it is made again)."""
        step = self.state["global_step"]
        steps = self.out / "steps.jsonl"
        if steps.exists():
            kept = [line for line in steps.read_text().splitlines() if _logged_step(line, step)]
            tmp = steps.with_name(steps.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, steps)
        csv_path = self.out / "epochs.csv"
        if not self.state["history"]:
            csv_path.unlink(missing_ok=True)
            return
        _write_csv(csv_path, self.state["history"])

    # -- one step ----------------------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )

    def train_step(self, batch: np.ndarray) -> dict[str, float]:
        """One optimisation step on the PK batch ``batch`` (training positions) plus its unlabelled share."""
        step = self.state["global_step"]
        if self.device_source is not None:
            return self._step(self.device_source.prepare(step, batch))
        prepared = self._prefetcher.take(step, batch) if self._prefetcher else self.batch_source.prepare(step, batch)
        return self._step(prepared.to_device(self.device))

    def _teacher_targets(self, prepared: DeviceBatch) -> torch.Tensor | None:
        if self.teacher_net is not None and prepared.teacher_views is not None:
            with torch.no_grad():
                return self.teacher_net(prepared.teacher_views)
        return prepared.teacher_targets

    def _step(self, prepared: DeviceBatch) -> dict[str, float]:
        cfg, step = self.cfg, self.state["global_step"]
        torch.manual_seed(_seed_for(cfg.seed, step))  # dropout
        x, target_vis, labels = prepared.inputs, prepared.visibility, prepared.labels
        self.last_rows = int(x.shape[0])  # faces through the network: labelled, unlabelled and mixed
        n = prepared.labelled  # identity losses see the labelled faces; the teacher and the occlusion head all

        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        self.model.train()
        self.head.train()
        if cfg.mode == "finetune-heads":
            for module in (self.model.input_layer, self.model.body, self.model.output_layer):
                module.eval()
        with self._autocast():
            out = self.model.forward_all(x)
        losses: dict[str, torch.Tensor] = {}
        if self.w["margin"]:
            losses["margin"] = F.cross_entropy(self.head(out.embedding[:n], out.norm[:n], labels), labels)
        fmap, occ_weights = out.feature_map[:n], out.occlusion[:n].detach()
        if self.w["qaconv_pair"] or self.w["qaconv_triplet"]:
            scores = self.model.qaconv(fmap, fmap, probe_occ=occ_weights, gal_occ=occ_weights)
            losses["qaconv_pair"] = pairwise_matching_loss(scores, labels)
            losses["qaconv_triplet"] = triplet_ranking_loss(scores, labels, cfg.triplet_margin)
        if self.class_memory is not None:
            losses["qaconv_class"] = class_neighbor_loss(
                self.class_memory.scores(self.model.qaconv, fmap, labels, occ_weights)
            )
        losses["occlusion"] = occlusion_loss(out.occlusion, target_vis)
        t = self._teacher_targets(prepared)
        if t is not None:
            if self.w["distill_relation"]:
                losses["distill_relation"] = relation_distillation_loss(out.embedding, t)
            if self.w["distill_feature"] and self.projector is not None:
                losses["distill_feature"] = feature_distillation_loss(self.projector(out.embedding.float()), t)
        total = torch.stack([self.w[k] * v.float() for k, v in losses.items()]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state["global_step"] += 1
        result = {k: float(v.detach()) for k, v in losses.items()}
        result["total"] = float(total.detach())
        clean = ~prepared.occluded
        result["visibility_clean"] = float(out.occlusion.detach()[clean].mean()) if bool(clean.any()) else float("nan")
        return result

    # -- validation --------------------------------------------------------------------------

    def _val_set(self) -> ValidationSet:
        """Fixed validation pairs of the people validated, and one fixed occluded copy of each of their faces."""
        if self._val_cache is None:
            d, rows = self.data, self.val_rows
            self._val_cache = ValidationSet.build(
                d.images[rows],
                d.landmarks[rows],
                d.labels[rows],
                d.identities,
                self.cfg.occluders,
                self.cfg.seed,
                self.cfg.val_pairs,
            )
        return self._val_cache

    def validate(self) -> dict[str, float]:
        """Identity-disjoint verification of the current model (:meth:`ValidationSet.score`): clean pairs, and
        pairs whose second image is occluded; score = mean of the three accuracies."""
        if len(self.val_rows) == 0:
            return {"score": float("nan")}
        return self._val_set().score(self.model, self.device, self.precision)

    def _score_weights(self, path: str | Path, initial: bool) -> dict[str, float]:
        """Validation of other weights on this run's validation set: the initial weights (loaded as the run
        started from them) or an exported model (``best.safetensors``)."""
        if initial:
            model = self._new_model()
            self._load_initial(model, str(path))
        else:
            model, _ = load_checkpoint(path)
        return self._val_set().score(model.to(self.device), self.device, self.precision)

    def _settle_validation(self) -> None:
        """The validation set's digest, the initial weights' score on it (``baseline``) and the best score so far
        on it, before the run trains.

        A fresh run's baseline is its model before the first step (the initial weights exactly, heads an imported
        AdaFace checkpoint lacks drawn as the run drew them); a resumed run whose set changed measures its initial
        weights again (an OAML weights file; not an AdaFace checkpoint, whose fresh heads the run drew) and its
        exported best, so the best is chosen on one set. A checkpoint of older code, which did not record its
        set, changed only if people are now left out. RNG states are kept, so a run that settles here trains as
        one that did not."""
        if len(self.val_rows) == 0:
            return
        digest = self._val_set().digest
        states = rng_states()
        previous = self.state.get("validation_set")
        older = previous is None and len(self.val_rows) == len(self.val_idx)
        if self.state["history"] and previous != digest and not older:
            best = self.out / "best.safetensors"
            self.state["best_score"] = self._score_weights(best, initial=False)["score"] if best.exists() else -math.inf
            if best.exists():
                self.state["best_step"] = int(read_metadata(best)["training"].get("global_step", 0))
            logger.warning(
                "validation changed since this run's last validation (%d faces now): earlier epochs.csv rows were "
                "measured on the old set; best.safetensors scores %.4f on the new one",
                len(self.val_rows),
                self.state["best_score"],
            )
        self.state["validation_set"] = digest
        init = self.cfg.init_from
        fresh = self.state["global_step"] == 0 and not self.state["history"]
        if init and (self.state.get("baseline") or {}).get("validation_set") != digest:
            if fresh or init.endswith(".safetensors"):
                started = time.perf_counter()
                scores = self.validate() if fresh else self._score_weights(init, initial=True)
                self.state["baseline"] = {"weights": str(init), "validation_set": digest, **scores}
                logger.info(
                    "baseline: the initial weights %s score %.4f on this run's validation (%.0f s)",
                    init,
                    scores["score"],
                    time.perf_counter() - started,
                )
            else:
                logger.warning(
                    "no baseline on the new validation set: the run started from %s, whose heads it drew at random",
                    init,
                )
        restore_rng_states(states)
        self._write_status()  # the next checkpoint holds them (a run stopped before it measures them again)

    # -- loop --------------------------------------------------------------------------------

    def _refresh_graph(self) -> None:
        if isinstance(self.sampler, GraphSampler):
            with torch.no_grad():
                centres = F.normalize(self.head.kernel.detach().float().T, dim=1).cpu()
                sim = centres @ centres.T
                sim.fill_diagonal_(-math.inf)
                self.sampler.set_neighbors(sim.topk(self.cfg.p - 1, dim=1).indices.numpy())
        if self.class_memory is not None:
            self.class_memory.compute_neighbors()

    def fit(self, stop_after: int | None = None) -> TrainState:
        """Train until ``epochs``, ``max_steps`` or ``max_samples`` (or the time budget); returns the final state.

        ``stop_after`` interrupts at that global step (checkpointed) without changing the schedule,
        as a crash or a time limit would; a new :class:`Trainer` on the same folder resumes. With
        ``budget_minutes`` the cosine schedule is re-sized from the measured step rate so that the
        run, validations included, ends decayed inside the budget; with ``validate_every_s`` the
        model is validated (and the best exported) by the clock instead of at epoch ends, with
        ``validate_every`` every that many steps. ``checkpoint_every_s`` (180 s for a preemptible run)
        checkpoints by the clock too; SIGTERM or SIGINT stop a preemptible run after the step it is in,
        checkpointed (:attr:`stopped_by` names the signal; a second signal exits at once).
        """
        cfg = self.cfg
        self._settle_validation()  # before the clock: the baseline's minutes are no step's
        self.ledger.open(self.state["global_step"], self.device, self.precision)
        clock = _RunClock(cfg.budget_minutes, self.state["global_step"], cfg.validate_every_s, self.created)
        progress = _progress(total=self.total_steps, initial=self.state["global_step"])
        log_jsonl = (self.out / "steps.jsonl").open("a")
        t_epoch, images_epoch, last_validation = time.perf_counter(), 0, time.perf_counter()
        self._prefetcher = Prefetcher(self.batch_source, 0 if self.device_source else cfg.augment_workers)
        by_interval = cfg.validate_every_s is not None or cfg.validate_every is not None
        checkpoint_s = cfg.clock_checkpoint_s
        signals = StopSignals()
        guard = MemoryGuard(self.out) if cfg.memory_guard else None
        self.stopped_by = None
        self._saved_at = time.monotonic()

        def limit() -> int:
            return min(self.total_steps, stop_after) if stop_after is not None else self.total_steps

        # how long the end of fit() waits for the offsite copy: the stop signal's notice, or (at the run's end,
        # below) up to 10 minutes for the copy of its last checkpoint (a hung store must not hang the run)
        offsite_wait = cfg.offsite_wait_s
        # undone in reverse, each even if one before it raised (an interrupt during the offsite wait included)
        cleanup = contextlib.ExitStack()
        cleanup.callback(log_jsonl.close)
        cleanup.callback(progress.close)
        cleanup.callback(self._close_prefetcher)
        if cfg.preemptible:
            cleanup.enter_context(signals)
        cleanup.enter_context(self.ledger.pauses_excluded())
        if (offsite := self.offsite) is not None:
            cleanup.callback(lambda: offsite.close(offsite_wait))
        try:
            while self.state["global_step"] < limit() and self.state["epoch"] < cfg.epochs:
                epoch = self.state["epoch"]
                if self.state["step_in_epoch"] == 0:  # mid-epoch resume keeps the epoch's neighbours
                    self._refresh_graph()
                batches = self.sampler.batches(epoch)
                for i in range(self.state["step_in_epoch"], len(batches)):
                    if self.state["global_step"] >= limit():
                        break
                    step = self.state["global_step"]
                    for ahead in (1, 2):  # the workers prepare the next batches while this one trains
                        if i + ahead < len(batches):
                            self._prefetcher.request(step + ahead, batches[i + ahead])
                    if guard is not None:
                        guard.before_step()
                    t0 = time.perf_counter()
                    losses = self.train_step(batches[i])
                    self.state["step_in_epoch"] += 1
                    self.ledger.add(time.perf_counter() - t0, self.state["global_step"])
                    images_epoch += self.last_rows
                    for k, v in losses.items():
                        self.running.setdefault(k, []).append(v)
                    rate = self.last_rows / (time.perf_counter() - t0)
                    self.step_rates.append(rate)
                    progress.update(1, losses["total"], rate)
                    sized = clock.resize(self.state["global_step"])
                    if sized is not None:
                        self.total_steps = self.state["total_steps"] = sized
                        logger.info("time budget: schedule sized to %d steps", sized)
                    step_s = clock.step_seconds(self.state["global_step"])
                    if cfg.validate_every_s is not None:
                        due = time.perf_counter() - last_validation + step_s >= cfg.validate_every_s
                    elif cfg.validate_every is not None:
                        due = self.state["global_step"] % cfg.validate_every == 0
                    else:
                        due = i == len(batches) - 1  # the epoch's end validates
                    validation_s = self._validation_estimate(step_s, self.last_rows)
                    if clock.out_of_time(self.state["global_step"], validation_s, self.EXPORT_S, due):
                        stop = self.state["global_step"]
                        if stop < self.total_steps:
                            logger.warning(
                                "time budget: stopping at step %d of %d to validate and export inside %.1f minutes",
                                stop,
                                self.total_steps,
                                cfg.budget_minutes,
                            )
                        self.total_steps = self.state["total_steps"] = stop
                        break
                    if self.state["global_step"] % cfg.log_every == 0:
                        row = {
                            "step": self.state["global_step"],
                            "epoch": epoch,
                            "samples": self.state["global_step"] * cfg.samples_per_step,
                            "time": round(time.time(), 2),
                            "lr": self.lr_at(self.state["global_step"] - 1),
                            "img_per_s": round(rate, 2),
                            **{k: round(v, 5) for k, v in losses.items()},
                        }
                        log_jsonl.write(json.dumps(row) + "\n")
                        log_jsonl.flush()
                    if (
                        cfg.validate_every_s is not None
                        and time.perf_counter() - last_validation >= cfg.validate_every_s
                    ) or (cfg.validate_every is not None and self.state["global_step"] % cfg.validate_every == 0):
                        started = time.perf_counter()
                        self._validate_and_record(self.running, started - t_epoch, images_epoch, end_of_epoch=False)
                        clock.spent_validating(time.perf_counter() - started)
                        self.running, t_epoch, images_epoch = {}, time.perf_counter(), 0
                        last_validation = time.perf_counter()
                    elif self.state["global_step"] % cfg.checkpoint_every == 0 or (
                        checkpoint_s is not None and time.monotonic() - self._saved_at >= checkpoint_s
                    ):
                        self.save()
                    if signals.received:
                        break
                else:
                    started = time.perf_counter()
                    if not by_interval:
                        self._validate_and_record(self.running, started - t_epoch, images_epoch, end_of_epoch=True)
                        clock.spent_validating(time.perf_counter() - started)
                        self.running, t_epoch, images_epoch = {}, time.perf_counter(), 0
                    else:
                        self._next_epoch()
                    if not signals.received:
                        continue
                break  # the step limit was reached inside the epoch, or a stop signal came
            if signals.received:
                self.stopped_by = signals.received
                self.save()
                logger.warning(
                    "%s: stopped at step %d of %d (epoch %d), checkpointed in %s; the same command resumes",
                    signals.received,
                    self.state["global_step"],
                    self.total_steps,
                    self.state["epoch"],
                    self.out / "last.pt",
                )
                return self.state
            finished = self.state["global_step"] >= self.total_steps
            if self.running and (cfg.validate_every_s is not None or finished):
                # the last stretch is validated too: with max_steps inside an epoch it is the decayed end
                # of the schedule, the model the run was for
                self._validate_and_record(self.running, time.perf_counter() - t_epoch, images_epoch, end_of_epoch=False)
                self.running = {}
            if self.state["step_in_epoch"]:
                self.save()
            offsite_wait = OFFSITE_FINAL_WAIT_S
        finally:
            cleanup.close()
        return self.state

    def _close_prefetcher(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    #: seconds kept for the last checkpoint and the export of a time-budgeted run
    EXPORT_S = 3.0

    def _validation_estimate(self, step_s: float, batch: int) -> float:
        """Seconds a validation takes before one has been timed: its faces clean and occluded, each at half a
        training step's time per face (a forward without the backward, augmentation or teacher)."""
        return 2 * len(self.val_rows) * (step_s / max(batch, 1)) / 2

    def _next_epoch(self) -> None:
        self.state["epoch"] += 1
        self.state["step_in_epoch"] = 0
        self.save()

    def _validate_and_record(
        self, running: dict[str, list[float]], seconds: float, images: int, end_of_epoch: bool
    ) -> None:
        """Validate, log a row (``epochs.csv``), export the best model, checkpoint."""
        started = time.perf_counter()
        val = self.validate()
        self.ledger.add(time.perf_counter() - started)
        row = {
            "epoch": self.state["epoch"],
            "global_step": self.state["global_step"],
            "seconds": round(seconds, 1),
            "img_per_s": round(images / max(seconds, 1e-9), 2),
            **{f"train_{k}": round(float(np.nanmean(v)), 5) for k, v in running.items()},
            **{f"val_{k}": round(v, 5) for k, v in val.items()},
        }
        self.state["history"].append(row)
        if end_of_epoch:
            self.state["epoch"] += 1
            self.state["step_in_epoch"] = 0
        logger.info("validation %s", json.dumps(row))
        _write_csv(self.out / "epochs.csv", self.state["history"])
        score = val.get("score", float("nan"))
        if not math.isnan(score) and score > self.state["best_score"]:
            self.state["best_score"] = score
            self.state["best_step"] = self.state["global_step"]
            self.export(
                self.out / "best.safetensors", {"validation": val, "epoch": row["epoch"], "step": row["global_step"]}
            )
        self.save()

    def export(self, path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the current model in the serving format with training metadata."""
        meta = {
            "training": {
                "data": self.data.sources,
                "identities": self.num_classes,
                "images": int(len(self.train_idx)),
                "validation_identities": int(len(np.unique(self.data.labels[self.val_rows]))),
                # every person these weights learnt from, their initial weights' included (model.training.lineage)
                "trained_identities": sorted(
                    {self.data.identities[int(c)] for c in np.unique(self.data.labels[self.train_idx])} | self.inherited
                ),
                "config": self.cfg.to_dict(),
                "global_step": self.state["global_step"],
                "device": str(self.device),
                "precision": self.precision,
                # how many samples, on what, over how long: every process of the run (model/training/ledger.py)
                "compute": self.ledger.summary(self.cfg.samples_per_step, self.state["global_step"]),
                **(extra or {}),
            },
            "quality": {
                "norm_mean": float(self.head.batch_mean) if isinstance(self.head, AdaFace) else None,
                "norm_std": float(self.head.batch_std) if isinstance(self.head, AdaFace) else None,
            },
        }
        return save_checkpoint(self.model, path, meta)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV, whole or not at all; the columns are every key in the order first seen (a column a later
    version adds is blank in older rows)."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _logged_step(line: str, last: int) -> bool:
    """Whether a steps.jsonl line is a whole row of a step at or before ``last``."""
    try:
        return int(json.loads(line)["step"]) <= last
    except (ValueError, KeyError, TypeError):
        return False


class _RunClock:
    """Keeps a time-budgeted run inside its budget: sizes the schedule from the measured step rate and stops it
    when the time left would not hold one more step and the final validation and export.

    The schedule is (re)sized at :data:`PROBES` steps into the run, or at :data:`PROBE_FRACTIONS` of the budget
    when steps are too slow to reach them, so a slow machine gets a short, decayed schedule instead of a long
    one cut off. The time the remaining validations will take is kept out of the schedule. Whatever the rate,
    :meth:`out_of_time` ends the run early enough to validate and export inside the budget, measured from
    ``started`` (the trainer's creation: loading the data counts too).
    """

    PROBES = (20, 200)  # steps into the run at which the schedule is (re)sized
    PROBE_FRACTIONS = (0.05, 0.25)  # ... or these shares of the budget, whichever comes first
    MARGIN = 0.03  # of the budget, for the final checkpoint and export

    def __init__(
        self,
        budget_minutes: float | None,
        first_step: int,
        validate_every_s: float | None = None,
        started: float | None = None,
    ) -> None:
        self.budget = budget_minutes * 60.0 if budget_minutes else None
        self.every = validate_every_s
        self.started = time.perf_counter() if started is None else started
        self.first_step = first_step
        self.mark: tuple[float, int] | None = None
        self.validating = 0.0
        self.validations = 0
        self._pending = list(zip(self.PROBES, self.PROBE_FRACTIONS, strict=True))
        self._last_step_s = 0.0
        self._step_started = time.perf_counter()

    def spent_validating(self, seconds: float) -> None:
        self.validating += seconds
        self.validations += 1

    @property
    def deadline(self) -> float | None:
        return self.started + self.budget * (1 - self.MARGIN) if self.budget is not None else None

    def _rate(self, step: int, now: float) -> float | None:
        """Steps a second since timing started (validations excluded)."""
        if self.mark is None or step <= self.mark[1]:
            return None
        return (step - self.mark[1]) / max(now - self.mark[0] - self.validating, 1e-6)

    def resize(self, step: int) -> int | None:
        """The new total step count when ``step`` reaches a probe, else ``None``."""
        now = time.perf_counter()
        self._last_step_s, self._step_started = now - self._step_started, now
        if self.budget is None or not self._pending:
            return None
        done = step - self.first_step
        if self.mark is None:  # start timing after the first step (start-up, allocator and kernel warm-up)
            if done >= 1:
                self.mark = (now, step)
            return None
        steps, fraction = self._pending[0]
        if done < steps and now - self.started < fraction * self.budget:
            return None
        rate = self._rate(step, now)
        if rate is None:
            return None
        self._pending.pop(0)
        assert self.deadline is not None
        wall = self.deadline - now
        per = self.validating / self.validations if self.validations else 0.0
        future = wall / (self.every + per) if self.every else 1.0  # validations still to come (+1: the last)
        return step + max(1, int(rate * (wall - (future + 1) * per)))

    def step_seconds(self, step: int) -> float:
        """Seconds a training step takes: from the measured rate (validations excluded), else the last step's."""
        rate = self._rate(step, time.perf_counter())
        return 1.0 / rate if rate else self._last_step_s

    def out_of_time(self, step: int, validation_s: float, export_s: float, validation_due: bool = False) -> bool:
        """Whether the run must stop now: one more step, a validation already due (``validation_due``) and the
        final validation and export would pass the deadline. A validation takes what the timed ones took, or
        ``validation_s`` (the trainer's estimate) until one was timed."""
        if self.deadline is None:
            return False
        validation = self.validating / self.validations if self.validations else validation_s
        needed = self.step_seconds(step) + validation * (2 if validation_due else 1) + export_s
        return time.perf_counter() + needed > self.deadline


class _progress:
    """tqdm progress bar with loss and throughput when tqdm is installed, else periodic log lines."""

    def __init__(self, total: int, initial: int) -> None:
        try:
            from tqdm import tqdm

            self._bar: Any = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self._n = initial
        self._total = total

    def update(self, n: int, loss: float, rate: float) -> None:
        self._n += n
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}", refresh=False)
            self._bar.update(n)
        elif self._n % 10 == 0:
            logger.info("step %d/%d loss %.4f %.1f img/s", self._n, self._total, loss, rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
