"""Fault tests run against real databases (a file, or a PostgreSQL schema), real sockets and
real processes; each test gets its own database, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers import live_database
from tests.support.databases import KINDS


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def app_name() -> str:
    """The PostgreSQL ``application_name`` of this test's connections."""
    return f"carnet_faults_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def db_url(kind: str, tmp_path: Path, app_name: str) -> Iterator[str]:
    with live_database(kind, tmp_path, app_name) as url:
        yield url
