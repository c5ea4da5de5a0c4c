"""LUKS2 interoperability with the kernel's dm-crypt (in the guest).

Bytes written through storaged read back identical through
``cryptsetup open`` + dm-crypt, and the other way round, for a volume storaged
made and for one made by ``cryptsetup luksFormat``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netblk.protocol.constants import BLOCK_SIZE
from storaged import luks2
from tests.storaged.stack import PASSPHRASE, Stack, run, serving

#: (block index, block count) extents: first block, a run crossing 1 MiB, far out.
EXTENTS = [(0, 1), (250, 12), (9000, 3)]


@contextlib.contextmanager
def dm_crypt(volume: Path, passphrase_file: Path) -> Iterator[Path]:
    """Map ``volume`` with cryptsetup through a loop device; yield the mapping."""
    name = f"netblk-test-{os.getpid()}"
    subprocess.run(
        [
            "cryptsetup",
            "open",
            "--type",
            "luks2",
            "--key-file",
            str(passphrase_file),
            str(volume),
            name,
        ],
        check=True,
    )
    try:
        yield Path("/dev/mapper") / name
    finally:
        subprocess.run(["cryptsetup", "close", name], check=True)


def patterns(seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {first: rng.randbytes(count * BLOCK_SIZE) for first, count in EXTENTS}


def write_through_storaged(stack: Stack, data: dict[int, bytes]) -> None:
    async def body() -> None:
        async with serving(stack), await stack.connect() as client:
            for first, payload in data.items():
                await client.write(first * BLOCK_SIZE, payload)
            await client.flush()

    run(body())


def read_through_storaged(stack: Stack, data: dict[int, bytes]) -> dict[int, bytes]:
    async def body() -> dict[int, bytes]:
        async with serving(stack), await stack.connect() as client:
            return {
                first: await client.read(first * BLOCK_SIZE, len(payload))
                for first, payload in data.items()
            }

    return run(body())  # type: ignore[return-value]


def dm_write(device: Path, data: dict[int, bytes]) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        for first, payload in data.items():
            buf = mmap.mmap(-1, len(payload))  # O_DIRECT needs alignment
            buf.write(payload)
            assert os.pwritev(fd, [buf], first * BLOCK_SIZE) == len(payload)
    finally:
        os.close(fd)


def dm_read(device: Path, data: dict[int, bytes]) -> dict[int, bytes]:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        out = {}
        for first, payload in data.items():
            buf = mmap.mmap(-1, len(payload))
            assert os.preadv(fd, [buf], first * BLOCK_SIZE) == len(payload)
            out[first] = bytes(buf)
        return out
    finally:
        os.close(fd)


def device_size(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@pytest.fixture
def passphrase_file(stack: Stack) -> Path:
    path = stack.root / "key"
    path.write_bytes(PASSPHRASE)
    return path


def test_storaged_volume_through_dm_crypt_both_ways(stack: Stack, passphrase_file: Path) -> None:
    volume = stack.volume_path("data")
    ours, theirs = patterns(1), {first + 20: p for first, p in patterns(2).items()}
    write_through_storaged(stack, ours)
    with dm_crypt(volume, passphrase_file) as device:
        assert device_size(device) == 64 << 20
        assert dm_read(device, ours) == ours
        dm_write(device, theirs)
    assert read_through_storaged(stack, theirs) == theirs
    assert read_through_storaged(stack, ours) == ours


def test_cryptsetup_volume_served_by_storaged(stack: Stack, passphrase_file: Path) -> None:
    volume = stack.volume_path("data")
    volume.unlink()
    subprocess.run(["truncate", "-s", str((16 << 20) + (64 << 20)), str(volume)], check=True)
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--sector-size",
            "4096",
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
            "--key-file",
            str(passphrase_file),
            str(volume),
        ],
        check=True,
    )
    assert luks2.read_info(volume).sector_size == BLOCK_SIZE
    theirs, ours = patterns(3), {first + 40: p for first, p in patterns(4).items()}
    with dm_crypt(volume, passphrase_file) as device:
        dm_write(device, theirs)
    assert read_through_storaged(stack, theirs) == theirs
    write_through_storaged(stack, ours)
    with dm_crypt(volume, passphrase_file) as device:
        assert dm_read(device, ours) == ours
        assert dm_read(device, theirs) == theirs
