"""The command line every netblk daemon shares.

storaged, tls-bridge and netblk-admin-api each read one TOML file and take
the same options for it: ``--config FILE`` (default
``/etc/netblk/NAME.toml``), ``--check-config`` (validate the file and the
files it names, print a one-line summary, exit 0) and ``--log-format``
(over ``[log] format``).  A config that cannot be used is one line on
stderr, ``PROG: error: WHY``, and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from netblk.logs import setup_logging
from netblk.tomlconf import LOG_FORMATS, ConfigError

CONFIG_DIR = Path("/etc/netblk")
#: Exit status of a daemon whose config or start-up failed.
EXIT_FAILURE = 1


class LoggedConfig(Protocol):
    """What a daemon's config says about its logging (``[log]``)."""

    @property
    def log_format(self) -> str: ...
    @property
    def log_level(self) -> str: ...


ConfigT = TypeVar("ConfigT", bound=LoggedConfig)


def add_daemon_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--config``, ``--check-config`` and ``--log-format`` for daemon ``name``."""
    default = CONFIG_DIR / f"{name}.toml"
    parser.add_argument(
        "--config", type=Path, default=default, help=f"TOML config (default {default})"
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config and its files, then exit"
    )
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="overrides [log] format")


def fail(prog: str, reason: object) -> int:
    """Report why the daemon cannot go on, in one line; returns the exit status."""
    print(f"{prog}: error: {reason}", file=sys.stderr)
    return EXIT_FAILURE


def deprecated(prog: str, old: str, new: str) -> None:
    """Say once, on stderr, that a spelling still works but will go."""
    print(f"{prog}: warning: '{old}' is deprecated, use '{new}'", file=sys.stderr)


@dataclass(frozen=True)
class Daemon(Generic[ConfigT]):
    """One daemon's start: load its config, check it or serve with it."""

    prog: str
    #: Reads and validates the config the arguments name; raises ConfigError.
    load: Callable[[argparse.Namespace], ConfigT]
    #: What ``--check-config`` prints after "ok": "2 exports, 1 clients".
    summary: Callable[[ConfigT], str]
    #: Runs until stopped; returns the exit status (ConfigError also ends it).
    serve: Callable[[ConfigT], int]

    def run(self, args: argparse.Namespace) -> int:
        try:
            config = self.load(args)
            if args.check_config:
                print(f"{args.config}: ok ({self.summary(config)})")
                return 0
            setup_logging(args.log_format or config.log_format, config.log_level)
            return self.serve(config)
        except ConfigError as exc:
            return fail(self.prog, exc)
