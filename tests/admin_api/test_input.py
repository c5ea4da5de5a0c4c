"""Input limits: a body over MAX_BODY_BYTES is a 413 before any handler runs,
whether its Content-Length says so or a streamed body grows past it; every
request field takes exactly its schema's type, spelled as JSON spells it
(422 otherwise, nothing written), and the legitimate forms still pass."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from netblk.protocol.constants import (
    DEAD_TIMEOUT_MS_MAX,
    DEAD_TIMEOUT_MS_MIN,
    MAX_EXPORT_NAME,
    MAX_SERVERS,
    RECONNECT_RETRIES_MAX,
    RECONNECT_RETRIES_MIN,
    REQUEST_TIMEOUT_MS_MAX,
    REQUEST_TIMEOUT_MS_MIN,
)
from netblk_admin.app import MAX_BODY_BYTES, create_app
from netblk_admin.config import ApiConfig
from netblk_admin.models import MAX_WAIT, PORT_MAX, PORT_MIN
from tests.admin_api.conftest import AUTH
from tests.admin_api.fake_driver import FakeDriver
from tests.admin_api.test_app import GUARDED, assert_error

CONFIG = "/v1/devices/netblk0/config"
JSON = {"Content-Type": "application/json"}
#: Every operation, health included.
OPERATIONS = [(method, path) for method, path, _ in GUARDED] + [("GET", "/v1/health")]


class Untouchable:
    """Stands in for the app's DeviceControl: any use means a handler ran."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(name)
        raise AssertionError(f"a handler ran: control.{name}")


def guarded_app(config: ApiConfig) -> tuple[FastAPI, Untouchable]:
    app, control = create_app(config), Untouchable()
    app.state.control = control
    return app, control


def assert_too_large(response: Any) -> None:
    body = assert_error(response, 413, "too_large")
    assert str(MAX_BODY_BYTES) in body["detail"]
    assert response.headers["connection"] == "close"  # the rest is never read


# --- the body cap ------------------------------------------------------------


