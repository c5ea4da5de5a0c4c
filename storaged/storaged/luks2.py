"""LUKS2 encryption at rest for storaged volumes, in pure Python.

The on-disk format is cryptsetup's LUKS2 so that ``cryptsetup`` on the server
can open a storaged volume and storaged can serve a volume made by
``cryptsetup luksFormat --type luks2 --sector-size 4096 --pbkdf argon2id``.
Every layout detail below was checked against cryptsetup 2.6 (Debian 12),
both by reading its sources and by the interoperability tests.

Layout of a volume file made here (the cryptsetup 2.6 defaults)::

    0        primary binary header (4 KiB) + JSON area (12 KiB)
    16 KiB   secondary binary header + JSON area (same JSON, own salt/checksum)
    32 KiB   keyslots area: AF-split, AES-XTS encrypted copies of the volume key,
             the rest filled with random bytes so used and free space look alike
    16 MiB   data segment: AES-XTS-plain64, 4096-byte sectors, sparse

Header copies, keyslot areas and the data segment never overlap, and the
segment lies within the file or image (cryptsetup's rules, which it applies
to the data only when activating): the header and data are one volume here,
never a detached header.

The module is the header format and the keyslots, layered: header parsing
and validation, keyslot crypto (KDF, anti-forensic split/merge, keyslot-area
encryption, key digest), header writing, and the public operations built on
them.  Every failure surfaces as :class:`Luks2Error`.  The per-request cipher
of the data segment (AES-XTS, plain64 tweaks) is ``storaged.sectors``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from argon2.exceptions import HashingError
from argon2.low_level import Type as Argon2Type
from argon2.low_level import hash_secret_raw

from storaged.sectors import (
    IV_UNIT,
    PLAIN64_LIMIT,
    CipherError,
    SectorCipher,
    valid_sector_size,
)

# --------------------------------------------------------------------------
# Format constants (lib/luks2/luks2.h and cryptsetup 2.6 defaults)
# --------------------------------------------------------------------------

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
LUKS2_VERSION = 2

#: The binary header is 512 bytes of fields padded to 4 KiB; the JSON area follows it.
BINARY_HEADER_SIZE = 4096
LABEL_FIELD_SIZE = 48
CHECKSUM_ALG_FIELD_SIZE = 32
HEADER_SALT_SIZE = 64
UUID_FIELD_SIZE = 40
_HEADER_PADDING_SIZE = 184
CHECKSUM_FIELD_SIZE = 64
#: magic, version, hdr_size, seqid, label, checksum_alg, salt, uuid, subsystem,
#: hdr_offset, padding, csum -- all integers big-endian (struct luks2_hdr_disk).
_BINARY_HEADER = struct.Struct(
    f">{len(MAGIC_PRIMARY)}sHQQ{LABEL_FIELD_SIZE}s{CHECKSUM_ALG_FIELD_SIZE}s"
    f"{HEADER_SALT_SIZE}s{UUID_FIELD_SIZE}s{LABEL_FIELD_SIZE}sQ"
    f"{_HEADER_PADDING_SIZE}s{CHECKSUM_FIELD_SIZE}s"
)
#: Byte offset of the csum field inside the binary header.
CHECKSUM_FIELD_OFFSET = _BINARY_HEADER.size - CHECKSUM_FIELD_SIZE
HEADER_CHECKSUM_ALG = "sha256"

#: Size of one header copy (binary header + JSON area), cryptsetup's default.
METADATA_SIZE = 16 * 1024
#: Where cryptsetup looks for the secondary header when the primary is unreadable.
SECONDARY_HEADER_OFFSETS = (
    0x4000,
    0x8000,
    0x10000,
    0x20000,
    0x40000,
    0x80000,
    0x100000,
    0x200000,
    0x400000,
)
#: Largest header copy cryptsetup accepts (LUKS2_HDR_OFFSET_MAX).
MAX_METADATA_SIZE = 0x400000

#: cryptsetup's default data offset for LUKS2.
DATA_OFFSET = 16 * 1024 * 1024
KEYSLOTS_OFFSET = 2 * METADATA_SIZE
KEYSLOTS_SIZE = DATA_OFFSET - KEYSLOTS_OFFSET
#: Keyslot areas start and end on 4 KiB boundaries.
KEYSLOT_AREA_ALIGNMENT = 4096
#: Segment offsets and sizes are whole 512-byte sectors (cryptsetup's MISALIGNED_512).
SEGMENT_ALIGNMENT = 512
MAX_KEYSLOTS = 32

CIPHER = "aes-xts-plain64"
VOLUME_KEY_SIZE = 64
SECTOR_SIZE = 4096

AF_STRIPES = 4000
AF_HASH = "sha256"
#: The anti-forensic diffuser hashes each chunk after its 32-bit big-endian index.
_AF_INDEX_SIZE = 4
#: LUKS_SALTSIZE: salt length of keyslot KDFs and of the key digest.
KDF_SALT_SIZE = 32
#: LUKS1-era digests are truncated to 20 bytes; newer ones are the full hash.
LEGACY_DIGEST_SIZE = 20
DIGEST_HASH = "sha256"
#: LUKS_MKD_ITERATIONS_MS: the key digest is benchmarked to cost about this much.
DIGEST_ITER_TIME_MS = 125
#: NIST SP 800-132 minimum, also cryptsetup's floor for PBKDF2.
PBKDF2_MIN_ITERATIONS = 1000

ARGON2_VERSION = 0x13
ARGON2_MIN_TIME_COST = 4
ARGON2_MIN_MEMORY_KIB = 32
ARGON2_MAX_MEMORY_KIB = 4 * 1024 * 1024
ARGON2_MAX_PARALLELISM = 4
#: Argon2 needs at least 8 KiB of memory per lane.
ARGON2_MIN_MEMORY_PER_LANE_KIB = 8
DEFAULT_MEMORY_KIB = 1024 * 1024
DEFAULT_ITER_TIME_MS = 2000
#: Benchmark constants from lib/crypto_backend/pbkdf_check.c.
BENCH_MIN_MS = 250
BENCH_MIN_MS_FAST = 10
BENCH_FAST_SCALE = 16
BENCH_PERCENT_ATLEAST = 95
BENCH_PERCENT_ATMOST = 110
PBKDF2_BENCH_START_ITERATIONS = 1 << 12
PBKDF2_BENCH_MIN_MS = 50

KEYSLOT_PRIORITY_IGNORE = 0
KEYSLOT_PRIORITY_NORMAL = 1

_ARGON2_TYPES = {"argon2id": Argon2Type.ID, "argon2i": Argon2Type.I}
_SUPPORTED_HASHES = frozenset({"sha1", "sha256", "sha512"})

FILE_MODE = 0o600

JsonObject = dict[str, Any]


class Luks2Error(Exception):
    """Any failure to read, unlock or modify a LUKS2 volume."""


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost for a new keyslot (cryptsetup's --pbkdf-force-iterations,
    --pbkdf-memory and --pbkdf-parallel)."""

    time_cost: int
    memory_kib: int
    parallelism: int


