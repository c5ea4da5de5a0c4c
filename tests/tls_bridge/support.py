"""Shared helpers for the tls-bridge tests: config entries for a test
storaged, logins over the userspace record layer, a post-login I/O client."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from netblk.ktls import KtlsKeys
from netblk.protocol.codec import (
    ClientConnection,
    HelloReply,
    NeedData,
    Reply,
    encode_hello_reply,
)
from netblk.protocol.constants import Cmd, LoginStatus
from tests.storaged.stack import Stack
from tests.tls_bridge.userspace_tls import userspace_install
from tls_bridge.channel import RecordChannel
from tls_bridge.config import ServerEntry
from tls_bridge.login import LoginResult, handshake_and_login

LOOPBACK = "127.0.0.1"


def server_entry(stack: Stack, client: str = "alice", **changes: Any) -> ServerEntry:
    """A config entry for ``stack`` with ``client``'s certificate and token."""
    token_file = stack.root / f"{client}.token"
    token_file.write_text(stack.tokens[client] + "\n")
    cert, key = stack.client_tls(client)
    entry = ServerEntry(
        address=ipaddress.ip_address(LOOPBACK),
        port=stack.port,
        ca=stack.pki.ca_cert,
        cert=cert,
        key=key,
        token_file=token_file,
    )
    return dataclasses.replace(entry, **changes)


class RecordingInstaller:
    """The userspace record layer, keeping the channel and keys it made."""

    def __init__(self) -> None:
        self.channel: RecordChannel | None = None
        self.keys: KtlsKeys | None = None

    def __call__(self, sock: socket.socket, keys: KtlsKeys) -> RecordChannel:
        self.keys = keys
        self.channel = userspace_install(sock, keys)
        return self.channel


def login_once(
    port: int,
    entry: ServerEntry,
    export: str = "data",
    timeout: float = 60,
    install: Callable[[socket.socket, KtlsKeys], RecordChannel] = userspace_install,
) -> LoginResult:
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        return handshake_and_login(sock, entry, export, timeout, install)


def logged_in_client() -> ClientConnection:
    """A codec client past login (tls-bridge consumed the real HELLO reply)."""
    client = ClientConnection()
    client.receive_data(encode_hello_reply(HelloReply(status=LoginStatus.OK)))
    assert isinstance(client.next_event(), HelloReply)
    return client


class PlainIo:
    """netblk requests as plain bytes over a channel (kTLS or userspace)."""

    def __init__(self, channel: RecordChannel) -> None:
        self.channel = channel
        self.client = logged_in_client()
        self.handle = 0

    def call(self, opcode: Cmd, offset: int = 0, length: int = 0, data: bytes = b"") -> Reply:
        self.handle += 1
        self.channel.send(self.client.send_request(opcode, self.handle, offset, length) + data)
        while isinstance(event := self.client.next_event(), NeedData):
            self.client.receive_data(self.channel.recv(1 << 20))
        assert isinstance(event, Reply), event
        return event

    def write(self, offset: int, data: bytes) -> Reply:
        return self.call(Cmd.WRITE, offset, len(data), data)

    def read(self, offset: int, length: int) -> Reply:
        return self.call(Cmd.READ, offset, length)
