"""What the service does, one function per use case; the HTTP routes call exactly one of these.

Routes own HTTP (form fields, uploads, status codes); these functions own the decisions: which
face to use, how scores are fused and thresholded, how candidates are ranked, which faces are
good enough to enrol, and what an enrolment answers. Device work goes through the engine's worker
(:meth:`service.engine.Engine.run_device`); decoding, detection and rendering through its CPU pool;
the store through the gallery's own threads (:class:`service.gallery.Gallery`), which keep the
store, the index and the names in step and bound every wait.

One module per resource, as the routes are: :mod:`~service.usecases.verify` (two photos, or a photo and a
subject), :mod:`~service.usecases.gallery` (subjects and their faces), :mod:`~service.usecases.identify`,
:mod:`~service.usecases.collections` (and their model versions), :mod:`~service.usecases.occlusion`; what they
share in :mod:`~service.usecases.common`.
"""

from __future__ import annotations

from service.usecases.collections import (
    cancel_migration,
    create_collection,
    delete_collection,
    drop_previous,
    export_collection,
    get_collection,
    import_collection,
    list_collections,
    migration_status,
    review_identities,
    rollback,
    start_migration,
    switch_migration,
    update_collection,
)
from service.usecases.common import (
    OCCLUDED_SHORTLIST_FACTOR,
    OCCLUDED_VISIBILITY,
    PER_PHOTO_ERRORS,
    Heatmap,
    Photo,
)
from service.usecases.gallery import (
    Enrolled,
    delete_face,
    delete_subject,
    enrol,
    get_subject,
    list_subjects,
    merge_subjects,
    move_faces,
    update_subject,
)
from service.usecases.identify import MAX_GROUP_FACES, identify, identify_all, identify_presets
from service.usecases.occlusion import heatmap_of_face, heatmap_of_photo
from service.usecases.verify import EXPLAIN_LINES, PairRequest, explain, verify, verify_subject

__all__ = [
    "Photo",
    "PairRequest",
    "Heatmap",
    "Enrolled",
    "PER_PHOTO_ERRORS",
    "OCCLUDED_VISIBILITY",
    "OCCLUDED_SHORTLIST_FACTOR",
    "EXPLAIN_LINES",
    "MAX_GROUP_FACES",
    "verify",
    "explain",
    "verify_subject",
    "enrol",
    "list_subjects",
    "get_subject",
    "update_subject",
    "delete_subject",
    "delete_face",
    "merge_subjects",
    "move_faces",
    "identify",
    "identify_all",
    "identify_presets",
    "create_collection",
    "list_collections",
    "get_collection",
    "update_collection",
    "delete_collection",
    "migration_status",
    "start_migration",
    "switch_migration",
    "cancel_migration",
    "rollback",
    "drop_previous",
    "review_identities",
    "export_collection",
    "import_collection",
    "heatmap_of_face",
    "heatmap_of_photo",
]
