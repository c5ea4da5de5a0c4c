"""Many requests on one device at once: they are serialized, so the API
never sends the driver a store it would refuse, every answer matches what
happened, and the device ends where the last request left it."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig
from tests.admin_api.conftest import AUTH
from tests.admin_api.fake_driver import FakeDriver

DEVICE = "/v1/devices/netblk0"
REQUESTS = 60
SEED = 4
#: Arrivals spread over this many seconds: some waits overlap, some finish alone.
SPREAD = 0.5


def run_with_client(config: ApiConfig, body: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=create_app(config))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=AUTH
        ) as client:
            return await asyncio.wait_for(body(client), timeout=60)

    return asyncio.run(main())


def test_concurrent_connects_disconnects_and_patches_stay_consistent(
    config: ApiConfig, driver: FakeDriver
) -> None:
    driver.step = 0.005
    rng = random.Random(SEED)
    kinds = [rng.choice(["connect", "disconnect", "patch", "tune"]) for _ in range(REQUESTS)]

    async def one(client: httpx.AsyncClient, kind: str) -> httpx.Response:
        await asyncio.sleep(rng.random() * SPREAD)
        if kind == "patch":
            return await client.patch(f"{DEVICE}/config", json={"server_port": 10911})
        if kind == "tune":
            return await client.patch(f"{DEVICE}/config", json={"reconnect_retries": 7})
        return await client.post(f"{DEVICE}/{kind}", params={"wait": "true", "timeout": "30"})

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        await client.patch(f"{DEVICE}/config", json={"server_ip": "127.0.0.1", "export": "data"})
        return list(await asyncio.gather(*(one(client, kind) for kind in kinds)))

    responses = run_with_client(config, body)

    outcomes = Counter(
        (kind, r.status_code, r.json().get("error"))
        for kind, r in zip(kinds, responses, strict=True)
    )
    allowed = {
        ("connect", 200, None),
        ("connect", 409, "busy"),  # already connected
        ("connect", 409, "preempted"),  # a disconnect was queued behind it
        ("disconnect", 200, None),
        ("patch", 200, None),
        ("patch", 409, "busy"),
        ("tune", 200, None),
    }
    assert set(outcomes) <= allowed, outcomes
    # Serialized: every check still held when its write landed.
    assert driver.refused == []
    stores = Counter(attr for _, attr, _ in driver.stores)
    connects = outcomes["connect", 200, None] + outcomes["connect", 409, "preempted"]
    assert stores["connect"] == connects
    assert stores["disconnect"] == outcomes["disconnect", 200, None]
    # The device ends where the last action left it, once it settles.
    last = next(attr for _, attr, _ in reversed(driver.stores) if attr in ("connect", "disconnect"))
    deadline = time.monotonic() + 10
    while driver.state("netblk0") in ("connecting", "handshaking"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert driver.state("netblk0") == {"connect": "connected", "disconnect": "disconnected"}[last]
    # Every 200 shows the goal state it waited for.
    for kind, response in zip(kinds, responses, strict=True):
        if kind in ("connect", "disconnect") and response.status_code == 200:
            assert response.json()["state"] == f"{kind}ed"


def test_a_disconnect_cuts_a_hanging_wait_short(config: ApiConfig, driver: FakeDriver) -> None:
    driver.outcome["netblk0"] = "hang"

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, float]:
        await client.patch(f"{DEVICE}/config", json={"server_ip": "127.0.0.1", "export": "data"})
        started = time.monotonic()
        connect = asyncio.create_task(client.post(f"{DEVICE}/connect?wait=true&timeout=60"))
        while driver.state("netblk0") != "handshaking":
            await asyncio.sleep(0.01)
        disconnect = await client.post(f"{DEVICE}/disconnect?wait=true")
        return await connect, disconnect, time.monotonic() - started

    connect, disconnect, elapsed = run_with_client(config, body)
    assert connect.status_code == 409
    assert connect.json() == {
        "error": "preempted",
        "detail": "a disconnect request arrived while waiting",
        "state": "handshaking",
    }
    assert disconnect.status_code == 200
    assert disconnect.json()["state"] == "disconnected"
    assert elapsed < 10  # not the connect's 60 s