#: Fast parameters for tests and CI only: an unlock costs milliseconds.
TEST_KDF_PARAMS = KdfParams(time_cost=4, memory_kib=32768, parallelism=1)


@dataclass(frozen=True)
class KeyslotInfo:
    """One keyslot as stored: for pbkdf2 slots time_cost is the iteration
    count and memory_kib/parallelism are 0; kdf_hash is None for argon2."""

    id: int
    kdf: str
    time_cost: int
    memory_kib: int
    parallelism: int
    kdf_hash: str | None
    area_offset: int
    area_size: int
    priority: int


@dataclass(frozen=True)
class VolumeInfo:
    """What a volume header says about its data segment and keyslots."""

    uuid: str
    label: str
    cipher: str
    key_size_bits: int
    sector_size: int
    iv_tweak: int
    data_offset: int
    data_size: int
    seqid: int
    keyslots: tuple[KeyslotInfo, ...]

    @property
    def keyslot_ids(self) -> tuple[int, ...]:
        return tuple(slot.id for slot in self.keyslots)


# --------------------------------------------------------------------------
# Parsed header model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kdf:
    type: str
    salt: bytes
    time_cost: int  # argon2 passes, or pbkdf2 iterations
    memory_kib: int
    parallelism: int
    hash: str | None


@dataclass(frozen=True)
class _Keyslot:
    id: int
    key_size: int
    af_stripes: int
    af_hash: str
    area_offset: int
    area_size: int
    area_cipher: str
    area_key_size: int
    kdf: _Kdf
    priority: int


@dataclass(frozen=True)
class _Digest:
    id: str
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str
    iterations: int
    salt: bytes
    digest: bytes


@dataclass(frozen=True)
class _Segment:
    offset: int
    size: int | None  # None means "dynamic": up to the end of the device
    cipher: str
    sector_size: int
    iv_tweak: int


class _Area(NamedTuple):
    """The bytes a keyslot of any type owns in the keyslots area."""

    keyslot: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class _Metadata:
    """The parts of the JSON metadata this module interprets."""

    keyslots: dict[int, _Keyslot]
    areas: tuple[_Area, ...]
    digests: tuple[_Digest, ...]
    segment: _Segment
    #: The keyslots area follows the two header copies (2 x hdr_size).
    keyslots_offset: int
    keyslots_size: int

    @property
    def header_end(self) -> int:
        """End of the header copies and keyslots area (LUKS2_hdr_and_areas_size)."""
        return self.keyslots_offset + self.keyslots_size

    def volume_key_size(self) -> int:
        """Key size of the keyslots bound to segment 0 (LUKS2 stores it nowhere else)."""
        for digest in self.digests:
            if 0 in digest.segments:
                for slot_id in digest.keyslots:
                    if slot_id in self.keyslots:
                        return self.keyslots[slot_id].key_size
        raise Luks2Error("no keyslot is bound to the data segment")


@dataclass(frozen=True)
class _Identity:
    """Binary-header fields that stay the same when a header is rewritten."""

    metadata_size: int
    uuid: str
    label: str
    subsystem: str


@dataclass(frozen=True)
class _Header:
    """The newest valid header copy; ``raw`` is the JSON kept whole so rewriting it
    preserves fields this module does not interpret (tokens, flags, priorities)."""

    seqid: int
    identity: _Identity
    raw: JsonObject
    meta: _Metadata


class _DiskHeader(NamedTuple):
    """struct luks2_hdr_disk, as unpacked by :data:`_BINARY_HEADER`."""

    magic: bytes
    version: int
    metadata_size: int
    seqid: int
    label: bytes
    checksum_alg: bytes
    salt: bytes
    uuid: bytes
    subsystem: bytes
    hdr_offset: int
    padding: bytes
    csum: bytes


# --------------------------------------------------------------------------
# Header parsing and validation
# --------------------------------------------------------------------------


_BINARY_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def _size_text(size: int) -> str:
    """A byte count or offset in the largest binary unit that divides it."""
    if size == 0:
        return "0"
    for unit, name in _BINARY_UNITS:
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def _span(start: int, end: int) -> str:
    return f"{_size_text(start)}-{_size_text(end)}"


