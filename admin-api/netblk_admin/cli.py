"""``netblk-admin-api``: serve the admin API with uvicorn until SIGTERM.

Tokens and their hashes come from ``netblk-certs token`` (and ``hash-token``
for an existing token): the same tool and argon2id parameters as storaged's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from netblk.daemon import Daemon, add_daemon_arguments
from netblk_admin.app import create_app
from netblk_admin.config import ApiConfig, load_config

log = logging.getLogger("netblk_admin")

#: On SIGTERM, requests still waiting on a device get this long (seconds).
SHUTDOWN_GRACE = 30


def _drop_terminal_colours(record: logging.LogRecord) -> bool:
    # uvicorn adds its message again with ANSI colours for terminals; our
    # formatters would put every extra field into the log line.
    record.__dict__.pop("color_message", None)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netblk-admin-api",
        description="netblk admin API: REST control of netblk.ko over sysfs.",
    )
    add_daemon_arguments(parser, "admin-api")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    daemon = Daemon(
        prog="netblk-admin-api",
        load=lambda args: load_config(args.config),
        summary=lambda config: f"{len(config.tokens)} tokens",
        serve=serve,
    )
    return daemon.run(args)


def serve(config: ApiConfig) -> int:
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_drop_terminal_colours)
    if config.tls is None and not config.loopback_only:
        log.warning(
            "plain HTTP on a non-loopback address: bearer tokens cross the network in clear",
            extra={"event": "insecure_listen", "listen": config.listen},
        )
    uvicorn.run(
        create_app(config),
        host=config.listen,
        port=config.port,
        ssl_certfile=config.tls.cert if config.tls else None,
        ssl_keyfile=config.tls.key if config.tls else None,
        log_config=None,  # keep setup_logging's handler: uvicorn's loggers propagate to it
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
