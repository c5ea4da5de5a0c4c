"""Fixtures shared by the VM suites (loaded only in the guest: tests/conftest.py
ignores tests/vm elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pki_fixtures import PkiFiles
from tests.vm.stage import Stage, running_stage


@pytest.fixture(scope="module")
def stage(pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """The whole stack, once per test module that asks for it."""
    with running_stage(pki, tmp_path_factory.mktemp("stage")) as running:
        yield running
