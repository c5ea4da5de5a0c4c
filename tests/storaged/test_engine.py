"""storaged._engine against its Python oracles (tests/storaged/oracle.py):
the same frames give the same events, batches, replies, notes, volume
bytes and counts, refused and failing requests included."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netblk.protocol.codec import (
    NEED_DATA,
    ExportGeometry,
    FrameKind,
    ProtocolError,
    ServerConnection,
    encode_hello,
    encode_request,
)
from netblk.protocol.constants import (
    BLOCK_SIZE,
    REPLY,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ExportFlag,
)
from storaged import _engine
from storaged._engine import (
    STOP_BROKEN,
    STOP_DISCONNECT,
    STOP_FLUSH,
    STOP_FULL,
    STOP_SHORT,
    Counters,
    FileStore,
    Key,
    Scanner,
)
from storaged.sectors import SectorCipher
from storaged.session import scanner_for
from tests.netblk.protocol.accepted import ALL_FLAGS, TOKEN
from tests.storaged import oracle

BLOCKS = 64
SIZE = BLOCKS * BLOCK_SIZE
MAX_PAYLOAD = 16 * BLOCK_SIZE
DATA_OFFSET = 2 * BLOCK_SIZE


def frame(
    opcode: int,
    handle: int,
    offset: int = 0,
    length: int = 0,
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


@dataclass
class Pair:
    """The engine and its oracle on two copies of one volume."""

    geometry: ExportGeometry
    scanner: Scanner
    volume: _engine.Volume
    store: FileStore
    counters: Counters
    model_scanner: oracle.FrameOracle
    model: oracle.VolumeOracle
    model_counts: oracle.CountsOracle
    paths: tuple[Path, Path]

    def inject_error(self, offset: int, length: int, error: int) -> None:
        self.store.inject_error(DATA_OFFSET + offset, length, error)
        self.model.store.inject_error(DATA_OFFSET + offset, length, error)

    def same_bytes(self) -> bool:
        return self.paths[0].read_bytes() == self.paths[1].read_bytes()


#: ``pairs(read_only=...)``: a Pair on fresh volume files.
MakePair = Callable[..., Pair]


@pytest.fixture(
    params=[(BLOCK_SIZE, 0), (512, 2**63 + 5), (BLOCK_SIZE, 2**64 - SIZE // 512)],
    ids=["4k-sectors", "512-sectors", "last-plain64-tweaks"],
)
def pairs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakePair]:
    """Makes Pairs: ``pairs(read_only=...)``, each on fresh volume files."""
    sector_size, iv_tweak = request.param
    key = os.urandom(64)
    made: list[Pair] = []

    def make(*, read_only: bool = False) -> Pair:
        flags = ALL_FLAGS | (ExportFlag.READ_ONLY if read_only else ExportFlag(0))
        geometry = ExportGeometry(size=SIZE, flags=flags, max_payload=MAX_PAYLOAD)
        paths = (tmp_path / f"engine{len(made)}", tmp_path / f"model{len(made)}")
        for path in paths:
            path.write_bytes(bytes(DATA_OFFSET + SIZE))
        store = FileStore(paths[0], writable=True)
        volume = _engine.Volume(
            store,
            Key(key),
            data_offset=DATA_OFFSET,
            size=SIZE,
            sector_size=sector_size,
            iv_tweak=iv_tweak,
        )
        model = oracle.VolumeOracle(
            oracle.StoreOracle(paths[1]),
            SectorCipher(key, sector_size, iv_tweak),
            DATA_OFFSET,
            SIZE,
        )
        pair = Pair(
            geometry,
            scanner_for(geometry),
            volume,
            store,
            Counters(),
            oracle.FrameOracle(geometry),
            model,
            oracle.CountsOracle(),
            paths,
        )
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.model.store.close()


def serve(pair: Pair, stream: bytes, room: int, payload_room: int) -> list[object]:
    """Run ``stream`` through engine and oracle batch by batch, as a
    session does, checking that each batch is the same; returns them."""
    engine_buffer, model_buffer = bytearray(stream), bytearray(stream)
    start = 0
    batches: list[object] = []
    while True:
        got = _engine.run(
            pair.scanner, pair.volume, pair.counters, engine_buffer, start, room, payload_room
        )
        want = oracle.run(
            pair.model_scanner,
            pair.model,
            pair.model_counts,
            model_buffer,
            start,
            room,
            payload_room,
        )
        assert got == want
        batches.append(got)
        consumed, _reply, _taken, _payload, stop, detail, _notes = got
        start += consumed
        if stop == STOP_FLUSH:
            assert isinstance(detail, int)
            flushed = _engine.flush(pair.scanner, pair.volume, pair.counters, detail)
            assert flushed == oracle.flush(
                pair.model_scanner, pair.model, pair.model_counts, detail
            )
            # In flight until answered (by the session, when it sends the reply).
            assert pair.scanner.inflight == pair.model_scanner.inflight == 1
            assert pair.scanner.answer(detail, flushed[0]) == pair.model_scanner.answer(
                detail, flushed[0]
            )
        elif stop != STOP_FULL:
            break
    assert pair.scanner.inflight == pair.model_scanner.inflight == 0 or stop == STOP_BROKEN
    assert pair.model_counts.matches(pair.counters.snapshot())
    assert pair.same_bytes()
    return batches


blocks = st.integers(0, BLOCKS - 1).map(lambda block: block * BLOCK_SIZE)
#: Mostly requests that run; now and then each way a range can be refused.
offsets = st.one_of(
    *[blocks] * 8, st.sampled_from([1, 512, SIZE, SIZE - BLOCK_SIZE, 2**64 - BLOCK_SIZE])
)
lengths = st.one_of(
    *[st.integers(1, 17).map(lambda n: n * BLOCK_SIZE)] * 8,
    st.sampled_from([0, 512, BLOCK_SIZE + 1, MAX_PAYLOAD + BLOCK_SIZE, 2**32 - BLOCK_SIZE]),
)


@st.composite
def frames(draw: st.DrawFn, handle: int) -> bytes:
    """One request frame, mostly valid, sometimes any of the ways not to be."""
    opcode = draw(
        st.sampled_from(
            [Cmd.READ] * 4
            + [Cmd.WRITE] * 4
            + [Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES] * 2
            + [Cmd.DISCONNECT, 9]
        )
    )
    ranged = opcode in oracle.RANGED
    offset = draw(offsets if ranged else st.sampled_from([0, 0, 0, BLOCK_SIZE]))
    length = draw(lengths if ranged else st.sampled_from([0, 0, 0, BLOCK_SIZE]))
    if opcode == Cmd.WRITE and length > MAX_PAYLOAD:
        length = draw(st.sampled_from([MAX_PAYLOAD, length]))
    flags = draw(
        st.sampled_from(
            [0] * 6
            + [int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.FUA | CmdFlag.NO_HOLE)]
            + [0x8000]
        )
    )
    magic = draw(st.sampled_from([REQUEST_MAGIC] * 12 + [0x4E424C52]))
    reserved = draw(st.sampled_from([0] * 12 + [1]))
    payload = b""  # a WRITE over the max payload breaks the stream at its header
    if opcode == Cmd.WRITE and length <= MAX_PAYLOAD:
        payload = draw(st.sampled_from([b"", b"\x5a"])) * length or os.urandom(length)
    return frame(
        opcode, handle, offset, length, flags=flags, magic=magic, reserved=reserved, payload=payload
    )


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(1, 12))
    handles = draw(st.lists(st.integers(0, 2**64 - 1), min_size=count, max_size=count))
    # a handle used twice is in flight twice when both fall in one batch
    if count > 1 and draw(st.integers(0, 5)) == 0:
        handles[-1] = handles[0]
    stream = b"".join(draw(frames(handle)) for handle in handles)
    cut = draw(st.sampled_from([0, 0, 0, 1, 20, 31]))
    return stream[: len(stream) - cut] if cut < len(stream) else stream


faults = st.lists(
    st.tuples(
        blocks,
        st.integers(1, 8).map(lambda n: n * BLOCK_SIZE),
        st.sampled_from([errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS]),
    ),
    max_size=2,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stream=streams(),
    read_only=st.booleans(),
    room=st.sampled_from([1, 2, 3, 64]),
    payload_room=st.sampled_from([0, BLOCK_SIZE, MAX_PAYLOAD, 1 << 30]),
    injected=faults,
)
def test_the_engine_runs_every_stream_as_the_oracle_does(
    pairs: MakePair,
    stream: bytes,
    read_only: bool,
    room: int,
    payload_room: int,
    injected: list[tuple[int, int, int]],
) -> None:
    pair = pairs(read_only=read_only)
    for offset, length, error in injected:
        pair.inject_error(offset, length, error)
    serve(pair, stream, room, payload_room)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream=streams(), read_only=st.booleans(), answer_every=st.sampled_from([1, 2, 100]))
def test_the_codec_sees_the_same_events_through_the_engine_and_the_oracle(
    stream: bytes, read_only: bool, answer_every: int
) -> None:
    """Framing and validation: the codec's events (and the reason a stream
    breaks) are the same with the engine's Scanner as with the oracle's."""
    flags = ALL_FLAGS | (ExportFlag.READ_ONLY if read_only else ExportFlag(0))
    geometry = ExportGeometry(size=SIZE, flags=flags, max_payload=MAX_PAYLOAD)

    def events(scanner: object) -> list[object]:
        conn = ServerConnection(scanner)  # type: ignore[arg-type]
        conn.receive_data(encode_hello("data", TOKEN))
        conn.next_event()
        conn.accept(geometry)
        conn.receive_data(stream)
        seen: list[object] = []
        try:
            while (event := conn.next_event()) is not NEED_DATA:
                seen.append(event)
                handle = getattr(event, "handle", None)
                if handle is not None and len(seen) % answer_every == 0:
                    seen.append(conn.send_reply(handle, Errno.OK))
                if not hasattr(event, "handle"):
                    break
        except ProtocolError as exc:
            seen.append(("broken", exc.reason))
        seen.append(conn.inflight)
        return seen

    assert events(scanner_for) == events(oracle.FrameOracle)


def test_frame_kinds_and_stops_are_the_engines() -> None:
    assert {kind.name: int(kind) for kind in FrameKind} == {
        name.removeprefix("FRAME_"): getattr(_engine, name)
        for name in dir(_engine)
        if name.startswith("FRAME_")
    }
    assert len({STOP_FULL, STOP_SHORT, STOP_FLUSH, STOP_DISCONNECT, STOP_BROKEN}) == 5


def replies(reply: bytes) -> list[tuple[int, int]]:
    """(handle, error) of each reply in ``reply``, for headers-only batches."""
    out = []
    for at in range(0, len(reply), REPLY.size):
        _magic, error, handle = REPLY.layout.unpack_from(reply, at)
        out.append((handle, error))
    return out


def test_a_write_that_fails_part_way_writes_what_comes_before(pairs: MakePair) -> None:
    pair = pairs()
    pair.inject_error(4 * BLOCK_SIZE, BLOCK_SIZE, errno.EIO)
    data = os.urandom(8 * BLOCK_SIZE)
    (_, reply, *_rest, notes), *_ = serve(
        pair, frame(Cmd.WRITE, 1, 0, len(data), payload=data), 64, 1 << 30
    )
    assert replies(reply) == [(1, Errno.IO)]
    assert notes == [("io_error", 1, Cmd.WRITE, 0, len(data), Errno.IO, os.strerror(errno.EIO))]
    pair.store.clear_errors()
    pair.model.store.faults.clear()
    (_, reply, *_), *_ = serve(pair, frame(Cmd.READ, 2, 0, 8 * BLOCK_SIZE), 64, 1 << 30)
    got = reply[REPLY.size :]
    assert got[: 4 * BLOCK_SIZE] == data[: 4 * BLOCK_SIZE]  # before the failure
    assert got[4 * BLOCK_SIZE :] == bytes(4 * BLOCK_SIZE)  # never written


def test_a_store_out_of_space_answers_enospc(pairs: MakePair) -> None:
    pair = pairs()
    pair.inject_error(0, BLOCK_SIZE, errno.ENOSPC)
    (_, reply, *_), *_ = serve(pair, frame(Cmd.WRITE, 7, 0, BLOCK_SIZE), 64, 1 << 30)
    assert replies(reply) == [(7, Errno.NOSPC)]


@pytest.mark.parametrize(
    "second",
    [
        frame(Cmd.READ, 5, 0, BLOCK_SIZE),
        frame(Cmd.WRITE, 5, BLOCK_SIZE, BLOCK_SIZE),
        frame(Cmd.TRIM, 5, 2 * BLOCK_SIZE, BLOCK_SIZE),
        frame(Cmd.WRITE_ZEROES, 5, 3 * BLOCK_SIZE, BLOCK_SIZE),
        frame(Cmd.FLUSH, 5),
        frame(Cmd.READ, 5, 1, 1),  # refused, but still in flight until answered
    ],
    ids=["read", "write", "trim", "write_zeroes", "flush", "invalid"],
)
def test_a_handle_reused_within_a_batch_breaks_the_stream(pairs: MakePair, second: bytes) -> None:
    """docs/protocol.md: a handle in flight may not be sent again; every
    request of a batch is in flight until the batch's replies leave."""
    pair = pairs()
    first = frame(Cmd.READ, 5, 8 * BLOCK_SIZE, BLOCK_SIZE)
    (_, reply, taken, _, stop, detail, _), *_ = serve(pair, first + second, 64, 1 << 30)
    assert (taken, stop, detail) == (1, STOP_BROKEN, "handle 0x5 is already in flight")
    assert replies(reply[: REPLY.size]) == [(5, Errno.OK)]


