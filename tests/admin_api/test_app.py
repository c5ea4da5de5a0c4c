"""Every endpoint against the fake driver: answers, validation (422 with
nothing written), tokens (401), unknown devices (404), the driver's refusals
and their errnos, waits that settle, fail, time out or are cut short."""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from netblk_admin import sysfs
from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig
from tests.admin_api.conftest import OTHER_TOKEN
from tests.admin_api.fake_driver import LOGIN_REFUSED, FakeDriver

TARGET = {"server_ip": "127.0.0.1", "server_port": 10911, "export": "data"}
#: A valid value of every target field.
TARGETS = TARGET | {"servers": [{"ip": "127.0.0.1"}, {"ip": "127.0.0.2", "port": 10911}]}
#: Every operation but health, with a body that would be valid.
GUARDED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/metrics", None),
    ("GET", "/v1/devices", None),
    ("GET", "/v1/devices/netblk0", None),
    ("GET", "/v1/devices/netblk0/config", None),
    ("GET", "/v1/devices/netblk0/stats", None),
    ("PATCH", "/v1/devices/netblk0/config", {"server_port": 10911}),
    ("POST", "/v1/devices/netblk0/connect", None),
    ("POST", "/v1/devices/netblk0/disconnect", None),
]


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def configure_target(client: TestClient, device: str = "netblk0") -> None:
    assert client.patch(f"/v1/devices/{device}/config", json=TARGET).status_code == 200


def assert_error(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == error, body
    assert body["detail"]
    return body


# --- reading --------------------------------------------------------------


def test_health_needs_no_token(client: TestClient) -> None:
    response = client.get("/v1/health", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "devices": 2}


def test_health_says_when_sysfs_is_unreadable(driver: FakeDriver) -> None:
    shutil.rmtree(driver.root)
    with TestClient(create_app(ApiConfig(tokens={}, sysfs_root=driver.root))) as client:
        body = assert_error(client.get("/v1/health"), 503, "sysfs_error")
    assert "No such file or directory" in body["detail"]


def test_devices_are_listed_with_config_state_and_stats(
    client: TestClient, driver: FakeDriver
) -> None:
    driver.set_stats("netblk1", read_bytes=8192, inflight=3)
    driver.set("netblk1", "state", "error")
    driver.set("netblk1", "last_error", "connect: connection refused")
    devices = client.get("/v1/devices").json()["devices"]
    assert [device["name"] for device in devices] == ["netblk0", "netblk1"]
    assert devices[0]["state"] == "disconnected"
    assert devices[0]["last_error"] is None
    assert devices[0]["current_server"] is None
    assert devices[0]["config"] == {
        "servers": [],
        "server_ip": None,
        "server_port": 10910,
        "export": None,
        "request_timeout_ms": 30000,
        "dead_timeout_ms": 30000,
        "reconnect_retries": 100,
    }
    assert devices[1]["state"] == "error"
    assert devices[1]["last_error"] == "connect: connection refused"
    assert devices[1]["stats"] == {"read_bytes": 8192, "inflight": 3}


def test_one_device_its_config_and_its_stats(client: TestClient, driver: FakeDriver) -> None:
    configure_target(client)
    driver.set_stats("netblk0", write_bytes=4096, write_requests=1, inflight=0)
    device = client.get("/v1/devices/netblk0").json()
    assert device["config"] == client.get("/v1/devices/netblk0/config").json()
    assert device["config"]["server_ip"] == "127.0.0.1"
    assert client.get("/v1/devices/netblk0/stats").json() == {
        "write_bytes": 4096,
        "write_requests": 1,
        "inflight": 0,
    }


#: A sample line of the text exposition format: name, labels, a value.
SAMPLE_RE = re.compile(
    r"[a-zA-Z_:][a-zA-Z0-9_:]*"  # the metric name
    r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\}'  # its labels
    r" -?[0-9]+"
)


