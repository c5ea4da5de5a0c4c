"""LUKS2 volumes: format, header validation and recovery, keyslots, data cipher.

Tests marked ``cryptsetup`` check real interoperability with the cryptsetup
binary in both directions; they are skipped only when it is not installed.
Everything uses :data:`luks2.TEST_KDF_PARAMS` so an unlock costs milliseconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storaged import luks2
from storaged.config import RbdImage
from storaged.volume import Volume, header_file

FAST = luks2.TEST_KDF_PARAMS
PASSPHRASE = b"correct horse battery staple"
DATA_SIZE = 1 << 20
MIB = 1 << 20

requires_cryptsetup = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="cryptsetup not installed"
)


def make_volume(tmp_path: Path, name: str = "vol.img", *, label: str | None = None) -> Path:
    path = tmp_path / name
    luks2.format_volume(
        path,
        DATA_SIZE,
        PASSPHRASE,
        FAST,
        label=label,
        digest_iterations=luks2.PBKDF2_MIN_ITERATIONS,
    )
    return path


def corrupt(path: Path, offset: int, length: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        original = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))


# ---------------------------------------------------------------------------
# cryptsetup helpers
# ---------------------------------------------------------------------------


def key_file(tmp_path: Path, passphrase: bytes) -> Path:
    path = tmp_path / f"key-{passphrase.hex()}"
    path.write_bytes(passphrase)
    return path


def cryptsetup(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cryptsetup", *map(str, args)], capture_output=True, text=True, check=check, timeout=120
    )


def cryptsetup_accepts(tmp_path: Path, volume: Path, passphrase: bytes) -> bool:
    result = cryptsetup(
        "open",
        "--test-passphrase",
        "--key-file",
        key_file(tmp_path, passphrase),
        volume,
        check=False,
    )
    # 0: opened; 2: no keyslot matched.  Anything else is a broken header.
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def cryptsetup_volume_key(tmp_path: Path, volume: Path, passphrase: bytes) -> bytes:
    out = cryptsetup(
        "luksDump",
        "--dump-volume-key",
        "--batch-mode",
        "--key-file",
        key_file(tmp_path, passphrase),
        volume,
    ).stdout
    dump = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", dump)))


def cryptsetup_format(tmp_path: Path, *extra: str, passphrase: bytes = PASSPHRASE) -> Path:
    path = tmp_path / "cs.img"
    with path.open("wb") as f:
        f.truncate(20 * MIB)
    cryptsetup(
        "luksFormat",
        "--type",
        "luks2",
        "--sector-size",
        "4096",
        "--batch-mode",
        "--key-file",
        key_file(tmp_path, passphrase),
        *extra,
        path,
    )
    return path


ARGON2_SMALL = ("--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4")


# ---------------------------------------------------------------------------
# format_volume / read_info
# ---------------------------------------------------------------------------


def test_format_creates_sparse_private_volume(tmp_path: Path) -> None:
    path = make_volume(tmp_path, label="exports-a")
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == luks2.DATA_OFFSET + DATA_SIZE
    # Header + keyslots area are written, the data area is a hole.
    assert st.st_blocks * 512 <= luks2.DATA_OFFSET
    with path.open("rb") as f:
        f.seek(luks2.DATA_OFFSET)
        assert f.read(DATA_SIZE) == bytes(DATA_SIZE)

    info = luks2.read_info(path)
    assert info.label == "exports-a"
    assert info.cipher == "aes-xts-plain64"
    assert info.key_size_bits == 512
    assert info.sector_size == 4096
    assert info.iv_tweak == 0
    assert info.data_offset == 16 * MIB
    assert info.data_size == DATA_SIZE
    assert info.seqid == 1
    assert info.keyslot_ids == (0,)
    slot = info.keyslots[0]
    assert (slot.kdf, slot.time_cost, slot.memory_kib, slot.parallelism) == (
        "argon2id",
        FAST.time_cost,
        FAST.memory_kib,
        FAST.parallelism,
    )
    assert (slot.area_offset, slot.area_size) == (32768, 258048)


def test_format_writes_cryptsetup_layout(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    raw = path.read_bytes()[: 2 * luks2.METADATA_SIZE]
    assert raw[:8] == b"LUKS\xba\xbe\x00\x02"
    assert raw[luks2.METADATA_SIZE : luks2.METADATA_SIZE + 8] == b"SKUL\xba\xbe\x00\x02"
    text = raw[4096 : luks2.METADATA_SIZE].rstrip(b"\0")
    meta = json.loads(text)
    assert meta["segments"]["0"] == {
        "type": "crypt",
        "offset": "16777216",
        "size": "dynamic",
        "iv_tweak": "0",
        "encryption": "aes-xts-plain64",
        "sector_size": 4096,
    }
    assert meta["keyslots"]["0"]["af"] == {"type": "luks1", "stripes": 4000, "hash": "sha256"}
    assert meta["keyslots"]["0"]["area"]["encryption"] == "aes-xts-plain64"
    assert meta["digests"]["0"]["type"] == "pbkdf2"
    assert meta["config"] == {"json_size": "12288", "keyslots_size": "16744448"}
    # Both copies carry the same JSON.
    second = raw[luks2.METADATA_SIZE + 4096 :].rstrip(b"\0")
    assert second == text


def test_format_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    path.write_bytes(b"precious")
    with pytest.raises(luks2.Luks2Error, match="exists"):
        luks2.format_volume(path, DATA_SIZE, PASSPHRASE, FAST)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("size", [0, -4096, 1000, 4096 + 512])
def test_format_rejects_bad_sizes(tmp_path: Path, size: int) -> None:
    with pytest.raises(luks2.Luks2Error, match="multiple of 4096"):
        luks2.format_volume(tmp_path / "v", size, PASSPHRASE, FAST)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "kdf",
    [
        luks2.KdfParams(time_cost=1, memory_kib=32768, parallelism=1),
        luks2.KdfParams(time_cost=4, memory_kib=16, parallelism=1),
        luks2.KdfParams(time_cost=4, memory_kib=32768, parallelism=5),
    ],
)
def test_format_rejects_kdf_below_cryptsetup_limits(tmp_path: Path, kdf: luks2.KdfParams) -> None:
    with pytest.raises(luks2.Luks2Error, match="argon2"):
        luks2.format_volume(tmp_path / "v", DATA_SIZE, PASSPHRASE, kdf)
    assert not (tmp_path / "v").exists()


def test_format_rejects_long_label(tmp_path: Path) -> None:
    with pytest.raises(luks2.Luks2Error, match="label"):
        luks2.format_volume(tmp_path / "v", DATA_SIZE, PASSPHRASE, FAST, label="x" * 48)
    assert not (tmp_path / "v").exists()


def test_read_info_rejects_non_luks_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    path.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(luks2.Luks2Error, match="not a LUKS2 volume"):
        luks2.read_info(path)


def test_read_info_missing_file(tmp_path: Path) -> None:
    with pytest.raises(luks2.Luks2Error, match="No such file"):
        luks2.read_info(tmp_path / "absent.img")


# ---------------------------------------------------------------------------
# Header damage and crash consistency
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 300, 4096 + 10], ids=["magic", "binary", "json"])
def test_damaged_primary_falls_back_to_secondary(tmp_path: Path, offset: int) -> None:
    path = make_volume(tmp_path)
    key = luks2.unlock(path, PASSPHRASE)
    corrupt(path, offset)
    info = luks2.read_info(path)
    assert info.keyslot_ids == (0,)
    assert luks2.unlock(path, PASSPHRASE) == key


def test_damaged_secondary_is_ignored(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    corrupt(path, luks2.METADATA_SIZE + 4096 + 10)
    assert luks2.read_info(path).keyslot_ids == (0,)


def test_both_headers_damaged_is_an_error(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    corrupt(path, 4096 + 10)
    corrupt(path, luks2.METADATA_SIZE + 4096 + 10)
    with pytest.raises(luks2.Luks2Error, match="checksum mismatch"):
        luks2.read_info(path)
    with pytest.raises(luks2.Luks2Error, match="checksum mismatch"):
        luks2.unlock(path, PASSPHRASE)


def test_update_repairs_damaged_primary(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    corrupt(path, 4096 + 10)
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    # The primary was rewritten: losing the secondary now is harmless.
    corrupt(path, luks2.METADATA_SIZE + 4096 + 10)
    assert luks2.read_info(path).keyslot_ids == (0, 1)


def test_newest_valid_copy_wins(tmp_path: Path) -> None:
    """A crash between the two header writes leaves one new and one old copy."""
    path = make_volume(tmp_path)
    with path.open("rb") as f:
        old_secondary = f.read(2 * luks2.METADATA_SIZE)[luks2.METADATA_SIZE :]
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    with path.open("r+b") as f:
        f.seek(luks2.METADATA_SIZE)
        f.write(old_secondary)
    info = luks2.read_info(path)
    assert info.keyslot_ids == (0, 1)
    assert info.seqid == 2


def test_torn_primary_write_keeps_old_state(tmp_path: Path) -> None:
    """Crash while writing the primary: it never validates, the old secondary rules."""
    path = make_volume(tmp_path)
    with path.open("rb") as f:
        old_secondary = f.read(2 * luks2.METADATA_SIZE)[luks2.METADATA_SIZE :]
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    with path.open("r+b") as f:
        f.seek(luks2.CHECKSUM_FIELD_OFFSET)  # the checksum is written last
        f.write(bytes(luks2.CHECKSUM_FIELD_SIZE))
        f.seek(luks2.METADATA_SIZE)
        f.write(old_secondary)
    info = luks2.read_info(path)
    assert info.keyslot_ids == (0,)
    assert info.seqid == 1
    luks2.unlock(path, PASSPHRASE)


# ---------------------------------------------------------------------------
# Keyslots
# ---------------------------------------------------------------------------


def test_unlock_wrong_passphrase(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    with pytest.raises(luks2.Luks2Error, match="no keyslot matches this passphrase"):
        luks2.unlock(path, b"wrong")


def test_unlock_returns_a_stable_random_key(tmp_path: Path) -> None:
    a = make_volume(tmp_path, "a.img")
    b = make_volume(tmp_path, "b.img")
    key_a = luks2.unlock(a, PASSPHRASE)
    assert len(key_a) == 64
    assert luks2.unlock(a, PASSPHRASE) == key_a
    assert luks2.unlock(b, PASSPHRASE) != key_a


def test_add_and_remove_passphrases(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    key = luks2.unlock(path, PASSPHRASE)

    assert luks2.add_passphrase(path, PASSPHRASE, b"second", FAST) == 1
    info = luks2.read_info(path)
    assert info.keyslot_ids == (0, 1)
    assert info.seqid == 2
    assert info.keyslots[1].area_offset == 32768 + 258048
    assert luks2.unlock(path, b"second") == key

    area = slice(info.keyslots[0].area_offset, info.keyslots[0].area_offset + 258048)
    before = path.read_bytes()[area]
    assert luks2.remove_passphrase(path, PASSPHRASE) == 0
    after = path.read_bytes()[area]
    assert after != before  # key material overwritten ...
    assert after.count(0) < len(after) // 100  # ... with random bytes, not zeros
    assert luks2.read_info(path).keyslot_ids == (1,)
    with pytest.raises(luks2.Luks2Error, match="no keyslot matches"):
        luks2.unlock(path, PASSPHRASE)
    assert luks2.unlock(path, b"second") == key


def test_remove_last_keyslot_refused(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    with pytest.raises(luks2.Luks2Error, match="last"):
        luks2.remove_passphrase(path, PASSPHRASE)
    assert luks2.read_info(path).keyslot_ids == (0,)
    luks2.unlock(path, PASSPHRASE)


def test_add_and_remove_need_a_valid_passphrase(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    with pytest.raises(luks2.Luks2Error, match="no keyslot matches"):
        luks2.add_passphrase(path, b"wrong", b"third", FAST)
    with pytest.raises(luks2.Luks2Error, match="no keyslot matches"):
        luks2.remove_passphrase(path, b"wrong")
    assert luks2.read_info(path).keyslot_ids == (0, 1)


def test_freed_slot_and_area_are_reused(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    luks2.add_passphrase(path, PASSPHRASE, b"one", FAST)
    luks2.add_passphrase(path, PASSPHRASE, b"two", FAST)
    freed = luks2.read_info(path).keyslots[1]
    luks2.remove_passphrase(path, b"one")
    assert luks2.add_passphrase(path, b"two", b"three", FAST) == 1
    reused = luks2.read_info(path).keyslots[1]
    assert reused.area_offset == freed.area_offset
    assert luks2.unlock(path, b"three") == luks2.unlock(path, PASSPHRASE)


def rewrite_metadata(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON of a volume and rewrite both copies, as another tool might."""
    fd = os.open(path, os.O_RDWR)
    try:
        header = luks2._load_header(fd, path)
        raw = json.loads(json.dumps(header.raw))
        edit(raw)
        luks2._write_headers(fd, header.identity, header.seqid + 1, raw)
    finally:
        os.close(fd)