def test_a_read_after_a_write_to_the_same_block_waits_for_the_next_batch(pairs: MakePair) -> None:
    pair = pairs()
    data = os.urandom(BLOCK_SIZE)
    stream = (
        frame(Cmd.WRITE, 1, 0, BLOCK_SIZE, payload=data)
        + frame(Cmd.READ, 2, BLOCK_SIZE, BLOCK_SIZE)  # no overlap: same batch
        + frame(Cmd.READ, 3, 0, BLOCK_SIZE)
    )
    first, second = serve(pair, stream, 64, 1 << 30)
    assert (first[2], first[4]) == (2, STOP_FULL)
    assert (second[2], second[4]) == (1, STOP_SHORT)
    assert second[1][REPLY.size :] == data


def test_holes_read_as_zeros_and_trim_makes_them(pairs: MakePair) -> None:
    pair = pairs()
    data = os.urandom(2 * BLOCK_SIZE)
    serve(pair, frame(Cmd.WRITE, 1, 0, len(data), payload=data), 64, 1 << 30)
    serve(pair, frame(Cmd.TRIM, 2, 0, BLOCK_SIZE, flags=CmdFlag.FUA), 64, 1 << 30)
    (_, reply, *_), *_ = serve(pair, frame(Cmd.READ, 3, 0, len(data)), 64, 1 << 30)
    assert reply[REPLY.size :] == bytes(BLOCK_SIZE) + data[BLOCK_SIZE:]
    assert pair.paths[0].read_bytes()[DATA_OFFSET : DATA_OFFSET + BLOCK_SIZE] == bytes(BLOCK_SIZE)


