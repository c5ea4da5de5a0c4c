"""kTLS key material: the TLS 1.3 key schedule against RFC 8448, and the
crypto_info bytes and socket options against the kernel's headers, compiled
by the C compiler so sizes and offsets are what the kernel sees."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from netblk.ktls import (
    CIPHERS,
    CLIENT_TRAFFIC_SECRET,
    SERVER_TRAFFIC_SECRET,
    TLS_1_3_VERSION,
    KeyLog,
    crypto_info,
    hkdf_expand_label,
    ktls_keys,
    traffic_key_iv,
)
from netblk.tlsconf import (
    SOL_TLS,
    TCP_ULP,
    TLS_GET_RECORD_TYPE,
    TLS_RX,
    TLS_RX_EXPECT_NO_PAD,
    TLS_SET_RECORD_TYPE,
    TLS_TX,
)
from tests.c_program import c_program_output
from tests.tls_bridge.userspace_tls import Direction

TLS_H = Path("/usr/include/linux/tls.h")


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# RFC 8448 section 3 (Simple 1-RTT Handshake), TLS_AES_128_GCM_SHA256.
SERVER_HS_SECRET = unhex(
    "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4"
    " e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38"
)
CLIENT_HS_SECRET = unhex(
    "b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f"
    " 3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21"
)
SERVER_AP_SECRET = unhex(
    "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32"
    " 82 04 b4 f4 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43"
)


@pytest.mark.parametrize(
    ("secret", "key", "iv"),
    [
        (
            SERVER_HS_SECRET,
            "3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc",
            "5d 31 3e b2 67 12 76 ee 13 00 0b 30",
        ),
        (
            CLIENT_HS_SECRET,
            "db fa a6 93 d1 76 2c 5b 66 6a f5 d9 50 25 8d 01",
            "5b d3 c7 1b 83 6e 0b 76 bb 73 26 5f",
        ),
        (
            SERVER_AP_SECRET,
            "9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56",
            "cf 78 2b 88 dd 83 54 9a ad f1 e9 84",
        ),
    ],
)
def test_traffic_keys_match_rfc_8448(secret: bytes, key: str, iv: str) -> None:
    assert traffic_key_iv(CIPHERS["TLS_AES_128_GCM_SHA256"], secret) == (unhex(key), unhex(iv))


def test_expand_label_with_hash_length_output_matches_rfc_8448_finished_key() -> None:
    finished_key = hkdf_expand_label(hashes.SHA256(), SERVER_HS_SECRET, "finished", b"", 32)
    assert finished_key == unhex(
        "00 8d 3b 66 f8 16 ea 55 9f 96 b5 37 e8 85 c3 1f"
        " c0 68 bf 49 2c 65 2f 01 f2 88 a1 d8 cd c1 9f c8"
    )


@pytest.mark.parametrize("name", list(CIPHERS))
def test_crypto_info_layout(name: str) -> None:
    cipher = CIPHERS[name]
    secret = bytes(range(cipher.hash.digest_size))
    info = crypto_info(cipher, secret)
    assert len(info) == cipher.info_size
    key, iv = traffic_key_iv(cipher, secret)
    # Read back exactly as the kernel would (independent parser in the test helper).
    direction = Direction(info)
    assert direction.cipher_type == cipher.cipher_type
    assert direction.nonce_base == iv
    assert direction.seq == 0
    assert key in info


C_PROGRAM = """
#include <stdio.h>
#include <stddef.h>
#include <sys/socket.h>
#include <netinet/tcp.h>
#include <linux/tls.h>
#define SHOW(type, number) printf("%d %zu %zu %zu %zu %zu\\n", number, sizeof(struct type), \\
    offsetof(struct type, iv), offsetof(struct type, key), offsetof(struct type, salt), \\
    offsetof(struct type, rec_seq))
int main(void) {
    printf("%d %d %d %d %d %d %d %d\\n", TLS_1_3_VERSION, SOL_TLS, TLS_TX, TLS_RX,
           TLS_RX_EXPECT_NO_PAD, TCP_ULP, TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE);
    SHOW(tls12_crypto_info_aes_gcm_128, TLS_CIPHER_AES_GCM_128);
    SHOW(tls12_crypto_info_aes_gcm_256, TLS_CIPHER_AES_GCM_256);
    SHOW(tls12_crypto_info_chacha20_poly1305, TLS_CIPHER_CHACHA20_POLY1305);
    return 0;
}
"""


@pytest.mark.skipif(not TLS_H.exists(), reason="needs linux/tls.h")
def test_crypto_info_matches_the_kernel_header(tmp_path: Path) -> None:
    lines = c_program_output(tmp_path, C_PROGRAM).split("\n")
    assert list(map(int, lines[0].split())) == [
        TLS_1_3_VERSION,
        SOL_TLS,
        TLS_TX,
        TLS_RX,
        TLS_RX_EXPECT_NO_PAD,
        TCP_ULP,
        TLS_SET_RECORD_TYPE,
        TLS_GET_RECORD_TYPE,
    ]
    by_type = {int(line.split()[0]): list(map(int, line.split()[1:])) for line in lines[1:4]}
    for cipher in CIPHERS.values():
        size, iv_at, key_at, salt_at, seq_at = by_type[cipher.cipher_type]
        info = crypto_info(cipher, bytes(cipher.hash.digest_size))
        key, iv = traffic_key_iv(cipher, bytes(cipher.hash.digest_size))
        assert len(info) == size == cipher.info_size
        assert info[iv_at:key_at] == iv[cipher.salt_len :]
        assert info[key_at:salt_at] == key
        assert info[salt_at:seq_at] == iv[: cipher.salt_len]
        assert info[seq_at:] == bytes(8)


def test_keylog_keeps_only_the_application_secrets() -> None:
    keylog = KeyLog()
    random_hex = "ab" * 32
    keylog.feed(f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {random_hex} {'11' * 48}".encode())
    assert keylog.secrets() is None
    keylog.feed(f"{CLIENT_TRAFFIC_SECRET} {random_hex} {'22' * 48}".encode())
    assert keylog.secrets() is None
    keylog.feed(f"{SERVER_TRAFFIC_SECRET} {random_hex} {'33' * 48}".encode())
    assert keylog.secrets() == (b"\x22" * 48, b"\x33" * 48)
    assert "22" not in repr(keylog)


def test_keys_never_show_in_repr() -> None:
    cipher = CIPHERS["TLS_AES_256_GCM_SHA384"]
    keys = ktls_keys(cipher, b"\x01" * 48, b"\x02" * 48)
    assert keys.tx != keys.rx
    assert keys.tx.hex() not in repr(keys)
    assert "tx" not in repr(keys)
