"""Shared fixtures: throwaway PKI and a ready-to-serve storaged stack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pki_fixtures import PkiFiles, pki
from tests.storaged.stack import Stack

__all__ = ["pki", "stack"]

# tests/vm needs root, kernel modules and kTLS: it runs only inside the QEMU
# guest (scripts/vm-test sets NETBLK_VM), where it is the whole run.
collect_ignore = [] if os.environ.get("NETBLK_VM") else ["vm"]


@pytest.fixture
def stack(pki: PkiFiles, tmp_path: Path) -> Stack:
    return Stack(pki=pki, root=tmp_path / "stack")
