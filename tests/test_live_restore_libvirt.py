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
import time
from pathlib import Path

import pytest

from helpers import support
from helpers.libvirt import disk_xml, domain_dir, domain_xml, guest_write, virsh
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
    d = domain_dir("nbdbackup-live-")
    dest = d / "dest.qcow2"
    name = f"nbdbackup-test-{os.getpid()}-live"
    xml = d / "dom.xml"
    xml.write_text(domain_xml(name, disk_xml("vda", dest, "qcow2")))
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


# --- DOMAIN missing: defined from the backup's stored definition (a `full --libvirt` set) ------

IFACE = "<interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>"


@pytest.fixture
def qemu_dir():
    """A 0755 directory under /var/tmp: qemu (libvirt-qemu) must reach DEST and the NVRAM."""
    d = domain_dir("nbdbackup-live-def-")
    yield d
    for state in d.glob("*.nbdbackup-live.json"):           # servers of a failed test
        st = json.loads(state.read_text())
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(st.get("server_pid"), signal.SIGKILL)
        if st.get("run_dir"):
            shutil.rmtree(st["run_dir"], ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def undefine():
    names: list[str] = []
    yield names
    for n in names:
        virsh("destroy", n, check=False)
        virsh("undefine", n, "--nvram", check=False)


def _xml_of(name: str):
    import xml.etree.ElementTree as ET

    return ET.fromstring(virsh("dumpxml", name).stdout)


def _nbb(repo, *args, timeout=180):
    return support.run([support.nbdbackup_exe(), "--repo", str(repo), *map(str, args)], check=False, timeout=timeout)


def test_missing_domain_defined_from_the_stored_definition(libvirt_domain, tmp_path, qemu_dir, undefine):
    from helpers.engine_util import init_repo

    dom = libvirt_domain(disks=[("qcow2", 16 * MiB)], nvram=True, persistent=True, running=False, tag="ldef",
                         busy=3 * MiB)
    (dom.dir / "iface.xml").write_text(IFACE)
    virsh("attach-device", dom.name, str(dom.dir / "iface.xml"), "--config")
    dom.start()
    repo = init_repo(tmp_path / "repo")
    p = _nbb(repo, "--json", "full", "--libvirt", dom.name)
    assert p.returncode == 0, p.stderr
    [full] = (lambda j: j if isinstance(j, list) else [j])(json.loads(p.stdout))
    backed_up = tmp_path / "backed-up.raw"
    assert _nbb(repo, "restore", full["id"], backed_up).returncode == 0

    # the stored name while that domain exists (without DEST): refused before anything is made
    clash = qemu_dir / "clash.qcow2"
    p = _nbb(repo, "restore", "--live", full["id"], clash, "--domain", dom.name, "--start")
    assert p.returncode == 2 and "never redefines an existing domain" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not list(qemu_dir.iterdir())

    new = f"{dom.name}-new"
    undefine.append(new)
    dest = qemu_dir / "dest.qcow2"
    p = _nbb(repo, "--json", "restore", "--live", full["id"], dest, "--domain", new, "--start")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["domain_defined"] and res["server_stopped"] and res["bytes"] == 16 * MiB, res
    assert virsh("domstate", new).stdout.strip() == "running"
    assert virsh("domstate", dom.name).stdout.strip() == "running"        # the original runs on
    live, orig = _xml_of(new), _xml_of(dom.name)
    assert [d.find("source").get("file") for d in live.iterfind("devices/disk")] == [str(dest)]
    assert live.findtext("uuid") != orig.findtext("uuid")
    macs = [m.get("address") for x in (live, orig) for m in x.iterfind("devices/interface/mac")]
    assert len(macs) == 2 and macs[0] != macs[1], macs
    nvram = qemu_dir / f"{new}_VARS.fd"
    assert live.findtext("os/nvram").strip() == str(nvram) and nvram.read_bytes() == dom.nvram.read_bytes()
    assert (nvram.stat().st_mode & 0o077) == 0
    assert res["domain_xml"] == str(qemu_dir / f"{new}.xml")
    guest_write(new, "vda", 0x5a, 2 * MiB, 64 * 1024)                   # the guest runs on DEST
    virsh("destroy", new)
    info = json.loads(support.run([support.require_tool("qemu-img"), "info", "--output=json", str(dest)]).stdout)
    assert "backing-filename" not in info, info
    expected = bytearray(backed_up.read_bytes())
    expected[2 * MiB:2 * MiB + 64 * 1024] = b"\x5a" * (64 * 1024)
    (tmp_path / "expected.raw").write_bytes(expected)
    c = support.run([support.require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(dest),
                     str(tmp_path / "expected.raw")], check=False)
    assert c.returncode == 0, c.stdout + c.stderr

    # the same new name again: it exists now, without DEST2 as its disk
    p = _nbb(repo, "restore", "--live", full["id"], qemu_dir / "dest2.qcow2", "--domain", new)
    assert p.returncode == 2 and "never redefines" in p.stderr, p.stderr
    assert not (qemu_dir / "dest2.qcow2").exists()

    # the stored name once the original is gone: defined with its own UUID and MAC
    orig_uuid, orig_mac = orig.findtext("uuid"), macs[1]
    virsh("destroy", dom.name)
    virsh("undefine", dom.name, "--nvram", "--checkpoints-metadata")
    dest3 = qemu_dir / "dest3.qcow2"
    p = _nbb(repo, "--json", "restore", "--live", full["id"], dest3, "--domain", dom.name)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["domain_defined"]
    again = _xml_of(dom.name)           # dom.remove() undefines it at the end
    assert again.findtext("uuid") == orig_uuid
    assert [m.get("address") for m in again.iterfind("devices/interface/mac")] == [orig_mac]
    assert [d.find("source").get("file") for d in again.iterfind("devices/disk")] == [str(dest3)]
    virsh("destroy", dom.name)
    c = support.run([support.require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(dest3),
                     str(backed_up)], check=False)
    assert c.returncode == 0, c.stdout + c.stderr


def test_missing_domain_without_a_definition_or_with_other_disks(libvirt_domain, tmp_path, qemu_dir):
    from helpers.engine_util import init_repo

    repo = init_repo(tmp_path / "repo")
    dom = libvirt_domain(disks=[("qcow2", 4 * MiB), ("qcow2", 4 * MiB)], persistent=True, running=False,
                         tag="ldef2")        # shut off: backed up from its images, no qemu to boot
    p = _nbb(repo, "--json", "full", "--libvirt", dom.name)
    assert p.returncode == 0, p.stderr
    vda = next(b for b in json.loads(p.stdout) if b["disk"].endswith("-vda"))
    missing = f"nbdbackup-test-{os.getpid()}-nosuch"
    p = _nbb(repo, "restore", "--live", vda["id"], qemu_dir / "a.qcow2", "--domain", missing, "--start")
    assert p.returncode == 2 and "one of 2 disks" in p.stderr and "restore --libvirt" in p.stderr, p.stderr

    plain = tmp_path / "plain.raw"
    plain.write_bytes(b"\x42" * (2 * MiB))
    p = _nbb(repo, "--json", "full", "--image", plain, "--format", "raw", "--disk", "plain")
    assert p.returncode == 0, p.stderr
    p = _nbb(repo, "restore", "--live", "plain", qemu_dir / "b.qcow2", "--domain", missing, "--start")
    assert p.returncode == 11, p.stderr
    assert "no stored definition" in p.stderr and f"<source file='{qemu_dir}/b.qcow2'/>" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not list(qemu_dir.iterdir())
    assert virsh("domstate", missing, check=False).returncode != 0
