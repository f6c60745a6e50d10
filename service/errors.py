"""The service's own domain errors, in the one hierarchy rooted at :class:`model.errors.OAMLError`.

Each has a stable ``code``; :mod:`service.problems` maps codes to HTTP statuses in one place, so
the store, the index and the engine never know about HTTP.
"""

from __future__ import annotations

from model.errors import OAMLError

__all__ = [
    "Overloaded",
    "SubjectNotFound",
    "FaceNotFound",
    "GalleryVersionError",
    "GalleryStoreError",
    "GalleryReadOnly",
    "IdempotencyKeyReused",
    "Stopping",
    "SubjectHasNoFaces",
    "CollectionNotFound",
    "CollectionExists",
    "CollectionProtected",
    "MigrationIncomplete",
    "MigrationConflict",
    "ModelNotAvailable",
    "QuotaExceeded",
]


class Overloaded(OAMLError):
    """The inference queue is full: retry later."""

    code = "OVERLOADED"


class SubjectNotFound(OAMLError, LookupError):
    """No subject with that id is enrolled."""

    code = "SUBJECT_NOT_FOUND"


class FaceNotFound(OAMLError, LookupError):
    """No enrolled face with that id (or not under that subject)."""

    code = "FACE_NOT_FOUND"


class GalleryVersionError(OAMLError, RuntimeError):
    """The store holds faces embedded by different weights: matching them would be meaningless."""

    code = "GALLERY_VERSION_MISMATCH"


class GalleryStoreError(OAMLError, RuntimeError):
    """The gallery's database cannot be opened or written (read-only folder, full disk, ...)."""

    code = "STORE_UNAVAILABLE"


class GalleryReadOnly(OAMLError, RuntimeError):
    """The gallery could not be written at start-up (full disk, read-only mount): matching is served,
    enrolments and deletions are refused until a write succeeds again."""

    code = "STORE_READ_ONLY"


class IdempotencyKeyReused(OAMLError, ValueError):
    """An ``Idempotency-Key`` already answered a different request."""

    code = "IDEMPOTENCY_KEY_REUSED"


class Stopping(OAMLError, RuntimeError):
    """The service is shutting down: work handed to it now is not done (retry on another replica)."""

    code = "NOT_READY"


class SubjectHasNoFaces(OAMLError, LookupError):
    """The subject exists but has no enrolled face (all were deleted): nothing to verify against."""

    code = "SUBJECT_HAS_NO_FACES"


class CollectionNotFound(OAMLError, LookupError):
    """No collection (named gallery) of that name exists."""

    code = "COLLECTION_NOT_FOUND"


class CollectionExists(OAMLError, ValueError):
    """A collection of that name exists already (creating it again would hide that it is in use)."""

    code = "COLLECTION_EXISTS"


class CollectionProtected(OAMLError, ValueError):
    """The default collection cannot be deleted: clients that name no collection use it."""

    code = "COLLECTION_PROTECTED"


class MigrationIncomplete(OAMLError, RuntimeError):
    """A collection cannot switch to a version some of its faces lack (their crops were not kept)."""

    code = "MIGRATION_INCOMPLETE"


class MigrationConflict(OAMLError, RuntimeError):
    """A migration cannot start or act now: another runs, none runs, or there is nothing to roll back to."""

    code = "MIGRATION_CONFLICT"


class ModelNotAvailable(OAMLError, LookupError):
    """No weights of that model version are where the service looks (``OAML_WEIGHTS_DIR``)."""

    code = "MODEL_NOT_AVAILABLE"


class QuotaExceeded(OAMLError, RuntimeError):
    """A key enrolled its faces of the day (``OAML_ENROL_FACES_PER_DAY``): 429 with when to retry."""

    code = "QUOTA_EXCEEDED"
