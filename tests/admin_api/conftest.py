"""A fake driver under tmp_path, throwaway tokens hashed cheaply, and an
authenticated test client of the app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, Type
from fastapi.testclient import TestClient

from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig
from tests.admin_api.fake_driver import FakeDriver

TOKEN = "ops-token-for-tests-0123456789"
OTHER_TOKEN = "monitoring-token-for-tests-42"
# argon2id at the lowest cost: the API verifies whatever parameters a hash names.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID)
TOKENS = {"ops": CHEAP.hash(TOKEN), "monitoring": CHEAP.hash(OTHER_TOKEN)}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    fake = FakeDriver(tmp_path / "sys-block")
    fake.install(monkeypatch)
    yield fake
    fake.close()


@pytest.fixture
def config(driver: FakeDriver) -> ApiConfig:
    return ApiConfig(tokens=TOKENS, sysfs_root=driver.root)


@pytest.fixture
def client(config: ApiConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config), headers=AUTH) as test_client:
        yield test_client
