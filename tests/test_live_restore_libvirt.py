"""`restore --live --domain`: a libvirt domain (no guest OS, TCG) whose disk is DEST.qcow2 is
started by the command, libvirt's blockPull copies the backup into DEST while the guest writes
(HMP qemu-io through libvirt), the command is SIGKILLed and resumed; DEST ends with no backing
and equal to the backup plus exactly those writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import support
from helpers.libvirt import guest_write, virsh
from helpers.repo import new_repo, write_backup

MiB = 1024 * 1024
SIZE = 96 * MiB
SPEED = 12 * MiB


@pytest.fixture
def setup(tmp_path, libvirtd):
    """(repo, backup id, disk bytes, DEST, domain name): a persistent, shut-off domain whose disk
    is DEST (in a 0755 directory: qemu runs as libvirt-qemu). All removed at the end, with
    every server the command started."""
    rnd = random.Random(14)
    data = bytearray(SIZE)
    data[:20 * MiB] = rnd.randbytes(20 * MiB)
    for i in range(24, 96, 8):
        data[i * MiB:(i + 1) * MiB] = bytes([i]) * MiB
    r = new_repo(tmp_path / "repo")
    try:
        info = write_backup(r, "ldisk", bytes(data), zero_holes=True)
    finally:
        r.close()
    d = Path(tempfile.mkdtemp(prefix="nbdbackup-live-", dir="/var/tmp"))
    d.chmod(0o755)
    dest = d / "dest.qcow2"
    name = f"nbdbackup-test-{os.getpid()}-live"
    xml = d / "dom.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{support.require_tool("qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{dest}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
""")
    virsh("define", str(xml))
    pids: set[int] = set()
    try:
        yield str(tmp_path / "repo"), info.id, data, dest, name, pids
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
        state = Path(f"{dest}.nbdbackup-live.json")
        if state.exists():
            st = json.loads(state.read_text())
            pids.add(st.get("server_pid") or 0)
            if st.get("run_dir"):
                shutil.rmtree(st["run_dir"], ignore_errors=True)
        for pid in pids - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def _job_cur(name: str) -> int | None:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        if not dom.isActive():
            return None
        info = dom.blockJobInfo("vda", 0)
        return int(info["cur"]) if info else None
    finally:
        conn.close()


def _wait_cur(name: str, at_least: int, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cur = _job_cur(name)
        if cur is not None and cur >= at_least:
            return cur
        if proc.poll() is not None:
            raise AssertionError(f"restore --live exited with {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"blockPull did not reach {at_least} within {timeout}s")


def _run(repo: str, *args) -> subprocess.Popen:
    return subprocess.Popen([support.nbdbackup_exe(), "--repo", repo, "restore", "--live", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_domain_live_restore_killed_and_resumed(setup, tmp_path):
    repo, bid, data, dest, name, pids = setup
    model = bytearray(data)

    def write(offset: int, length: int, pattern: int) -> None:
        guest_write(name, "vda", pattern, offset, length)
        model[offset:offset + length] = bytes([pattern]) * length

    proc = _run(repo, "ldisk", dest, "--domain", name, "--start", "--speed", SPEED, "--json")
    try:
        cur = _wait_cur(name, 8 * MiB, proc)
        st = json.loads(Path(f"{dest}.nbdbackup-live.json").read_text())
        pids.add(st["server_pid"])
        assert f'"export":"{bid}"' in st["backing"] and "libvirt-qemu" in st["server_argv"]
        write((cur // 2) & ~0xFFFF, 64 * 1024, 0x61)        # copied already
        write(cur + 40 * MiB + 512, 4096, 0x62)              # not yet, a partial cluster
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        support.kill_if_running(proc)
        proc.stdout.close()
        proc.stderr.close()
    cur = _job_cur(name)
    assert cur is not None and cur < SIZE - 16 * MiB        # qemu's job goes on without the command
    write(SIZE - 64 * 1024, 64 * 1024, 0x63)
    p = support.run([support.nbdbackup_exe(), "--repo", repo, "restore", "--live", "--resume", str(dest),
                     "--domain", name, "--speed", "0", "--json"], check=False, timeout=180)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["followed_running_job"] and res["server_stopped"], res
    virsh("destroy", name)
    info = json.loads(support.run([support.require_tool("qemu-img"), "info", "--output=json", str(dest)]).stdout)
    assert "backing-filename" not in info, info
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    c = support.run([support.require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(dest),
                     str(expected)], check=False)
    assert c.returncode == 0, c.stdout + c.stderr
    assert not Path(f"{dest}.nbdbackup-live.json").exists()


def test_domain_server_killed_then_resume(setup, tmp_path):
    repo, bid, data, dest, name, pids = setup
    proc = _run(repo, "ldisk", dest, "--domain", name, "--start", "--speed", SPEED)
    try:
        _wait_cur(name, 8 * MiB, proc)
        st = json.loads(Path(f"{dest}.nbdbackup-live.json").read_text())
        pids.add(st["server_pid"])
        os.kill(st["server_pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        support.kill_if_running(proc)
    assert proc.returncode == 24, err
    assert "still has its backing store" in err and "Traceback" not in err, err
    assert "start it again with" in err and f"--domain {name}" in err, err
    p = support.run([support.nbdbackup_exe(), "--repo", repo, "restore", "--live", "--resume", str(dest),
                     "--domain", name, "--json"], check=False, timeout=180)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    pids.add(res["server_pid"])
    assert res["server_stopped"] and res["server_pid"] != st["server_pid"], res
    virsh("destroy", name)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(data)
    c = support.run([support.require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(dest),
                     str(expected)], check=False)
    assert c.returncode == 0, c.stdout + c.stderr
