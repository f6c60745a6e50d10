"""Property-based fuzzing of every operation in the OpenAPI document against a real server.

Schemathesis generates requests from the published schema (valid and invalid ones), seeded and
bounded (``EXAMPLES`` per operation, about a minute on a 2-core CPU). Every answer must be below
500, carry a status code and content type the schema declares, and match the declared body.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.servers import free_port, start_server, wait_ready

EXAMPLES = 80

# a collection import's body is JSON lines, bytes as far as the schema says: sent as generated
schemathesis.serializer.alias("application/x-ndjson", "application/octet-stream")


@pytest.fixture(scope="module")
def api_schema(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    port = free_port()
    proc = start_server(weights, Path(tmp_path_factory.mktemp("fuzz-data")), port, OAML_MAX_IMAGE_BYTES=str(256 * 1024))
    try:
        wait_ready(proc, port)
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    finally:
        proc.kill()
        proc.wait()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_operation_answers_within_its_schema(api_schema: schemathesis.BaseSchema) -> None:
    """One Hypothesis run per operation (the loop, rather than schemathesis' pytest plugin, keeps this
    independent of pytest internals); the first failure names its operation and the request to replay."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12  # every route of the API is in the document

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,  # the same requests every run: a failure here is reproducible
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=60, checks=CHECKS)

        run()