def test_stats_keys_that_make_no_metric_name_are_left_out(
    client: TestClient, driver: FakeDriver
) -> None:
    odd = ["bad key", "x{y}", "a-b", "9lives", "évil", "Upper", 'q"uote', "x" * 65]
    stats = "\n".join(f"{key}: 7" for key in [*odd, "read_bytes", "new_counter"])
    driver.set("netblk0", "stats", stats)
    lines = client.get("/metrics").text.splitlines()
    for line in lines:
        assert line.startswith("# ") or SAMPLE_RE.fullmatch(line), line
    assert 'netblk_new_counter_total{device="netblk0"} 7' in lines
    assert 'netblk_read_bytes_total{device="netblk0"} 7' in lines
    assert not any(key in line for key in odd for line in lines if not line.startswith("#"))


def test_metrics_in_prometheus_text_format(client: TestClient, driver: FakeDriver) -> None:
    driver.set_stats("netblk0", read_bytes=512, errors=2, inflight=1)
    driver.set("netblk1", "state", "connected")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = response.text.splitlines()
    assert "# TYPE netblk_read_bytes_total counter" in lines
    assert 'netblk_read_bytes_total{device="netblk0"} 512' in lines
    assert 'netblk_errors_total{device="netblk0"} 2' in lines
    assert 'netblk_read_bytes_total{device="netblk1"} 0' in lines
    assert "# TYPE netblk_inflight_requests gauge" in lines
    assert 'netblk_inflight_requests{device="netblk0"} 1' in lines
    assert 'netblk_state{device="netblk1",state="connected"} 1' in lines
    assert 'netblk_state{device="netblk1",state="disconnected"} 0' in lines
    assert 'netblk_state{device="netblk0",state="disconnected"} 1' in lines
    # One HELP and TYPE per family (12 stats keys and the state), samples right after.
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(families) == len(set(families)) == 13
    family = ""
    for line in lines:
        if line.startswith("# TYPE"):
            family = line.split()[2]
        elif not line.startswith("#"):
            assert line.startswith(family + "{"), line
    assert response.text.endswith("\n")


def test_a_device_that_vanishes_is_gone_from_every_answer(
    client: TestClient, driver: FakeDriver
) -> None:
    shutil.rmtree(driver.root / "netblk1")  # what rmmod does
    assert [d["name"] for d in client.get("/v1/devices").json()["devices"]] == ["netblk0"]
    assert 'device="netblk1"' not in client.get("/metrics").text
    assert_error(client.get("/v1/devices/netblk1"), 404, "unknown_device")


