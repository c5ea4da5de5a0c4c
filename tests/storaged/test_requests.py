"""storaged._requests: plain READs and WRITEs run in C take exactly the frames
the codec would accept, and do to the volume and its cache what the Python
path does."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netblk.protocol.codec import (
    ExportGeometry,
    ProtocolError,
    Request,
    ServerConnection,
    encode_reply,
    encode_request,
)
from netblk.protocol.constants import (
    BLOCK_SIZE,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ExportFlag,
)
from storaged._requests import Runner
from storaged.cache import SectorCache
from storaged.client import RequestError
from storaged.engine import execute
from storaged.luks2 import Luks2Error, SectorCipher, VolumeInfo
from storaged.session import Session
from storaged.stats import RequestRecord
from storaged.volume import CACHE_MAX_READ, Volume
from tests.netblk.protocol.accepted import ALL_FLAGS, accepted
from tests.storaged.stack import Stack, run, serving

BLOCKS = 64
MAX_PAYLOAD = 16 * BLOCK_SIZE
DATA_OFFSET = 2 * BLOCK_SIZE
#: Handle of a FLUSH each codec below leaves in flight.
IN_FLIGHT = 99


@pytest.fixture(params=[(BLOCK_SIZE, 0), (512, 2**63 + 5)], ids=["4k-sectors", "512-sectors"])
def volume(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    sector_size, iv_tweak = request.param
    path = tmp_path / "volume"
    path.write_bytes(bytes(DATA_OFFSET + BLOCKS * BLOCK_SIZE))
    info = VolumeInfo(
        uuid="",
        label="",
        cipher="aes-xts-plain64",
        key_size_bits=512,
        sector_size=sector_size,
        iv_tweak=iv_tweak,
        data_offset=DATA_OFFSET,
        data_size=BLOCKS * BLOCK_SIZE,
        seqid=0,
        keyslots=(),
    )
    vol = Volume(path, os.urandom(64), info, SectorCache(BLOCKS * BLOCK_SIZE, sector_size))
    yield vol
    vol.close()


def logged_in(*, read_only: bool, max_payload: int = MAX_PAYLOAD) -> ServerConnection:
    """A codec serving the fixture's volume, with FLUSH ``IN_FLIGHT`` taken."""
    flags = ALL_FLAGS | (ExportFlag.READ_ONLY if read_only else ExportFlag(0))
    conn = accepted(ExportGeometry(size=BLOCKS * BLOCK_SIZE, flags=flags, max_payload=max_payload))
    conn.receive_data(encode_request(Cmd.FLUSH, IN_FLIGHT))
    assert isinstance(conn.next_event(), Request)
    return conn


def frame(
    opcode: int,
    handle: int,
    offset: int,
    length: int,
    *,
    flags: int = 0,
    magic: int = REQUEST_MAGIC,
    reserved: int = 0,
    payload: bytes | None = None,
) -> bytes:
    header = bytearray(encode_request(opcode, handle, offset, length, flags))
    header[0:4] = magic.to_bytes(4, "big")
    header[28:32] = reserved.to_bytes(4, "big")
    if payload is None:
        payload = os.urandom(length) if opcode == Cmd.WRITE else b""
    return bytes(header) + payload


def run_frames(
    volume: Volume,
    conn: ServerConnection,
    data: bytes,
    *,
    read_only: bool = False,
    room: int = 64,
    payload_room: int = 1 << 30,
) -> tuple[int, int, list[bytes], list[RequestRecord]]:
    runner = volume.runner(max_payload=MAX_PAYLOAD, writable=not read_only)
    conn.receive_data(data)
    replies: list[bytes] = []
    records: list[RequestRecord] = []
    taken, payload = conn.run_requests(runner, room, payload_room, replies, records)
    return taken, payload, replies, records


def plain(event: object) -> bool:
    """Whether the codec's event is one the runner must take."""
    return (
        isinstance(event, Request)
        and event.opcode in (Cmd.READ, Cmd.WRITE)
        and event.flags == CmdFlag(0)
    )


