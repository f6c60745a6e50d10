"""Wire models: every endpoint returns one of these (never raw dicts of numpy values)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.store import COLLECTION_PATTERN, DEFAULT_COLLECTION

__all__ = [
    "FaceInfo",
    "Quality",
    "ScoreBreakdown",
    "VerifyResponse",
    "Correspondence",
    "FaceEvidence",
    "ExplainResponse",
    "EnrolledFace",
    "RejectedImage",
    "EnrolResponse",
    "SubjectSummary",
    "SubjectFace",
    "SubjectDetail",
    "SubjectPage",
    "DeleteResponse",
    "Candidate",
    "IdentifyResponse",
    "PresetInfo",
    "InfoResponse",
    "HealthResponse",
    "SubjectMerge",
    "FacesMove",
    "IdentityReview",
    "DuplicatePair",
    "MixedSubject",
    "AuditEntryInfo",
    "AuditPage",
    "ImportResult",
    "CollectionCreate",
    "CollectionUpdate",
    "MigrationRequest",
    "MigrationStatus",
    "CollectionInfo",
    "CollectionPage",
    "CollectionDeleted",
]


class Quality(BaseModel):
    norm: float = Field(description="AdaFace feature norm (higher = clearer face)")
    standardised: float = Field(description="(norm - training mean) / training std")


class OcclusionAttributes(BaseModel):
    regions: dict[str, float] = Field(
        description="mean visibility of the forehead, eyes, nose and mouth regions of the 7x7 map (1 = visible)"
    )
    occluded: dict[str, bool] = Field(description="each region: more hidden than seen (visibility below 0.5)")
    mask_like: bool = Field(
        description="the lower face is hidden, as by a mask or a scarf (threshold fitted and measured on real masked "
        "photos: see the model card)"
    )
    glasses_like: bool = Field(
        description="the eyes are hidden, as by sunglasses (no real test set yet: see the model card)"
    )


class FaceInfo(BaseModel):
    box: list[float] | None = Field(None, description="[x1, y1, x2, y2] in the uploaded photo (null for aligned input)")
    landmarks: list[list[float]] | None = Field(None, description="5 points: eyes, nose, mouth corners")
    detection_score: float | None = None
    quality: Quality
    visibility: float = Field(description="mean of the 7x7 occlusion map (1 = fully visible)")
    visibility_map: list[list[float]] = Field(description="7x7, row-major from the top-left, 1 = visible")
    occlusion: OcclusionAttributes | None = Field(None, description="which regions are hidden, and what by")


class ScoreBreakdown(BaseModel):
    adaface: float = Field(description="cosine of the AdaFace embeddings")
    qaconv: float = Field(description="occlusion-weighted QAConv logit")
    weights: dict[str, float] = Field(
        description="effective fusion weights on the standardised scores at this pair's visibility (and, for a "
        "quality-form calibration, at its faces' lower feature norm)"
    )


PROBABILITY_DOC = (
    "P(same person | this pair's scores) for a pair drawn with a 1:1 prior (half of all compared pairs genuine), "
    "calibrated on identities held out of training. It describes the pair, not the decision: the presets demand "
    "much more evidence than 0.5 (see threshold_probability). Strictly increasing in score."
)
THRESHOLD_PROBABILITY_DOC = (
    "the probability a pair must exceed to match at this threshold: match == (probability > threshold_probability), "
    "up to rounding. A FAR preset sits far above 0.5 because it limits false accepts, not errors overall."
)


class VerifyResponse(BaseModel):
    match: bool = Field(description="score > threshold")
    score: float = Field(description="fused score: a logit, log-odds of the same person under the 1:1 prior")
    probability: float = Field(description=PROBABILITY_DOC)
    threshold: float = Field(description="fused-score threshold applied (a preset's, or the number given)")
    threshold_probability: float = Field(description=THRESHOLD_PROBABILITY_DOC)
    threshold_preset: str | None = Field(description="preset name when the threshold is a preset, else null")
    scores: ScoreBreakdown
    face_a: FaceInfo
    face_b: FaceInfo
    model_version: str


class Correspondence(BaseModel):
    location: int = Field(description="cell of this face's 7x7 grid, 0-48, row-major from the top-left")
    match: int = Field(description="the other face's cell this location matched best")
    similarity: float = Field(description="that visibility-weighted local similarity (clamped at 0)")
    weight: float = Field(description="this location's own visibility weight in the match")
    share: float = Field(description="this location's contribution to the QAConv score")


class FaceEvidence(BaseModel):
    crop: str = Field(description="the aligned 112x112 crop the model saw, as a data: URL (JPEG)")
    visibility_map: list[list[float]] = Field(description="7x7, 1 = visible")
    correspondences: list[Correspondence] = Field(description="one per location, in location order")


class ExplainResponse(VerifyResponse):
    qaconv_bias: float = Field(
        description="the QAConv tail's constant: the shares of both faces plus this equal scores.qaconv"
    )
    evidence_a: FaceEvidence
    evidence_b: FaceEvidence
    picture: str | None = Field(None, description="the explanation picture as a data: URL (PNG), when asked for")


class EnrolledFace(BaseModel):
    face_id: str
    image_index: int
    filename: str | None
    box: list[float] | None
    detection_score: float | None
    quality: Quality
    visibility: float


class RejectedImage(BaseModel):
    image_index: int
    filename: str | None
    code: str
    reason: str


class EnrolResponse(BaseModel):
    subject: str
    collection: str = Field(DEFAULT_COLLECTION, description="the collection (named gallery) it is in")
    name: str | None
    faces: list[EnrolledFace] = Field(description="the faces this request enrolled")
    rejected: list[RejectedImage]
    face_count: int = Field(description="faces the subject has now, these included")
    total_faces: int = Field(description="deprecated: the same as face_count")


class SubjectSummary(BaseModel):
    subject: str
    collection: str = Field(DEFAULT_COLLECTION, description="the collection (named gallery) it is in")
    name: str | None
    metadata: dict[str, Any]
    face_count: int = Field(description="enrolled faces of the subject")
    faces: int = Field(description="deprecated: the same as face_count (a count here, not a list)")
    created_at: float


class SubjectFace(BaseModel):
    face_id: str
    quality: Quality
    visibility: float
    detection_score: float | None
    box: list[float] | None
    created_at: float


class SubjectDetail(SubjectSummary):
    face_list: list[SubjectFace]


class SubjectUpdate(BaseModel):
    """``PATCH /gallery/{subject}``: the fields given are set, the others kept."""

    model_config = {"extra": "forbid"}

    name: str | None = Field(None, max_length=256, description="the display name; null clears it")
    metadata: dict[str, Any] | None = Field(
        None, description="a JSON object that replaces the stored one (at most 16 KiB, nested at most 16 deep)"
    )


class SubjectMerge(BaseModel):
    """``POST /gallery/{subject}/merge``."""

    model_config = {"extra": "forbid"}

    from_: str = Field(
        alias="from",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$",
        description="the subject whose faces join this one (it is deleted)",
    )


class FacesMove(BaseModel):
    """``POST /gallery/{subject}/faces/move``."""

    model_config = {"extra": "forbid"}

    faces: list[str] = Field(min_length=1, max_length=1000, description="face ids of this subject to move")
    to: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$",
        description="the subject they move to (made if it does not exist)",
    )


class SubjectPage(BaseModel):
    collection: str = Field(DEFAULT_COLLECTION, description="the collection listed")
    subjects: list[SubjectSummary]
    total: int
    offset: int
    limit: int


class DeleteResponse(BaseModel):
    subject: str
    collection: str = Field(DEFAULT_COLLECTION, description="the collection (named gallery) it is in")
    deleted_faces: list[str]


IDENTIFY_PROBABILITY_DOC = (
    "P(the probe is this subject | the candidates' scores), for a probe that is an enrolled person with prior "
    "`probability_prior` (else a stranger), uniformly among the `gallery_subjects` enrolled subjects, each "
    "fused score read as a log likelihood ratio and a subject's the mean over its enrolled faces; summed over the "
    "candidates scored. It accounts for how many people the candidate was picked from: the same score is less "
    "convincing in a larger gallery."
)


class Candidate(BaseModel):
    subject: str
    name: str | None
    face_id: str = Field(description="the subject's best-matching enrolled face")
    score: float = Field(description="fused score (log-odds that this pair is one person, under a 1:1 prior)")
    probability: float = Field(description=IDENTIFY_PROBABILITY_DOC)
    scores: ScoreBreakdown = Field(description="the component scores, as /verify reports them")
    adaface: float = Field(description="deprecated: scores.adaface")
    qaconv: float = Field(description="deprecated: scores.qaconv")
    match: bool = Field(description="score > threshold")


class IdentifyResponse(BaseModel):
    match: Candidate | None = Field(
        description="the best candidate if its score passes the threshold, else null (an unknown person)"
    )
    candidates: list[Candidate]
    threshold: float = Field(description="fused-score threshold of this decision, for this gallery's size")
    threshold_preset: str | None = Field(
        description="the preset used: an FPIR target (lenient 1e-2, balanced 1e-3, strict 1e-4); null for a number"
    )
    fpir: float = Field(
        description=(
            "false-positive identification rate of this decision: the modelled share of people who are not "
            "enrolled that this threshold matches to someone, at the gallery's current size (the preset's target; "
            "for a numeric threshold, what it implies)"
        )
    )
    threshold_probability: float = Field(
        description="the probability a lone candidate scoring exactly the threshold would get (as `probability`)"
    )
    probability_unknown: float = Field(
        description="P(the probe is nobody enrolled | the candidates' scores), under the same prior"
    )
    probability_prior: float = Field(description="P(the probe is an enrolled person) assumed by the probabilities")
    face: FaceInfo
    collection: str = Field(DEFAULT_COLLECTION, description="the collection searched")
    gallery_faces: int = Field(description="faces in the collection searched")
    gallery_subjects: int = Field(description="subjects in the collection searched")
    timings_ms: dict[str, float]
    model_version: str


class SkippedFace(BaseModel):
    box: list[float] | None
    code: str = Field(description="FACE_TOO_SMALL or LOW_QUALITY (the probe quality gate)")
    reason: str


class IdentifyAllResponse(BaseModel):
    """`/identify` with `face=all`: every face of a group photo, each identified as one face is."""

    faces: list[IdentifyResponse] = Field(description="one result per face, largest first, each with its box")
    skipped: list[SkippedFace] = Field(
        default_factory=list, description="faces the probe quality gate kept from matching (OAML_PROBE_MIN_*)"
    )
    faces_found: int = Field(description="faces the detector found")
    faces_identified: int = Field(description="faces identified: the largest 32 at most")
    collection: str = Field(DEFAULT_COLLECTION, description="the collection searched")
    model_version: str


class SubjectVerifyResponse(VerifyResponse):
    """`POST /gallery/{subject}/verify`: /verify's answer, `face_b` being the subject's best-matching face."""

    far: float = Field(
        description=(
            "false-accept rate of this decision for the subject as a whole: a stranger has one chance per enrolled "
            "face, so a preset's threshold is set for `faces_compared` faces (the preset's FAR); for a number, what "
            "it implies"
        )
    )
    subject: str
    collection: str = Field(DEFAULT_COLLECTION, description="the collection (named gallery) it is in")
    name: str | None
    face_id: str = Field(description="the subject's face that matched best (its box, quality and map are face_b)")
    faces_compared: int


class PresetInfo(BaseModel):
    far: float = Field(description="false-accept rate of the preset on the calibration impostor pairs")
    threshold: float = Field(description="fused-score threshold")
    probability: float = Field(description="the probability a pair must exceed to match at this preset")
    lfw_tar: float | None = Field(
        None,
        description="true-accept rate at this preset on the 3,000 genuine LFW pairs (oaml eval; null if not recorded)",
    )
    lfw_far: float | None = Field(
        None,
        description="false-accept rate at this preset on the 3,000 impostor LFW pairs "
        "(oaml eval; null if not recorded)",
    )


class IdentifyPresetInfo(BaseModel):
    fpir: float = Field(description="false-positive identification rate the preset promises")
    threshold: float = Field(description="fused-score threshold that keeps it at the gallery's current size")


class GallerySearchInfo(BaseModel):
    method: Literal["exact", "inverted_file"] = Field(
        description="how /identify finds the faces QAConv re-ranks: cosine against every enrolled face, or "
        "against the faces of the inverted file's nearest lists (from `ann_min_faces` faces on)"
    )
    shortlist: int = Field(description="faces QAConv re-ranks per probe (OAML_SHORTLIST)")
    ann_min_faces: int = Field(description="gallery size from which the inverted file is used; 0: never")
    ann_lists: int | None = Field(description="lists of the trained inverted file (null until it is trained)")
    ann_probe: int = Field(description="lists read per probe")
    map_storage: Literal["native", "int8"] = Field(
        description="how the index keeps the enrolled faces' QAConv maps (OAML_MAP_STORAGE): `native` in the "
        "matching dtype, `int8` with a scale per face and channel"
    )


class CollectionCreate(BaseModel):
    """``POST /collections``."""

    model_config = {"extra": "forbid"}

    name: str = Field(
        pattern=COLLECTION_PATTERN,
        description="1 to 64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
    )
    store_crops: bool | None = Field(
        None,
        description=(
            "keep each enrolled face's aligned crop (what a later model version is re-embedded from); null: the "
            "service's OAML_STORE_CROPS"
        ),
    )


class CollectionUpdate(BaseModel):
    """``PATCH /collections/{name}``: the fields sent are set."""

    model_config = {"extra": "forbid"}

    store_crops: bool | None = Field(
        None, description="keep the crops of faces enrolled from now on (null: the service's OAML_STORE_CROPS)"
    )


class MigrationRequest(BaseModel):
    """``POST /collections/{name}/migration``."""

    model_config = {"extra": "forbid"}

    to: str = Field(description="the model version to move to (`model_version` of weights in OAML_WEIGHTS_DIR)")
    switch: bool = Field(
        True,
        description="switch when every face is re-embedded; false: a dry run, which stops `ready` with its report",
    )
    missing: Literal["refuse", "drop"] = Field(
        "refuse",
        description=(
            "faces without a stored crop cannot be re-embedded: `refuse` (409 FACES_WITHOUT_CROPS, listing their "
            "subjects) or `drop` (move the rest; those faces are deleted at the switch)"
        ),
    )


class MigrationStatus(BaseModel):
    collection: str
    model_version: str = Field(description="the model version the collection is matched with")
    previous_version: str | None = Field(
        description="the version it was switched from, kept for rollback until dropped"
    )
    switched_at: float | None = Field(description="when it last switched (the previous version's retention counts)")
    migration: dict[str, Any] | None = Field(
        description=(
            "a migration: `to`, `from`, `state` (`running`, `ready`: re-embedded and waiting, `switching`, "
            "`failed`), `faces`, `done`, `without_crops`, `derived_from` (the version whose stored data the new "
            "data is made from, when the target only changes the heads; else null: re-embedded from crops), "
            "`faces_per_second`, `seconds_left`, and once every face is re-embedded its `report` (how decisions "
            "move: per subject, per preset)"
        )
    )


class DuplicatePair(BaseModel):
    subjects: list[str] = Field(description="two subjects that are probably the same person")
    score: float = Field(description="their best cross score (fused, the collection's model)")
    faces: list[str] = Field(description="the two faces that scored it, one of each subject")


class MixedSubject(BaseModel):
    subject: str
    faces: int
    lowest_score: float = Field(description="the fused score of its two least similar faces")
    pair: list[str] = Field(description="those two faces")


class IdentityReview(BaseModel):
    collection: str
    model_version: str
    threshold: float = Field(description="what a cross score must pass to list a pair (score units)")
    threshold_preset: str | None
    fpir: float = Field(description="the FPIR that threshold means at this collection's size")
    faces: int
    probes: int = Field(description="faces searched as probes (a sample in a collection of over 5,000)")
    duplicates: list[DuplicatePair] = Field(description="pairs of subjects that are probably one person, best first")
    duplicates_found: int
    mixed: list[MixedSubject] = Field(
        description="subjects whose own faces do not match each other (probably two people), worst first"
    )
    mixed_found: int
    mixed_subjects_checked: int = Field(
        description="subjects with two faces or more whose faces were compared (a sample of 5,000 beyond that)"
    )
    mixed_threshold: float = Field(description="the 1:1 `lenient` threshold their least similar pair falls below")


class AuditEntryInfo(BaseModel):
    seq: int = Field(description="the entry's position in the log")
    at: float = Field(description="when (seconds since the epoch)")
    key_id: str = Field(
        description="the API key's id (`key-` and 12 hex digits of its SHA-256), `anonymous` without keys"
    )
    action: str
    collection: str | None
    subject: str | None = Field(description="the subject's id, or its pseudonym once it was deleted")
    other_subject: str | None = Field(
        description="a merge's source (a pseudonym: merged away) or a move's destination, pseudonymised as `subject`"
    )
    faces: int = Field(description="faces the operation added, moved or deleted")
    outcome: str = Field(description="`ok`, or the error code that refused it")
    detail: dict[str, Any] = Field(description="counts and ids of the operation; never images, embeddings or names")


class AuditPage(BaseModel):
    entries: list[AuditEntryInfo]
    next: int | None = Field(description="pass as `after` for the next page; null on the last one")


class ImportResult(BaseModel):
    collection: str
    model_version: str = Field(description="the model the collection is matched with")
    subjects: int
    faces: int
    embedded_again: int = Field(description="faces embedded again from their crops (the file was of another model)")


class CollectionInfo(BaseModel):
    name: str
    created_at: float
    subject_count: int
    face_count: int
    model_version: str = Field(description="the model version its faces are matched with")
    previous_version: str | None = Field(None, description="the version kept for rollback, if any")
    migration: dict[str, Any] | None = Field(
        None, description="a migration in progress or waiting (`to`, `state`, `faces`, `done`), if any"
    )
    store_crops: bool = Field(description="whether its faces' crops are kept (what a migration re-embeds from)")
    identify_presets: dict[str, IdentifyPresetInfo] | None = Field(
        None, description="/identify's presets for this collection's current size (in `GET /collections/{name}`)"
    )


class CollectionPage(BaseModel):
    collections: list[CollectionInfo] = Field(description="the collections this key may use, by name")
    total: int


class CollectionDeleted(BaseModel):
    name: str
    deleted_subjects: int
    deleted_faces: int


class SelfCheckInfo(BaseModel):
    path: str = Field(description="the path checked, `<engine> <precision>`")
    min_cosine: float = Field(description="lowest cosine between a bundled face's embedding there and in PyTorch fp32")
    max_score_drift: float = Field(description="largest move of a pair's fused score (logits) against PyTorch fp32")
    faces: int
    pairs: int
    seconds: float
    passes: bool
    bounds: dict[str, float]


class BackbonePathInfo(BaseModel):
    cpu_class: str = Field(
        description="this CPU's instruction-set class (`amx`, `avx512_bf16`, `avx512_vnni`, `avx512`, `avx2_vnni`, "
        "`avx2`, `baseline`): checks of a faster path vouch for the class they ran on"
    )
    served: str = Field(description="what runs the backbone, `<engine> <precision>`")
    vouched_on: list[str] = Field(
        description="the CPU classes on which a recorded `oaml check-engine` vouches for the served path"
    )
    self_check: SelfCheckInfo | None = Field(
        description="the start-up self-check of the served path against PyTorch fp32 (null: PyTorch runs it)"
    )
    fallbacks: list[str] = Field(description="faster paths not served here, each with the reason")
    forced: bool = Field(description="the path was set by OAML_ENGINE / OAML_PRECISION=int8, not chosen by auto")


class InfoResponse(BaseModel):
    model_version: str
    architecture: str
    device: str
    precision: str = Field(
        description="how the backbone computes: `float32`, `bfloat16`, `float16` or `int8` (OAML_PRECISION)"
    )
    engine: str = Field(description="what runs the backbone: `torch`, `openvino` or `onnxruntime` (OAML_ENGINE)")
    backbone_path: BackbonePathInfo = Field(description="why this engine and precision run the backbone on this CPU")
    calibration: str
    presets: dict[str, PresetInfo]
    probability_prior: float = Field(description="P(same person) under which `probability` is calibrated")
    identify_presets: dict[str, IdentifyPresetInfo] | None = Field(
        description="/identify's presets: their FPIR and, for the default collection's current number of faces, "
        "their threshold (null for a key limited to other collections: see `GET /collections/{name}`)"
    )
    identify_model: str = Field(
        description=(
            "what turns FPIR into thresholds: `fitted` (the stranger population measured on held-out identities, "
            "oaml calibrate-identify) or `from_pairwise` (independent impostors, from the 1:1 presets)"
        )
    )
    identify_prior: float = Field(description="P(the probe is enrolled) assumed by /identify's probabilities")
    flip_test: bool = Field(description="whether each face is embedded with its mirror image as well")
    default_threshold: str
    gallery_subjects: int | None = Field(
        description="subjects in the default collection (null for a key limited to other collections)"
    )
    gallery_faces: int | None = Field(
        description="faces in the default collection, whose size sets `identify_presets` (null for a key limited to "
        "other collections)"
    )
    collections: int | None = Field(
        description="collections (named galleries), the default one included (null for a key limited to some)"
    )
    gallery_store: str = Field(
        description="`sqlite` (embedded, this process only) or `postgresql` (shared by replicas; see `gallery_sync`)"
    )
    gallery_sync: dict[str, int | bool] | None = Field(
        None,
        description=(
            "with a shared store: `seq` (the last change log entry this replica applied), `connected` (its "
            "LISTEN connection is up) and `reconnects`"
        ),
    )
    gallery_search: GallerySearchInfo
    gallery_writable: bool = Field(
        description="false while the gallery is read-only: enrolments and deletions answer 503 STORE_READ_ONLY"
    )
    detector: str
    detector_passes: str = Field(
        description="how faces are found and landmarked: `coarse 320, refined` (OAML_DETECTOR_COARSE_SIDE, the "
        "largest face found at 320 px, every aligned face refined), `whole photo, refined` or `whole photo` "
        "(OAML_DETECTOR_REFINE=false)"
    )
    detector_backend: str = Field(
        description="`onnxruntime` (CPU, per photo in the detection workers) or `torch` (on `device`, batched)"
    )
    max_batch: int
    limits: dict[str, int]
    image_formats: list[str] = Field(description="image formats decoded; any other is refused with 415")


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None


class ReadyResponse(HealthResponse):
    gallery_writable: bool = Field(
        description=(
            "false while the gallery is read-only (its database could not be written at start-up): matching is "
            "served, enrolments and deletions answer 503 STORE_READ_ONLY until a write succeeds"
        ),
    )
