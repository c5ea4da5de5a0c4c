"""Fixtures shared by the storaged tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph_cluster import MiniCluster, mini_cluster


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniCluster]:
    """One mini Ceph cluster for the session (its monitor's ports are fixed).
    bluestore: an OSD killed by a test comes back with what it held."""
    with mini_cluster(tmp_path_factory.mktemp("ceph"), "bluestore") as cluster:
        yield cluster
