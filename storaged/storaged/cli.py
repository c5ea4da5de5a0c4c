"""``storaged``: serve exports (the default), manage volumes, read stats."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from storaged import volume_cli
from storaged.config import DEFAULT_CONTROL_SOCKET, Config, load_config
from storaged.logs import setup_logging
from storaged.server import StorageServer
from storaged.tomlconf import LOG_FORMATS, ConfigError

log = logging.getLogger("storaged")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storaged",
        description="netblk storage server: serves encrypted LUKS2 volumes over mutual TLS 1.3.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (docs/operations.md)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (overrides [tls] cert)")
    parser.add_argument("--tls-key", type=Path, help="server private key (overrides [tls] key)")
    parser.add_argument("--tls-ca", type=Path, help="CA that signs clients (overrides [tls] ca)")
    parser.add_argument(
        "--listen", action="append", help="address to listen on, repeatable (overrides [server])"
    )
    parser.add_argument("--port", type=int, help="TCP port (overrides [server] port)")
    parser.add_argument("--control-socket", type=Path, help="stats socket path")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="log line format")
    parser.set_defaults(func=serve)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate the config and exit")
    check.set_defaults(func=check_config)
    stats = commands.add_parser("stats", help="print a running server's counters as JSON")
    stats.add_argument("--control-socket", type=Path, default=None)
    stats.set_defaults(func=print_stats)
    volume_cli.register(commands)
    return parser


def _load(args: argparse.Namespace) -> Config:
    if args.config is None:
        raise ConfigError("--config is required")
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


def check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{args.config}: ok ({len(config.exports)} exports, {len(config.clients)} clients)")
    return 0


def serve(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging(config.log_format, config.log_level)
    return asyncio.run(_serve(StorageServer(config)))


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
        print(f"storaged: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
