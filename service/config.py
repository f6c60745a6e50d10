"""Service settings: environment variables prefixed ``OAML_`` (see README.md, "Configuration")."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.store import COLLECTION_PATTERN

__all__ = [
    "Settings",
    "KeyGrant",
    "MIN_KEY_LENGTH",
    "get_settings",
    "grant_for",
    "key_id",
    "usable_cores",
    "is_loopback",
    "invalid_settings",
    "parse_rate_limits",
    "DEFAULT_WEIGHTS",
]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "oaml_ir18.safetensors"


class Settings(BaseSettings):
    """Read once at start-up; invalid values fail fast with a clear message."""

    # invalid values are named, never echoed: OAML_API_KEYS holds secrets (and pydantic would print the whole list)
    model_config = SettingsConfigDict(env_prefix="OAML_", env_file=None, extra="ignore", hide_input_in_errors=True)

    weights: Path = Field(
        DEFAULT_WEIGHTS, description="OAML .safetensors weights to serve: new collections and /verify use them"
    )
    weights_dir: Path | None = Field(
        None,
        description=(
            "where weights of other model versions are found (every *.safetensors file, by the version in its "
            "metadata): those collections are still matched with, migrate to or may roll back to; default: the "
            "folder of `weights`"
        ),
    )
    migration_batch: int = Field(
        32, ge=1, le=1024, description="faces a migration re-embeds and writes per transaction"
    )
    keep_previous_days: float = Field(
        30.0,
        ge=0,
        description=(
            "after a collection switches model version, the previous version's data is kept this many days for "
            "rollback, then dropped; 0 keeps it until dropped by hand"
        ),
    )
    data_dir: Path = Field(Path("data"), description="folder for the gallery database (created if missing)")
    gallery_url: str | None = Field(
        None,
        description=(
            "postgresql://... : a PostgreSQL store of record shared by several replicas (instead of SQLite in "
            "data_dir); each replica follows the others' enrolments and deletions"
        ),
    )
    gallery_poll_s: float = Field(
        1.0, gt=0, le=60, description="with gallery_url: longest wait between catch-ups when no notification arrives"
    )
    replica_stale_s: float = Field(
        600.0,
        ge=60,  # well beyond a live replica's heartbeat (10 s) and poll
        description=(
            "with gallery_url: how long a silent replica holds back the pruning of the change log (one that "
            "comes back later reconciles its index with the database)"
        ),
    )
    store_timeout_s: float = Field(
        5.0,
        gt=0,
        le=120,
        description="longest wait of a gallery write (queue, write lock, connection) before 503 STORE_UNAVAILABLE",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description=(
            "auto: fp16 on CUDA; on a CPU without AMX, int8 (OpenVINO) where the weights carry an int8 recipe "
            "(`oaml quantize`) that passed `oaml check-engine`; else bf16 on CPUs with native bf16, fp32 on others; "
            "int8 forces that recipe"
        ),
    )
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description=(
            "what runs the backbone. auto: on a CPU, OpenVINO in int8 where `precision` picks it, in fp32 (a CPU "
            "without native bf16: PyTorch's numbers, faster), and in bf16 where the weights' calibration records a "
            "passed `oaml check-engine` for it, else PyTorch; onnxruntime needs fp32 on the CPU; openvino runs "
            "fp32, bf16 or int8 on the CPU"
        ),
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of the inference worker (default: sized to the machine)"
    )
    detector_threads: int = Field(1, ge=1, description="onnxruntime threads per detection")
    detector_backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description=(
            "auto: torch on the model's device when that is a GPU (batched across requests), else onnxruntime "
            "in the detection workers (faster on a CPU)"
        ),
    )
    detection_workers: int | None = Field(
        None, ge=1, description="photos decoded and detected concurrently (default: sized to the machine)"
    )
    detector_refine: bool = Field(
        True,
        description=(
            "each aligned face's landmarks from a second detector pass around it, the face at most 128 px there "
            "(RetinaFace places them worse on larger faces); false: from the pass that found it, as before "
            "2026-12-02 (and no coarse pass)"
        ),
    )
    detector_coarse_side: int = Field(
        320,
        ge=0,
        description=(
            "where one face per photo is wanted (face=largest), photos are first detected at this longer side, then "
            "in a square around the face found there (40-50% of the work of the 640-pixel pass); 0: always the "
            "full pass"
        ),
    )
    max_batch: int = Field(8, ge=1, description="most faces per batched forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first queued face waits for others")
    queue_size: int = Field(256, ge=1, description="faces waiting for the model before requests get 503")
    max_image_bytes: int = Field(15 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=10_000)
    max_images_per_request: int = Field(20, ge=1)
    max_import_mb: int = Field(
        4096,
        ge=1,
        description=(
            "most MiB a collection import (POST /collections/{name}/import) may carry: an export is ~3.5 KB a face, "
            "~10 KB more with its crop"
        ),
    )
    decode_max_side: int = Field(
        2560,
        ge=0,
        description=(
            "photos are decoded to at most this many pixels on their longer side (JPEGs by their decoder, at a "
            "fraction of the memory): detection reads at most 640, and a face it can find still spans 64 pixels or "
            "more for its 112-pixel crop; 0 decodes at full size"
        ),
    )
    decode_budget_mb: int = Field(
        768,
        ge=16,
        description=(
            "MiB that photos being decoded, detected and aligned may hold together, each charged its decoded cost "
            "from its header before it is decoded; beyond it requests get 503 OVERLOADED"
        ),
    )
    min_face_size: int = Field(20, ge=1, description="enrolment rejects faces narrower than this (pixels)")
    min_quality: float = Field(
        -3.0, description="enrolment rejects faces whose standardised AdaFace norm is below this"
    )
    probe_min_quality: float | None = Field(
        None,
        description=(
            "matching (/verify, /identify, /gallery/{subject}/verify) refuses probe faces whose standardised quality "
            "is below this (422 LOW_QUALITY) instead of matching them; unset: no gate"
        ),
    )
    probe_min_face_size: int = Field(
        0, ge=0, description="matching refuses probe faces narrower than this (pixels; 422 FACE_TOO_SMALL); 0: no gate"
    )
    shortlist: int = Field(100, ge=1, description="faces re-ranked by QAConv in /identify")
    ann_min_faces: int = Field(
        200_000,
        ge=0,
        description="gallery size from which /identify's cosine stage reads an inverted file's nearest lists "
        "instead of every face (bench/RESULTS.md); 0 keeps it exact",
    )
    ann_probe: int = Field(
        256, ge=1, description="inverted-file lists read per /identify probe (of ~sqrt(gallery size)): recall vs time"
    )
    map_storage: Literal["native", "int8"] = Field(
        "int8",
        description="how the in-memory index keeps each enrolled face's QAConv maps: int8 with a scale per face and "
        "channel (half the bytes of native; no measurable cost in accuracy, bench/RESULTS.md) or native (bf16 on a "
        "CPU, fp16 on CUDA). The stores keep fp16 maps either way, so it can change at any restart",
    )
    default_threshold: str = Field("balanced", description="preset or number used when a request gives none")
    store_crops: bool = Field(
        False, description="keep aligned 112x112 crops of enrolled faces (for /occlusion overlays)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "comma-separated `key`, `key:role` (role `admin`, the default, or `match`) or `key:role:collections` "
            "(`+`-separated collection names the key is limited to); empty disables auth"
        ),
    )
    rate_limits: str = Field(
        "match=20/40,admin=10/20",
        description=(
            "requests per second each API key may make, sustained/burst, by role (`role=rate/burst`, comma-separated; "
            "a rate of 0: no limit for that role); beyond it 429 RATE_LIMITED with Retry-After and RateLimit-* "
            "headers. Counted per replica; without API keys there is no limit"
        ),
    )
    enrol_faces_per_day: int = Field(
        10_000,
        ge=0,
        description=(
            "faces each API key may enrol in 24 hours (0: no limit); beyond it 429 QUOTA_EXCEEDED. Counted from the "
            "audit log, so on PostgreSQL every replica shares it"
        ),
    )
    audit_retention_days: float = Field(
        365.0, ge=0, description="audit log entries older than this are deleted (0: kept for ever)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty disables CORS"
    )
    allow_unauthenticated: bool = Field(
        False,
        description=(
            "serve without API keys on an address other than loopback: an explicit choice, since anyone who can "
            "reach the port may then enrol, delete and read the gallery"
        ),
    )
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection may take to send its request headers")
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    body_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a request body may pause between chunks, and the grace before its minimum rate counts",
    )
    body_min_rate: float = Field(
        8192.0,
        gt=0,
        description="bytes a second a request body must average once body_timeout has passed, else 408 and close",
    )
    limit_concurrency: int = Field(256, ge=1, description="connections and requests in flight before new ones get 503")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        """Entries are checked without ever echoing one: a message names the entry's position, never its key."""
        for number, entry in enumerate(value, 1):
            key, role, collections = _key_entry(entry)
            if not key or role not in ("admin", "match") or (collections is not None and not collections):
                raise ValueError(
                    "API key entries are `key`, `key:role` or `key:role:collection+collection` with role admin or "
                    f"match; entry {number} is not"
                )
            bad = [c for c in collections or () if not re.fullmatch(COLLECTION_PATTERN, c)]
            if bad:
                raise ValueError(f"API key entry {number}: {bad[0]!r} is not a collection name")
        keys = [_key_entry(entry)[0] for entry in value]
        if len(set(keys)) != len(keys):
            raise ValueError("API keys must differ: two entries share a key")
        return value

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits(cls, value: str) -> str:
        parse_rate_limits(value)
        return value

    @field_validator("gallery_url")
    @classmethod
    def _gallery_url(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("gallery_url must be a postgresql:// URL (leave it unset for the embedded SQLite store)")
        return value

    @field_validator("default_threshold")
    @classmethod
    def _threshold(cls, value: str) -> str:
        if value not in ("lenient", "balanced", "strict"):
            try:
                number = float(value)
            except ValueError as exc:
                raise ValueError("default_threshold must be lenient, balanced, strict or a number") from exc
            if not math.isfinite(number):
                raise ValueError("default_threshold must be a finite number")
        return value

    @model_validator(mode="after")
    def _sized(self) -> Settings:
        """Thread and worker counts from the cores this process may use, when not set.

        Without a GPU the model and detection share the cores: the model gets all of them (up to
        8) and detection half (at least 2), so a 2-core machine gets 2 and 2. With a GPU the model
        needs a CPU thread or two and detection, now the CPU's main work, gets the rest.
        """
        cores = usable_cores()
        gpu = self.device == "cuda" or (self.device == "auto" and _cuda_visible())
        if self.torch_threads is None:
            self.torch_threads = 2 if gpu else min(8, cores)
        if self.detection_workers is None:
            self.detection_workers = max(2, cores - 2) if gpu else max(2, cores // 2)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Settings that are valid alone but not together: fail at start-up, not on every request."""
        if 0 < self.decode_max_side < 640:
            raise ValueError(
                f"decode_max_side (OAML_DECODE_MAX_SIDE={self.decode_max_side}) must be 0 or at least 640, the "
                "detector's input"
            )
        largest = max(2, self.max_images_per_request)  # /verify embeds 2 faces, an enrolment up to max_images
        if self.queue_size < largest:
            raise ValueError(
                f"queue_size (OAML_QUEUE_SIZE={self.queue_size}) must hold the faces of one request ({largest}: "
                "OAML_MAX_IMAGES_PER_REQUEST, and /verify's two faces); otherwise such requests are refused forever"
            )
        short = [n for n, e in enumerate(self.api_keys, 1) if len(_key_entry(e)[0]) < MIN_KEY_LENGTH]
        if short and not is_loopback(self.host):
            raise ValueError(
                f"API key entries {', '.join(map(str, short))} are shorter than {MIN_KEY_LENGTH} characters: "
                f"listening on {self.host}, keys must resist guessing (e.g. `openssl rand -hex 24`)"
            )
        if not self.api_keys and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"listening on {self.host} without API keys would let anyone who reaches the port enrol, delete "
                "and read faces: set OAML_API_KEYS (key:admin,key2:match), or OAML_ALLOW_UNAUTHENTICATED=true to "
                "serve without authentication on purpose"
            )
        return self

    @property
    def authenticated(self) -> bool:
        """Whether requests need an API key."""
        return bool(self.api_keys)

    def key_grants(self) -> dict[bytes, KeyGrant]:
        """SHA-256 of each API key -> what it may do: its role (``admin`` unless the entry names ``match``), the
        collections it is limited to (None: every collection) and its id. Keyed by digest, so a supplied key is
        compared in constant time (:func:`grant_for`) and never kept beside its grant."""
        grants = {}
        for entry in self.api_keys:
            key, role, collections = _key_entry(entry)
            digest = hashlib.sha256(key.encode()).digest()
            grants[digest] = KeyGrant(role, collections, key_id(key))
        return grants


#: Keys shorter than this are refused where the service listens beyond loopback.
MIN_KEY_LENGTH = 16


def key_id(key: str) -> str:
    """A key's public name: ``key-`` and the first 12 hex digits of its SHA-256 (audit records, logs, quotas):
    it identifies the key without letting anyone present it."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def grant_for(grants: dict[bytes, KeyGrant], supplied: str | None) -> KeyGrant | None:
    """The grant of the key ``supplied``, or None: every stored digest compared with :func:`hmac.compare_digest`,
    so the answer takes the same time whichever key (or how much of one) was guessed."""
    if supplied is None:
        return None
    digest = hashlib.sha256(supplied.encode()).digest()
    found = None
    for stored, grant in grants.items():
        if hmac.compare_digest(stored, digest):
            found = grant
    return found


@dataclass(frozen=True)
class KeyGrant:
    """An API key's role, the collections it is limited to (None: all of them) and its id (:func:`key_id`)."""

    role: str
    collections: frozenset[str] | None = None
    key_id: str = ""

    def may_use(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


def _key_entry(entry: str) -> tuple[str, str, frozenset[str] | None]:
    """``key[:role[:collection+collection...]]`` -> (key, role, collections or None)."""
    key, _, rest = entry.partition(":")
    role, limited, names = rest.partition(":")
    collections = frozenset(n for n in names.split("+") if n) if limited else None
    return key, role or "admin", collections


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity
        return max(1, os.cpu_count() or 1)


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def parse_rate_limits(value: str) -> dict[str, tuple[float, float]]:
    """``match=20/40,admin=10/20`` -> role -> (requests a second, burst); a rate of 0 means no limit."""
    limits: dict[str, tuple[float, float]] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        match = re.fullmatch(r"(admin|match)=(\d+(?:\.\d+)?)(?:/(\d+(?:\.\d+)?))?", part)
        if match is None:
            raise ValueError(f"rate_limits entries are role=rate/burst with role admin or match, got {part!r}")
        rate = float(match.group(2))
        limits[match.group(1)] = (rate, float(match.group(3) or max(1.0, 2 * rate)))
    return limits


def invalid_settings(exc: ValidationError) -> str:
    """One line naming each invalid setting and why (values never echoed: some are secrets)."""
    return "; ".join(
        f"OAML_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
