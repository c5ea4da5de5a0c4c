"""The sysfs layer on its own, with the real write function (no fake driver):
which entries are devices, how names are checked, how files are read and
written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from netblk_admin.sysfs import DeviceNotFound, DeviceTree, State, SysfsError, parse_stats
from tests.admin_api.fake_driver import FakeDriver

TRAVERSALS = ["..", ".", "../outside", "netblk0/../netblk1", "netblk0/..", "/etc", "netblk0\x00"]


@pytest.fixture
def tree(tmp_path: Path) -> DeviceTree:
    """Files as the driver shows them; nothing emulates its stores here."""
    return DeviceTree(FakeDriver(tmp_path / "sys-block").root)


def test_only_netblk_devices_are_listed_in_index_order(tree: DeviceTree) -> None:
    for name in ("netblk10", "netblk2"):
        (tree.root / name).mkdir()
    (tree.root / "netblk3x").mkdir()
    assert tree.names() == ["netblk0", "netblk1", "netblk2", "netblk10"]


def test_an_unreadable_root_is_a_sysfs_error(tmp_path: Path) -> None:
    with pytest.raises(SysfsError) as caught:
        DeviceTree(tmp_path / "missing").names()
    assert caught.value.errno == errno.ENOENT


def test_a_snapshot_reads_every_file(tree: DeviceTree) -> None:
    snapshot = tree.snapshot("netblk1")
    assert snapshot.state is State.DISCONNECTED
    assert snapshot.last_error == ""
    assert snapshot.config["server_port"] == "10910"
    assert snapshot.config["server_ip"] == ""
    assert snapshot.stats["inflight"] == 0
    assert snapshot.current_server == ""
    assert snapshot.config["servers"] == ""
    assert len(snapshot.stats) == 12


@pytest.mark.parametrize(
    "name",
    ["netblk7", "netblk", "sda", "loop0", "NETBLK0", "netblk" + "9" * 5000, *TRAVERSALS],
)
def test_names_that_are_no_device_are_not_found(tree: DeviceTree, name: str) -> None:
    (tree.root.parent / "outside").mkdir()
    for call in (lambda: tree.snapshot(name), lambda: tree.write(name, "connect", "1")):
        with pytest.raises(DeviceNotFound):
            call()


def test_a_device_that_is_a_symlink_works_as_in_sysfs(tree: DeviceTree) -> None:
    # /sys/block/netblkN links to ../devices/virtual/block/netblkN.
    real = tree.root.parent / "devices" / "netblk0"
    real.parent.mkdir()
    (tree.root / "netblk0").rename(real)
    (tree.root / "netblk0").symlink_to(real)
    tree.write("netblk0", "server_port", "10911")
    assert tree.read("netblk0", "server_port") == "10911"


def test_a_write_is_one_write_of_the_value_and_a_newline(
    tree: DeviceTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    tree.write("netblk0", "export", "data")
    assert writes == [b"data\n"]
    assert (tree.root / "netblk0" / "export").read_bytes() == b"data\n"


def test_a_missing_attribute_is_an_error_never_a_new_file(tree: DeviceTree) -> None:
    (tree.root / "netblk0" / "export").unlink()
    with pytest.raises(SysfsError) as caught:
        tree.write("netblk0", "export", "data")
    assert caught.value.errno == errno.ENOENT
    assert caught.value.attr == "export"
    assert not (tree.root / "netblk0" / "export").exists()


def test_a_device_that_vanishes_is_not_found(tree: DeviceTree) -> None:
    directory = tree.root / "netblk1"
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()  # what rmmod does to the whole directory
    with pytest.raises(DeviceNotFound):
        tree.state("netblk1")


def test_only_the_driver_attributes_are_writable(tree: DeviceTree) -> None:
    for attr in ("state", "stats", "../netblk1/connect", "uevent"):
        with pytest.raises(ValueError, match="not a writable netblk attribute"):
            tree.write("netblk0", attr, "1")


def test_stats_parse_and_refuse_garbage() -> None:
    assert parse_stats("read_bytes: 4096\ninflight: 2\n") == {"read_bytes": 4096, "inflight": 2}
    assert parse_stats("") == {}
    with pytest.raises(ValueError, match="unexpected line"):
        parse_stats("read_bytes 4096")
    with pytest.raises(ValueError):
        parse_stats("read_bytes: many")
