"""Shared fixtures: a real initialised data directory, the running services, an API client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tether.server.app import create_app
from tether.server.services import Services, init_data_dir

TRUST_DOMAIN = "example.org"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "tether-home"
    init_data_dir(root, TRUST_DOMAIN)
    return root


@pytest.fixture
def services(home: Path) -> Iterator[Services]:
    svc = Services(home)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def admin_credential(home: Path) -> str:
    return (home / "credentials" / "admin").read_text().strip()


@pytest.fixture
def admin_token(services: Services, admin_credential: str) -> str:
    return services.authority.login(admin_credential).token


@pytest.fixture
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://tether") as client:
        yield client
