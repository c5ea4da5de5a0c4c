"""``storaged``: serve exports (the default), manage volumes, read stats."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from netblk.daemon import Daemon, add_daemon_arguments, deprecated, fail
from netblk.tomlconf import ConfigError
from storaged import volume_cli
from storaged.config import DEFAULT_CONTROL_SOCKET, Config, load_config
from storaged.server import StorageServer

PROG = "storaged"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="netblk storage server: serves encrypted LUKS2 volumes over mutual TLS 1.3.",
    )
    add_daemon_arguments(parser, PROG)
    parser.add_argument("--tls-cert", type=Path, help="server certificate (overrides [tls] cert)")
    parser.add_argument("--tls-key", type=Path, help="server private key (overrides [tls] key)")
    parser.add_argument("--tls-ca", type=Path, help="CA that signs clients (overrides [tls] ca)")
    parser.add_argument(
        "--listen", action="append", help="address to listen on, repeatable (overrides [server])"
    )
    parser.add_argument("--port", type=int, help="TCP port (overrides [server] port)")
    parser.add_argument("--control-socket", type=Path, help="stats socket path")
    parser.set_defaults(func=serve)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # The spelling before --check-config, which every daemon now takes.
    check = commands.add_parser("check-config", help="deprecated: use --check-config")
    check.set_defaults(func=check_config)
    stats = commands.add_parser("stats", help="print a running server's counters as JSON")
    stats.add_argument("--control-socket", type=Path, default=None)
    stats.set_defaults(func=print_stats)
    volume_cli.register(commands)
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides = {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_ca": args.tls_ca,
        "listen": tuple(args.listen) if args.listen else None,
        "port": args.port,
        "control_socket": args.control_socket,
        "log_format": args.log_format,
    }
    return load_config(args.config, overrides)


def _summary(config: Config) -> str:
    return f"{len(config.exports)} exports, {len(config.clients)} clients"


def _daemon() -> Daemon[Config]:
    return Daemon(prog=PROG, load=_load, summary=_summary, serve=_run)


def serve(args: argparse.Namespace) -> int:
    return _daemon().run(args)


def check_config(args: argparse.Namespace) -> int:
    deprecated(PROG, "storaged check-config", "storaged --check-config")
    args.check_config = True
    return _daemon().run(args)


def _run(config: Config) -> int:
    try:
        return asyncio.run(_serve(StorageServer(config)))
    except OSError as exc:
        return fail(PROG, exc)


async def _serve(server: StorageServer) -> int:
    await server.open_volumes()
    await server.start()
    await server.run_until_stopped()
    return 0


def print_stats(args: argparse.Namespace) -> int:
    path = args.control_socket or DEFAULT_CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ConfigError(f"cannot reach storaged at {path}: {exc.strerror}") from None
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    print(json.dumps(json.loads(b"".join(chunks)), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, OSError) as exc:
        return fail(PROG, exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
