"""``tls-bridge``: serve the netblk handshake upcall until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

from netblk.daemon import Daemon, add_daemon_arguments, fail
from tls_bridge.config import BridgeConfig, load_config
from tls_bridge.daemon import Bridge
from tls_bridge.netlink import GenlUpcall, UpcallUnavailable

log = logging.getLogger("tls_bridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tls-bridge",
        description="netblk handshake helper: TLS 1.3 + login for netblk.ko, then kTLS.",
    )
    add_daemon_arguments(parser, "tls-bridge")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    daemon = Daemon(
        prog="tls-bridge",
        load=lambda args: load_config(args.config),
        summary=lambda config: f"{len(config.servers)} servers",
        serve=run,
    )
    return daemon.run(args)


def run(config: BridgeConfig) -> int:
    # pyroute2 logs every netlink message at DEBUG; ours say what matters.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(config))
    except UpcallUnavailable as exc:
        return fail("tls-bridge", exc)
    except OSError as exc:
        log.error("netlink failed: %s", exc, extra={"event": "fatal"})
    return 1


async def serve(config: BridgeConfig) -> int:
    upcall = await GenlUpcall.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "serving the netblk handshake upcall",
        extra={"event": "started", "servers": len(config.servers)},
    )
    try:
        await Bridge(config, upcall).run(stop)
    finally:
        upcall.close()
    log.info("stopped", extra={"event": "stopped"})
    return 0
