"""``storaged volume ...``: create and manage LUKS2-encrypted volume files.

A volume may also be a Ceph RBD image, named ``rbd:POOL/IMAGE`` with the
cephx options (``--ceph-client``, ``--ceph-conf``, ``--ceph-keyring``):
``create`` makes the image and writes the LUKS2 header into it, ``info``
reads it.  The image then holds what a volume file holds.

Passphrases never come from the command line (it is visible in ``ps`` and
shell history): they come from a file (``-`` is stdin), an environment
variable, or an interactive prompt.  KDF flags mirror cryptsetup's names so an
admin who knows ``cryptsetup luksFormat`` knows these.

Exit codes: 0 success, 1 operation failed, 2 usage error (including "no
passphrase source and stdin is not a terminal").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from netblk.tomlconf import ConfigError
from storaged import config, luks2
from storaged._engine import RbdStore
from storaged.config import Location, RbdImage
from storaged.volume import header_file, open_store

RBD_PREFIX = "rbd:"
#: Where ``create`` lays out an image's header before copying it in (RAM
#: where there is some: the keyslots never touch a disk this way).
SCRATCH_DIR = Path("/dev/shm")  # noqa: S108 - a private 0700 directory is made inside

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

STDIN_NAME = "-"

_Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing failure; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64M``, ``1G``, ``1GiB`` (binary units) into bytes."""
    try:
        return config.parse_size(text, "size")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (examples: 4096, 64M, 1GiB)"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --------------------------------------------------------------------------
# Passphrase sources
# --------------------------------------------------------------------------


def _read_passphrase_file(name: str) -> bytes:
    """Whole file, minus one trailing newline (what ``echo pw > file`` adds)."""
    try:
        data = sys.stdin.buffer.read() if name == STDIN_NAME else Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read passphrase file {name}: {exc.strerror}") from exc
    return data.removesuffix(b"\n")


