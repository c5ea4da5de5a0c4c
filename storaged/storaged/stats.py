"""Per-export and per-client counters, read by operators through the
control socket.

The engine counts every request into the ``Counters`` of its connection's
(export, client) pair as it answers it (``storaged._engine``, under the
GIL); this module hands out those counters and sums them into the
per-export and per-client views of a snapshot."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from netblk.protocol.constants import Cmd
from storaged._engine import LATENCY_BUCKETS, Counters

#: What operators read a request's count under: its opcode's name.
_OP_KEYS = {int(cmd): cmd.name.lower() for cmd in Cmd}


@dataclass
class LatencyHistogram:
    """Log2 histogram: cheap to update, percentiles within a factor of 2.
    Bucket i counts latencies in [2**i, 2**(i+1)) microseconds."""

    buckets: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)
    count: int = 0
    total_us: int = 0
    max_us: int = 0

    def merge(self, other: LatencyHistogram) -> None:
        self.buckets = [
            mine + theirs for mine, theirs in zip(self.buckets, other.buckets, strict=True)
        ]
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> int:
        """Upper bound in microseconds of the bucket holding ``fraction``."""
        if not self.count:
            return 0
        rank = fraction * self.count
        seen = 0
        for index, hits in enumerate(self.buckets):
            seen += hits
            if seen >= rank:
                return min(1 << (index + 1), self.max_us)
        return self.max_us

    def as_dict(self) -> dict[str, int]:
        return {
            "count": self.count,
            "mean_us": self.total_us // self.count if self.count else 0,
            "p50_us": self.percentile(0.50),
            "p99_us": self.percentile(0.99),
            "max_us": self.max_us,
        }


@dataclass
class IoCounters:
    """What happened on one export or for one client: one pair's engine
    counters, or several summed."""

    requests: Counter[str] = field(default_factory=Counter)
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @classmethod
    def of(cls, counters: Counters) -> IoCounters:
        """What the engine has counted into ``counters`` so far."""
        snap = counters.snapshot()
        latency = snap["latency"]
        requests = Counter({_OP_KEYS[op]: count for op, count in snap["requests"].items()})
        if snap["refused"]:
            requests["refused"] = snap["refused"]
        return cls(
            requests=requests,
            bytes_read=snap["bytes_read"],
            bytes_written=snap["bytes_written"],
            errors=snap["errors"],
            latency=LatencyHistogram(
                buckets=latency["buckets"],
                count=latency["count"],
                total_us=latency["total_us"],
                max_us=latency["max_us"],
            ),
        )

    def merge(self, other: IoCounters) -> None:
        self.requests.update(other.requests)
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.errors += other.errors
        self.latency.merge(other.latency)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "errors": self.errors,
            "latency": self.latency.as_dict(),
        }


@dataclass
class ServerStats:
    """Everything storaged counts; ``snapshot`` is what operators see.

    Requests are counted once, per (export, client) pair; the per-export and
    per-client views are summed when a snapshot is taken.
    """

    started: float = field(default_factory=time.time)
    connections_open: int = 0
    connections_total: int = 0
    logins_ok: int = 0
    logins_failed: Counter[str] = field(default_factory=Counter)
    protocol_errors: int = 0
    pairs: dict[tuple[str, str], Counters] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # protects every field above

    def connection_opened(self) -> None:
        with self._lock:
            self.connections_open += 1
            self.connections_total += 1

    def connection_closed(self) -> None:
        with self._lock:
            self.connections_open -= 1

    def login_ok(self) -> None:
        with self._lock:
            self.logins_ok += 1

    def login_failed(self, reason: str) -> None:
        with self._lock:
            self.logins_failed[reason] += 1

    def protocol_error(self) -> None:
        with self._lock:
            self.protocol_errors += 1

    def counters(self, export: str, client: str) -> Counters:
        """The engine's counters for a connection of ``client`` on ``export``."""
        with self._lock:
            counters = self.pairs.get((export, client))
            if counters is None:
                counters = self.pairs[export, client] = Counters()
            return counters

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            exports: dict[str, IoCounters] = {}
            clients: dict[str, IoCounters] = {}
            for (export, client), counters in self.pairs.items():
                counted = IoCounters.of(counters)
                exports.setdefault(export, IoCounters()).merge(counted)
                clients.setdefault(client, IoCounters()).merge(counted)
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "connections_open": self.connections_open,
                "connections_total": self.connections_total,
                "logins_ok": self.logins_ok,
                "logins_failed": dict(sorted(self.logins_failed.items())),
                "protocol_errors": self.protocol_errors,
                "exports": {k: v.as_dict() for k, v in sorted(exports.items())},
                "clients": {k: v.as_dict() for k, v in sorted(clients.items())},
            }