offsets = st.one_of(
    st.integers(0, BLOCKS - 1).map(lambda block: block * BLOCK_SIZE),
    st.sampled_from([1, 512, (BLOCKS - 1) * BLOCK_SIZE, BLOCKS * BLOCK_SIZE, 2**64 - BLOCK_SIZE]),
)
lengths = st.one_of(
    st.integers(1, 17).map(lambda blocks: blocks * BLOCK_SIZE),
    st.sampled_from(
        [0, 512, BLOCK_SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + BLOCK_SIZE, 2**32 - BLOCK_SIZE]
    ),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    opcode=st.sampled_from([Cmd.READ, Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, 9]),
    flags=st.sampled_from([0, 0, 0, int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), 0x8000]),
    handle=st.sampled_from([1, 2**64 - 1, IN_FLIGHT]),
    offset=offsets,
    length=lengths,
    magic=st.sampled_from([REQUEST_MAGIC, REQUEST_MAGIC, REQUEST_MAGIC, 0x4E424C52]),
    reserved=st.sampled_from([0, 0, 0, 1]),
    cut=st.sampled_from([0, 0, 0, 1, 20]),
    read_only=st.booleans(),
)
def test_the_runner_takes_exactly_the_plain_requests_the_codec_accepts(
    volume: Volume,
    opcode: int,
    flags: int,
    handle: int,
    offset: int,
    length: int,
    magic: int,
    reserved: int,
    cut: int,
    read_only: bool,
) -> None:
    """The same frame (possibly cut short) to the runner and to the codec:
    the runner takes it if and only if the codec makes a READ or WRITE
    without flags of it, answers it as the Python path would, and
    otherwise consumes nothing."""
    payload = os.urandom(min(length, MAX_PAYLOAD + BLOCK_SIZE)) if opcode == Cmd.WRITE else b""
    data = frame(
        opcode, handle, offset, length, flags=flags, magic=magic, reserved=reserved, payload=payload
    )
    data = data[: len(data) - cut]
    in_c = logged_in(read_only=read_only)
    in_python = logged_in(read_only=read_only)
    taken, taken_payload, replies, records = run_frames(volume, in_c, data, read_only=read_only)
    in_python.receive_data(data)
    try:
        event: object = in_python.next_event()
    except ProtocolError as exc:
        event = exc
    assert taken == plain(event), (event, taken)
    if not taken:
        assert (in_c.buffered, taken_payload, replies, records) == (len(data), 0, [], [])
        return
    assert isinstance(event, Request)
    assert in_c.buffered == 0 and taken_payload == length
    assert replies[0] == encode_reply(handle, Errno.OK)
    op, recorded_length, error, hit, seconds = records[0]
    assert (op, recorded_length, error) == (event.opcode, length, Errno.OK) and seconds > 0
    if event.opcode is Cmd.READ:
        assert replies[1:] == [execute(volume, event).data] and hit is not None
    else:
        assert len(replies) == 1 and hit is None
        assert volume.read(offset, length).data == payload


def test_a_run_stops_at_the_first_frame_it_does_not_take(volume: Volume) -> None:
    """READ, WRITE, READ run in C; the FLUSH after them is the codec's, and
    the READ after the FLUSH is C's again."""
    conn = logged_in(read_only=False)
    written = os.urandom(2 * BLOCK_SIZE)
    stream = [
        frame(Cmd.READ, 1, 0, BLOCK_SIZE),
        frame(Cmd.WRITE, 2, 4 * BLOCK_SIZE, 2 * BLOCK_SIZE, payload=written),
        frame(Cmd.READ, 3, 4 * BLOCK_SIZE, 2 * BLOCK_SIZE),
        frame(Cmd.FLUSH, 4, 0, 0),
        frame(Cmd.READ, 5, 5 * BLOCK_SIZE, BLOCK_SIZE),
    ]
    taken, payload, replies, records = run_frames(volume, conn, b"".join(stream))
    assert (taken, payload) == (3, 5 * BLOCK_SIZE)
    assert [record[0] for record in records] == [Cmd.READ, Cmd.WRITE, Cmd.READ]
    assert replies[0] == encode_reply(1, Errno.OK) and replies[1] == bytes(BLOCK_SIZE)
    assert replies[2] == encode_reply(2, Errno.OK)
    assert replies[3:] == [encode_reply(3, Errno.OK), written]
    assert conn.buffered == len(stream[3]) + len(stream[4])
    assert conn.next_event() == Request(Cmd.FLUSH, CmdFlag(0), 4, 0, 0)
    taken, _, replies, _ = run_frames(volume, conn, b"")
    assert taken == 1 and replies == [encode_reply(5, Errno.OK), written[BLOCK_SIZE:]]