def test_the_largest_valid_body_is_far_under_the_cap(client: TestClient) -> None:
    # Every field at its longest: 8 IPv6 servers of 45 characters with ports.
    servers = [
        {"ip": f"0000:0000:0000:0000:0000:ffff:255.255.255.24{i}", "port": PORT_MAX}
        for i in range(MAX_SERVERS)
    ]
    patch = {
        "servers": servers,
        "server_port": PORT_MAX,
        "export": "x" * MAX_EXPORT_NAME,
        "request_timeout_ms": REQUEST_TIMEOUT_MS_MAX,
        "dead_timeout_ms": DEAD_TIMEOUT_MS_MAX,
        "reconnect_retries": RECONNECT_RETRIES_MAX,
    }
    body = json.dumps(patch, indent=4).encode()
    assert 8 * len(body) < MAX_BODY_BYTES
    response = client.patch(CONFIG, content=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert len(response.json()["config"]["servers"]) == MAX_SERVERS


def test_a_body_at_the_cap_passes_and_one_byte_more_is_413(
    client: TestClient, driver: FakeDriver
) -> None:
    at_cap = b'{"server_port": 10911}'.ljust(MAX_BODY_BYTES)  # trailing blanks are JSON
    assert client.patch(CONFIG, content=at_cap, headers=JSON).status_code == 200
    driver.stores.clear()
    before = driver.files()
    assert_too_large(client.patch(CONFIG, content=at_cap + b" ", headers=JSON))
    assert driver.stores == []
    assert driver.files() == before


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_a_content_length_over_the_cap_is_413_before_anything_runs(
    config: ApiConfig, driver: FakeDriver, method: str, path: str
) -> None:
    """No token either: the cap comes before authentication and routing."""
    app, control = guarded_app(config)
    with TestClient(app) as client:
        response = client.request(method, path, content=b"{" * (MAX_BODY_BYTES + 1), headers=JSON)
    assert_too_large(response)
    assert control.touched == []
    assert driver.stores == []


#: A streamed body that would go on this long: far past the cap, yet finite,
#: so a server that reads it all ends too (and fails the test).
STREAM_BYTES = 4 * 1024 * 1024


@pytest.mark.parametrize("chunk", [1000, 64 * 1024], ids=["small-chunks", "one-big-chunk"])
def test_a_streamed_body_is_cut_off_once_past_the_cap(
    config: ApiConfig, driver: FakeDriver, chunk: int
) -> None:
    """Chunked, no Content-Length: the API stops reading just past the cap."""
    app, control = guarded_app(config)
    pulled = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal pulled
        while pulled * chunk < STREAM_BYTES:
            pulled += 1
            yield b" " * chunk

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.patch(CONFIG, content=stream(), headers=AUTH | JSON)

    response = asyncio.run(main())
    assert "content-length" not in response.request.headers
    assert_too_large(response)
    assert pulled == MAX_BODY_BYTES // chunk + 1  # the first chunk past the cap, no more
    assert control.touched == []
    assert driver.stores == []


# --- strict types in bodies --------------------------------------------------

#: Each integer field of each request body, a valid value, and where the
#: value sits: ``{}`` is replaced by its JSON text.
INTEGERS = {
    "server_port": (10910, '{"server_port": {}}', ["server_port"]),
    "request_timeout_ms": (5000, '{"request_timeout_ms": {}}', ["request_timeout_ms"]),
    "dead_timeout_ms": (0, '{"dead_timeout_ms": {}}', ["dead_timeout_ms"]),  # false is 0
    "reconnect_retries": (1, '{"reconnect_retries": {}}', ["reconnect_retries"]),  # true is 1
    "servers.port": (
        10911,
        '{"servers": [{"ip": "192.0.2.1", "port": {}}]}',
        ["servers", 0, "port"],
    ),
}
#: Each string field, the same way.
STRINGS = {
    "server_ip": ("192.0.2.1", '{"server_ip": {}}', ["server_ip"]),
    "export": ("data", '{"export": {}}', ["export"]),
    "servers.ip": ("192.0.2.1", '{"servers": [{"ip": {}}]}', ["servers", 0, "ip"]),
}


def not_integers(value: int) -> list[str]:
    """The same number spelled as anything but a JSON integer."""
    return [f"{value}.0", f"{value}e0", f"{value}.0e0", f'"{value}"', f"[{value}]", "true", "false"]


def not_strings(value: str) -> list[str]:
    return ["1", "1.5", "true", f'["{value}"]', f'{{"ip": "{value}"}}']


def typed_cases() -> list[Any]:
    cases = [
        pytest.param(
            template, loc, spelling, "Input should be a valid integer", id=f"{f}={spelling}"
        )
        for f, (value, template, loc) in INTEGERS.items()
        for spelling in not_integers(value)
    ]
    cases += [
        pytest.param(
            template, loc, spelling, "Input should be a valid string", id=f"{f}={spelling}"
        )
        for f, (value, template, loc) in STRINGS.items()
        for spelling in not_strings(value)
    ]
    return cases


@pytest.mark.parametrize(("template", "loc", "spelling", "msg"), typed_cases())
def test_a_field_of_another_json_type_is_422_and_writes_nothing(
    client: TestClient, driver: FakeDriver, template: str, loc: list[Any], spelling: str, msg: str
) -> None:
    before = driver.files()
    body = template.replace("{}", spelling)
    response = client.patch(CONFIG, content=body.encode(), headers=JSON)
    error = assert_error(response, 422, "invalid_request")
    assert {"loc": ["body", *loc], "msg": msg} in [
        {"loc": issue["loc"], "msg": issue["msg"]} for issue in error["detail"]
    ], error
    assert driver.stores == []
    assert driver.files() == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server_port", PORT_MIN),
        ("server_port", PORT_MAX),
        ("request_timeout_ms", REQUEST_TIMEOUT_MS_MIN),
        ("request_timeout_ms", REQUEST_TIMEOUT_MS_MAX),
        ("dead_timeout_ms", DEAD_TIMEOUT_MS_MIN),
        ("dead_timeout_ms", DEAD_TIMEOUT_MS_MAX),
        ("reconnect_retries", RECONNECT_RETRIES_MIN),
        ("reconnect_retries", RECONNECT_RETRIES_MAX),
    ],
)
def test_integers_written_as_integers_pass(
    client: TestClient, driver: FakeDriver, field: str, value: int
) -> None:
    response = client.patch(CONFIG, content=f'{{ "{field}" : {value} }}', headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["config"][field] == value
    assert driver.stores == [("netblk0", field, str(value))]


# --- strict types in the query -----------------------------------------------

NOT_BOOLEANS = ["yes", "no", "on", "off", "1", "0", "t", "f", "y", "n", "True", "FALSE", "true "]
NOT_NUMBERS = [" 5", "5 ", "+5", ".5", "5.", "05", "5_0", "1e1e1", "0x10", "inf", "NaN"]


@pytest.mark.parametrize("action", ["connect", "disconnect"])
@pytest.mark.parametrize(
    ("query", "msg"),
    [(f"wait={value}", "Input should be true or false") for value in NOT_BOOLEANS]
    + [
        (f"wait=true&timeout={value}", "Input should be a number written as in JSON")
        for value in NOT_NUMBERS
    ],
)
def test_query_values_not_spelled_as_json_are_422_and_write_nothing(
    client: TestClient, driver: FakeDriver, action: str, query: str, msg: str
) -> None:
    response = client.post(f"/v1/devices/netblk0/{action}", params=httpx.QueryParams(query))
    error = assert_error(response, 422, "invalid_request")
    name = query.rpartition("&")[2].partition("=")[0]
    assert [(issue["loc"], issue["msg"]) for issue in error["detail"]] == [(["query", name], msg)]
    assert driver.stores == []


@pytest.mark.parametrize("timeout", ["5", "0.5", "1e1", "1E1", "1.5e-1", "6e2", str(int(MAX_WAIT))])
def test_query_values_spelled_as_json_pass(
    client: TestClient, driver: FakeDriver, timeout: str
) -> None:
    path = "/v1/devices/netblk0/disconnect"
    response = client.post(path, params={"wait": "true", "timeout": timeout})
    assert response.status_code == 200, response.text
    assert client.post(path, params={"wait": "false"}).status_code == 202


def test_openapi_declares_the_cap_and_the_types(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()]
    assert len(operations) == len(OPERATIONS)
    for path, operation in operations:
        assert "413" in operation["responses"], path
    assert str(MAX_BODY_BYTES) in spec["info"]["description"]
    parameters = spec["paths"]["/v1/devices/{name}/connect"]["post"]["parameters"]
    schemas = {parameter["name"]: parameter["schema"] for parameter in parameters}
    assert schemas["wait"]["type"] == "boolean"
    assert schemas["timeout"]["type"] == "number"
    assert (schemas["timeout"]["exclusiveMinimum"], schemas["timeout"]["maximum"]) == (0, MAX_WAIT)
    components = spec["components"]["schemas"]
    for field in ("server_port", "request_timeout_ms", "dead_timeout_ms", "reconnect_retries"):
        assert components["ConfigPatch"]["properties"][field]["type"] == "integer"
    assert components["ServerAddress"]["properties"]["port"]["type"] == "integer"
