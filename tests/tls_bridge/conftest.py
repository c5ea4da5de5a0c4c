"""One storaged for the whole module, with the login throttle out of the way
(tests that provoke failures would otherwise trip it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import Stack, ThreadedServer

RELAXED_THROTTLE = "[login]\nmax_failures = 1000\n"


@pytest.fixture(scope="module")
def shared_stack(pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    root = tmp_path_factory.mktemp("tls-bridge") / "stack"
    return Stack(pki=pki, root=root, extra_config=RELAXED_THROTTLE)


@pytest.fixture(scope="module")
def storaged(shared_stack: Stack) -> Iterator[Stack]:
    """The shared stack, served on a background loop thread."""
    with ThreadedServer(shared_stack):
        yield shared_stack
