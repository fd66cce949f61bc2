"""A short schemathesis run over every operation of the OpenAPI document (`make fuzz`: long).

Each database gets a stack of its own on a fresh database: fuzzing creates and deletes users,
keys, triggers and functions at random, which must not leak into the shared session stack.
"""

from collections.abc import Iterator

import pytest

from tests.conftest import PG_ADMIN
from tests.fuzz import fresh_database, fuzz_stack

EXAMPLES = 5


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_database(request.param, PG_ADMIN) as url:
        yield url


def test_fuzz_finds_no_server_error_and_no_schema_violation(
    temporal_address: str, fresh_url: str
) -> None:
    report = fuzz_stack(temporal_address, fresh_url, EXAMPLES, workers=2, coverage=False)
    assert report.operations, "the OpenAPI document lists no operation"
    assert report.requests >= len(report.operations)
    assert report.ok, report.summary()
