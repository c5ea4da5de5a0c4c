"""storaged.sectors and the engine's AES-XTS: dm-crypt's plain64 rule
(tweak = byte offset / 512 + iv_tweak), checked against a reference XTS,
against ciphertext the kernel's dm-crypt wrote, and through the engine."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from netblk.protocol.codec import ExportGeometry, encode_request
from netblk.protocol.constants import REPLY, Cmd, Errno
from storaged import _engine
from storaged._engine import Counters, FileStore, Key
from storaged.sectors import CipherError, SectorCipher
from storaged.session import scanner_for
from tests.netblk.protocol.accepted import ALL_FLAGS


def reference_xts(key: bytes, tweak: int, sector: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.XTS(tweak.to_bytes(16, "little"))).encryptor()
    return encryptor.update(sector) + encryptor.finalize()


def test_sector_cipher_round_trip() -> None:
    cipher = SectorCipher(os.urandom(64))
    data = os.urandom(16 * 4096)
    encrypted = cipher.encrypt(8 * 4096, data)
    assert encrypted != data
    assert len(encrypted) == len(data)
    assert cipher.decrypt(8 * 4096, encrypted) == data
    assert cipher.decrypt(9 * 4096, encrypted) != data
    assert cipher.decrypt(0, bytearray(cipher.encrypt(0, memoryview(data)))) == data


@pytest.mark.parametrize("key_len", [32, 64])
def test_a_key_is_expanded_once_and_shared_by_threads(key_len: int) -> None:
    """Every run copies the keyed contexts, so runs from many threads on one
    Key, encrypting and decrypting in turn, each see only their tweaks."""
    key = Key(raw := os.urandom(key_len))
    sectors = [os.urandom(4096) for _ in range(8)]

    def round_trip(index: int) -> bool:
        encrypted = key.crypt(sectors[index], 4096, index, 8, True)
        assert encrypted == reference_xts(raw, index, sectors[index])
        return key.crypt(encrypted, 4096, index, 8, False) == sectors[index]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(round_trip, [i % 8 for i in range(400)]))


def test_a_key_refuses_other_sizes_and_runs_that_are_not_whole_units() -> None:
    with pytest.raises(ValueError, match="256- or 512-bit key, got 384 bits"):
        Key(os.urandom(48))
    with pytest.raises(ValueError, match="not a run of 4096-byte data units"):
        Key(os.urandom(64)).crypt(bytes(4095), 4096, 0, 8, True)


def test_sector_cipher_tweak_is_offset_in_512_byte_units() -> None:
    key = os.urandom(64)
    cipher = SectorCipher(key)
    data = os.urandom(4 * 4096)
    base = 1 << 30
    encrypted = cipher.encrypt(base, data)
    for k in range(4):
        sector = data[k * 4096 : (k + 1) * 4096]
        offset = base + k * 4096
        alone = cipher.encrypt(offset, sector)
        assert encrypted[k * 4096 : (k + 1) * 4096] == alone
        # dm-crypt plain64 counts 512-byte units, not 4096-byte sector indexes.
        assert alone == reference_xts(key, offset // 512, sector)
        assert alone != reference_xts(key, offset // 4096, sector)


#: Recorded from the Linux 6.1 dm-crypt of a volume made by format_volume, opened
#: with ``cryptsetup open`` on a loop device in the guest; two 4096-byte sectors
#: of KAT_PLAINTEXT written with ``dd ... bs=4096 seek=N oflag=direct``.
KAT_VOLUME_KEY = bytes.fromhex(
    "d53c3c354d16fb97c8db444a001ce1f53fa591559c4480e86ffe3f889ac56ce6"
    "62969fbd9512ebfa8e237e07978e44e3b5045c248b2217bdea29702340a0071f"
)
KAT_PLAINTEXT = b"".join(bytes((s * 7 + i) % 256 for i in range(4096)) for s in range(2))
KAT_CIPHERTEXT_SHA256 = {
    5: "e738ddf8c852400100c720b1a59341a80769d5eb1cb4bf630a3b3a8a89489ce5",
    1000: "d5306d10e9463a011f2e4535e3ce7f192159c39a7096e5ddd693e2dc95f0bbed",
}


@pytest.mark.parametrize("sector", sorted(KAT_CIPHERTEXT_SHA256))
def test_sector_cipher_matches_kernel_dm_crypt(sector: int) -> None:
    cipher = SectorCipher(KAT_VOLUME_KEY)
    encrypted = cipher.encrypt(sector * 4096, KAT_PLAINTEXT)
    assert hashlib.sha256(encrypted).hexdigest() == KAT_CIPHERTEXT_SHA256[sector]


DATA_OFFSET = 16 << 20
SEGMENT = 4 << 20


def engine_on(path: Path, key: bytes) -> tuple[_engine.Scanner, _engine.Volume, Counters]:
    geometry = ExportGeometry(size=SEGMENT, flags=ALL_FLAGS, max_payload=1 << 20)
    volume = _engine.Volume(
        FileStore(path, writable=True),
        Key(key),
        data_offset=DATA_OFFSET,
        size=SEGMENT,
        sector_size=4096,
        iv_tweak=0,
    )
    return scanner_for(geometry), volume, Counters()


def engine_request(
    path: Path, key: bytes, opcode: Cmd, offset: int, length: int, payload: bytes = b""
) -> bytes:
    """One request through the engine; its reply's data."""
    scanner, volume, counters = engine_on(path, key)
    buffer = bytearray(encode_request(opcode, 1, offset, length) + payload)
    _consumed, reply, taken, *_ = _engine.run(scanner, volume, counters, buffer, 0, 1, 1 << 30)
    assert taken == 1
    _magic, error, _handle = REPLY.layout.unpack_from(reply)
    assert error == Errno.OK
    return reply[REPLY.size :]