def _get(obj: JsonObject, key: str, kind: type, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Luks2Error(f"{where}: missing or malformed {key!r}")
    return value


def _get_obj(obj: JsonObject, key: str, where: str) -> JsonObject:
    value: JsonObject = _get(obj, key, dict, where)
    return value


def _get_str(obj: JsonObject, key: str, where: str) -> str:
    value: str = _get(obj, key, str, where)
    return value


def _get_int(obj: JsonObject, key: str, where: str) -> int:
    value: int = _get(obj, key, int, where)
    if value < 0:
        raise Luks2Error(f"{where}: negative {key!r}")
    return value


def _get_u64(obj: JsonObject, key: str, where: str) -> int:
    """LUKS2 stores 64-bit quantities as decimal strings (JSON numbers are doubles)."""
    text = _get_str(obj, key, where)
    if not text.isdigit() or int(text) >= PLAIN64_LIMIT:
        raise Luks2Error(f"{where}: {key!r} is not a 64-bit decimal string")
    return int(text)


def _get_b64(obj: JsonObject, key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_get_str(obj, key, where), validate=True)
    except binascii.Error as exc:
        raise Luks2Error(f"{where}: {key!r} is not base64") from exc


def _get_id_list(obj: JsonObject, key: str, where: str) -> tuple[int, ...]:
    items = _get(obj, key, list, where)
    if not all(isinstance(item, str) and item.isdigit() for item in items):
        raise Luks2Error(f"{where}: {key!r} must list decimal ids")
    return tuple(int(item) for item in items)


def _parse_kdf(kdf: JsonObject, where: str) -> _Kdf:
    kind = _get_str(kdf, "type", where)
    salt = _get_b64(kdf, "salt", where)
    if kind in _ARGON2_TYPES:
        return _Kdf(
            type=kind,
            salt=salt,
            time_cost=_get_int(kdf, "time", where),
            memory_kib=_get_int(kdf, "memory", where),
            parallelism=_get_int(kdf, "cpus", where),
            hash=None,
        )
    if kind == "pbkdf2":
        return _Kdf(
            type=kind,
            salt=salt,
            time_cost=_get_int(kdf, "iterations", where),
            memory_kib=0,
            parallelism=0,
            hash=_get_str(kdf, "hash", where),
        )
    # Unknown KDFs are reported, and refused only when unlocking with them.
    return _Kdf(type=kind, salt=salt, time_cost=0, memory_kib=0, parallelism=0, hash=None)


def _parse_area(slot_id: int, slot: JsonObject) -> _Area:
    where = f"keyslot {slot_id}"
    area = _get_obj(slot, "area", where)
    return _Area(slot_id, _get_u64(area, "offset", where), _get_u64(area, "size", where))


def _check_areas(areas: list[_Area], keyslots_offset: int, keyslots_size: int) -> None:
    """cryptsetup's validate_intervals: every keyslot area is non-empty, lies in
    the keyslots area (never over a header copy) and overlaps no other area."""
    keyslots_end = keyslots_offset + keyslots_size
    previous: _Area | None = None
    # Sorted by offset, any overlap shows between neighbours.
    for area in sorted(areas, key=lambda area: area.offset):
        where = f"keyslot {area.keyslot}: area {_span(area.offset, area.end)}"
        if area.size == 0:
            raise Luks2Error(f"keyslot {area.keyslot}: empty area")
        if area.offset < keyslots_offset:
            raise Luks2Error(
                f"{where} overlaps the LUKS2 header copies ({_span(0, keyslots_offset)})"
            )
        if area.end > keyslots_end:
            raise Luks2Error(
                f"{where} runs past the keyslots area ({_span(keyslots_offset, keyslots_end)})"
            )
        if previous is not None and area.offset < previous.end:
            raise Luks2Error(
                f"{where} overlaps the area of keyslot {previous.keyslot} "
                f"({_span(previous.offset, previous.end)})"
            )
        previous = area


def _parse_keyslot(area: _Area, slot: JsonObject) -> _Keyslot:
    where = f"keyslot {area.keyslot}"
    af = _get_obj(slot, "af", where)
    area_json = _get_obj(slot, "area", where)
    keyslot = _Keyslot(
        id=area.keyslot,
        key_size=_get_int(slot, "key_size", where),
        af_stripes=_get_int(af, "stripes", where),
        af_hash=_get_str(af, "hash", where),
        area_offset=area.offset,
        area_size=area.size,
        area_cipher=_get_str(area_json, "encryption", where),
        area_key_size=_get_int(area_json, "key_size", where),
        kdf=_parse_kdf(_get_obj(slot, "kdf", where), where),
        priority=_get_int(slot, "priority", where)
        if "priority" in slot
        else KEYSLOT_PRIORITY_NORMAL,
    )
    if keyslot.key_size == 0 or keyslot.af_stripes == 0:
        raise Luks2Error(f"{where}: empty key or zero AF stripes")
    if _af_sectors(keyslot.key_size, keyslot.af_stripes) * IV_UNIT > keyslot.area_size:
        raise Luks2Error(f"{where}: area too small for {keyslot.af_stripes} stripes")
    return keyslot


def _parse_digest(digest_id: str, digest: JsonObject) -> _Digest:
    where = f"digest {digest_id}"
    kind = _get_str(digest, "type", where)
    if kind != "pbkdf2":
        raise Luks2Error(f"{where}: unsupported digest type {kind!r}")
    return _Digest(
        id=digest_id,
        keyslots=_get_id_list(digest, "keyslots", where),
        segments=_get_id_list(digest, "segments", where),
        hash=_get_str(digest, "hash", where),
        iterations=_get_int(digest, "iterations", where),
        salt=_get_b64(digest, "salt", where),
        digest=_get_b64(digest, "digest", where),
    )


def _parse_segment(segments: JsonObject) -> _Segment:
    if list(segments) != ["0"]:
        raise Luks2Error(
            f"expected exactly one data segment, found {len(segments)} (reencryption in progress?)"
        )
    segment = _get_obj(segments, "0", "segments")
    where = "segment 0"
    kind = _get_str(segment, "type", where)
    if kind != "crypt":
        raise Luks2Error(f"{where}: unsupported segment type {kind!r}")
    offset = _get_u64(segment, "offset", where)
    size_text = _get_str(segment, "size", where)
    size = None if size_text == "dynamic" else _get_u64(segment, "size", where)
    sector_size = _get_int(segment, "sector_size", where)
    if not valid_sector_size(sector_size):
        raise Luks2Error(f"{where}: invalid sector size {sector_size}")
    # cryptsetup's hdr_validate_segments and hdr_validate_crypt_segment.
    if offset % SEGMENT_ALIGNMENT:
        raise Luks2Error(f"{where}: offset {offset} is not a multiple of {SEGMENT_ALIGNMENT} bytes")
    if size is not None and (size == 0 or size % sector_size):
        raise Luks2Error(
            f"{where}: size {size} is not a positive multiple of the sector size {sector_size}"
        )
    return _Segment(
        offset=offset,
        size=size,
        cipher=_get_str(segment, "encryption", where),
        sector_size=sector_size,
        iv_tweak=_get_u64(segment, "iv_tweak", where),
    )


def _parse_metadata(raw: JsonObject, metadata_size: int) -> _Metadata:
    """Validate the JSON the way cryptsetup would before trusting a header copy."""
    config = _get_obj(raw, "config", "metadata")
    if _get_u64(config, "json_size", "config") != metadata_size - BINARY_HEADER_SIZE:
        raise Luks2Error("config: json_size does not match the header size")
    keyslots_size = _get_u64(config, "keyslots_size", "config")
    requirements = config.get("requirements", {})
    if isinstance(requirements, dict) and requirements.get("mandatory"):
        raise Luks2Error(f"volume has unsupported requirements {requirements['mandatory']}")
    _get_obj(raw, "tokens", "metadata")
    keyslots_offset = 2 * metadata_size
    keyslots: dict[int, _Keyslot] = {}
    areas: list[_Area] = []
    for key, slot in _get_obj(raw, "keyslots", "metadata").items():
        if not key.isdigit() or not isinstance(slot, dict):
            raise Luks2Error(f"malformed keyslot {key!r}")
        areas.append(area := _parse_area(int(key), slot))
        # Other keyslot types (reencrypt) are never opened by a passphrase.
        if slot.get("type") == "luks2":
            keyslots[int(key)] = _parse_keyslot(area, slot)
    _check_areas(areas, keyslots_offset, keyslots_size)
    digests = _get_obj(raw, "digests", "metadata")
    return _Metadata(
        keyslots=keyslots,
        areas=tuple(areas),
        digests=tuple(_parse_digest(key, _get_obj(digests, key, "digests")) for key in digests),
        segment=_parse_segment(_get_obj(raw, "segments", "metadata")),
        keyslots_offset=keyslots_offset,
        keyslots_size=keyslots_size,
    )


def _field_text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _checksum(alg: str, binary_header: bytes, json_area: bytes) -> bytes:
    """sha256 over binary header (csum zeroed) + whole JSON area, as cryptsetup does."""
    digest = hashlib.new(alg)
    digest.update(binary_header[:CHECKSUM_FIELD_OFFSET])
    digest.update(bytes(CHECKSUM_FIELD_SIZE))
    digest.update(binary_header[CHECKSUM_FIELD_OFFSET + CHECKSUM_FIELD_SIZE :])
    digest.update(json_area)
    return digest.digest()


_BAD_MAGIC = "bad magic"
_TOO_SHORT = "file too short"
#: Reasons that mean "no header here" rather than "a damaged header here".
_NO_HEADER = (_BAD_MAGIC, _TOO_SHORT)


def _read_copy(fd: int, offset: int, *, secondary: bool) -> _Header | str:
    """Read and validate one header copy; return the reason when it is unusable."""
    binary = os.pread(fd, BINARY_HEADER_SIZE, offset)
    if len(binary) < BINARY_HEADER_SIZE:
        return _TOO_SHORT
    disk = _DiskHeader._make(_BINARY_HEADER.unpack_from(binary))
    if disk.magic != (MAGIC_SECONDARY if secondary else MAGIC_PRIMARY):
        return _BAD_MAGIC
    if disk.version != LUKS2_VERSION:
        return f"unsupported LUKS version {disk.version}"
    if disk.hdr_offset != offset or (secondary and disk.metadata_size != offset):
        return "header offset mismatch"
    if not METADATA_SIZE <= disk.metadata_size <= MAX_METADATA_SIZE:
        return f"bogus header size {disk.metadata_size}"
    alg = _field_text(disk.checksum_alg)
    if alg not in _SUPPORTED_HASHES:
        return f"unsupported checksum algorithm {alg!r}"
    json_size = disk.metadata_size - BINARY_HEADER_SIZE
    json_area = os.pread(fd, json_size, offset + BINARY_HEADER_SIZE)
    if len(json_area) < json_size:
        return _TOO_SHORT
    expected = _checksum(alg, binary, json_area)
    if not hmac.compare_digest(disk.csum[: len(expected)], expected):
        return "checksum mismatch"
    text, _, padding = json_area.partition(b"\0")
    if padding.strip(b"\0"):
        return "garbage after the JSON metadata"
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            return "JSON metadata is not an object"
        meta = _parse_metadata(raw, disk.metadata_size)
    except (ValueError, Luks2Error) as exc:
        return f"invalid JSON metadata: {exc}"
    identity = _Identity(
        metadata_size=disk.metadata_size,
        uuid=_field_text(disk.uuid),
        label=_field_text(disk.label),
        subsystem=_field_text(disk.subsystem),
    )
    return _Header(seqid=disk.seqid, identity=identity, raw=raw, meta=meta)


def _load_header(fd: int, path: Path) -> _Header:
    """Return the newest valid header copy, falling back to the secondary one."""
    primary = _read_copy(fd, 0, secondary=False)
    if isinstance(primary, _Header):
        secondary = _read_copy(fd, primary.identity.metadata_size, secondary=True)
    else:
        # Without a primary we do not know the header size: probe like cryptsetup,
        # and report why a copy that exists is unusable rather than the empty probes.
        reasons = []
        for offset in SECONDARY_HEADER_OFFSETS:
            secondary = _read_copy(fd, offset, secondary=True)
            if isinstance(secondary, _Header):
                break
            reasons.append(secondary)
        else:
            secondary = next((r for r in reasons if r not in _NO_HEADER), _BAD_MAGIC)
    copies = [copy for copy in (primary, secondary) if isinstance(copy, _Header)]
    if not copies:
        if primary == _BAD_MAGIC and secondary == _BAD_MAGIC:
            raise Luks2Error(f"{path}: not a LUKS2 volume (bad magic)")
        # Both copies of one JSON fail alike: say why once.
        why = (
            f"both copies: {primary}"
            if primary == secondary
            else f"primary: {primary}; secondary: {secondary}"
        )
        raise Luks2Error(f"{path}: no valid LUKS2 header ({why})")
    return max(copies, key=lambda copy: copy.seqid)


def _device_size(fd: int) -> int:
    """Size of a regular file or a block device (st_size is 0 for the latter)."""
    return os.lseek(fd, 0, os.SEEK_END)


# --------------------------------------------------------------------------
# Keyslot crypto: KDFs, anti-forensic splitter, keyslot areas, key digest
# --------------------------------------------------------------------------


def _check_hash(name: str) -> str:
    if name not in _SUPPORTED_HASHES:
        raise Luks2Error(f"unsupported hash {name!r}")
    return name


def _argon2(kind: str, passphrase: bytes, salt: bytes, params: KdfParams, length: int) -> bytes:
    try:
        return hash_secret_raw(
            secret=passphrase,
            salt=salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=length,
            type=_ARGON2_TYPES[kind],
            version=ARGON2_VERSION,
        )
    except HashingError as exc:
        raise Luks2Error(f"{kind} failed: {exc}") from exc


def _derive_key(kdf: _Kdf, passphrase: bytes, length: int) -> bytes:
    """Turn a passphrase into the key that decrypts a keyslot area."""
    if kdf.type in _ARGON2_TYPES:
        if kdf.memory_kib > ARGON2_MAX_MEMORY_KIB:
            # A crafted header must not make us allocate without bound.
            raise Luks2Error(f"argon2 memory {kdf.memory_kib} KiB exceeds cryptsetup's limit")
        params = KdfParams(kdf.time_cost, kdf.memory_kib, kdf.parallelism)
        return _argon2(kdf.type, passphrase, kdf.salt, params, length)
    if kdf.type == "pbkdf2" and kdf.hash is not None:
        return hashlib.pbkdf2_hmac(
            _check_hash(kdf.hash), passphrase, kdf.salt, kdf.time_cost, length
        )
    raise Luks2Error(f"unsupported keyslot KDF {kdf.type!r}")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """Hash every digest-sized chunk with its big-endian index (af.c diffuse)."""
    size = hashlib.new(hash_name).digest_size
    out = []
    for index, start in enumerate(range(0, len(block), size)):
        chunk = block[start : start + size]
        digest = hashlib.new(hash_name, index.to_bytes(_AF_INDEX_SIZE, "big") + chunk).digest()
        out.append(digest[: len(chunk)])
    return b"".join(out)


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "little") ^ int.from_bytes(right, "little")).to_bytes(
        len(left), "little"
    )