@pytest.mark.parametrize(
    ("room", "payload_room", "expected"),
    [(2, 1 << 30, 2), (64, 0, 1), (64, BLOCK_SIZE, 2), (64, 2 * BLOCK_SIZE - 1, 2), (0, 0, 0)],
)
def test_a_run_keeps_to_its_room(
    volume: Volume, room: int, payload_room: int, expected: int
) -> None:
    """Another request is taken while fewer than ``room`` were and the
    payload taken is at most ``payload_room`` (Session's batch bounds)."""
    conn = logged_in(read_only=False)
    stream = b"".join(frame(Cmd.READ, handle, 0, BLOCK_SIZE) for handle in range(1, 5))
    taken, payload, _, _ = run_frames(volume, conn, stream, room=room, payload_room=payload_room)
    assert (taken, payload) == (expected, expected * BLOCK_SIZE)
    assert conn.buffered == len(stream) - expected * len(frame(Cmd.READ, 1, 0, BLOCK_SIZE))


def test_reads_and_writes_in_c_keep_the_cache_coherent(volume: Volume) -> None:
    """A range read twice is taken into the cache, the third read hits; a
    WRITE in C drops it, so the next read misses and returns the new data;
    and a WRITE through Volume.write drops what C filled."""
    conn = logged_in(read_only=False)
    hits: list[bool | None] = []
    first, second = os.urandom(BLOCK_SIZE), os.urandom(BLOCK_SIZE)
    for handle, data in enumerate(
        [
            frame(Cmd.WRITE, 1, 0, BLOCK_SIZE, payload=first),
            frame(Cmd.READ, 2, 0, BLOCK_SIZE),
            frame(Cmd.READ, 3, 0, BLOCK_SIZE),
            frame(Cmd.READ, 4, 0, BLOCK_SIZE),
            frame(Cmd.WRITE, 5, 0, BLOCK_SIZE, payload=second),
            frame(Cmd.READ, 6, 0, BLOCK_SIZE),
        ],
        start=1,
    ):
        taken, _, replies, records = run_frames(volume, conn, data)
        assert taken == 1, handle
        hits.append(records[0][3])
        if len(replies) == 2:
            assert replies[1] == (first if handle < 5 else second), handle
    assert hits == [None, False, False, True, None, False]
    run_frames(volume, conn, frame(Cmd.READ, 7, 0, BLOCK_SIZE))  # in the cache again
    third = os.urandom(BLOCK_SIZE)
    volume.write(0, third, fua=False)
    _, _, replies, records = run_frames(volume, conn, frame(Cmd.READ, 8, 0, BLOCK_SIZE))
    assert replies[1] == third and records[0][3] is False


@pytest.mark.parametrize(
    ("good", "failing", "mode"),
    [(Cmd.READ, Cmd.WRITE, os.O_RDONLY), (Cmd.WRITE, Cmd.READ, os.O_WRONLY)],
)
def test_failed_file_io_is_left_to_the_codec(
    volume: Volume, good: Cmd, failing: Cmd, mode: int
) -> None:
    """pread or pwrite fails (EBADF: the volume's descriptor swapped for one
    opened the other way): the request before it ran in C, the failing
    frame is not consumed, and the codec and engine answer it with EIO."""
    swapped = os.open(volume.path, mode)
    os.dup2(swapped, volume._fd)
    os.close(swapped)
    conn = logged_in(read_only=False)
    stream = frame(good, 1, BLOCK_SIZE, BLOCK_SIZE) + frame(failing, 2, 0, BLOCK_SIZE)
    taken, payload, replies, records = run_frames(volume, conn, stream)
    assert (taken, payload) == (1, BLOCK_SIZE)
    assert replies[0] == encode_reply(1, Errno.OK) and records[0][0] is good
    event = conn.next_event()
    assert isinstance(event, Request) and event.handle == 2
    assert execute(volume, event).error is Errno.IO


class FailsPartWay:
    """A volume's cipher whose pwrite writes the first sector of its data,
    then fails as a full file system would."""

    def __init__(self, real: SectorCipher, sector_size: int) -> None:
        self._real = real
        self._sector_size = sector_size

    def pwrite(self, fd: int, position: int, segment_offset: int, data: bytes) -> None:
        self._real.pwrite(fd, position, segment_offset, data[: self._sector_size])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("change", ["write", "write_zeroes", "trim"])