def test_unsupported_keyslot_is_skipped(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)

    def make_slot0_scrypt(raw: dict[str, Any]) -> None:
        raw["keyslots"]["0"]["kdf"]["type"] = "scrypt"

    rewrite_metadata(path, make_slot0_scrypt)
    assert luks2.read_info(path).keyslots[0].kdf == "scrypt"
    luks2.unlock(path, b"second")
    with pytest.raises(luks2.Luks2Error, match="unsupported keyslot KDF 'scrypt'"):
        luks2.unlock(path, PASSPHRASE)


def test_unknown_metadata_survives_updates(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    token = {"type": "netblk-test", "keyslots": ["0"], "note": "kept"}

    def add_token(raw: dict[str, Any]) -> None:
        raw["tokens"]["0"] = dict(token)

    rewrite_metadata(path, add_token)
    luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    luks2.remove_passphrase(path, PASSPHRASE)
    raw = json.loads(path.read_bytes()[4096 : luks2.METADATA_SIZE].rstrip(b"\0"))
    # The token survives; its reference to the destroyed keyslot does not.
    assert raw["tokens"]["0"] == {**token, "keyslots": []}


def test_concurrent_update_is_refused(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    with path.open("rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(luks2.Luks2Error, match="another process"):
            luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
    assert luks2.read_info(path).keyslot_ids == (0,)


@pytest.mark.parametrize("key_size", [64, 20])
def test_af_split_merge_round_trip(key_size: int) -> None:
    key = os.urandom(key_size)
    material = luks2._af_split(key, luks2.AF_STRIPES, "sha256")
    assert len(material) == key_size * luks2.AF_STRIPES
    assert luks2._af_merge(material, key_size, luks2.AF_STRIPES, "sha256") == key
    damaged = bytearray(material)
    damaged[key_size * 17] ^= 1  # one bit in one stripe destroys the key
    assert luks2._af_merge(bytes(damaged), key_size, luks2.AF_STRIPES, "sha256") != key


# ---------------------------------------------------------------------------
# Layout: header copies, keyslot areas and the data segment never overlap
# ---------------------------------------------------------------------------

KIB = 1 << 10
#: make_volume's file: 16 MiB of header and keyslots, then the data.
VOLUME_FILE_SIZE = luks2.DATA_OFFSET + DATA_SIZE
DETACHED = r": is this a detached header\? storaged needs the header and data in one volume"

Edit = Callable[[dict[str, Any]], None]


def write_unchecked_metadata(path: Path, edit: Edit) -> None:
    """Like rewrite_metadata, but also writes JSON that storaged refuses to
    write itself: a crafted or foreign header."""
    fd = os.open(path, os.O_RDWR)
    try:
        header = luks2._load_header(fd, path)
        raw = json.loads(json.dumps(header.raw))
        edit(raw)
        metadata_size = header.identity.metadata_size
        json_area = luks2._json_area(raw, metadata_size)
        for offset in (0, metadata_size):
            binary = bytearray(
                luks2._binary_header(header.identity, header.seqid + 1, secondary=offset > 0)
            )
            csum = luks2._checksum(luks2.HEADER_CHECKSUM_ALG, bytes(binary), json_area)
            binary[luks2.CHECKSUM_FIELD_OFFSET : luks2.CHECKSUM_FIELD_OFFSET + len(csum)] = csum
            os.pwrite(fd, bytes(binary) + json_area, offset)
    finally:
        os.close(fd)


def set_segment(**fields: int) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        raw["segments"]["0"].update({key: str(value) for key, value in fields.items()})

    return edit


def move_keyslot_area(offset: int) -> Edit:
    """Keyslot 0's area at ``offset`` (its key material stays where it was)."""

    def edit(raw: dict[str, Any]) -> None:
        raw["keyslots"]["0"]["area"]["offset"] = str(offset)

    return edit


def add_keyslot_copy(offset: int) -> Edit:
    """A second keyslot, keyslot 0's copy with its area at ``offset``."""

    def edit(raw: dict[str, Any]) -> None:
        raw["keyslots"]["1"] = json.loads(json.dumps(raw["keyslots"]["0"]))
        raw["keyslots"]["1"]["area"]["offset"] = str(offset)
        raw["digests"]["0"]["keyslots"].append("1")

    return edit


#: Keyslot 0 of make_volume: 32 KiB-284 KiB (4000 stripes of a 64-byte key).
SLOT0 = "32 KiB-284 KiB"

#: id: (edit, error, whether cryptsetup's own header validation accepts it:
#: those layouts are wrong only for a header and data in one volume of this size).
BAD_LAYOUTS: dict[str, tuple[Edit, str, bool]] = {
    "segment-at-0": (
        set_segment(offset=0),
        r"data segment at offset 0 overlaps the LUKS2 header \(0-16 MiB\)" + DETACHED,
        True,
    ),
    "segment-in-keyslot-area": (
        set_segment(offset=luks2.KEYSLOTS_OFFSET + 4 * KIB),
        rf"data segment at offset 36 KiB overlaps the area of keyslot 0 \({SLOT0}\)" + DETACHED,
        False,
    ),
    "segment-in-free-keyslots-space": (
        set_segment(offset=8 * MIB),
        r"data segment at offset 8 MiB overlaps the LUKS2 header \(0-16 MiB\)" + DETACHED,
        False,
    ),
    "segment-beyond-the-file": (
        set_segment(offset=32 * MIB),
        r"data segment at offset 32 MiB starts at or beyond the end of the volume \(17 MiB\)",
        True,
    ),
    "segment-at-the-end-of-the-file": (
        set_segment(offset=VOLUME_FILE_SIZE),
        r"data segment at offset 17 MiB starts at or beyond the end of the volume \(17 MiB\)",
        True,
    ),
    "fixed-size-past-the-file": (
        set_segment(size=2 * MIB),
        r"data segment 16 MiB-18 MiB runs past the end of the volume \(17 MiB\)",
        True,
    ),
    "unaligned-segment-offset": (
        set_segment(offset=luks2.DATA_OFFSET + 100),
        r"both copies: invalid JSON metadata: segment 0: offset 16777316 is not a multiple "
        r"of 512 bytes",
        False,
    ),
    "segment-size-not-whole-sectors": (
        set_segment(size=DATA_SIZE - 512),
        r"segment 0: size 1048064 is not a positive multiple of the sector size 4096",
        False,
    ),
    "keyslot-over-the-secondary-header": (
        move_keyslot_area(luks2.METADATA_SIZE),
        r"keyslot 0: area 16 KiB-268 KiB overlaps the LUKS2 header copies \(0-32 KiB\)",
        False,
    ),
    "keyslot-past-the-keyslots-area": (
        move_keyslot_area(luks2.DATA_OFFSET - 4 * KIB),
        r"keyslot 0: area 16380 KiB-16632 KiB runs past the keyslots area \(32 KiB-16 MiB\)",
        False,
    ),
    "keyslots-overlapping": (
        add_keyslot_copy(luks2.KEYSLOTS_OFFSET + 4 * KIB),
        rf"keyslot 1: area 36 KiB-288 KiB overlaps the area of keyslot 0 \({SLOT0}\)",
        False,
    ),
}


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_layout_is_refused_at_open(tmp_path: Path, case: str) -> None:
    """A volume whose data would overwrite its header or keyslots, or lies
    outside the file, never opens: the server's start fails with the reason."""
    edit, error, _cryptsetup_parses = BAD_LAYOUTS[case]
    path = make_volume(tmp_path)
    write_unchecked_metadata(path, edit)
    with pytest.raises(luks2.Luks2Error, match=error):
        Volume.open(path, PASSPHRASE)


@pytest.mark.parametrize(
    ("edit", "offset", "size"),
    [
        (set_segment(size=DATA_SIZE), luks2.DATA_OFFSET, DATA_SIZE),
        (set_segment(size=DATA_SIZE // 2), luks2.DATA_OFFSET, DATA_SIZE // 2),
        (
            set_segment(offset=luks2.DATA_OFFSET + 4 * KIB),
            luks2.DATA_OFFSET + 4 * KIB,
            MIB - 4 * KIB,
        ),
    ],
    ids=["fixed-to-the-end", "fixed-short-of-the-end", "dynamic-after-a-gap"],
)
def test_segment_between_header_and_end_opens(
    tmp_path: Path, edit: Edit, offset: int, size: int
) -> None:
    path = make_volume(tmp_path)
    key = luks2.unlock(path, PASSPHRASE)
    rewrite_metadata(path, edit)
    volume = Volume.open(path, PASSPHRASE)
    assert (luks2.read_info(path).data_offset, volume.size) == (offset, size)
    assert luks2.unlock(path, PASSPHRASE) == key
    volume.close()


def test_storaged_never_writes_a_bad_layout(tmp_path: Path) -> None:
    path = make_volume(tmp_path)
    before = path.read_bytes()[: 2 * luks2.METADATA_SIZE]
    with pytest.raises(luks2.Luks2Error, match="overlaps the area of keyslot 0"):
        rewrite_metadata(path, add_keyslot_copy(luks2.KEYSLOTS_OFFSET + 4 * KIB))
    assert path.read_bytes()[: 2 * luks2.METADATA_SIZE] == before


class ImageStore:
    """Stands in for an RbdStore: the image's size is its own, not a file's."""

    def __init__(self, content: bytes, size: int) -> None:
        self.content = content
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        return self.content[offset : offset + length].ljust(length, b"\0")


def image_info(tmp_path: Path, volume: Path, image_size: int) -> luks2.VolumeInfo:
    """What storaged reads from an image holding ``volume``'s header."""
    image = RbdImage(pool="netblk", image="data", conf=tmp_path / "ceph.conf", client="netblk")
    store = ImageStore(volume.read_bytes()[: luks2.DATA_OFFSET], image_size)
    with header_file(image, store) as header:  # type: ignore[arg-type]
        return luks2.read_info(header)


def test_image_size_bounds_the_segment(tmp_path: Path) -> None:
    """An RBD image's size is the device size, whatever size the file had."""
    dynamic = make_volume(tmp_path, "dynamic.img")
    with pytest.raises(
        luks2.Luks2Error,
        match=r"data segment at offset 16 MiB starts at or beyond the end of the volume \(16 MiB\)",
    ):
        image_info(tmp_path, dynamic, luks2.DATA_OFFSET)
    fixed = make_volume(tmp_path, "fixed.img")
    rewrite_metadata(fixed, set_segment(size=DATA_SIZE))
    assert image_info(tmp_path, fixed, VOLUME_FILE_SIZE).data_size == DATA_SIZE
    with pytest.raises(
        luks2.Luks2Error,
        match=r"data segment 16 MiB-17 MiB runs past the end of the volume \(16896 KiB\)",
    ):
        image_info(tmp_path, fixed, VOLUME_FILE_SIZE - DATA_SIZE // 2)


# ---------------------------------------------------------------------------
# KDF parameter selection
# ---------------------------------------------------------------------------


def test_benchmark_respects_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the machine has 32 MiB of RAM: at most half of it may be used.
    monkeypatch.setattr(luks2, "_physical_memory_kib", lambda: 32 * 1024)
    params = luks2.benchmark_kdf(100)
    assert params.memory_kib <= 16 * 1024
    assert params.time_cost >= luks2.ARGON2_MIN_TIME_COST
    assert 1 <= params.parallelism <= min(4, os.cpu_count() or 1)


def test_benchmark_hits_target_time() -> None:
    params = luks2.benchmark_kdf(200, max_memory_kib=16 * 1024, parallelism=1)
    assert params.memory_kib <= 16 * 1024
    assert params.parallelism == 1
    start = time.perf_counter()
    luks2._argon2("argon2id", b"pw", bytes(32), params, 64)
    elapsed_ms = (time.perf_counter() - start) * 1000
    # Loose bounds: a loaded CI machine is noisy, a broken benchmark is off by far more.
    assert 40 < elapsed_ms < 1000


def test_digest_benchmark_has_a_floor() -> None:
    quick = luks2.benchmark_digest_iterations(1)
    assert quick >= luks2.PBKDF2_MIN_ITERATIONS
    assert luks2.benchmark_digest_iterations() > quick


# ---------------------------------------------------------------------------
# Interoperability with the real cryptsetup
# ---------------------------------------------------------------------------


@pytest.mark.cryptsetup
@requires_cryptsetup
class TestCryptsetupReadsOurs:
    def test_luks_dump(self, tmp_path: Path) -> None:
        path = make_volume(tmp_path, label="netblk")
        dump = cryptsetup("luksDump", path).stdout
        info = luks2.read_info(path)
        assert re.search(r"^Version:\s+2$", dump, re.M)
        assert re.search(rf"^UUID:\s+{info.uuid}$", dump, re.M)
        assert re.search(r"^Label:\s+netblk$", dump, re.M)
        assert re.search(r"cipher: aes-xts-plain64$", dump, re.M)
        assert re.search(r"sector: 4096 \[bytes\]$", dump, re.M)
        assert re.search(r"offset: 16777216 \[bytes\]$", dump, re.M)
        assert re.search(r"PBKDF:\s+argon2id$", dump, re.M)
        assert re.search(r"Time cost:\s+4$", dump, re.M)
        assert re.search(r"Memory:\s+32768$", dump, re.M)
        assert re.search(r"AF stripes:\s+4000$", dump, re.M)
        assert cryptsetup("isLuks", "--type", "luks2", path, check=False).returncode == 0

    def test_test_passphrase(self, tmp_path: Path) -> None:
        path = make_volume(tmp_path)
        assert cryptsetup_accepts(tmp_path, path, PASSPHRASE)
        assert not cryptsetup_accepts(tmp_path, path, b"wrong")

    def test_dump_volume_key_matches_unlock(self, tmp_path: Path) -> None:
        path = make_volume(tmp_path)
        assert cryptsetup_volume_key(tmp_path, path, PASSPHRASE) == luks2.unlock(path, PASSPHRASE)

    def test_after_add_and_remove(self, tmp_path: Path) -> None:
        path = make_volume(tmp_path)
        key = luks2.unlock(path, PASSPHRASE)
        luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
        assert cryptsetup_accepts(tmp_path, path, b"second")
        assert cryptsetup_volume_key(tmp_path, path, b"second") == key
        luks2.remove_passphrase(path, PASSPHRASE)
        assert not cryptsetup_accepts(tmp_path, path, PASSPHRASE)
        assert cryptsetup_accepts(tmp_path, path, b"second")
        assert re.search(r"^Epoch:\s+3$", cryptsetup("luksDump", path).stdout, re.M)

    def test_cryptsetup_add_key_on_ours(self, tmp_path: Path) -> None:
        path = make_volume(tmp_path)
        cryptsetup(
            "luksAddKey",
            "--batch-mode",
            *ARGON2_SMALL,
            "--key-file",
            key_file(tmp_path, PASSPHRASE),
            path,
            key_file(tmp_path, b"added"),
        )
        assert luks2.read_info(path).keyslot_ids == (0, 1)
        assert luks2.unlock(path, b"added") == luks2.unlock(path, PASSPHRASE)
        # and our removal of the original is seen by cryptsetup
        luks2.remove_passphrase(path, PASSPHRASE)
        assert not cryptsetup_accepts(tmp_path, path, PASSPHRASE)
        assert cryptsetup_accepts(tmp_path, path, b"added")


@pytest.mark.cryptsetup
@requires_cryptsetup
class TestWeReadCryptsetups:
    def test_argon2id_volume(self, tmp_path: Path) -> None:
        path = cryptsetup_format(tmp_path, *ARGON2_SMALL, "--pbkdf-parallel", "1")
        info = luks2.read_info(path)
        uuid = cryptsetup("luksUUID", path).stdout.strip()
        assert info.uuid == uuid
        assert info.cipher == "aes-xts-plain64"
        assert info.key_size_bits == 512
        assert info.sector_size == 4096
        assert info.data_offset == 16 * MIB
        assert info.data_size == 4 * MIB
        assert [(s.kdf, s.time_cost, s.memory_kib) for s in info.keyslots] == [
            ("argon2id", 4, 32768)
        ]
        key = luks2.unlock(path, PASSPHRASE)
        assert key == cryptsetup_volume_key(tmp_path, path, PASSPHRASE)
        with pytest.raises(luks2.Luks2Error, match="no keyslot matches"):
            luks2.unlock(path, b"wrong")

    def test_add_passphrase_on_cryptsetup_volume(self, tmp_path: Path) -> None:
        path = cryptsetup_format(tmp_path, *ARGON2_SMALL)
        assert luks2.add_passphrase(path, PASSPHRASE, b"from storaged", FAST) == 1
        assert cryptsetup_accepts(tmp_path, path, b"from storaged")
        assert cryptsetup_accepts(tmp_path, path, PASSPHRASE)
        assert cryptsetup_volume_key(tmp_path, path, b"from storaged") == luks2.unlock(
            path, PASSPHRASE
        )
        # cryptsetup's own removal of its slot leaves a volume we still open.
        cryptsetup("luksKillSlot", "--batch-mode", path, "0")
        assert luks2.read_info(path).keyslot_ids == (1,)
        luks2.unlock(path, b"from storaged")

    def test_pbkdf2_volume(self, tmp_path: Path) -> None:
        path = cryptsetup_format(tmp_path, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
        slot = luks2.read_info(path).keyslots[0]
        assert (slot.kdf, slot.kdf_hash, slot.time_cost) == ("pbkdf2", "sha256", 1000)
        assert luks2.unlock(path, PASSPHRASE) == cryptsetup_volume_key(tmp_path, path, PASSPHRASE)

    def test_unsupported_data_cipher_is_refused(self, tmp_path: Path) -> None:
        path = cryptsetup_format(
            tmp_path, *ARGON2_SMALL, "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"
        )
        assert luks2.read_info(path).cipher == "aes-cbc-essiv:sha256"
        with pytest.raises(luks2.Luks2Error, match="unsupported data cipher"):
            luks2.unlock(path, PASSPHRASE)

    def test_detached_header_is_refused(self, tmp_path: Path) -> None:
        """`luksFormat --header` puts the data at offset 0 of another device:
        served as a volume, the header file's 16 MiB would be the export."""
        header = tmp_path / "detached.hdr"
        data = cryptsetup_format(tmp_path, *ARGON2_SMALL, "--header", str(header))
        before = header.read_bytes()
        with pytest.raises(
            luks2.Luks2Error,
            match=r"data segment at offset 0 overlaps the LUKS2 header \(0-16 MiB\)" + DETACHED,
        ):
            Volume.open(header, PASSPHRASE)
        assert header.read_bytes() == before
        # The data device holds no header at all.
        with pytest.raises(luks2.Luks2Error, match="not a LUKS2 volume"):
            luks2.read_info(data)

    def test_larger_header_copies(self, tmp_path: Path) -> None:
        """With 64 KiB copies the keyslots start at 128 KiB, not 32 KiB."""
        path = cryptsetup_format(tmp_path, *ARGON2_SMALL, "--luks2-metadata-size", "64k")
        info = luks2.read_info(path)
        assert [slot.area_offset for slot in info.keyslots] == [128 * KIB]
        assert luks2.unlock(path, PASSPHRASE) == cryptsetup_volume_key(tmp_path, path, PASSPHRASE)
        write_unchecked_metadata(path, move_keyslot_area(64 * KIB))
        with pytest.raises(
            luks2.Luks2Error,
            match=r"keyslot 0: area 64 KiB-316 KiB overlaps the LUKS2 header copies "
            r"\(0-128 KiB\)",
        ):
            luks2.read_info(path)

    def test_new_keyslot_goes_after_the_largest_header_copies(self, tmp_path: Path) -> None:
        """4 MiB copies end at 8 MiB: a keyslot placed before would be overwritten
        by the next header write."""
        path = cryptsetup_format(tmp_path, *ARGON2_SMALL, "--luks2-metadata-size", "4m")
        luks2.add_passphrase(path, PASSPHRASE, b"second", FAST)
        offsets = [slot.area_offset for slot in luks2.read_info(path).keyslots]
        assert min(offsets) >= 2 * luks2.MAX_METADATA_SIZE
        assert cryptsetup_accepts(tmp_path, path, b"second")
        assert luks2.unlock(path, b"second") == luks2.unlock(path, PASSPHRASE)

    @pytest.mark.parametrize("case", BAD_LAYOUTS)
    def test_cryptsetup_agrees_about_bad_layouts(self, tmp_path: Path, case: str) -> None:
        """What cryptsetup's header validation refuses, storaged refuses too; the
        rest cryptsetup refuses only on activation (header and data on one device
        or a device too small)."""
        edit, _error, cryptsetup_parses = BAD_LAYOUTS[case]
        path = make_volume(tmp_path)
        write_unchecked_metadata(path, edit)
        assert (cryptsetup("luksDump", path, check=False).returncode == 0) == cryptsetup_parses