def _af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Spread a key over `stripes` blocks so that destroying any one destroys it."""
    size = len(key)
    accumulator = bytes(size)
    out = []
    for _ in range(stripes - 1):
        stripe = secrets.token_bytes(size)
        out.append(stripe)
        accumulator = _diffuse(_xor(accumulator, stripe), hash_name)
    out.append(_xor(accumulator, key))
    return b"".join(out)


def _af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """Inverse of :func:`_af_split`."""
    accumulator = bytes(key_size)
    for index in range(stripes - 1):
        stripe = material[index * key_size : (index + 1) * key_size]
        accumulator = _diffuse(_xor(accumulator, stripe), hash_name)
    last = material[(stripes - 1) * key_size : stripes * key_size]
    return _xor(accumulator, last)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _af_sectors(key_size: int, stripes: int) -> int:
    """512-byte sectors needed for the split key (AF_split_sectors)."""
    return _round_up(key_size * stripes, IV_UNIT) // IV_UNIT


def _area_size(key_size: int) -> int:
    """Bytes a new keyslot area takes: the split key rounded up to 4 KiB."""
    return _round_up(_af_sectors(key_size, AF_STRIPES) * IV_UNIT, KEYSLOT_AREA_ALIGNMENT)


def _keyslot_cipher(area_cipher: str, key: bytes) -> SectorCipher:
    """Keyslot areas are encrypted in 512-byte sectors, IVs counted from the area start."""
    if area_cipher != CIPHER:
        raise Luks2Error(f"unsupported keyslot cipher {area_cipher!r}")
    try:
        return SectorCipher(key, sector_size=IV_UNIT)
    except CipherError as exc:
        raise Luks2Error(f"keyslot key: {exc}") from None


def _open_keyslot(fd: int, slot: _Keyslot, passphrase: bytes) -> bytes:
    """Decrypt a keyslot with a passphrase; the result is only a candidate key."""
    af_hash = _check_hash(slot.af_hash)
    derived = _derive_key(slot.kdf, passphrase, slot.area_key_size)
    length = _af_sectors(slot.key_size, slot.af_stripes) * IV_UNIT
    encrypted = os.pread(fd, length, slot.area_offset)
    if len(encrypted) != length:
        raise Luks2Error(f"keyslot {slot.id}: area is truncated")
    material = _keyslot_cipher(slot.area_cipher, derived).decrypt(0, encrypted)
    return _af_merge(material, slot.key_size, slot.af_stripes, af_hash)


def _seal_keyslot(volume_key: bytes, passphrase: bytes, kdf: _Kdf) -> bytes:
    """Encrypted keyslot-area contents for a new keyslot (sector-padded split key)."""
    derived = _derive_key(kdf, passphrase, len(volume_key))
    material = _af_split(volume_key, AF_STRIPES, AF_HASH)
    padded = material.ljust(_af_sectors(len(volume_key), AF_STRIPES) * IV_UNIT, b"\0")
    return _keyslot_cipher(CIPHER, derived).encrypt(0, padded)


def _digest_matches(digest: _Digest, key: bytes) -> bool:
    if len(digest.digest) not in (
        LEGACY_DIGEST_SIZE,
        hashlib.new(_check_hash(digest.hash)).digest_size,
    ):
        raise Luks2Error(f"digest {digest.id}: bad digest length")
    candidate = hashlib.pbkdf2_hmac(
        digest.hash, key, digest.salt, digest.iterations, len(digest.digest)
    )
    return hmac.compare_digest(candidate, digest.digest)


def _make_digest(volume_key: bytes, iterations: int) -> JsonObject:
    """The digest of a new volume, binding keyslot 0 to segment 0."""
    salt = secrets.token_bytes(KDF_SALT_SIZE)
    value = hashlib.pbkdf2_hmac(DIGEST_HASH, volume_key, salt, iterations)
    return {
        "type": "pbkdf2",
        "keyslots": ["0"],
        "segments": ["0"],
        "hash": DIGEST_HASH,
        "iterations": iterations,
        "salt": base64.b64encode(salt).decode(),
        "digest": base64.b64encode(value).decode(),
    }


def _keyslot_json(kdf: _Kdf, area_offset: int, key_size: int) -> JsonObject:
    return {
        "type": "luks2",
        "key_size": key_size,
        "af": {"type": "luks1", "stripes": AF_STRIPES, "hash": AF_HASH},
        "area": {
            "type": "raw",
            "offset": str(area_offset),
            "size": str(_area_size(key_size)),
            "encryption": CIPHER,
            "key_size": key_size,
        },
        "kdf": {
            "type": kdf.type,
            "time": kdf.time_cost,
            "memory": kdf.memory_kib,
            "cpus": kdf.parallelism,
            "salt": base64.b64encode(kdf.salt).decode(),
        },
    }


def _new_argon2id(params: KdfParams) -> _Kdf:
    _check_kdf_params(params)
    return _Kdf(
        type="argon2id",
        salt=secrets.token_bytes(KDF_SALT_SIZE),
        time_cost=params.time_cost,
        memory_kib=params.memory_kib,
        parallelism=params.parallelism,
        hash=None,
    )


def _check_kdf_params(params: KdfParams) -> None:
    """cryptsetup's limits for forced argon2 parameters (pbkdf_check.c)."""
    if params.time_cost < ARGON2_MIN_TIME_COST:
        raise Luks2Error(f"argon2 time cost must be at least {ARGON2_MIN_TIME_COST}")
    if not 1 <= params.parallelism <= ARGON2_MAX_PARALLELISM:
        raise Luks2Error(f"argon2 parallelism must be 1..{ARGON2_MAX_PARALLELISM}")
    low = max(ARGON2_MIN_MEMORY_KIB, ARGON2_MIN_MEMORY_PER_LANE_KIB * params.parallelism)
    if not low <= params.memory_kib <= ARGON2_MAX_MEMORY_KIB:
        raise Luks2Error(f"argon2 memory must be {low}..{ARGON2_MAX_MEMORY_KIB} KiB")


