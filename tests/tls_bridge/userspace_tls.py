"""A userspace stand-in for kernel TLS, for hosts without it (tests only).

It reads the ``crypto_info`` bytes the way the kernel does (the
``struct tls12_crypto_info_*`` layouts of include/uapi/linux/tls.h, written
out here independently of netblk.ktls) and runs TLS 1.3 records with
them.  storaged's OpenSSL must decrypt what this sends and vice versa, so a
host test through it proves the keys tls-bridge would install are right.
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from netblk.ktls import APPLICATION_DATA, KtlsKeys
from tls_bridge.channel import unexpected_record

#: cipher_type -> (iv, key, salt) sizes, from the TLS_CIPHER_*_SIZE macros.
LAYOUTS = {51: (8, 16, 4), 52: (8, 32, 4), 54: (12, 32, 0)}
REC_SEQ_SIZE = 8
TLS_1_3 = 0x0304
RECORD_HEADER = struct.Struct(">BHH")
MAX_PLAINTEXT = 1 << 14
TAG = 16


class Direction:
    """One direction's AEAD, nonce base and record sequence number."""

    def __init__(self, info: bytes) -> None:
        version, cipher_type = struct.unpack_from("=HH", info)
        assert version == TLS_1_3, hex(version)
        iv_len, key_len, salt_len = LAYOUTS[cipher_type]
        assert len(info) == 4 + iv_len + key_len + salt_len + REC_SEQ_SIZE
        iv, rest = info[4 : 4 + iv_len], info[4 + iv_len :]
        key, salt, rec_seq = rest[:key_len], rest[key_len : key_len + salt_len], rest[-8:]
        self.cipher_type = cipher_type
        self.aead: AESGCM | ChaCha20Poly1305 = (
            ChaCha20Poly1305(key) if cipher_type == 54 else AESGCM(key)
        )
        self.nonce_base = salt + iv
        assert len(self.nonce_base) == 12
        self.seq = int.from_bytes(rec_seq, "big")

    def next_nonce(self) -> bytes:
        nonce = bytes(
            a ^ b for a, b in zip(self.nonce_base, self.seq.to_bytes(12, "big"), strict=True)
        )
        self.seq += 1
        return nonce


class UserspaceKtls:
    """A RecordChannel doing in Python what kTLS does in the kernel."""

    def __init__(self, sock: socket.socket, keys: KtlsKeys) -> None:
        self.sock = sock
        self.tx = Direction(keys.tx)
        self.rx = Direction(keys.rx)
        self._plain = b""

    def send(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_PLAINTEXT):
            inner = data[start : start + MAX_PLAINTEXT] + bytes([APPLICATION_DATA])
            header = RECORD_HEADER.pack(APPLICATION_DATA, 0x0303, len(inner) + TAG)
            sealed = self.tx.aead.encrypt(self.tx.next_nonce(), inner, header)
            self.sock.sendall(header + sealed)

    def recv(self, size: int) -> bytes:
        if not self._plain:
            header = self._recv_exact(RECORD_HEADER.size)
            if not header:
                return b""
            _type, _version, length = RECORD_HEADER.unpack(header)
            body = self._recv_exact(length)
            inner = self.rx.aead.decrypt(self.rx.next_nonce(), body, header).rstrip(b"\0")
            content, content_type = inner[:-1], inner[-1]
            if content_type != APPLICATION_DATA:
                raise unexpected_record(content_type, content)
            self._plain = content
        data, self._plain = self._plain[:size], self._plain[size:]
        return data

    def _recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                if data:
                    raise ConnectionResetError("peer closed mid-record")
                return b""
            data += chunk
        return data


def userspace_install(sock: socket.socket, keys: KtlsKeys) -> UserspaceKtls:
    return UserspaceKtls(sock, keys)
