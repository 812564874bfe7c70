"""Every command on every repository place: local+SQLite, local+PostgreSQL, S3+PostgreSQL.

One test body per place (conftest's `place` fixture), through the installed
CLI and real qemu: init; full and incremental from an --image, an NBD URI
(qemu-nbd) and a running VM (--qmp); list, restore, serve (qemu reads the
export), verify, stats, forget, prune, gc, rebuild-index and migrate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers.qmp_vm import MiB, Vm
from helpers.support import kill_if_running, nbdbackup, nbdbackup_exe, run

pytestmark = pytest.mark.qemu


def _restored(place, tmp_path, ref) -> bytes:
    out = tmp_path / "restored.raw"
    out.unlink(missing_ok=True)
    nbdbackup("--repo", place, "-q", "restore", ref, out)
    return out.read_bytes()


def _raw_of(image, tmp_path) -> bytes:
    out = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)])
    return out.read_bytes()


def test_every_command_in_every_place(place, tmp_path):
    p = nbdbackup("--repo", place, "--json", "init", "--chunk-size", "64K")
    assert json.loads(p.stdout)["path"] == (place.spec if place.on_s3 else os.path.abspath(place.spec))
    expected: dict[str, bytes] = {}

    # --image: a full, then an incremental through the image's persistent bitmap
    img = tmp_path / "web1.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "6M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x42 4M 1M", str(img)])
    b = json.loads(nbdbackup("--repo", place, "--json", "full", "--image", img).stdout)
    expected[b["id"]] = _raw_of(img, tmp_path)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x43 1M 64K", str(img)])
    b = json.loads(nbdbackup("--repo", place, "--json", "incremental", "--image", img).stdout)
    assert b["kind"] == "incremental" and b["read_bytes"] < 1 * MiB
    expected[b["id"]] = _raw_of(img, tmp_path)
    image_latest = b["id"]

    # an NBD URI (qemu-nbd serving a raw file)
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(MiB) + b"\0" * MiB + b"text " * 204_800)   # whole sectors
    sock = tmp_path / "qnbd.sock"
    qnbd = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-k", str(sock), str(raw)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        b = json.loads(nbdbackup("--repo", place, "--json", "full", "--source", f"nbd+unix:///?socket={sock}",
                                 "--disk", "data").stdout)
        expected[b["id"]] = raw.read_bytes()
    finally:
        kill_if_running(qnbd)

    # a running VM over QMP (fleecing), full then incremental
    vm = Vm(tmp_path, {"vda": 4 * MiB})
    try:
        vm.write("vda", 0, 300_000, 0x61)
        at = vm.snapshot()["vda"]
        b = json.loads(nbdbackup("--repo", place, "--json", "full", "--qmp", vm.qmp_sock, "--node", "vda",
                                 "--disk", "vm-vda").stdout)
        expected[(b[0] if isinstance(b, list) else b)["id"]] = at
        vm.write("vda", 2 * MiB, 4096, 0x62)
        at = vm.snapshot()["vda"]
        b = json.loads(nbdbackup("--repo", place, "--json", "incremental", "--qmp", vm.qmp_sock, "--node", "vda",
                                 "--disk", "vm-vda").stdout)
        b = b[0] if isinstance(b, list) else b
        assert b["kind"] == "incremental"
        expected[b["id"]] = at
        vm.assert_clean()
    finally:
        vm.stop()

    listed = json.loads(nbdbackup("--repo", place, "--json", "list").stdout)
    assert {x["id"] for x in listed} == set(expected)
    for bid, data in expected.items():
        assert _restored(place, tmp_path, bid) == data, f"restore of {bid} differs"

    # serve: qemu reads the image's latest backup through the export named by the disk
    ssock = tmp_path / "serve.sock"
    srv = subprocess.Popen([nbdbackup_exe(), "--repo", place.spec, "serve", "--listen", f"unix:{ssock}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ssock.exists():
            assert srv.poll() is None and time.monotonic() < deadline, srv.stderr.read() if srv.poll() else ""
            time.sleep(0.05)
        out = tmp_path / "served.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///web1?socket={ssock}", str(out)])
        assert out.read_bytes() == expected[image_latest]
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(30)
        finally:
            kill_if_running(srv)

    nbdbackup("--repo", place, "verify")
    stats = json.loads(nbdbackup("--repo", place, "--json", "stats").stdout)
    assert stats["backups"] == len(expected) and stats["disks"] == 3 and isinstance(stats["pack_bytes"], int)

    # maintenance: forget one, prune to the newest per disk, gc everything unreferenced
    nbdbackup("--repo", place, "forget", "data")
    out = json.loads(nbdbackup("--repo", place, "--json", "prune", "--keep-last", "1").stdout)
    assert out["removed"] == 2
    gc = json.loads(nbdbackup("--repo", place, "--json", "gc", "--grace", "0").stdout)
    assert gc["bytes_reclaimed"] > 0 and gc["skipped_damaged"] == []
    left = {x["id"] for x in json.loads(nbdbackup("--repo", place, "--json", "list").stdout)}
    assert len(left) == 2
    nbdbackup("--repo", place, "verify")

    # rebuild-index from the storage alone (PostgreSQL: the old index moves into a schema of its own)
    rep = json.loads(nbdbackup("--repo", place, "--json", "rebuild-index").stdout)
    assert set(rep["backups"]) >= left and rep["backups_lost"] == [] and rep["old_index"]
    for bid in left:
        assert _restored(place, tmp_path, bid) == expected[bid]
    nbdbackup("--repo", place, "verify")
    assert json.loads(nbdbackup("--repo", place, "--json", "migrate").stdout)["changed"] is False
    # and the repository takes backups again after all that
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 5M 64K", str(img)])
    b = json.loads(nbdbackup("--repo", place, "--json", "incremental", "--image", img).stdout)
    assert _restored(place, tmp_path, b["id"]) == _raw_of(img, tmp_path)
