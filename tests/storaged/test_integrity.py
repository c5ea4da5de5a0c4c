"""Data integrity through the real server: concurrent clients against a model,
pipelined out-of-order replies, holes, and no plaintext at rest."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from typing import Any

import pytest

from netblk.protocol.codec import NEED_DATA, ClientConnection, HelloReply, Reply
from netblk.protocol.constants import BLOCK_SIZE, Cmd, Errno, LoginStatus
from storaged import session
from storaged.client import NetblkClient
from tests.storaged.stack import VOLUME_SIZE, Stack, ThreadedServer, raw_tls_socket, run, serving

BLOCKS = VOLUME_SIZE // BLOCK_SIZE


class Model:
    """What a region of the export must contain: block index -> contents."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}

    def expect(self, first: int, count: int) -> bytes:
        zero = bytes(BLOCK_SIZE)
        return b"".join(self.blocks.get(b, zero) for b in range(first, first + count))

    def store(self, first: int, data: bytes) -> None:
        for i in range(len(data) // BLOCK_SIZE):
            self.blocks[first + i] = data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]

    def erase(self, first: int, count: int) -> None:
        for b in range(first, first + count):
            self.blocks.pop(b, None)


async def random_batch(
    client: NetblkClient, model: Model, rng: random.Random, region: range, size: int
) -> None:
    """Issue ``size`` concurrent requests on disjoint extents, then update
    the model: requests in flight together never overlap, as on a disk."""
    starts = sorted(rng.sample(range(region.start, region.stop, 16), size))
    ops = []
    for first in starts:
        count = rng.randint(1, 16)
        kind = rng.choices(["read", "write", "fua", "trim", "zero", "flush"], [4, 4, 1, 1, 1, 1])[0]
        ops.append((kind, first, count, rng.randbytes(count * BLOCK_SIZE)))

    async def one(kind: str, first: int, count: int, data: bytes) -> bytes | None:
        offset, length = first * BLOCK_SIZE, count * BLOCK_SIZE
        if kind == "read":
            return await client.read(offset, length)
        if kind in ("write", "fua"):
            await client.write(offset, data, fua=kind == "fua")
        elif kind == "trim":
            await client.trim(offset, length)
        elif kind == "zero":
            await client.write_zeroes(offset, length, no_hole=rng.random() < 0.5)
        else:
            await client.flush()
        return None

    results = await asyncio.gather(*(one(*op) for op in ops))
    for (kind, first, count, data), result in zip(ops, results, strict=True):
        if kind == "read":
            assert result == model.expect(first, count), f"read of block {first}+{count}"
        elif kind in ("write", "fua"):
            model.store(first, data)
        elif kind in ("trim", "zero"):
            model.erase(first, count)


def test_concurrent_clients_match_the_model(stack: Stack) -> None:
    """Four connections (three clients' sessions on two exports), each with
    up to 24 requests in flight, random ops; every read checked, and a full
    read-back at the end, also by a read-only client on another connection."""
    regions = [range(0, 2048), range(2048, 4096), range(4096, 6144)]

    async def worker(region: range, seed: int) -> Model:
        rng = random.Random(seed)
        model = Model()
        async with await stack.connect("data", "alice") as client:
            for _ in range(12):
                await random_batch(client, model, rng, region, rng.randint(1, 24))
            for first in range(region.start, region.stop, 256):
                assert await client.read(first * BLOCK_SIZE, 256 * BLOCK_SIZE) == model.expect(
                    first, 256
                )
        return model

    async def other_export(seed: int) -> Model:
        rng = random.Random(seed)
        model = Model()
        async with await stack.connect("other", "bob") as client:
            for _ in range(12):
                await random_batch(client, model, rng, range(0, 2048), rng.randint(1, 24))
        return model

    async def body() -> None:
        async with serving(stack):
            models = await asyncio.gather(
                *(worker(region, seed) for seed, region in enumerate(regions)), other_export(99)
            )
            async with await stack.connect("data", "bob") as reader:
                assert reader.info.read_only
                for region, model in zip(regions, models, strict=False):
                    length = len(region) * BLOCK_SIZE
                    got = await reader.read(region.start * BLOCK_SIZE, min(length, 1 << 20))
                    assert got == model.expect(region.start, min(len(region), 256))

    run(body())


