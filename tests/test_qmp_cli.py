"""`nbdbackup full|incremental --qmp` through the installed CLI, against real qemu:
qemu-system-x86_64 (guest writes through HMP) and qemu-storage-daemon (guest
writes through a writable FUSE export of the node)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from helpers import support
from helpers.qmp_vm import MiB, Qsd, Vm


def nbb(tmp_path, *args, check=True):
    env = {"NBDBACKUP_STATE_DIR": str(tmp_path / "state")}
    pw = tmp_path / "passphrase"        # written by the vm fixture for an encrypted repository
    key = ["--passphrase-file", str(pw)] if pw.exists() else []
    return support.nbdbackup("--repo", str(tmp_path / "repo"), *key, *args, check=check, env=env)


def restore_bytes(tmp_path, backup_id: str) -> bytes:
    out = tmp_path / f"restore-{backup_id}.raw"
    nbb(tmp_path, "restore", backup_id, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture
def vm(tmp_path, request):
    """A VM with two disks and a repository: plaintext, or encrypted when parametrized with True."""
    encrypted = getattr(request, "param", False)
    v = Vm(tmp_path, {"vda": 8 * MiB, "vdb": 4 * MiB})
    if encrypted:
        (tmp_path / "passphrase").write_text("qmp test passphrase\n")
    nbb(tmp_path, "init", "--chunk-size", "64K", *(["--encryption", "--kdf-memory", "8"] if encrypted else []))
    try:
        yield v
    finally:
        v.stop()


@pytest.mark.parametrize("vm", [False, True], ids=["plaintext", "encrypted"], indirect=True)
def test_cli_full_incremental_set_and_restore(vm, tmp_path):
    vm.write("vda", 0, 200_000, 0x61)
    vm.write("vdb", MiB, 4096, 0x62)
    at_full = vm.snapshot()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p = nbb(tmp_path, "--json", "full", "--qmp", vm.qmp_sock, "--node", "vda", "--node", "node-vdb",
            "--disk", "web-os", "--disk", "web-data", "--scratch-dir", str(scratch))
    full = json.loads(p.stdout)
    assert [b["disk"] for b in full] == ["web-os", "web-data"]
    assert full[0]["set_id"] == full[1]["set_id"] and full[0]["created"] == full[1]["created"]
    assert restore_bytes(tmp_path, full[0]["id"]) == at_full["vda"]
    assert restore_bytes(tmp_path, full[1]["id"]) == at_full["vdb"]
    assert list(scratch.iterdir()) == []
    vm.assert_clean()

    vm.write("vda", 7 * MiB, 65536, 0x63)
    p = nbb(tmp_path, "--json", "incremental", "--qmp", vm.qmp_sock, "--node", "vda", "--node", "node-vdb",
            "--disk", "web-os", "--disk", "web-data", "--bitmap-granularity", "128K")
    incr = json.loads(p.stdout)
    assert [b["kind"] for b in incr] == ["incremental", "incremental"]
    assert [b["parent"] for b in incr] == [b["id"] for b in full]
    assert restore_bytes(tmp_path, incr[0]["id"]) == vm.snapshot()["vda"]
    assert restore_bytes(tmp_path, incr[1]["id"]) == vm.snapshot()["vdb"]
    vm.assert_clean()
    (bm,) = [b for n, b in vm.bitmaps("vda").items() if n.startswith("nbdbackup-")]
    assert bm["granularity"] == 128 * 1024

    listed = json.loads(nbb(tmp_path, "--json", "list").stdout)
    sets = {b["set_id"] for b in listed}
    assert len(sets) == 2 and len(listed) == 4
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert ("encryption" in config) == (tmp_path / "passphrase").exists()


def test_cli_usage_errors(vm, tmp_path):
    p = nbb(tmp_path, "full", "--qmp", vm.qmp_sock, check=False)
    assert p.returncode == 2 and "--node" in p.stderr
    p = nbb(tmp_path, "full", "--qmp", vm.qmp_sock, "--node", "vda", "--node", "vdb", "--disk", "x",
            check=False)
    assert p.returncode == 2 and "one --disk per --node" in p.stderr
    p = nbb(tmp_path, "full", "--qmp", vm.qmp_sock, "--node", "vda", "--bitmap-granularity", "3000",
            check=False)
    assert p.returncode == 2 and "power of two" in p.stderr
    p = nbb(tmp_path, "full", "--qmp", str(tmp_path / "nope.sock"), "--node", "vda", check=False)
    assert p.returncode == 4 and "QMP socket" in p.stderr and "Traceback" not in p.stderr
    p = nbb(tmp_path, "full", "--qmp", vm.qmp_sock, "--node", "nosuch", check=False)
    assert p.returncode == 11 and "nosuch" in p.stderr and "vda" in p.stderr
    p = nbb(tmp_path, "incremental", "--qmp", vm.qmp_sock, "--node", "vda", "--no-fallback", check=False)
    assert p.returncode == 13 and "no dirty bitmap" in p.stderr
    p = nbb(tmp_path, "full", "--image", "x.qcow2", "--node", "vda", check=False)
    assert p.returncode == 2 and "--node is for --qmp" in p.stderr
    vm.assert_clean()


def start_and_signal(vm, tmp_path, sig) -> subprocess.CompletedProcess:
    """Run an incremental through the CLI; send *sig* once its export is up (it is reading)."""
    proc = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(tmp_path / "repo"), "incremental",
                             "--qmp", vm.qmp_sock, "--node", "vda", "--connections", "1"],
                            env=dict(os.environ, NBDBACKUP_STATE_DIR=str(tmp_path / "state")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not vm.exports():          # reading starts right after the export appears
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def test_cli_interrupted_or_killed_while_reading(tmp_path):
    """SIGTERM, then SIGKILL, the CLI while it reads; the next incremental has every change."""
    vm = Vm(tmp_path, {"vda": 256 * MiB})
    nbb(tmp_path, "init", "--chunk-size", "64K")
    try:
        data = tmp_path / "random.bin"
        data.write_bytes(os.urandom(64 * MiB))
        out = vm.cmd("human-monitor-command",
                     **{"command-line": f'qemu-io -d vda "write -s {data} 0 {64 * MiB}"'})
        assert out == "", out
        expected = bytearray(data.read_bytes()) + bytearray(192 * MiB)
        nbb(tmp_path, "full", "--qmp", vm.qmp_sock, "--node", "vda")

        # full of random data, 64K chunks, 1 connection: the read takes long enough to be caught
        vm.write("vda", 64 * MiB, 64 * MiB, 0x5a)   # makes the interrupted incremental big
        p = start_and_signal(vm, tmp_path, signal.SIGTERM)
        assert p.returncode == 130, p.stderr
        assert "Traceback" not in p.stderr
        vm.assert_clean()
        ours = {n: b for n, b in vm.bitmaps("vda").items() if n.startswith("nbdbackup-")}
        assert len(ours) == 2 and sum(b["recording"] for b in ours.values()) == 1

        vm.write("vda", 100 * MiB, MiB, 0x71)
        p = start_and_signal(vm, tmp_path, signal.SIGKILL)
        assert p.returncode == -signal.SIGKILL
        assert vm.exports(), "the killed run's export should be left behind"

        vm.write("vda", 200 * MiB, 65536, 0x72)
        expected[64 * MiB:128 * MiB] = b"\x5a" * (64 * MiB)
        expected[100 * MiB:101 * MiB] = b"\x71" * MiB
        expected[200 * MiB:200 * MiB + 65536] = b"\x72" * 65536
        incr = json.loads(nbb(tmp_path, "--json", "incremental", "--qmp", vm.qmp_sock, "--node", "vda").stdout)
        assert incr["kind"] == "incremental"
        assert incr["read_bytes"] == 64 * MiB + 65536
        assert restore_bytes(tmp_path, incr["id"]) == bytes(expected)
        vm.assert_clean()
        assert len([n for n in vm.bitmaps("vda") if n.startswith("nbdbackup-")]) == 1
    finally:
        vm.stop()


def test_qemu_storage_daemon_with_fuse_writes(tmp_path):
    """Guest writes through a writable FUSE export while the backup fleeces the node."""
    qsd = Qsd(tmp_path, {"disk0": 4 * MiB})
    nbb(tmp_path, "init", "--chunk-size", "64K")
    try:
        qsd.write("disk0", 0, b"\x81" * 100_000)
        full = json.loads(nbb(tmp_path, "--json", "full", "--qmp", qsd.qmp_sock, "--node", "disk0").stdout)
        assert restore_bytes(tmp_path, full["id"]) == qsd.snapshot()["disk0"]
        qsd.write("disk0", 2 * MiB, b"\x82" * 70_000)
        incr = json.loads(nbb(tmp_path, "--json", "incremental", "--qmp", qsd.qmp_sock, "--node", "disk0").stdout)
        assert incr["kind"] == "incremental" and incr["read_bytes"] == 2 * 65536
        assert restore_bytes(tmp_path, incr["id"]) == qsd.snapshot()["disk0"]
        assert [e["id"] for e in qsd.query("query-block-exports")] == ["guest-disk0"]
        assert qsd.query("query-block-jobs") == []
        assert {n["node-name"] for n in qsd.query("query-named-block-nodes", flat=True)} == {"file-disk0", "disk0"}
    finally:
        qsd.stop()
