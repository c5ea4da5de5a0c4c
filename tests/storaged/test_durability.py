"""Acknowledged data survives: FLUSH/FUA reach fdatasync, kill -9 loses
nothing flushed, a FLUSH covers writes made on other connections to the
export, SIGTERM finishes in-flight requests and exits cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import pytest

from netblk.protocol.constants import BLOCK_SIZE, ExportFlag
from storaged._engine import FileStore
from storaged.client import ConnectionLost, RequestError
from storaged.server import StorageServer
from tests.storaged.stack import ServerProcess, Stack, run, serving


@pytest.fixture
def process(stack: Stack) -> Iterator[ServerProcess]:
    proc = ServerProcess(stack)
    yield proc
    proc.stop()


def test_flushed_writes_survive_kill_9(stack: Stack, process: ServerProcess) -> None:
    blocks = {i * 37: os.urandom(BLOCK_SIZE * 8) for i in range(64)}
    fua_block = os.urandom(BLOCK_SIZE)

    async def write_all() -> None:
        client = await stack.connect()
        await asyncio.gather(*(client.write(b * BLOCK_SIZE, d) for b, d in blocks.items()))
        await client.flush()
        await client.write(10_000 * BLOCK_SIZE, fua_block, fua=True)
        # No DISCONNECT: the server dies with this connection open.

    async def read_all() -> None:
        async with await stack.connect() as client:
            for block, data in blocks.items():
                assert await client.read(block * BLOCK_SIZE, len(data)) == data
            assert await client.read(10_000 * BLOCK_SIZE, BLOCK_SIZE) == fua_block

    process.start()
    run(write_all())
    assert process.signal(signal.SIGKILL) == -signal.SIGKILL
    process.start()
    run(read_all())


def syncs(server: StorageServer, export: str = "data") -> int:
    """Flushes the export's file store made (fdatasync calls that succeeded),
    as the control socket reports them."""
    store = server.exports[export].volume.engine.store
    assert isinstance(store, FileStore)
    assert server.snapshot()["volumes"][export]["syncs"] == store.syncs
    return store.syncs


def test_flush_and_fua_call_fdatasync(stack: Stack) -> None:
    """kill -9 keeps the page cache, so also prove the power-loss half: an
    acknowledged FLUSH or FUA write has been through fdatasync."""

    async def body() -> None:
        async with serving(stack) as server, await stack.connect() as client:
            await client.write(0, bytes(BLOCK_SIZE))
            assert syncs(server) == 0
            await client.flush()
            assert syncs(server) == 1
            await client.write(0, bytes(BLOCK_SIZE), fua=True)
            assert syncs(server) == 2
            await client.trim(0, BLOCK_SIZE)
            assert syncs(server) == 2
            await client.trim(0, BLOCK_SIZE, fua=True)
            assert syncs(server) == 3

    run(body())


def test_connections_to_one_export_are_coherent(stack: Stack) -> None:
    """What MULTI_CONN promises: one connection reads what another wrote, and
    a FLUSH on one makes the other's write durable (one store, one sync)."""
    data = os.urandom(BLOCK_SIZE)

    async def body() -> None:
        async with (
            serving(stack) as server,
            await stack.connect() as one,
            await stack.connect() as other,
        ):
            assert one.info.flags & ExportFlag.MULTI_CONN
            assert await other.read(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)
            await one.write(0, data)
            assert await other.read(0, BLOCK_SIZE) == data
            assert syncs(server) == 0
            await other.flush()
            assert syncs(server) == 1

    run(body())


async def wait_for_event(process: ServerProcess, event: str, timeout: float = 30) -> None:
    """Wait until storaged's JSON log has a record of ``event``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        lines = process.log_path.read_text().splitlines()
        if any(json.loads(line).get("event") == event for line in lines if line.startswith("{")):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"storaged never logged {event!r}")


def test_sigterm_finishes_in_flight_requests_then_exits_cleanly(
    stack: Stack, process: ServerProcess
) -> None:
    data = {i: os.urandom(64 * BLOCK_SIZE) for i in range(48)}

    async def body() -> None:
        client = await stack.connect()
        writes = [
            asyncio.ensure_future(client.write(i * 64 * BLOCK_SIZE, d)) for i, d in data.items()
        ]
        await asyncio.sleep(0.05)  # let some be in flight when the signal lands
        assert process.proc is not None
        os.kill(process.proc.pid, signal.SIGTERM)
        results = await asyncio.gather(*writes, return_exceptions=True)
        # Each write either completed or was never taken: none half-done.
        acknowledged = [i for i, r in zip(data, results, strict=True) if r is None]
        for result in results:
            assert result is None or isinstance(result, ConnectionLost | RequestError)
        assert acknowledged, "no write was in flight long enough to be finished"
        # The writes may all finish before storaged handles the signal; a
        # request it receives before then is rightly served.
        await wait_for_event(process, "shutdown")
        with pytest.raises(ConnectionLost):
            await client.read(0, BLOCK_SIZE)
        await client.close()
        assert process.proc.wait(timeout=60) == 0
        process.start()
        async with await stack.connect() as again:
            for i in acknowledged:
                assert await again.read(i * 64 * BLOCK_SIZE, 64 * BLOCK_SIZE) == data[i]

    process.start()
    run(body())
    log = [json.loads(line) for line in process.log_path.read_text().splitlines()]
    events = [entry.get("event") for entry in log]
    assert "shutdown" in events
    assert "stopped" in events
