"""One sysfs contract: the driver's attribute ranges and defaults, its
states and its stats keys are defined in the UAPI header (their integer
mirror is checked by tests/netblk/test_uapi_drift.py); this test fails when
the header's lists, netblk.ko's sysfs code, the admin API's models and
metrics, or the tests' fake driver say anything else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from netblk.protocol.constants import (
    MAX_SERVERS,
    SYSFS_RANGES,
    SYSFS_STATES,
    SYSFS_STATS,
)
from netblk_admin import metrics
from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig
from netblk_admin.sysfs import Snapshot, State
from tests.admin_api.conftest import TOKENS
from tests.admin_api.fake_driver import DEFAULTS, RANGES, STATS_KEYS, FakeDriver

KMOD = Path(__file__).resolve().parents[2] / "kmod"
HEADER = KMOD / "include/uapi/linux/netblk.h"


def x_macro(name: str) -> list[tuple[str, ...]]:
    """The X(...) entries of the header's ``#define name(X)`` list."""
    text = HEADER.read_text()
    found = re.search(rf"^#define {name}\(X\)((?:.*\\\n)*.*)$", text, re.M)
    assert found, f"{name} is not in the header"
    return [
        tuple(arg.strip() for arg in args.split(","))
        for args in re.findall(r"\bX\(([^)]*)\)", found[1])
    ]


def test_the_header_lists_are_mirrored() -> None:
    assert [word for _name, word in x_macro("NETBLK_SYSFS_STATES")] == list(SYSFS_STATES)
    assert [name.lower() for name, _word in x_macro("NETBLK_SYSFS_STATES")] == list(SYSFS_STATES)
    assert [key for (key,) in x_macro("NETBLK_SYSFS_STATS")] == list(SYSFS_STATS)


def c_source(name: str) -> str:
    return (KMOD / name).read_text()


@pytest.mark.parametrize("attribute", sorted(SYSFS_RANGES))
def test_the_driver_builds_each_range_and_default_from_the_header(attribute: str) -> None:
    macro = f"NETBLK_{attribute.upper()}"
    declared = re.search(
        rf"NETBLK_U32_ATTR\({attribute},\s*(\w+),\s*(\w+),", c_source("netblk_sysfs.c")
    )
    assert declared, f"netblk_sysfs.c declares no {attribute}"
    assert declared.groups() == (f"{macro}_MIN", f"{macro}_MAX")
    assert re.search(rf"cf_{attribute} = {macro}_DEFAULT;", c_source("netblk_conn.c"))


def test_the_driver_builds_its_states_and_stats_from_the_header() -> None:
    assert "NETBLK_SYSFS_STATES(NETBLK_STATE_ENUM)" in c_source("netblk.h")
    assert "NETBLK_SYSFS_STATES(NETBLK_STATE_NAME)" in c_source("netblk_conn.c")
    stats_show = c_source("netblk_sysfs.c").split("static ssize_t stats_show", 1)[1]
    body = stats_show.split("\n}\n", 1)[0]
    assert "NETBLK_SYSFS_STATS(NETBLK_STATS_LINE)" in body
    assert '": %' not in body.replace('#key ": %lld', ""), "a stats key spelled out by hand"


@pytest.fixture
def schema(tmp_path: Path) -> dict[str, Any]:
    app = create_app(ApiConfig(tokens=TOKENS, sysfs_root=tmp_path))
    return app.openapi()["components"]["schemas"]  # type: ignore[no-any-return]


def patch_property(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """What a PATCH of the device config takes for ``name``."""
    prop: dict[str, Any] = schema["ConfigPatch"]["properties"][name]
    return prop


@pytest.mark.parametrize("attribute", sorted(SYSFS_RANGES))
def test_the_api_takes_exactly_the_drivers_range(schema: dict[str, Any], attribute: str) -> None:
    low, high, _default = SYSFS_RANGES[attribute]
    prop = patch_property(schema, attribute)
    assert (prop["type"], prop["minimum"], prop["maximum"]) == ("integer", low, high), prop


def test_the_api_lists_as_many_servers_as_the_driver(schema: dict[str, Any]) -> None:
    assert patch_property(schema, "servers")["maxItems"] == MAX_SERVERS


def test_the_api_knows_the_drivers_states_and_makes_a_metric_of_each_stat() -> None:
    assert [state.value for state in State] == list(SYSFS_STATES)
    assert list(metrics.HELP) == list(SYSFS_STATS)
    assert set(metrics.GAUGES) <= set(SYSFS_STATS)
    snapshot = Snapshot(
        name="netblk0",
        state=State.CONNECTED,
        last_error="",
        current_server="",
        config={},
        stats=dict.fromkeys(SYSFS_STATS, 7),
    )
    text = metrics.render([snapshot])
    for key in SYSFS_STATS:
        name = metrics.GAUGES.get(key, f"netblk_{key}_total")
        assert f'{name}{{device="netblk0"}} 7' in text, key


def test_the_fake_driver_is_the_driver(tmp_path: Path) -> None:
    assert STATS_KEYS == SYSFS_STATS
    for attribute, (low, high, default) in SYSFS_RANGES.items():
        assert RANGES[attribute] == (low, high)
        assert DEFAULTS[attribute] == str(default)
    fake = FakeDriver(tmp_path / "sys-block")
    try:
        shown = (fake.root / "netblk0" / "stats").read_text().splitlines()
        assert [line.split(":")[0] for line in shown] == list(SYSFS_STATS)
    finally:
        fake.close()