def _prompt(prompt: str, *, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise CliError(
            "no passphrase source: use --passphrase-file, --passphrase-env or run on a terminal",
            EXIT_USAGE,
        )
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Verify passphrase: ") != first:
        raise CliError("passphrases do not match")
    return first.encode()


def _passphrase(file: str | None, env: str | None, prompt: str, *, confirm: bool) -> bytes:
    if file is not None:
        value = _read_passphrase_file(file)
    elif env is not None:
        env_value = os.environb.get(env.encode())
        if env_value is None:
            raise CliError(f"environment variable {env} is not set")
        value = env_value
    else:
        value = _prompt(prompt, confirm=confirm)
    if not value:
        raise CliError("empty passphrase")
    return value


def _current_passphrase(args: argparse.Namespace, *, confirm: bool = False) -> bytes:
    return _passphrase(
        args.passphrase_file, args.passphrase_env, "Enter passphrase: ", confirm=confirm
    )


# --------------------------------------------------------------------------
# KDF selection
# --------------------------------------------------------------------------


def _kdf_from_args(args: argparse.Namespace) -> tuple[luks2.KdfParams, int | None]:
    """KDF costs and digest iterations, following cryptsetup's rules: forced
    iterations skip every benchmark (digest at the PBKDF2 minimum), otherwise
    the costs are benchmarked for ``--iter-time``."""
    lanes = args.pbkdf_parallel
    if args.pbkdf_force_iterations is not None:
        if args.iter_time is not None:
            raise CliError("--pbkdf-force-iterations cannot be combined with --iter-time")
        params = luks2.KdfParams(
            time_cost=args.pbkdf_force_iterations,
            memory_kib=args.pbkdf_memory or luks2.DEFAULT_MEMORY_KIB,
            parallelism=lanes or min(luks2.ARGON2_MAX_PARALLELISM, os.cpu_count() or 1),
        )
        return params, luks2.PBKDF2_MIN_ITERATIONS
    params = luks2.benchmark_kdf(
        args.iter_time or luks2.DEFAULT_ITER_TIME_MS,
        max_memory_kib=args.pbkdf_memory,
        parallelism=lanes,
    )
    return params, None


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------


def _location(args: argparse.Namespace) -> Location:
    """The volume ``args.path`` names: a file, or ``rbd:POOL/IMAGE``."""
    text: str = args.path
    if not text.startswith(RBD_PREFIX):
        for option in ("ceph_client", "ceph_conf", "ceph_keyring"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise CliError(f"{flag} is for rbd:POOL/IMAGE volumes", EXIT_USAGE)
        return Path(text)
    pool, slash, image = text.removeprefix(RBD_PREFIX).partition("/")
    if not (pool and slash and image) or "/" in image:
        raise CliError(f"expected rbd:POOL/IMAGE, got {text!r}", EXIT_USAGE)
    if args.ceph_client is None:
        raise CliError("an rbd: volume needs --ceph-client (the cephx id)", EXIT_USAGE)
    return RbdImage(
        pool=pool,
        image=image,
        conf=args.ceph_conf or Path("/etc/ceph/ceph.conf"),
        client=args.ceph_client.removeprefix("client."),
        keyring=args.ceph_keyring,
    )


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    where = SCRATCH_DIR if SCRATCH_DIR.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="netblk-volume-", dir=where) as directory:
        yield Path(directory) / "volume.luks"


def _cmd_create(args: argparse.Namespace) -> int:
    location = _location(args)
    passphrase = _current_passphrase(args, confirm=True)
    kdf, digest_iterations = _kdf_from_args(args)

    def format_at(path: Path) -> luks2.VolumeInfo:
        return luks2.format_volume(
            path,
            args.size,
            passphrase,
            kdf,
            label=args.label,
            digest_iterations=digest_iterations,
        )

    if isinstance(location, RbdImage):
        with _scratch() as scratch:
            info = format_at(scratch)
            _create_image(location, info, scratch)
    else:
        info = format_at(location)
    print(f"created {location}: {info.data_size} bytes, uuid {info.uuid}")
    return EXIT_OK


def _create_image(image: RbdImage, info: luks2.VolumeInfo, laid_out: Path) -> None:
    """Make the image as large as the volume file at ``laid_out`` and copy
    its header and keyslots in (the data area of both reads as zeros)."""
    try:
        RbdStore.create(
            image.pool,
            image.image,
            info.data_offset + info.data_size,
            conf=str(image.conf),
            client=image.client,
            keyring=str(image.keyring) if image.keyring else None,
        )
        store = open_store(image, writable=True)
        store.pwrite(0, laid_out.read_bytes()[: info.data_offset])
        store.flush()
    except OSError as exc:
        raise CliError(str(exc)) from None


def _format_info(path: Location, info: luks2.VolumeInfo) -> str:
    lines = [
        f"Path:         {path}",
        f"UUID:         {info.uuid}",
        f"Label:        {info.label or '(no label)'}",
        f"Cipher:       {info.cipher}, {info.key_size_bits}-bit key",
        f"Sector size:  {info.sector_size} bytes",
        f"Data offset:  {info.data_offset} bytes",
        f"Data size:    {info.data_size} bytes ({info.data_size / (1 << 20):.1f} MiB)",
        f"Epoch:        {info.seqid}",
        "Keyslots:",
    ]
    for slot in info.keyslots:
        if slot.kdf == "pbkdf2":
            cost = f"pbkdf2-{slot.kdf_hash}, {slot.time_cost} iterations"
        else:
            cost = (
                f"{slot.kdf}, time {slot.time_cost}, memory {slot.memory_kib} KiB, "
                f"{slot.parallelism} threads"
            )
        lines.append(f"  {slot.id}: {cost}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    location = _location(args)
    if isinstance(location, RbdImage):
        try:
            store = open_store(location, writable=False)
            with header_file(location, store) as header:
                info = luks2.read_info(header)
        except OSError as exc:
            raise CliError(str(exc)) from None
    else:
        info = luks2.read_info(location)
    if args.json:
        document = dataclasses.asdict(info)
        document["path"] = str(location)
        print(json.dumps(document, indent=2))
    else:
        print(_format_info(location, info))
    return EXIT_OK


def _cmd_add_passphrase(args: argparse.Namespace) -> int:
    if args.passphrase_file == STDIN_NAME and args.new_passphrase_file == STDIN_NAME:
        raise CliError("only one passphrase can be read from stdin", EXIT_USAGE)
    existing = _current_passphrase(args)
    new = _passphrase(
        args.new_passphrase_file,
        args.new_passphrase_env,
        "Enter new passphrase: ",
        confirm=True,
    )
    kdf, _digest_iterations = _kdf_from_args(args)
    slot = luks2.add_passphrase(args.path, existing, new, kdf)
    print(f"added keyslot {slot}")
    return EXIT_OK


def _cmd_remove_passphrase(args: argparse.Namespace) -> int:
    slot = luks2.remove_passphrase(args.path, _current_passphrase(args))
    print(f"removed keyslot {slot}")
    return EXIT_OK


# --------------------------------------------------------------------------
# Parser wiring
# --------------------------------------------------------------------------


def _add_passphrase_source(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        f"--{prefix}passphrase-file",
        metavar="FILE",
        help=f"read the {what} from FILE ('-' = stdin); one trailing newline is dropped",
    )
    group.add_argument(
        f"--{prefix}passphrase-env",
        metavar="VAR",
        help=f"read the {what} from environment variable VAR",
    )


def _add_ceph_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("for an rbd:POOL/IMAGE volume")
    group.add_argument("--ceph-client", metavar="ID", help="cephx id (with or without client.)")
    group.add_argument(
        "--ceph-conf", type=Path, metavar="FILE", help="ceph.conf (default /etc/ceph/ceph.conf)"
    )
    group.add_argument(
        "--ceph-keyring", type=Path, metavar="FILE", help="keyring (default: ceph.conf's)"
    )


def _add_kdf_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("key derivation (argon2id, as cryptsetup)")
    group.add_argument(
        "--pbkdf-memory",
        type=_positive_int,
        metavar="KIB",
        help=f"memory cost in KiB (default {luks2.DEFAULT_MEMORY_KIB}, at most half the RAM)",
    )
    group.add_argument(
        "--pbkdf-parallel", type=_positive_int, metavar="N", help="threads (default min(4, CPUs))"
    )
    group.add_argument(
        "--iter-time",
        type=_positive_int,
        metavar="MS",
        help=f"benchmark so one unlock takes MS (default {luks2.DEFAULT_ITER_TIME_MS})",
    )
    group.add_argument(
        "--pbkdf-force-iterations",
        type=_positive_int,
        metavar="N",
        help="use time cost N and skip the benchmark",
    )


def _handle_errors(handler: _Handler) -> _Handler:
    """Turn every expected failure into ``storaged: error: ...`` and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CliError as exc:
            print(f"storaged: error: {exc}", file=sys.stderr)
            return exc.code
        except luks2.Luks2Error as exc:
            print(f"storaged: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print("storaged: error: interrupted", file=sys.stderr)
            return EXIT_FAILURE

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``volume`` and its subcommands; each sets ``func(args) -> int``."""
    volume = subparsers.add_parser(
        "volume",
        help="create and manage encrypted (LUKS2) volume files",
        description="Create and manage LUKS2 volume files that cryptsetup can also open.",
    )
    commands = volume.add_subparsers(dest="volume_command", metavar="COMMAND", required=True)

    create = commands.add_parser(
        "create", help="create a new encrypted volume file (or RBD image: rbd:POOL/IMAGE)"
    )
    create.add_argument("path", metavar="PATH")
    _add_ceph_options(create)
    create.add_argument(
        "--size", type=parse_size, required=True, help="data size: 4096, 64M, 1G, 1GiB, ..."
    )
    create.add_argument("--label", help="LUKS2 label (at most 47 bytes)")
    _add_passphrase_source(create, "", "passphrase")
    _add_kdf_options(create)
    create.set_defaults(func=_handle_errors(_cmd_create))

    info = commands.add_parser("info", help="show a volume's header")
    info.add_argument("path", metavar="PATH")
    _add_ceph_options(info)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_handle_errors(_cmd_info))

    add = commands.add_parser("add-passphrase", help="add a passphrase (new keyslot)")
    add.add_argument("path", type=Path, metavar="PATH")
    _add_passphrase_source(add, "", "existing passphrase")
    _add_passphrase_source(add, "new-", "new passphrase")
    _add_kdf_options(add)
    add.set_defaults(func=_handle_errors(_cmd_add_passphrase))

    remove = commands.add_parser(
        "remove-passphrase", help="remove the keyslot a passphrase opens (never the last)"
    )
    remove.add_argument("path", type=Path, metavar="PATH")
    _add_passphrase_source(remove, "", "passphrase to remove")
    remove.set_defaults(func=_handle_errors(_cmd_remove_passphrase))