def _find_volume_key(fd: int, meta: _Metadata, passphrase: bytes) -> tuple[int, bytes, _Digest]:
    """Try every usable keyslot (highest priority first) and verify against its digest."""
    slots = sorted(
        (slot for slot in meta.keyslots.values() if slot.priority != KEYSLOT_PRIORITY_IGNORE),
        key=lambda slot: (-slot.priority, slot.id),
    )
    skipped = []
    for slot in slots:
        digest = next((d for d in meta.digests if slot.id in d.keyslots), None)
        if digest is None:
            continue
        try:
            candidate = _open_keyslot(fd, slot, passphrase)
        except Luks2Error as exc:
            # One odd keyslot must not hide the others.
            skipped.append(f"keyslot {slot.id}: {exc}")
            continue
        if _digest_matches(digest, candidate):
            return slot.id, candidate, digest
    note = f" (skipped {'; '.join(skipped)})" if skipped else ""
    raise Luks2Error(f"no keyslot matches this passphrase{note}")


# --------------------------------------------------------------------------
# Parameter selection (benchmarks)
# --------------------------------------------------------------------------


def _physical_memory_kib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024


def _time_argon2(params: KdfParams) -> float:
    salt = secrets.token_bytes(KDF_SALT_SIZE)
    start = time.perf_counter()
    _argon2("argon2id", b"benchmark passphrase", salt, params, VOLUME_KEY_SIZE)
    return (time.perf_counter() - start) * 1000