def test_forty_requests_in_flight_complete_out_of_order(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FLUSH held inside the server while 40 READs pipelined behind it on
    the same connection are answered: replies come back out of order, and
    at least 41 requests are in flight at once."""
    release = threading.Event()
    real_flush = session.flush

    def held_flush(*args: Any) -> Any:
        assert release.wait(timeout=30), "flush was never released"
        return real_flush(*args)

    monkeypatch.setattr(session, "flush", held_flush)
    with ThreadedServer(stack) as ts, raw_tls_socket(stack) as sock:
        conn = ClientConnection()
        sock.sendall(conn.send_hello("data", stack.tokens["alice"].encode()))
        frames = [conn.send_request(Cmd.FLUSH, 1)]
        frames += [conn.send_request(Cmd.READ, h, h * BLOCK_SIZE, BLOCK_SIZE) for h in range(2, 42)]
        sock.sendall(b"".join(frames))
        order = []
        while len(order) < 41:
            if len(order) == 40:
                release.set()
            conn.receive_data(sock.recv(65536))
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, HelloReply):
                    assert event.status is LoginStatus.OK
                else:
                    assert isinstance(event, Reply)
                    assert event.error is Errno.OK
                    order.append(event.handle)
        assert sorted(order) == list(range(1, 42))
        assert order[-1] == 1, "the held FLUSH must be answered last"
        assert ts.server is not None
        requests = ts.server.snapshot()["exports"]["data"]["requests"]
        assert requests == {"flush": 1, "read": 40}


def test_never_written_and_trimmed_blocks_read_zero_and_free_space(stack: Stack) -> None:
    path = stack.volume_path("data")

    async def body() -> None:
        async with serving(stack), await stack.connect() as client:
            assert await client.read(0, 1 << 20) == bytes(1 << 20)
            allocated_before = os.stat(path).st_blocks
            await client.write(0, os.urandom(1 << 20))
            await client.flush()
            allocated_written = os.stat(path).st_blocks
            await client.trim(0, 1 << 20)
            await client.flush()
            assert await client.read(0, 1 << 20) == bytes(1 << 20)
            assert os.stat(path).st_blocks < allocated_written
            assert allocated_written - allocated_before >= (1 << 20) // 512
            # WRITE_ZEROES keeping allocation reads zero but stays allocated.
            await client.write(1 << 20, os.urandom(1 << 20))
            await client.write_zeroes(1 << 20, 1 << 20, no_hole=True)
            await client.flush()
            assert await client.read(1 << 20, 1 << 20) == bytes(1 << 20)

    run(body())
    # The sparse file never grew past its nominal size.
    assert path.stat().st_size == 16 * (1 << 20) + VOLUME_SIZE


def test_plaintext_never_reaches_the_volume_file(stack: Stack) -> None:
    canary = b"NETBLK-PLAINTEXT-CANARY-0123456789abcdef"
    pattern = (canary * (BLOCK_SIZE // len(canary) + 1))[:BLOCK_SIZE] * 64

    async def body() -> None:
        async with serving(stack), await stack.connect() as client:
            await client.write(8 * BLOCK_SIZE, pattern)
            await client.flush()
            assert await client.read(8 * BLOCK_SIZE, len(pattern)) == pattern

    run(body())
    raw = stack.volume_path("data").read_bytes()
    assert canary not in raw
    assert canary[:16] not in raw
    # And the ciphertext is where the data went: not holes.
    start = 16 * (1 << 20) + 8 * BLOCK_SIZE
    assert raw[start : start + len(pattern)].count(0) < len(pattern) // 100
