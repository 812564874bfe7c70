"""Restore targets: sparse raw file, qcow2, NBD export, block device; --force; bad targets."""

import json
import os
import subprocess

import pytest

from helpers import support
from helpers.engine_util import MiB, backup, init_repo, make_image, nbb, qio, random_file, same_file, snapshot_raw


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One repository with a 24 MiB disk: data, zeros written as data, a trim, a short tail."""
    tmp = tmp_path_factory.mktemp("restore")
    img = make_image(tmp / "disk.qcow2", 24 * MiB + 12 * 1024)
    rnd = random_file(tmp / "r.bin", 3 * MiB, seed=9)
    qio(img, "write -q -P 0xee 0 8M", f"write -q -s {rnd} 10M 3M", "write -q -P 0 2M 1M",
        "discard -q 4M 1M", "write -q -P 0x3 24M 12k")
    repo = init_repo(tmp / "repo", "64K")
    info = backup(repo, "full", "--image", str(img))
    raw = snapshot_raw(img, tmp / "expected.raw")
    return repo, info, raw, tmp


def _garbage(path, size):
    with open(path, "wb") as f:
        f.write(b"\xa5" * size)


def test_restore_to_sparse_raw_file(saved, tmp_path):
    repo, info, raw, _ = saved
    out = tmp_path / "out.raw"
    p = nbb(repo, "--json", "restore", info["disk"], str(out))      # disk name -> its latest backup
    res = json.loads(p.stdout)
    assert res["backup"]["id"] == info["id"]
    assert same_file(out, raw)
    st = os.stat(out)
    assert st.st_size == info["size"]
    assert st.st_blocks * 512 < 14 * MiB      # holes where the disk is zero
    assert res["data_bytes"] + res["zero_bytes"] == info["size"]


def test_existing_file_needs_force(saved, tmp_path):
    repo, info, raw, _ = saved
    out = tmp_path / "exists.raw"
    out.write_bytes(b"precious")
    p = nbb(repo, "restore", info["id"], str(out), check=False)
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr
    assert out.read_bytes() == b"precious"
    _garbage(out, info["size"] + 4096)       # bigger and non-zero: no stale byte may survive
    nbb(repo, "restore", "--force", info["id"], str(out))
    assert same_file(out, raw)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".nbdbackup-restore")]


def test_restore_to_qcow2(saved, tmp_path):
    repo, info, raw, _ = saved
    out = tmp_path / "out.qcow2"
    nbb(repo, "restore", "--format", "qcow2", info["id"], str(out))
    meta = json.loads(support.run(["qemu-img", "info", "--output=json", str(out)]).stdout)
    assert meta["format"] == "qcow2" and meta["virtual-size"] == info["size"]
    assert meta["actual-size"] < 14 * MiB                       # sparse
    support.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)])


def test_restore_to_nbd_export(saved, tmp_path):
    repo, info, raw, _ = saved
    target = make_image(tmp_path / "target.qcow2", info["size"])
    qio(target, f"write -q -P 0x5a 0 {info['size']}")            # garbage everywhere
    with support.qemu_nbd(target, tmp_path / "t.sock", readonly=False, connections=4) as uri:
        p = nbb(repo, "--json", "restore", "--connections", "4", info["id"], uri)
    assert json.loads(p.stdout)["zero_bytes"] > 0
    support.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(target)])


def test_restore_to_nbd_export_of_wrong_size_or_read_only(saved, tmp_path):
    repo, info, raw, _ = saved
    target = make_image(tmp_path / "small.qcow2", 8 * MiB)
    with support.qemu_nbd(target, tmp_path / "t.sock", readonly=False) as uri:
        p = nbb(repo, "restore", info["id"], uri, check=False)
    assert p.returncode == 2 and "bytes" in p.stderr and "Traceback" not in p.stderr
    same = make_image(tmp_path / "same.qcow2", info["size"])
    with support.qemu_nbd(same, tmp_path / "r.sock", readonly=True) as uri:
        p = nbb(repo, "restore", info["id"], uri, check=False)
    assert p.returncode == 2 and "read-only" in p.stderr


def test_restore_to_block_device(saved, tmp_path):
    repo, info, raw, _ = saved
    backing = tmp_path / "loop.img"
    _garbage(backing, info["size"] + 64 * 1024)   # loop devices round to 512; a bit bigger is fine
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    assert dev.returncode == 0, f"losetup failed: {dev.stderr}"
    dev = dev.stdout.strip()
    try:
        p = nbb(repo, "restore", info["id"], dev, check=False)
        assert p.returncode == 2 and "--force" in p.stderr
        nbb(repo, "restore", "--force", info["id"], dev)
    finally:
        subprocess.run(["losetup", "-d", dev])
    with open(backing, "rb") as f:
        got = f.read(info["size"])
    assert got == raw.read_bytes()


def test_restore_unknown_backup(saved, tmp_path):
    repo, *_ = saved
    p = nbb(repo, "restore", "no-such-disk", str(tmp_path / "x.raw"), check=False)
    assert p.returncode == 11 and "Traceback" not in p.stderr
    assert not (tmp_path / "x.raw").exists()


def test_restore_target_full(saved, tmp_path):
    """ENOSPC on the target: exit 8, a clear message, no temp file left behind."""
    repo, info, raw, _ = saved
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        p = nbb(repo, "restore", info["id"], str(small / "x.raw"), check=False)
        left = os.listdir(small)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert p.returncode == 8 and "no space left on the restore target" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and left == []
