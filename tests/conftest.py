"""Shared fixtures: throwaway PKI and a ready-to-serve storaged stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pki_fixtures import PkiFiles, pki
from tests.storaged.stack import Stack

__all__ = ["pki", "stack"]


@pytest.fixture
def stack(pki: PkiFiles, tmp_path: Path) -> Stack:
    return Stack(pki=pki, root=tmp_path / "stack")
