"""Exports on Ceph RBD images (storaged/engine/store_rbd.c): the same
requests mean the same as on a file, against a mini cluster on 127.0.0.1,
and the cluster only ever holds ciphertext."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from pathlib import Path

import pytest

from netblk.protocol.constants import BLOCK_SIZE
from storaged import luks2, volume_cli
from storaged._engine import RbdStore
from storaged.client import NetblkClient
from storaged.config import RbdImage, load_config
from storaged.volume import Volume
from tests.ceph_cluster import CLIENT, MiniCluster
from tests.pki_fixtures import PkiFiles
from tests.storaged.stack import PASSPHRASE, Stack, run, serving

pytestmark = pytest.mark.ceph

#: A marker no ciphertext holds by chance: found in the image, it is plaintext.
MARKER = b"netblk plaintext marker, never on the cluster "


@pytest.fixture
def rbd_stack(pki: PkiFiles, tmp_path: Path, ceph: MiniCluster) -> Stack:
    return Stack(pki=pki, root=tmp_path / "stack", ceph=ceph, volume_size=16 << 20)


def test_an_rbd_export_is_configured_by_pool_image_and_cephx_user(rbd_stack: Stack) -> None:
    config = load_config(rbd_stack.config_path)
    location = config.exports["data"].volume
    assert isinstance(location, RbdImage)
    assert f"{location.pool}/{location.image}" == rbd_stack.image("data")
    assert location.client == CLIENT
    assert str(location) == f"rbd:{rbd_stack.image('data')}"


def test_random_io_on_an_rbd_export_reads_back_as_a_model_says(rbd_stack: Stack) -> None:
    """Random writes (some FUA), reads, TRIMs and WRITE_ZEROES of every kind,
    each read checked against a byte model; a 4 KiB TRIM reads back zeros."""
    size = rbd_stack.volume_size
    blocks = size // BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(22)

    async def body() -> None:
        async with serving(rbd_stack), await rbd_stack.connect() as client:
            assert client.info.size == size
            for step in range(300):
                first = rng.randrange(blocks)
                count = rng.randint(1, min(16, blocks - first))
                offset, length = first * BLOCK_SIZE, count * BLOCK_SIZE
                action = rng.choice(["write", "write", "read", "read", "trim", "zero", "zero_nh"])
                if action == "write":
                    data = MARKER * (length // len(MARKER)) + bytes(length % len(MARKER))
                    data = bytes(b ^ (step & 0xFF) for b in data) if step % 2 else data
                    await client.write(offset, data, fua=rng.random() < 0.2)
                    model[offset : offset + length] = data
                elif action == "read":
                    assert await client.read(offset, length) == model[offset : offset + length]
                elif action == "trim":
                    await client.trim(offset, length, fua=rng.random() < 0.2)
                    model[offset : offset + length] = bytes(length)
                else:
                    await client.write_zeroes(offset, length, no_hole=action == "zero_nh")
                    model[offset : offset + length] = bytes(length)
                if step % 50 == 49:
                    await client.flush()
            # the trap: a discard smaller than an object must not keep the data
            await client.write(
                0, MARKER * (BLOCK_SIZE // len(MARKER)) + bytes(BLOCK_SIZE % len(MARKER))
            )
            await client.trim(0, BLOCK_SIZE)
            model[0:BLOCK_SIZE] = bytes(BLOCK_SIZE)
            assert await client.read(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)
            for start in range(0, size, 1 << 20):
                assert await client.read(start, 1 << 20) == model[start : start + (1 << 20)]

    run(body())


def test_the_image_holds_only_ciphertext_and_cryptsetup_reads_it(
    rbd_stack: Stack, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(rbd_stack), await rbd_stack.connect() as client:
            await client.write(BLOCK_SIZE, MARKER * 2048, fua=True)

    run(body())
    exported = tmp_path / "exported.img"
    assert rbd_stack.ceph is not None
    rbd_stack.ceph.rbd("export", rbd_stack.image("data"), str(exported))
    raw = exported.read_bytes()
    assert MARKER not in raw
    # what the image holds is the volume storaged serves: open it as a file
    volume = Volume.open(exported, PASSPHRASE, read_only=True)
    assert volume.size == rbd_stack.volume_size
    assert luks2.read_info(exported).data_size == rbd_stack.volume_size


def test_the_managed_lock_is_exclusive_and_breaking_it_fences_the_owner(
    ceph: MiniCluster, tmp_path: Path
) -> None:
    """Ceph's fencing, as the standby will use it: a second client cannot
    take the lock, breaks it, and the first one's writes then fail."""
    image = f"lock-{os.getpid()}"
    ceph.rbd("create", "--size", "16M", f"netblk/{image}")

    def open_image() -> RbdStore:
        return RbdStore(
            "netblk",
            image,
            conf=str(ceph.conf),
            client=CLIENT,
            keyring=str(ceph.keyring()),
            writable=True,
        )

    active, standby = open_image(), open_image()
    assert active.lock()
    active.pwrite(0, b"a" * BLOCK_SIZE)
    assert not standby.lock()
    (owner,) = standby.lock_owners()
    standby.break_lock(owner)
    assert standby.lock()
    standby.pwrite(0, b"b" * BLOCK_SIZE)
    with pytest.raises(OSError):
        active.pwrite(0, b"c" * BLOCK_SIZE)
        active.flush()
    assert standby.pread(0, BLOCK_SIZE) == b"b" * BLOCK_SIZE