def _next_argon2_params(
    time_cost: int, memory_kib: int, min_memory: int, max_memory: int, ms: float, target_ms: int
) -> tuple[int, int, bool]:
    """Scale (time, memory) toward the target: memory first when growing, time
    first when shrinking (next_argon2_params in pbkdf_check.c).  The flag says
    to stop: a limit was hit or nothing changed."""
    if ms > target_ms:
        new_time = int(time_cost * target_ms / ms)
        if new_time >= ARGON2_MIN_TIME_COST:
            new_memory = memory_kib
        else:
            new_time = ARGON2_MIN_TIME_COST
            new_memory = int(time_cost * memory_kib * target_ms / (ARGON2_MIN_TIME_COST * ms))
            if new_memory < min_memory:
                return ARGON2_MIN_TIME_COST, min_memory, True
    else:
        new_time = time_cost
        new_memory = int(memory_kib * target_ms / ms)
        if new_memory > max_memory:
            new_time = int(time_cost * memory_kib * target_ms / (max_memory * ms))
            new_memory = max_memory
            if new_time <= ARGON2_MIN_TIME_COST:
                return ARGON2_MIN_TIME_COST, max_memory, True
        elif new_memory < min_memory:
            return time_cost, min_memory, True
    return new_time, new_memory, (new_time, new_memory) == (time_cost, memory_kib)


