"""Does storaged's decrypted-sector cache pay?  Random 4 KiB reads through
the real server and client library, with the cache on and off.

    .venv/bin/python bench/cache_effect.py [--seconds 10] [--depth 16]

Prints IOPS, mean latency and the cache hit ratio for each run.  Userspace
only (no kernel, no kTLS): it isolates the server's read path.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from netblk.protocol.constants import BLOCK_SIZE
from netblk.tlsconf import client_context
from netblk.tokens import generate_token, hash_token
from netblk_certs.pki import make_ca, make_client_cert, make_server_cert, write_issued
from storaged import luks2
from storaged.client import NetblkClient
from storaged.config import load_config
from storaged.server import StorageServer

VOLUME_SIZE = 256 << 20
WORKING_SET = 32 << 20
PASSPHRASE = b"benchmark passphrase"


def prepare(root: Path, cache: str, port: int) -> tuple[Path, str]:
    ca = make_ca()
    write_issued(ca, root, "ca")
    write_issued(make_server_cert(ca, "s", ip_addresses=["127.0.0.1"]), root, "server")
    write_issued(make_client_cert(ca, "bench"), root, "client")
    token = generate_token()
    (root / "pass").write_bytes(PASSPHRASE)
    volume = root / "vol.luks"
    if not volume.exists():
        luks2.format_volume(volume, VOLUME_SIZE, PASSPHRASE, luks2.TEST_KDF_PARAMS)
    config = root / "storaged.toml"
    config.write_text(
        f"""[server]
listen = ["127.0.0.1"]
port = {port}
control_socket = ""
[tls]
cert = "server.crt"
key = "server.key"
ca = "ca.crt"
[cache]
size = "{cache}"
[log]
level = "WARNING"
[clients.bench]
token_hash = "{hash_token(token)}"
[exports.vol]
volume = "vol.luks"
passphrase_file = "pass"
access = {{ bench = "rw" }}
"""
    )
    return config, token


async def run(root: Path, cache: str, seconds: float, depth: int) -> None:
    config_path, token = prepare(root, cache, 10977)
    server = StorageServer(load_config(config_path))
    await server.open_volumes()
    await server.start()
    context = client_context(root / "ca.crt", root / "client.crt", root / "client.key")
    client = await NetblkClient.connect(
        "127.0.0.1", 10977, ssl_context=context, export="vol", token=token.encode()
    )
    blocks = WORKING_SET // BLOCK_SIZE
    for offset in range(0, WORKING_SET, 1 << 20):
        await client.write(offset, random.randbytes(1 << 20))
    done = 0
    deadline = time.perf_counter() + seconds

    async def reader() -> None:
        nonlocal done
        rng = random.Random()
        while time.perf_counter() < deadline:
            await client.read(rng.randrange(blocks) * BLOCK_SIZE, BLOCK_SIZE)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(depth)))
    elapsed = time.perf_counter() - started
    snap = server.snapshot()
    await client.close()
    await server.shutdown()
    latency = snap["exports"]["vol"]["latency"]
    print(
        f"cache={cache:>6}  {done / elapsed:8.0f} IOPS  server latency mean {latency['mean_us']} us"
        f" p99 {latency['p99_us']} us  hit ratio {snap['cache']['hit_ratio']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for cache in ("0", "64MiB"):
            root = Path(tmp) / cache
            root.mkdir()
            asyncio.run(run(root, cache, args.seconds, args.depth))


if __name__ == "__main__":
    main()