def test_an_osd_killed_under_a_verified_write_load_loses_nothing(rbd_stack: Stack) -> None:
    """kill -9 one of the three OSDs while writes (some FUA) run, bring it
    back: every write succeeds, and every block reads back as written, also
    after the OSD returned (bluestore keeps what it had)."""
    ceph = rbd_stack.ceph
    assert ceph is not None and ceph.objectstore == "bluestore"
    size = rbd_stack.volume_size
    blocks = size // BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(2)
    errors: list[BaseException] = []

    async def load(client: NetblkClient, seconds: float) -> int:
        done = 0
        deadline = asyncio.get_running_loop().time() + seconds

        async def writer(worker: int) -> None:
            nonlocal done
            while asyncio.get_running_loop().time() < deadline:
                block = rng.randrange(worker, blocks, 8)  # workers never share a block
                data = os.urandom(BLOCK_SIZE)
                try:
                    await client.write(block * BLOCK_SIZE, data, fua=rng.random() < 0.1)
                except Exception as exc:  # every failure is a lost write: counted
                    errors.append(exc)
                    return
                model[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = data
                done += 1

        await asyncio.gather(*(writer(worker) for worker in range(8)))
        return done

    async def body() -> None:
        async with serving(rbd_stack), await rbd_stack.connect() as client:
            before = await load(client, 3)
            ceph.kill_osd("1")
            during = await load(client, 15)
            ceph.start_osd("1")
            after = await load(client, 5)
            await client.flush()
            assert errors == []
            assert min(before, during, after) > 0
            for start in range(0, size, 1 << 20):
                assert await client.read(start, 1 << 20) == model[start : start + (1 << 20)]

    run(body())
    ceph.wait_healthy()


def test_volume_create_makes_and_formats_an_image_that_storaged_unlocks(
    ceph: MiniCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``storaged volume create rbd:POOL/IMAGE``: the image is as large as a
    volume file would be, ``info`` reads its header, the passphrase unlocks
    it, and a second create refuses to overwrite it."""
    image = f"created-{os.getpid()}"
    passphrase = tmp_path / "pass"
    passphrase.write_bytes(PASSPHRASE + b"\n")
    cephx = [
        "--ceph-client", f"client.{CLIENT}", "--ceph-conf", str(ceph.conf),
        "--ceph-keyring", str(ceph.keyring()),
    ]  # fmt: skip
    create = ["create", f"rbd:netblk/{image}", "--size", "8M", "--passphrase-file", passphrase]
    assert run_volume_cli(*create, *cephx, *FAST_KDF) == 0
    assert f"created rbd:netblk/{image}: 8388608 bytes" in capsys.readouterr().out
    assert run_volume_cli("info", f"rbd:netblk/{image}", "--json", *cephx) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["path"], info["data_size"]) == (f"rbd:netblk/{image}", 8 << 20)
    assert json.loads(ceph.rbd("info", "--format", "json", f"netblk/{image}"))["size"] == (
        info["data_offset"] + info["data_size"]
    )
    location = RbdImage("netblk", image, ceph.conf, CLIENT, ceph.keyring())
    volume = Volume.open(location, PASSPHRASE)
    assert volume.size == 8 << 20
    volume.close()
    assert run_volume_cli(*create, *cephx, *FAST_KDF) == 1
    assert "creating the image: File exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "rbd:netblk"], "expected rbd:POOL/IMAGE"),
        (["info", "rbd:/image", "--ceph-client", "x"], "expected rbd:POOL/IMAGE"),
        (["info", "rbd:a/b/c", "--ceph-client", "x"], "expected rbd:POOL/IMAGE"),
        (["info", "rbd:netblk/x"], "needs --ceph-client"),
        (["info", "volume.luks", "--ceph-client", "x"], "--ceph-client is for rbd:POOL/IMAGE"),
    ],
)
def test_bad_rbd_volume_names_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_volume_cli(*argv) == 2
    assert message in capsys.readouterr().err


FAST_KDF = ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1"]


def run_volume_cli(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="storaged")
    volume_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["volume", *map(str, argv)])
    code: int = args.func(args)
    return code
