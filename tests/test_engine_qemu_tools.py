"""The managed-image helpers against real qemu-img/qemu-nbd."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import support
from nbdbackup.errors import LockedError, SourceUnreachable
from nbdbackup.sources import qemu_tools


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists": check its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def image(tmp_path):
    support.require_tool("qemu-img")
    support.require_tool("qemu-io")
    p = tmp_path / "d.qcow2"
    support.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"])
    support.run(["qemu-io", "-c", "write -q -P 0x11 0 1M", str(p)])
    return p


def test_info_and_bitmaps(image):
    qemu_tools.bitmap_add(str(image), "b1")
    info = qemu_tools.image_info(str(image))
    assert info.format == "qcow2" and info.size == 16 << 20
    assert [(b.name, b.enabled, b.in_use) for b in info.bitmaps] == [("b1", True, False)]
    qemu_tools.bitmap_remove(str(image), "b1")
    assert qemu_tools.image_info(str(image)).bitmaps == []


def test_missing_image(tmp_path):
    with pytest.raises(SourceUnreachable, match="does not exist"):
        qemu_tools.image_info(str(tmp_path / "nope.qcow2"))


def test_image_in_use_is_refused(image, tmp_path):
    with support.qemu_nbd(image, tmp_path / "w.sock", readonly=False):
        with pytest.raises(LockedError, match="in use"):
            qemu_tools.image_info(str(image))
        with pytest.raises(LockedError):
            qemu_tools.bitmap_add(str(image), "b2")


def test_qemu_nbd_serves_and_stops(image):
    support.require_tool("qemu-nbd")
    support.require_tool("nbdinfo")
    srv = qemu_tools.QemuNbd(str(image), "qcow2", connections=4)
    try:
        assert oct(os.stat(srv.dir).st_mode & 0o777) == "0o700"
        out = support.run(["nbdinfo", "--can", "multi-conn", srv.uri], check=False)
        assert out.returncode == 0, out.stderr        # -e 4 advertises multi-conn
        pid = srv.proc.pid
    finally:
        srv.stop()
    assert not _pid_alive(pid) and not os.path.exists(srv.dir)
    support.run(["qemu-io", "-c", "write -q 0 4k", str(image)])    # lock released


def test_qemu_nbd_dies_when_parent_is_killed(image, tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed parent takes its qemu-nbd with it."""
    support.require_tool("qemu-nbd")
    code = ("import sys, time\n"
            "from nbdbackup.sources.qemu_tools import QemuNbd\n"
            f"s = QemuNbd({str(image)!r}, 'qcow2', connections=2)\n"
            "print(s.proc.pid, s.dir, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid_s, sockdir = parent.stdout.readline().split()
        pid = int(pid_s)
        assert _pid_alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(pid), "qemu-nbd outlived its SIGKILLed parent"
    finally:
        support.stop(parent)
    support.run(["qemu-io", "-c", "write -q 0 4k", str(image)])    # image not locked any more


def test_qemu_nbd_start_failure_is_clear(image, tmp_path):
    support.require_tool("qemu-nbd")
    with support.qemu_nbd(image, tmp_path / "w.sock", readonly=False):
        with pytest.raises(LockedError, match="in use"):
            qemu_tools.QemuNbd(str(image), "qcow2", connections=1)
