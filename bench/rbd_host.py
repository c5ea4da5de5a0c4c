"""storaged on an RBD image against ``rbd bench``, on the host, no guest.

netblk.ko needs the guest (bench/run --rbd measures it there, where every
process shares two emulated CPUs).  Here the same mini cluster runs on the
host's real CPUs and the client is storaged's own client library
(storaged.client) in this process: mutual TLS 1.3 in userspace, the same
storaged, the same engine and librbd path.  Random 4 KiB reads and writes at
QD16 and QD32, against ``rbd bench`` on a second image of the same size, in
rounds whose order alternates; every run records the CPU each process used.

    .venv/bin/python bench/rbd_host.py [--size 128M] [--seconds 15] [--repeat 3]

Writes build/bench-rbd-host/{netblk,rbd}/PROFILE.N.json and rbd.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import targets
from machine import cpu_used
from profiles import Profile
from tests.ceph_cluster import mini_cluster  # on the path targets puts the repository on

from netblk.tlsconf import client_context
from storaged.client import NetblkClient

BLOCK = 4096
RESULTS = targets.REPO / "build" / "bench-rbd-host"


async def client_run(
    pki: targets.Pki, profile: Profile, size: int, seconds: float, seed: int
) -> dict[str, float]:
    """``profile.iodepth`` requests in flight on one connection for
    ``seconds``; the requests done and their rate."""
    cert, key = pki.pair("bench")
    client = await NetblkClient.connect(
        "127.0.0.1",
        targets.NETBLK_PORT,
        ssl_context=client_context(pki.ca, cert, key),
        export="data",
        token=pki.token_file.read_bytes().strip(),
        server_hostname="localhost",
    )
    rng = random.Random(seed)
    blocks = size // BLOCK
    payload = os.urandom(BLOCK)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < deadline:
            offset = rng.randrange(blocks) * BLOCK
            if profile.rw == "randread":
                await client.read(offset, BLOCK)
            else:
                await client.write(offset, payload)
            done += 1

    started = loop.time()
    async with client:
        await asyncio.gather(*(worker() for _ in range(profile.iodepth)))
    elapsed = loop.time() - started
    return {"iops": done / elapsed, "ops": done, "elapsed_s": round(elapsed, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="128M", help="each image's data size (M or G)")
    parser.add_argument("--seconds", type=float, default=15, help="seconds per client run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rbd-ops", type=int, default=8192, help="operations per rbd bench")
    args = parser.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="netblk-bench-rbd-") as tmp:
        root = Path(tmp)
        pki = targets.Pki.create(root)
        passphrase = root / "volume.pass"
        passphrase.write_text(targets.PASSPHRASE)
        with mini_cluster(root / "ceph", "memstore") as ceph:
            location = targets.rbd_images(ceph, args.size, passphrase)
            config = targets.storaged_config(root, pki, location, passphrase)
            log = root / "storaged.log"
            with targets.daemon(
                [str(targets.VENV_BIN / "storaged"), "--config", str(config)],
                log,
                targets.logged(log, "storaged listening"),
                "storaged",
            ) as storaged_pid:
                fill = Profile("fill", "fill", "randwrite", "4k", 32)
                asyncio.run(client_run(pki, fill, size, 5, seed=0))
                pids = {"storaged": storaged_pid, "client": os.getpid()}
                pids |= {name: pid for name, pid in ceph.pids.items() if name.startswith("osd")}
                for repeat, profile, target in targets.rbd_rounds(args.repeat):
                    out = RESULTS / target / f"{profile.name}.{repeat}.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text("{}")
                    with cpu_used(pids, out):
                        if target == "netblk":
                            result = asyncio.run(
                                client_run(pki, profile, size, args.seconds, repeat)
                            )
                        else:
                            result = targets.rbd_bench(ceph, profile, args.rbd_ops)
                    report = json.loads(out.read_text()) | result
                    out.write_text(json.dumps(report, indent=1))
                    print(f"bench: {target}/{out.name}: {result['iops']:,.0f} IOPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
