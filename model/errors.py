"""Domain errors shared by the model pipeline and the service.

Each carries a stable machine-readable ``code``; the service maps codes to HTTP statuses in one
place, so core code never knows about HTTP.
"""

from __future__ import annotations

__all__ = [
    "OAMLError",
    "InvalidImageError",
    "UnsupportedImageFormatError",
    "ImageTooLargeError",
    "NoFaceError",
    "MultipleFacesError",
    "FaceIndexError",
    "CheckpointError",
]


class OAMLError(Exception):
    """Base class: ``code`` is stable across releases, the message is for people.

    ``message`` and ``details`` may reach a client (an HTTP error body); ``internal`` never does: it
    holds what only the operator should read (a database path or address, a driver's own words) and
    goes to the log, or into the one line a failed start-up prints (:attr:`full`).
    """

    code = "OAML_ERROR"

    def __init__(self, message: str, *, internal: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.internal = internal
        self.details = details

    @property
    def full(self) -> str:
        """The message with the operator's detail, for logs and start-up failures."""
        return f"{self.message} ({self.internal})" if self.internal else self.message


class InvalidImageError(OAMLError, ValueError):
    """The bytes are not a decodable image (truncated, corrupt, unsupported format)."""

    code = "INVALID_IMAGE"


class UnsupportedImageFormatError(OAMLError, ValueError):
    """An image in a format the service does not decode (its parser is never run on uploads)."""

    code = "UNSUPPORTED_MEDIA"


class ImageTooLargeError(OAMLError, ValueError):
    """The image exceeds the configured pixel limit (decompression-bomb guard)."""

    code = "IMAGE_TOO_LARGE"


class NoFaceError(OAMLError, LookupError):
    """No face passed the detector's score threshold."""

    code = "NO_FACE"


class MultipleFacesError(OAMLError, LookupError):
    """Several faces were found where exactly one was required."""

    code = "MULTIPLE_FACES"


class FaceIndexError(OAMLError, IndexError):
    """A face index was requested that the image does not have."""

    code = "FACE_INDEX_OUT_OF_RANGE"


class CheckpointError(OAMLError, RuntimeError):
    """A weights file is missing, corrupt, of the wrong layout, or fails its hash check."""

    code = "CHECKPOINT_ERROR"