def test_fua_and_flush_reach_the_store(pairs: MakePair) -> None:
    pair = pairs()
    stream = frame(Cmd.WRITE, 1, 0, BLOCK_SIZE, flags=CmdFlag.FUA) + frame(
        Cmd.WRITE, 2, BLOCK_SIZE, BLOCK_SIZE, flags=CmdFlag.FUA
    )
    serve(pair, stream, 64, 1 << 30)
    assert pair.store.syncs == 1  # one sync for the batch's FUA writes
    serve(pair, frame(Cmd.FLUSH, 3) + frame(Cmd.WRITE, 4, 0, BLOCK_SIZE), 64, 1 << 30)
    assert pair.store.syncs == 2


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sector_size": 1024 + 512}, "sector size"),
        ({"sector_size": 8192}, "sector size"),
        ({"size": 4096 + 512}, "segment size"),
        ({"size": 0}, "segment size"),
        ({"iv_tweak": 2**64 - SIZE // 512 + 1}, "plain64"),
        ({"data_offset": 2**64 - 4096}, r"beyond 2\^64"),
    ],
)
def test_a_volume_the_cipher_cannot_serve_is_refused(
    tmp_path: Path, kwargs: dict[str, int], error: str
) -> None:
    path = tmp_path / "volume"
    path.write_bytes(b"")
    settings = {"data_offset": 0, "size": SIZE, "sector_size": 4096, "iv_tweak": 0} | kwargs
    with pytest.raises(ValueError, match=error):
        _engine.Volume(FileStore(path, writable=True), Key(os.urandom(64)), **settings)


def test_run_reads_no_further_than_its_buffer(pairs: MakePair) -> None:
    pair = pairs()
    buffer = bytearray(frame(Cmd.READ, 1, 0, BLOCK_SIZE))
    for start in (-1, len(buffer) + 1):
        with pytest.raises(ValueError, match="start outside"):
            _engine.run(pair.scanner, pair.volume, pair.counters, buffer, start, 64, 0)
    consumed, *_ = _engine.run(pair.scanner, pair.volume, pair.counters, buffer[:-1], 0, 64, 0)
    assert consumed == 0


def test_a_scanner_larger_than_its_volume_is_refused(pairs: MakePair) -> None:
    pair = pairs()
    bigger = Scanner(size=SIZE + BLOCK_SIZE, export_flags=int(ALL_FLAGS), max_payload=MAX_PAYLOAD)
    with pytest.raises(ValueError, match="more than the volume"):
        _engine.run(bigger, pair.volume, pair.counters, bytearray(), 0, 64, 0)
