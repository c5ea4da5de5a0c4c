"""The package layout docs/architecture.md promises: the shared package
imports no daemon, and no daemon imports another daemon's package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "netblk": ROOT / "lib" / "netblk",
    "storaged": ROOT / "storaged" / "storaged",
    "netblk_certs": ROOT / "certs" / "netblk_certs",
    "tls_bridge": ROOT / "tls-bridge" / "tls_bridge",
    "netblk_admin": ROOT / "admin-api" / "netblk_admin",
}


def imported(package: Path) -> set[str]:
    """Top-level names of everything ``package`` imports, type-only imports too."""
    names: set[str] = set()
    for path in package.rglob("*.py*"):
        if path.suffix not in (".py", ".pyi"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
    return names


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_only_the_shared_package_is_shared(name: str) -> None:
    ours = imported(PACKAGES[name]) & set(PACKAGES) - {name}
    assert ours == (set() if name == "netblk" else {"netblk"})