def benchmark_kdf(
    iter_time_ms: int = DEFAULT_ITER_TIME_MS,
    *,
    max_memory_kib: int | None = None,
    parallelism: int | None = None,
) -> KdfParams:
    """Pick argon2id costs like cryptsetup: up to 1 GiB (never over half of the
    RAM), min(4, CPUs) lanes, and a time cost so that one unlock takes about
    ``iter_time_ms`` on this machine."""
    if iter_time_ms <= 0:
        raise Luks2Error("iteration time must be positive")
    lanes = parallelism or min(ARGON2_MAX_PARALLELISM, os.cpu_count() or 1)
    floor = max(ARGON2_MIN_MEMORY_KIB, ARGON2_MIN_MEMORY_PER_LANE_KIB * lanes)
    ceiling = max(floor, min(max_memory_kib or DEFAULT_MEMORY_KIB, _physical_memory_kib() // 2))
    _check_kdf_params(KdfParams(ARGON2_MIN_TIME_COST, ceiling, lanes))
    time_cost, memory = ARGON2_MIN_TIME_COST, floor
    # 1. Grow memory, then time, until one run is long enough to measure reliably.
    while (ms := _time_argon2(KdfParams(time_cost, memory, lanes))) < BENCH_MIN_MS:
        growing_memory = memory < ceiling
        current = memory if growing_memory else time_cost
        if ms < BENCH_MIN_MS_FAST:
            grown = current * BENCH_FAST_SCALE
        else:
            grown = int(current * BENCH_MIN_MS / ms)
        if grown == current:
            break
        if growing_memory:
            memory = min(grown, ceiling)
        else:
            time_cost = grown
    # 2. Scale toward the target and re-measure until within -5 %/+10 %.
    low = iter_time_ms * BENCH_PERCENT_ATLEAST / 100
    high = iter_time_ms * BENCH_PERCENT_ATMOST / 100
    while True:
        time_cost, memory, final = _next_argon2_params(
            time_cost, memory, floor, ceiling, ms, iter_time_ms
        )
        if final:
            break
        ms = _time_argon2(KdfParams(time_cost, memory, lanes))
        if low <= ms <= high:
            break
    return KdfParams(time_cost, memory, lanes)


def benchmark_digest_iterations(target_ms: int = DIGEST_ITER_TIME_MS) -> int:
    """PBKDF2-SHA256 iterations for the key digest costing about ``target_ms``."""
    iterations = PBKDF2_BENCH_START_ITERATIONS
    key = secrets.token_bytes(VOLUME_KEY_SIZE)
    salt = secrets.token_bytes(KDF_SALT_SIZE)
    while True:
        start = time.perf_counter()
        hashlib.pbkdf2_hmac(DIGEST_HASH, key, salt, iterations)
        ms = (time.perf_counter() - start) * 1000
        if ms >= PBKDF2_BENCH_MIN_MS:
            return max(PBKDF2_MIN_ITERATIONS, int(iterations * target_ms / ms))
        iterations *= 2


# --------------------------------------------------------------------------
# Header writing
# --------------------------------------------------------------------------


def _json_area(metadata: JsonObject, metadata_size: int) -> bytes:
    """Compact JSON, NUL-padded to the area (at least one NUL must follow it)."""
    text = json.dumps(metadata, separators=(",", ":")).encode()
    area_size = metadata_size - BINARY_HEADER_SIZE
    if len(text) >= area_size:
        raise Luks2Error(f"JSON metadata does not fit in {area_size} bytes")
    return text.ljust(area_size, b"\0")


def _fixed_field(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise Luks2Error(f"{what} is longer than {size - 1} bytes")
    return raw


def _binary_header(identity: _Identity, seqid: int, *, secondary: bool) -> bytes:
    """One copy's binary header with a zero checksum and a fresh salt."""
    return _BINARY_HEADER.pack(
        MAGIC_SECONDARY if secondary else MAGIC_PRIMARY,
        LUKS2_VERSION,
        identity.metadata_size,
        seqid,
        _fixed_field(identity.label, LABEL_FIELD_SIZE, "label"),
        HEADER_CHECKSUM_ALG.encode(),
        secrets.token_bytes(HEADER_SALT_SIZE),
        _fixed_field(identity.uuid, UUID_FIELD_SIZE, "uuid"),
        _fixed_field(identity.subsystem, LABEL_FIELD_SIZE, "subsystem"),
        identity.metadata_size if secondary else 0,
        b"",
        b"",
    ).ljust(BINARY_HEADER_SIZE, b"\0")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_headers(fd: int, identity: _Identity, seqid: int, raw: JsonObject) -> None:
    """Write both copies with ``seqid``, primary first, like cryptsetup.

    Each copy is written checksum-less first, then its JSON, then the binary
    header with the checksum, then fsync: a copy torn by a crash never
    validates, and the other copy (old or new) is always intact.
    """
    _parse_metadata(raw, identity.metadata_size)  # never write what we could not read
    json_area = _json_area(raw, identity.metadata_size)
    for secondary in (False, True):
        offset = identity.metadata_size if secondary else 0
        unsummed = _binary_header(identity, seqid, secondary=secondary)
        csum = _checksum(HEADER_CHECKSUM_ALG, unsummed, json_area)
        summed = bytearray(unsummed)
        summed[CHECKSUM_FIELD_OFFSET : CHECKSUM_FIELD_OFFSET + len(csum)] = csum
        _pwrite_all(fd, unsummed, offset)
        _pwrite_all(fd, json_area, offset + BINARY_HEADER_SIZE)
        _pwrite_all(fd, bytes(summed), offset)
        os.fsync(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_locked(path: Path, *, write: bool) -> Iterator[int]:
    """Open a volume; writers take an exclusive flock so two updates never race.

    Readers need no lock: copies are rewritten one at a time and validated by
    checksum, so a reader always finds at least one consistent copy.
    """
    try:
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    except OSError as exc:
        raise Luks2Error(f"{path}: {exc.strerror}") from exc
    try:
        if write:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise Luks2Error(f"{path}: volume is being modified by another process") from exc
        yield fd
    except OSError as exc:
        raise Luks2Error(f"{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Public operations
# --------------------------------------------------------------------------


def format_volume(
    path: Path,
    size_bytes: int,
    passphrase: bytes,
    kdf: KdfParams,
    *,
    label: str | None = None,
    digest_iterations: int | None = None,
) -> VolumeInfo:
    """Create a new volume file with ``size_bytes`` of encrypted data space.

    ``digest_iterations`` is the PBKDF2 cost of the volume-key digest; None
    benchmarks it (125 ms) like cryptsetup, while callers that force KDF costs
    pass :data:`PBKDF2_MIN_ITERATIONS`, as cryptsetup does with forced costs.
    (The digest guards a random 512-bit key, so its cost is not what keeps the
    passphrase safe; the keyslot KDF is.)
    """
    if size_bytes <= 0 or size_bytes % SECTOR_SIZE:
        raise Luks2Error(f"size must be a positive multiple of {SECTOR_SIZE} bytes")
    if digest_iterations is not None and digest_iterations < PBKDF2_MIN_ITERATIONS:
        raise Luks2Error(f"digest iterations must be at least {PBKDF2_MIN_ITERATIONS}")
    identity = _Identity(METADATA_SIZE, str(uuid.uuid4()), label or "", subsystem="")
    _fixed_field(identity.label, LABEL_FIELD_SIZE, "label")
    keyslot_kdf = _new_argon2id(kdf)
    volume_key = secrets.token_bytes(VOLUME_KEY_SIZE)
    raw: JsonObject = {
        "keyslots": {"0": _keyslot_json(keyslot_kdf, KEYSLOTS_OFFSET, VOLUME_KEY_SIZE)},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(DATA_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": CIPHER,
                "sector_size": SECTOR_SIZE,
            }
        },
        "digests": {
            "0": _make_digest(volume_key, digest_iterations or benchmark_digest_iterations())
        },
        "config": {
            "json_size": str(METADATA_SIZE - BINARY_HEADER_SIZE),
            "keyslots_size": str(KEYSLOTS_SIZE),
        },
    }
    sealed = _seal_keyslot(volume_key, passphrase, keyslot_kdf)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError as exc:
        raise Luks2Error(f"{path}: file exists, refusing to overwrite") from exc
    except OSError as exc:
        raise Luks2Error(f"{path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask
        os.ftruncate(fd, DATA_OFFSET + size_bytes)  # the data area stays a hole
        # A random keyslots area makes free and used keyslot space look alike.
        _pwrite_all(fd, secrets.token_bytes(KEYSLOTS_SIZE), KEYSLOTS_OFFSET)
        _pwrite_all(fd, sealed, KEYSLOTS_OFFSET)
        # cryptsetup's first write is epoch 1 too.
        _write_headers(fd, identity, 1, raw)
        _fsync_directory(path)
    except BaseException as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise Luks2Error(f"{path}: {exc.strerror or exc}") from exc
        raise
    os.close(fd)
    return read_info(path)


def _data_size(meta: _Metadata, device_size: int, path: Path) -> int:
    """Size of the data segment, refusing one that is not wholly between the
    header and the end of the device: storaged serves both from one volume, and
    a detached header's segment (offset 0 by default) would be served over it."""
    segment = meta.segment
    start = segment.offset
    if start < meta.header_end:
        area = next((area for area in meta.areas if area.offset <= start < area.end), None)
        overlapped = (
            f"the area of keyslot {area.keyslot} ({_span(area.offset, area.end)})"
            if area is not None
            else f"the LUKS2 header ({_span(0, meta.header_end)})"
        )
        raise Luks2Error(
            f"{path}: data segment at offset {_size_text(start)} overlaps {overlapped}: is this "
            "a detached header? storaged needs the header and data in one volume"
        )
    if segment.size is None:
        if start >= device_size:
            raise Luks2Error(
                f"{path}: data segment at offset {_size_text(start)} starts at or beyond the end "
                f"of the volume ({_size_text(device_size)})"
            )
        return device_size - start
    if start + segment.size > device_size:
        raise Luks2Error(
            f"{path}: data segment {_span(start, start + segment.size)} runs past the end "
            f"of the volume ({_size_text(device_size)})"
        )
    return segment.size


def _volume_info(header: _Header, device_size: int, path: Path) -> VolumeInfo:
    segment = header.meta.segment
    data_size = _data_size(header.meta, device_size, path)
    return VolumeInfo(
        uuid=header.identity.uuid,
        label=header.identity.label,
        cipher=segment.cipher,
        key_size_bits=header.meta.volume_key_size() * 8,
        sector_size=segment.sector_size,
        iv_tweak=segment.iv_tweak,
        data_offset=segment.offset,
        data_size=data_size,
        seqid=header.seqid,
        keyslots=tuple(
            KeyslotInfo(
                id=slot.id,
                kdf=slot.kdf.type,
                time_cost=slot.kdf.time_cost,
                memory_kib=slot.kdf.memory_kib,
                parallelism=slot.kdf.parallelism,
                kdf_hash=slot.kdf.hash,
                area_offset=slot.area_offset,
                area_size=slot.area_size,
                priority=slot.priority,
            )
            for _, slot in sorted(header.meta.keyslots.items())
        ),
    )


def read_info(path: Path) -> VolumeInfo:
    """Describe a volume from its newest valid header copy."""
    with _open_locked(path, write=False) as fd:
        return _volume_info(_load_header(fd, path), _device_size(fd), path)


def unlock(path: Path, passphrase: bytes) -> bytes:
    """Return the volume key, refusing volumes :class:`SectorCipher` cannot serve."""
    with _open_locked(path, write=False) as fd:
        header = _load_header(fd, path)
        cipher = header.meta.segment.cipher
        if cipher != CIPHER:
            raise Luks2Error(f"{path}: unsupported data cipher {cipher!r}")
        _slot, key, _digest = _find_volume_key(fd, header.meta, passphrase)
        return key


def _free_area(meta: _Metadata, size: int) -> int:
    """First 4 KiB-aligned gap in the keyslots area that fits ``size`` bytes."""
    candidate = meta.keyslots_offset
    for start, end in sorted((area.offset, area.end) for area in meta.areas):
        if candidate + size <= start:
            break
        candidate = max(candidate, _round_up(end, KEYSLOT_AREA_ALIGNMENT))
    if candidate + size > meta.header_end:
        raise Luks2Error("no space left in the keyslots area")
    return candidate


def add_passphrase(path: Path, existing: bytes, new: bytes, kdf: KdfParams) -> int:
    """Add an argon2id keyslot for ``new``; return its id."""
    keyslot_kdf = _new_argon2id(kdf)
    with _open_locked(path, write=True) as fd:
        header = _load_header(fd, path)
        _slot, volume_key, digest = _find_volume_key(fd, header.meta, existing)
        raw = copy.deepcopy(header.raw)
        slot_id = next((i for i in range(MAX_KEYSLOTS) if str(i) not in raw["keyslots"]), None)
        if slot_id is None:
            raise Luks2Error(f"all {MAX_KEYSLOTS} keyslots are in use")
        offset = _free_area(header.meta, _area_size(len(volume_key)))
        raw["keyslots"][str(slot_id)] = _keyslot_json(keyslot_kdf, offset, len(volume_key))
        raw["digests"][digest.id]["keyslots"].append(str(slot_id))
        # Key material first, then the header that points at it (cryptsetup's order).
        _pwrite_all(fd, _seal_keyslot(volume_key, new, keyslot_kdf), offset)
        os.fsync(fd)
        _write_headers(fd, header.identity, header.seqid + 1, raw)
        return slot_id


def remove_passphrase(path: Path, passphrase: bytes) -> int:
    """Destroy the keyslot ``passphrase`` opens; return its id.

    The area is overwritten with random bytes (cryptsetup's final wipe pass; a
    single pass is enough on files and flash), so it stays indistinguishable
    from free keyslot space, and only then is the keyslot dropped from the
    header, as cryptsetup does.
    """
    with _open_locked(path, write=True) as fd:
        header = _load_header(fd, path)
        slot_id, _key, _digest = _find_volume_key(fd, header.meta, passphrase)
        if len(header.meta.keyslots) == 1:
            raise Luks2Error(
                f"refusing to remove keyslot {slot_id}: it is the last one "
                "and the volume would become unreadable"
            )
        slot = header.meta.keyslots[slot_id]
        _pwrite_all(fd, secrets.token_bytes(slot.area_size), slot.area_offset)
        os.fsync(fd)
        raw = copy.deepcopy(header.raw)
        del raw["keyslots"][str(slot_id)]
        for section in ("digests", "tokens"):
            for entry in raw[section].values():
                if isinstance(entry, dict) and isinstance(entry.get("keyslots"), list):
                    entry["keyslots"] = [k for k in entry["keyslots"] if k != str(slot_id)]
        _write_headers(fd, header.identity, header.seqid + 1, raw)
        return slot_id