def test_a_change_that_fails_part_way_leaves_nothing_stale_cached(
    volume: Volume, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached sectors a failed WRITE, WRITE_ZEROES or TRIM may have changed
    are dropped: later reads agree with the disk, not the old plaintext."""
    length, sector = 4 * BLOCK_SIZE, volume.sector_size
    old, new = os.urandom(length), os.urandom(length)
    volume.write(0, old, fua=False)
    for hit in (False, False, True):  # remembered, filled, then a hit
        assert volume.read(0, length) == (old, hit)
    deallocate = volume._deallocate

    def deallocate_part_way(offset: int, length: int) -> None:
        deallocate(offset, sector)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(volume, "_cipher", FailsPartWay(volume._cipher, sector))
    monkeypatch.setattr(volume, "_deallocate", deallocate_part_way)
    with pytest.raises(OSError, match="No space"):
        if change == "write":
            volume.write(0, new, fua=False)
        elif change == "write_zeroes":
            volume.write_zeroes(0, length, no_hole=True, fua=False)
        else:
            volume.trim(0, length, fua=False)
    monkeypatch.undo()
    first = new[:sector] if change == "write" else bytes(sector)
    assert volume.read(0, length) == (first + old[sector:], False)


def test_a_failed_read_is_run_once_in_c_and_once_by_the_codec(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the server: a WRITE and a READ pipelined, the READ's pread
    fails: it asks the cache once in C and once on the codec's path (not
    again in C), and the client gets EIO for it while the WRITE lands."""
    asked: list[int] = []
    real_lookup = SectorCache.lookup

    def recorded_lookup(self: SectorCache, volume: int, first: int, *args: Any, **kw: Any) -> Any:
        asked.append(first)
        return real_lookup(self, volume, first, *args, **kw)

    real_receive = Session._receive

    def unhurried_receive(self: Session) -> None:
        time.sleep(0.2)  # so the WRITE and the READ arrive in one receive
        real_receive(self)

    monkeypatch.setattr(SectorCache, "lookup", recorded_lookup)
    monkeypatch.setattr(Session, "_receive", unhurried_receive)
    data = os.urandom(BLOCK_SIZE)

    async def body() -> None:
        async with serving(stack) as server:
            volume = server.exports["data"].volume
            write_only = os.open(volume.path, os.O_WRONLY)
            os.dup2(write_only, volume._fd)  # before login: the runner dups it
            os.close(write_only)
            async with await stack.connect() as client:
                written, read = await asyncio.gather(
                    client.write(BLOCK_SIZE, data),
                    client.read(0, BLOCK_SIZE),
                    return_exceptions=True,
                )
        assert written is None
        assert isinstance(read, RequestError) and read.error is Errno.IO

    run(body())
    assert asked == [0, 0]


def test_the_server_runs_plain_reads_and_writes_in_c(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole server, READs and WRITEs go through the runner
    (and come back right); a FUA WRITE goes through the codec."""
    taken: list[int] = []
    real = ServerConnection.run_requests

    def counted(self: ServerConnection, *args: Any) -> tuple[int, int]:
        result = real(self, *args)
        taken.append(result[0])
        return result

    monkeypatch.setattr(ServerConnection, "run_requests", counted)
    executed: list[Cmd] = []
    real_take = Session._take

    def recorded_take(self: Session, request: Request, batch: Any) -> None:
        executed.append(request.opcode)
        real_take(self, request, batch)

    monkeypatch.setattr(Session, "_take", recorded_take)
    data = os.urandom(8 * BLOCK_SIZE)

    async def body() -> None:
        async with serving(stack), await stack.connect() as client:
            await client.write(0, data)
            assert await client.read(0, len(data)) == data
            await client.write(0, data[:BLOCK_SIZE], fua=True)

    run(body())
    assert sum(taken) == 2
    assert executed == [Cmd.WRITE]


def test_the_runner_reads_no_further_than_its_buffer(volume: Volume) -> None:
    """Called directly (the codec never passes less than a header): a
    partial header is not a frame, and a start outside the buffer an error."""
    runner = volume.runner(max_payload=MAX_PAYLOAD, writable=True)
    whole = bytearray(frame(Cmd.READ, 1, 0, BLOCK_SIZE))
    assert runner.run(whole[:-1], 0, set(), 64, 1 << 30, [], []) == (0, 0, 0)
    assert runner.run(whole, 1, set(), 64, 1 << 30, [], []) == (0, 0, 0)
    with pytest.raises(ValueError, match="start outside"):
        runner.run(whole, len(whole) + 1, set(), 64, 1 << 30, [], [])


def test_the_runner_keeps_its_own_descriptor(volume: Volume, tmp_path: Path) -> None:
    """The runner writes through a duplicate of the volume's descriptor,
    closed with the runner: a volume closed under a connection still
    running (a stuck one at shutdown) cannot have its number reused
    beneath it, and a finished connection leaves no descriptor behind."""
    before = len(os.listdir("/proc/self/fd"))
    runner = volume.runner(max_payload=MAX_PAYLOAD, writable=True)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    volume.close()
    reused = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    written = os.urandom(BLOCK_SIZE)
    conn = logged_in(read_only=False)
    conn.receive_data(frame(Cmd.WRITE, 1, 0, BLOCK_SIZE, payload=written))
    assert conn.run_requests(runner, 64, 1 << 30, [], []) == (1, BLOCK_SIZE)
    assert os.fstat(reused).st_size == 0
    os.close(reused)
    del runner
    assert len(os.listdir("/proc/self/fd")) == before - 1  # the volume's is closed too


def test_reads_larger_than_the_cache_takes_are_not_taken_in(volume: Volume) -> None:
    """A READ over ``CACHE_MAX_READ`` (a scan) never fills the cache, in C
    as in Volume.read: read three times, it misses three times."""
    length = CACHE_MAX_READ + BLOCK_SIZE
    conn = logged_in(read_only=False, max_payload=length)
    runner = volume.runner(max_payload=length, writable=True)
    for handle in (1, 2, 3):
        conn.receive_data(frame(Cmd.READ, handle, 0, length))
        records: list[RequestRecord] = []
        assert conn.run_requests(runner, 64, 1 << 30, [], records) == (1, length)
        assert records[0][3] is False
    assert volume.read(0, BLOCK_SIZE).cache_hit is False  # nothing of it held


def test_the_runner_leaves_sectors_beyond_plain64_to_the_python_path(tmp_path: Path) -> None:
    """With the volume's iv_tweak near 2**64, the last block whose tweaks
    fit plain64 is taken (its last unit's tweak is 2**64 - 1) and the next
    is not, where SectorCipher draws the same line."""
    step = BLOCK_SIZE // 512
    path = tmp_path / "volume"
    path.write_bytes(bytes(DATA_OFFSET + BLOCKS * BLOCK_SIZE))
    info = VolumeInfo(
        "",
        "",
        "aes-xts-plain64",
        512,
        BLOCK_SIZE,
        2**64 - 8 * step,
        DATA_OFFSET,
        BLOCKS * BLOCK_SIZE,
        0,
        (),
    )
    volume = Volume(path, os.urandom(64), info, SectorCache(0, BLOCK_SIZE))
    conn = logged_in(read_only=False)
    last_fitting = 7 * BLOCK_SIZE
    taken, *_ = run_frames(volume, conn, frame(Cmd.READ, 1, last_fitting, BLOCK_SIZE))
    assert taken == 1
    assert volume.read(last_fitting, BLOCK_SIZE).data == bytes(BLOCK_SIZE)
    beyond = frame(Cmd.READ, 2, last_fitting + BLOCK_SIZE, BLOCK_SIZE)
    assert run_frames(volume, conn, beyond)[0] == 0
    with pytest.raises(Luks2Error, match="plain64"):
        volume.read(last_fitting + BLOCK_SIZE, BLOCK_SIZE)
    volume.close()


class ShortCache:
    """A cache whose hit is one sector short (a bug the runner must catch)."""

    def lookup(self, volume: int, first: int, count: int, *, admit: bool) -> Any:
        return [bytes(BLOCK_SIZE)] * (count - 1), None

    def fill(self, *args: Any) -> bool:
        raise AssertionError("a hit fills nothing")

    invalidate = fill


def test_a_cache_hit_of_the_wrong_size_is_an_error_not_a_reply(volume: Volume) -> None:
    runner = Runner(
        key=volume._cipher.key,
        cache=ShortCache(),  # type: ignore[arg-type]
        volume_id=1,
        fd=volume._fd,
        data_offset=DATA_OFFSET,
        sector_size=BLOCK_SIZE,
        iv_tweak=0,
        export_size=BLOCKS * BLOCK_SIZE,
        max_payload=MAX_PAYLOAD,
        writable=True,
        cache_max_read=CACHE_MAX_READ,
        read_op=Cmd.READ,
        write_op=Cmd.WRITE,
        ok=Errno.OK,
    )
    replies: list[bytes] = []
    with pytest.raises(SystemError, match="wrong sectors"):
        runner.run(
            bytearray(frame(Cmd.READ, 1, 0, 2 * BLOCK_SIZE)), 0, set(), 64, 1 << 30, replies, []
        )
    assert replies == []