@pytest.mark.parametrize("sector", sorted(KAT_CIPHERTEXT_SHA256))
def test_the_engine_writes_what_kernel_dm_crypt_writes(tmp_path: Path, sector: int) -> None:
    """The engine's own tweak arithmetic (C), past a 16 MiB header."""
    path = tmp_path / "volume"
    path.write_bytes(b"")
    engine_request(path, KAT_VOLUME_KEY, Cmd.WRITE, sector * 4096, 8192, KAT_PLAINTEXT)
    with path.open("rb") as file:
        file.seek(DATA_OFFSET + sector * 4096)
        assert hashlib.sha256(file.read(8192)).hexdigest() == KAT_CIPHERTEXT_SHA256[sector]
    assert engine_request(path, KAT_VOLUME_KEY, Cmd.READ, sector * 4096, 8192) == KAT_PLAINTEXT


def test_the_engine_reads_holes_and_past_the_end_of_the_file_as_zeros(tmp_path: Path) -> None:
    """A sector of zeros on disk was never written: it reads as zeros, its
    neighbours still decrypt with their own tweaks, one non-zero byte makes
    a sector data, and a file shorter than the read is a hole at its end."""
    key = os.urandom(64)
    cipher = SectorCipher(key)
    data = os.urandom(3 * 4096)
    on_disk = bytearray(cipher.encrypt(4096, data))
    on_disk[4096:8192] = bytes(4096)
    almost = bytearray(4096)
    almost[4095] = 1
    path = tmp_path / "volume"
    path.write_bytes(bytes(DATA_OFFSET) + bytes(4096) + bytes(on_disk) + almost)
    got = engine_request(path, key, Cmd.READ, 4096, 3 * 4096)
    assert got == data[:4096] + bytes(4096) + data[8192:]
    assert engine_request(path, key, Cmd.READ, 4 * 4096, 4096) == cipher.decrypt(4 * 4096, almost)
    assert engine_request(path, key, Cmd.READ, 4 * 4096, 3 * 4096)[4096:] == bytes(2 * 4096)
    assert cipher.decrypt(4096, on_disk)[4096:8192] != bytes(4096)  # crypt has no holes


def test_sector_cipher_iv_tweak_shifts_the_tweak() -> None:
    key = os.urandom(64)
    sector = os.urandom(4096)
    shifted = SectorCipher(key, iv_tweak=24).encrypt(4096, sector)
    assert shifted == reference_xts(key, 4096 // 512 + 24, sector)


def test_sector_cipher_512_byte_sectors() -> None:
    key = os.urandom(64)
    data = os.urandom(3 * 512)
    encrypted = SectorCipher(key, sector_size=512).encrypt(1024, data)
    assert encrypted[512:1024] == reference_xts(key, 3, data[512:1024])


@pytest.mark.parametrize(("offset", "length"), [(100, 4096), (4096, 100), (-4096, 4096)])
def test_sector_cipher_rejects_partial_sectors(offset: int, length: int) -> None:
    with pytest.raises(CipherError, match="whole"):
        SectorCipher(os.urandom(64)).encrypt(offset, bytes(length))


def test_sector_cipher_rejects_bad_keys_sizes_and_tweaks() -> None:
    with pytest.raises(CipherError, match="key"):
        SectorCipher(os.urandom(48))
    with pytest.raises(CipherError, match="differ"):
        SectorCipher(bytes(64))
    with pytest.raises(CipherError, match="sector size"):
        SectorCipher(os.urandom(64), sector_size=8192)
    with pytest.raises(CipherError, match="plain64"):
        SectorCipher(os.urandom(64), iv_tweak=2**64)
    with pytest.raises(CipherError, match="plain64"):
        SectorCipher(os.urandom(64), iv_tweak=2**64 - 8).encrypt(4096, bytes(4096))
