"""Schemathesis against the served OpenAPI document: no 5xx, and every
answer matches its declared status, media type and schema.

The fake driver settles at once (``step=0``), a driver that is merely fast:
a connect with ``wait=true`` then ends ``connected`` (200) however small the
timeout, so a 5xx here is a bug, not a slow fake.  Device names are mostly
ones that exist, or the run would see nothing but 404s.  JSON Schema's
``integer`` also matches ``10910.0``, which the API refuses on purpose
(integers are written as integers), so such draws are sent as ``10910``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig
from netblk_admin.control import DeviceControl
from netblk_admin.sysfs import DeviceTree
from tests.admin_api.conftest import AUTH, TOKENS
from tests.admin_api.fake_driver import FakeDriver

#: Per operation: 9 operations in about ten seconds.
EXAMPLES = 100
NAMES = st.one_of(st.none(), st.sampled_from(["netblk0", "netblk1", "netblk7"]))


# The schema is read at import; each operation's run gets a fresh fake driver.
# (schemathesis.pytest.from_fixture would do that, but fails on pytest 9.)
APP = create_app(ApiConfig(tokens=TOKENS, sysfs_root=Path("/nonexistent")))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(autouse=True)
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver(tmp_path / "sys-block", step=0)
    fake.install(monkeypatch)
    APP.state.control = DeviceControl(DeviceTree(fake.root))
    return fake


def whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [whole_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: whole_floats_as_ints(item) for key, item in value.items()}
    return value


@schema.given(name=NAMES)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_api_keeps_its_openapi_promises(case: schemathesis.Case[Any], name: str | None) -> None:
    if name is not None and "name" in (case.path_parameters or {}):
        case.path_parameters = {"name": name}
    case.body = whole_floats_as_ints(case.body)
    case.call_and_validate(headers=AUTH)
