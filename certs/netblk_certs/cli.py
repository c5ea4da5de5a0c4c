"""netblk-certs: create the netblk CA, server and client certificates, and tokens."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from netblk import tokens
from netblk_certs import pki

PROG = "netblk-certs"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's code for bad usage
EXIT_INTERRUPTED = 130  # shell convention for SIGINT
CA_STEM = "ca"
SERVER_STEM = "server"
CLIENT_STEM_PREFIX = "client-"


class UsageError(Exception):
    """A usage problem argparse cannot see (exit 2, like argparse's own errors)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status instead of raising SystemExit."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error, already reported by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        args.handler(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except FileExistsError as exc:
        _error(f"{exc} (pass --force to replace it)")
        return EXIT_ERROR
    except OSError as exc:
        _error(f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc))
        return EXIT_ERROR
    except ValueError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except (KeyboardInterrupt, EOFError):
        _error("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create the netblk CA, server and client certificates, and login tokens.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="create the CA (DIR/ca.key, DIR/ca.crt)")
    _add_dir(ca)
    ca.add_argument("--cn", default="netblk CA", help="CA common name (default: %(default)s)")
    _add_days(ca, pki.DEFAULT_CA_DAYS)
    _add_force(ca)
    ca.set_defaults(handler=_cmd_ca)

    server = sub.add_parser("server", help="issue the storaged certificate (server.key/.crt)")
    _add_dir(server)
    server.add_argument("--name", required=True, metavar="CN", help="subject common name")
    server.add_argument(
        "--dns",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="DNS name SAN (repeatable)",
    )
    server.add_argument(
        "--ip",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADDR",
        help="IPv4 or IPv6 address SAN (repeatable)",
    )
    _add_out_dir(server)
    _add_days(server, pki.DEFAULT_LEAF_DAYS)
    _add_force(server)
    server.set_defaults(handler=_cmd_server)

    client = sub.add_parser("client", help="issue a client certificate (client-NAME.key/.crt)")
    client.add_argument("name", metavar="NAME", help="client identity (certificate CN)")
    _add_dir(client)
    _add_out_dir(client)
    _add_days(client, pki.DEFAULT_LEAF_DAYS)
    _add_force(client)
    client.set_defaults(handler=_cmd_client)

    token = sub.add_parser("token", help="generate a login/bearer token and its argon2id hash")
    token.add_argument("--out", type=Path, metavar="FILE", help="write the token here (0600)")
    _add_force(token)
    token.set_defaults(handler=_cmd_token)

    hash_token = sub.add_parser(
        "hash-token",
        help="print the argon2id hash of an existing token",
        description="The token is read from a file, an environment variable or a prompt, "
        "never from the command line (it would end up in shell history and ps).",
    )
    source = hash_token.add_mutually_exclusive_group()
    source.add_argument("--token-file", type=Path, metavar="F", help="read the token from F")
    source.add_argument("--token-env", metavar="VAR", help="read the token from $VAR")
    hash_token.set_defaults(handler=_cmd_hash_token)

    show = sub.add_parser("show", help="describe a PEM certificate")
    show.add_argument("file", type=Path, metavar="FILE")
    show.set_defaults(handler=_cmd_show)
    return parser


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, required=True, metavar="DIR", help="directory holding the CA"
    )


def _add_out_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir", type=Path, metavar="DIR", help="write the new files here (default: --dir)"
    )


def _add_days(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--days", type=int, default=default, help="validity in days (default: %(default)s)"
    )


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="replace existing files")


def _cmd_ca(args: argparse.Namespace) -> None:
    issued = pki.make_ca(args.cn, days=args.days)
    _report_written(pki.write_issued(issued, args.dir, CA_STEM, force=args.force))


def _cmd_server(args: argparse.Namespace) -> None:
    issued = pki.make_server_cert(
        _load_ca(args.dir),
        args.name,
        dns_names=args.dns,
        ip_addresses=args.ip,
        days=args.days,
    )
    out_dir = args.out_dir or args.dir
    _report_written(pki.write_issued(issued, out_dir, SERVER_STEM, force=args.force))


def _cmd_client(args: argparse.Namespace) -> None:
    issued = pki.make_client_cert(_load_ca(args.dir), args.name, days=args.days)
    stem = CLIENT_STEM_PREFIX + args.name
    _report_written(pki.write_issued(issued, args.out_dir or args.dir, stem, force=args.force))


def _cmd_token(args: argparse.Namespace) -> None:
    token = tokens.generate_token()
    token_hash = tokens.hash_token(token)
    if args.out is not None:
        pki.write_secret_file(args.out, f"{token}\n".encode(), force=args.force)
        _note(f"wrote the token to {args.out} (0600); hand it to the client, keep it secret")
    else:
        print(token)
        _note("the first line is the token; hand it to the client, keep it secret")
    print(_hash_line(token_hash))
    _note("the token_hash line goes into the server's config; it is not a secret")


def _cmd_hash_token(args: argparse.Namespace) -> None:
    print(_hash_line(tokens.hash_token(_read_token(args))))


def _cmd_show(args: argparse.Namespace) -> None:
    try:
        cert = x509.load_pem_x509_certificate(args.file.read_bytes())
    except ValueError:
        raise ValueError(f"{args.file}: not a PEM certificate") from None
    print(_describe(cert))


def _read_token(args: argparse.Namespace) -> str:
    token: str
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").rstrip("\r\n")
    elif args.token_env is not None:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise ValueError(f"environment variable {args.token_env} is not set or empty")
    elif sys.stdin.isatty():
        token = getpass.getpass("Token: ")
        if getpass.getpass("Token again: ") != token:
            raise ValueError("the tokens do not match")
    else:
        raise UsageError("no token source: use --token-file or --token-env, or run on a TTY")
    return token


def _load_ca(directory: Path) -> pki.Issued:
    return pki.load_issued(directory / f"{CA_STEM}.key", directory / f"{CA_STEM}.crt")


def _hash_line(token_hash: str) -> str:
    # PHC strings use only [A-Za-z0-9$=,+/-], so no quoting beyond the quotes is needed.
    return f'token_hash = "{token_hash}"'


def _describe(cert: x509.Certificate) -> str:
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        state = "NOT YET VALID"
    elif now > cert.not_valid_after_utc:
        state = "EXPIRED"
    else:
        state = "valid now"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return "\n".join(
        [
            f"subject:     {cert.subject.rfc4514_string()}",
            f"issuer:      {cert.issuer.rfc4514_string()}",
            f"serial:      {cert.serial_number:x}",
            f"SANs:        {', '.join(names) or '(none)'}",
            f"not before:  {cert.not_valid_before_utc.isoformat()}",
            f"not after:   {cert.not_valid_after_utc.isoformat()} ({state})",
            f"sha256:      {fingerprint}",
        ]
    )


def _report_written(paths: tuple[Path, Path]) -> None:
    key_path, cert_path = paths
    _note(f"wrote {key_path} (0600, secret) and {cert_path}")


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