def test_openapi_declares_the_bearer_scheme_and_docs_are_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/v1/health"]["get"]
    assert spec["paths"]["/v1/devices"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "swagger-ui" in client.get("/docs").text


# --- tokens ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
@pytest.mark.parametrize(
    ("authorization", "challenge"),
    [
        (None, "Bearer"),
        ("Bearer not-the-token-at-all-000", 'Bearer error="invalid_token"'),
        ("Bearer " + "x" * 300, 'Bearer error="invalid_token"'),
        ("Basic b3BzOnRva2Vu", "Bearer"),
        ("Bearer", "Bearer"),
    ],
    ids=["none", "wrong", "oversized", "basic", "empty"],
)
def test_every_operation_needs_a_valid_token(
    config: ApiConfig,
    driver: FakeDriver,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    authorization: str | None,
    challenge: str,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with TestClient(create_app(config)) as client:
        response = client.request(method, path, json=body, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == challenge
    assert driver.stores == []


def test_every_configured_token_works(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    assert client.get("/v1/devices", headers=headers).status_code == 200


# --- unknown devices and paths ---------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "netblk7",
        "netblk01",
        "netblk",
        "sda",
        "loop0",
        "NETBLK0",
        "..",
        "...",
        "%2e%2e",
        "netblk0%00",
        "netblk0%2F..%2Fnetblk1",
        "..%2F..%2Fetc%2Fpasswd",
        "netblk0%2Fstate",
        " netblk0",
        "netblk0 ",
        "netblk" + "9" * 5000,  # longer than a file name may be
        "netblk" + "0" * 300,
        "x" * 300,
    ],
)
@pytest.mark.parametrize("suffix", ["", "/config", "/stats", "/connect", "/disconnect"])
def test_unknown_devices_and_traversals_are_404(
    client: TestClient, driver: FakeDriver, name: str, suffix: str
) -> None:
    method = "POST" if suffix in ("/connect", "/disconnect") else "GET"
    response = client.request(method, f"/v1/devices/{name}{suffix}")
    assert response.status_code == 404
    assert response.json()["error"] in ("unknown_device", "not_found")
    response = client.patch(f"/v1/devices/{name}/config", json={"server_port": 10911})
    assert response.status_code == 404
    assert driver.stores == []


def test_routing_errors_are_json_too(client: TestClient) -> None:
    assert_error(client.get("/v2/devices"), 404, "not_found")
    response = client.delete("/v1/devices/netblk0")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


# --- changing the config ---------------------------------------------------


def test_a_patch_writes_exactly_the_fields_given(client: TestClient, driver: FakeDriver) -> None:
    before = driver.files()
    response = client.patch("/v1/devices/netblk0/config", json={"dead_timeout_ms": 0})
    assert response.status_code == 200
    assert response.json()["config"]["dead_timeout_ms"] == 0
    assert driver.stores == [("netblk0", "dead_timeout_ms", "0")]
    after = driver.files()
    assert {key for key in before if before[key] != after[key]} == {"netblk0/dead_timeout_ms"}


def test_a_patch_of_every_field_canonical_addresses(client: TestClient, driver: FakeDriver) -> None:
    patch = {
        "server_ip": "2001:DB8:0::10",
        "server_port": 65535,
        "export": "vm_disk-2.img",
        "request_timeout_ms": 3_600_000,
        "dead_timeout_ms": 86_400_000,
        "reconnect_retries": 1_000_000,
    }
    response = client.patch("/v1/devices/netblk1/config", json=patch)
    assert response.status_code == 200, response.text
    assert response.json()["config"] == patch | {
        "servers": [{"ip": "2001:db8::10"}],
        "server_ip": "2001:db8::10",
    }
    assert [attr for _, attr, _ in driver.stores] == list(patch)  # one write each, in order


def test_a_server_list_is_written_in_one_store_in_canonical_form(
    client: TestClient, driver: FakeDriver
) -> None:
    servers = [
        {"ip": "192.0.2.10"},
        {"ip": "192.0.2.11", "port": 10911},
        {"ip": "2001:DB8::1", "port": 10912},
        {"ip": "2001:db8::2"},
    ]
    response = client.patch("/v1/devices/netblk1/config", json={"servers": servers})
    assert response.status_code == 200, response.text
    canonical = [
        {"ip": "192.0.2.10"},
        {"ip": "192.0.2.11", "port": 10911},
        {"ip": "2001:db8::1", "port": 10912},
        {"ip": "2001:db8::2"},
    ]
    assert response.json()["config"]["servers"] == canonical
    assert response.json()["config"]["server_ip"] == "192.0.2.10"
    text = "192.0.2.10 192.0.2.11:10911 [2001:db8::1]:10912 2001:db8::2"
    assert driver.stores == [("netblk1", "servers", text)]
    # server_ip makes a list of one
    client.patch("/v1/devices/netblk1/config", json={"server_ip": "192.0.2.20"})
    assert client.get("/v1/devices/netblk1/config").json()["servers"] == [{"ip": "192.0.2.20"}]


def bodies() -> list[Any]:
    bad_values: dict[str, list[Any]] = {
        "server_ip": [
            "256.1.1.1",
            "1.2.3",
            "01.2.3.4",
            "fe80::1%eth0",
            "localhost",
            " 1.2.3.4",
            "1.2.3.4\n",
            "",
            1,
            None,
        ],
        "servers": [
            [],
            [{"ip": "192.0.2.1"}] * 2,
            [{"ip": "2001:db8::1"}, {"ip": "2001:DB8:0::1"}],
            [{"ip": f"192.0.2.{i}"} for i in range(9)],
            [{"ip": "192.0.2.1", "port": 0}],
            [{"ip": "192.0.2.1", "port": 65536}],
            [{"ip": "192.0.2.1", "port": "80"}],
            [{"ip": "192.0.2.1:80"}],
            [{"ip": "[2001:db8::1]"}],
            [{"ip": "fe80::1%eth0"}],
            [{"ip": "localhost"}],
            [{"port": 80}],
            [{"ip": "192.0.2.1", "host": "x"}],
            ["192.0.2.1"],
            "192.0.2.1",
            None,
        ],
        "server_port": [0, 65536, -1, "10910", True, 1.5, None],
        "export": [
            "../x",
            ".hidden",
            "-x",
            "a" * 65,
            "",
            "a b",
            "d\u00e4t\u00e4",
            "x\n",
            "x/y",
            7,
        ],
        "request_timeout_ms": [99, 3_600_001, "100"],
        "dead_timeout_ms": [-1, 86_400_001],
        "reconnect_retries": [-1, 1_000_001, [1]],
    }
    cases: list[Any] = [{field: value} for field, values in bad_values.items() for value in values]
    # One bad field spoils the whole patch: nothing is written.
    cases += [
        {"server_port": 10911, "export": "../x"},
        {"servers": [{"ip": "192.0.2.1"}], "server_ip": "192.0.2.2"},
        {"request_timeout_ms": 500, "bogus": 1},
        {"state": "connected"},
        {},
        [],
        "server_port=10911",
        None,
    ]
    return cases


@pytest.mark.parametrize("body", bodies())
def test_invalid_patches_are_422_and_write_nothing(
    client: TestClient, driver: FakeDriver, body: Any
) -> None:
    before = driver.files()
    response = client.patch("/v1/devices/netblk0/config", json=body)
    error = assert_error(response, 422, "invalid_request")
    assert all({"loc", "msg", "type"} <= set(issue) for issue in error["detail"])
    assert driver.stores == []
    assert driver.files() == before


def test_a_body_that_is_not_json_is_refused(client: TestClient, driver: FakeDriver) -> None:
    headers = {"Content-Type": "application/json"}
    response = client.patch("/v1/devices/netblk0/config", content=b"{", headers=headers)
    assert_error(response, 422, "invalid_request")
    not_utf8 = b'{"export": "d\xe4t\xe4"}'
    response = client.patch("/v1/devices/netblk0/config", content=not_utf8, headers=headers)
    assert_error(response, 400, "bad_request")
    assert driver.stores == []


@pytest.mark.parametrize("state", ["connecting", "handshaking", "connected", "reconnecting"])
@pytest.mark.parametrize("field", ["servers", "server_ip", "server_port", "export"])
def test_the_target_changes_only_while_idle(
    client: TestClient, driver: FakeDriver, state: str, field: str
) -> None:
    driver.set("netblk0", "state", state)
    before = driver.files()
    body = assert_error(
        client.patch("/v1/devices/netblk0/config", json={field: TARGETS[field]}), 409, "busy"
    )
    assert body["state"] == state
    assert driver.stores == []
    assert driver.refused == []
    assert driver.files() == before
    # Failure handling changes at any time.
    response = client.patch("/v1/devices/netblk0/config", json={"request_timeout_ms": 5000})
    assert response.status_code == 200


def test_the_target_changes_in_error(client: TestClient, driver: FakeDriver) -> None:
    driver.set("netblk0", "state", "error")
    assert client.patch("/v1/devices/netblk0/config", json=TARGET).status_code == 200


# --- connect and disconnect ------------------------------------------------


def test_connect_without_wait_is_accepted(client: TestClient, driver: FakeDriver) -> None:
    configure_target(client)
    response = client.post("/v1/devices/netblk0/connect")
    assert response.status_code == 202
    assert response.json()["state"] != "disconnected"
    wait_for(lambda: driver.state("netblk0") == "connected")


def test_connect_and_disconnect_with_wait(client: TestClient, driver: FakeDriver) -> None:
    configure_target(client)
    response = client.post("/v1/devices/netblk0/connect", params={"wait": "true"})
    assert response.status_code == 200
    assert response.json()["state"] == "connected"
    response = client.post("/v1/devices/netblk0/disconnect", params={"wait": "true"})
    assert response.status_code == 200
    assert response.json()["state"] == "disconnected"
    assert [attr for _, attr, _ in driver.stores][-2:] == ["connect", "disconnect"]


def test_a_connect_that_fails_is_502_with_the_reason(
    client: TestClient, driver: FakeDriver
) -> None:
    configure_target(client)
    driver.outcome["netblk0"] = "error"
    body = assert_error(
        client.post("/v1/devices/netblk0/connect", params={"wait": "true"}), 502, "connect_failed"
    )
    assert body["state"] == "error"
    assert body["last_error"] == body["detail"] == LOGIN_REFUSED
    # error is idle: a new connect is taken (and clears last_error).
    driver.outcome["netblk0"] = "connected"
    response = client.post("/v1/devices/netblk0/connect", params={"wait": "true"})
    assert response.status_code == 200
    assert response.json()["last_error"] is None


def test_a_connect_that_hangs_times_out_with_504(client: TestClient, driver: FakeDriver) -> None:
    configure_target(client)
    driver.outcome["netblk0"] = "hang"
    started = time.monotonic()
    response = client.post("/v1/devices/netblk0/connect?wait=true&timeout=0.3")
    body = assert_error(response, 504, "timeout")
    assert 0.3 <= time.monotonic() - started < 5
    assert body["state"] == "handshaking"
    # The attempt goes on until a disconnect, which works in every state.
    assert driver.state("netblk0") == "handshaking"
    assert client.post("/v1/devices/netblk0/disconnect?wait=true").status_code == 200


def test_connect_needs_a_target(client: TestClient, driver: FakeDriver) -> None:
    assert_error(client.post("/v1/devices/netblk0/connect"), 409, "no_target")
    assert driver.refused == [("netblk0", "connect", errno.EDESTADDRREQ)]
    assert driver.state("netblk0") == "disconnected"


@pytest.mark.parametrize("state", ["connecting", "handshaking", "connected", "reconnecting"])
def test_connect_is_refused_unless_idle(client: TestClient, driver: FakeDriver, state: str) -> None:
    configure_target(client)
    driver.set("netblk0", "state", state)
    body = assert_error(client.post("/v1/devices/netblk0/connect"), 409, "busy")
    assert body["state"] == state
    assert ("netblk0", "connect", "1") not in driver.stores


@pytest.mark.parametrize(
    "query",
    ["wait=maybe", "timeout=0", "timeout=-1", "timeout=601", "timeout=abc", "wiat=true", "x=1"],
)
@pytest.mark.parametrize("action", ["connect", "disconnect"])
def test_bad_query_parameters_are_422_and_write_nothing(
    client: TestClient, driver: FakeDriver, action: str, query: str
) -> None:
    configure_target(client)
    driver.stores.clear()
    assert_error(client.post(f"/v1/devices/netblk0/{action}?{query}"), 422, "invalid_request")
    assert_error(client.get(f"/v1/devices?{query}"), 422, "invalid_request")
    assert driver.stores == []


# --- the driver has the last word ------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (errno.EBUSY, 409, "busy"),
        (errno.EINVAL, 422, "invalid_value"),
        (errno.EDESTADDRREQ, 409, "no_target"),
        (errno.ENODEV, 503, "unloading"),
        (errno.EACCES, 503, "sysfs_error"),
    ],
)
def test_driver_errnos_become_clean_answers(
    client: TestClient,
    driver: FakeDriver,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    status: int,
    error: str,
) -> None:
    configure_target(client)

    def refusing(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sysfs, "write_attribute", refusing)
    body = assert_error(client.post("/v1/devices/netblk0/connect"), status, error)
    assert "connect" in body["detail"]
    assert_error(client.patch("/v1/devices/netblk0/config", json=TARGET), status, error)


def test_a_writer_that_races_in_gets_the_driver_answer(
    client: TestClient, driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone connects behind the API's back between its check and its
    writes: the driver refuses the rest with EBUSY, and the answer says what
    had been written."""
    configure_target(client)
    fake_store = sysfs.write_attribute

    def racing(path: Path, data: bytes) -> None:
        fake_store(path, data)
        if path.name == "server_ip":
            fake_store(path.with_name("connect"), b"1\n")

    monkeypatch.setattr(sysfs, "write_attribute", racing)
    patch = {"server_ip": "192.0.2.1", "export": "other"}
    body = assert_error(client.patch("/v1/devices/netblk0/config", json=patch), 409, "busy")
    assert body["detail"] == (
        "export: the driver refused: the device is not disconnected or in error"
        " (already written: server_ip)"
    )
    assert driver.refused == [("netblk0", "export", errno.EBUSY)]
    assert driver.read("netblk0", "export") == "data"
