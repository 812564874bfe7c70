"""A real qemu VM (no guest OS) for the QMP tests, and a watcher on its second QMP socket.

Guest writes go through the device's block backend with HMP `qemu-io -d DEV`,
as a real guest's writes would (so through the copy-before-write filter a
backup inserts). Each disk keeps a byte model of what the guest wrote, so a
restored backup can be compared with the disk as it was at a point in time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import support

MiB = 1024 * 1024


class Vm:
    def __init__(self, tmp: Path, disks: dict[str, int], *, fmt: str = "qcow2", start: bool = True):
        self.tmp = Path(tmp)
        self.disks = disks                          # device id -> size
        self.fmt = fmt
        self.qmp_sock = str(self.tmp / "qmp.sock")       # the tool's
        self.watch_sock = str(self.tmp / "watch.sock")   # the test's
        self.guest_sock = str(self.tmp / "guest.sock")   # a "guest" writing concurrently
        self.images = {dev: str(self.tmp / f"{dev}.{fmt}") for dev in disks}
        self.model = {dev: bytearray(size) for dev, size in disks.items()}
        self.proc = None
        self.mon = None
        for dev, size in disks.items():
            support.run([support.require_tool("qemu-img"), "create", "-q", "-f", fmt, self.images[dev], str(size)])
        if start:
            self.start()

    def node(self, dev: str) -> str:
        return f"node-{dev}"

    def start(self) -> None:
        exe = support.require_tool("qemu-system-x86_64")
        for s in (self.qmp_sock, self.watch_sock, self.guest_sock):
            if os.path.exists(s):
                os.unlink(s)
        cmd = [exe, "-machine", "pc", "-S", "-nodefaults", "-display", "none",
               "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
               "-qmp", f"unix:{self.watch_sock},server=on,wait=off",
               "-qmp", f"unix:{self.guest_sock},server=on,wait=off"]
        for dev in self.disks:
            cmd += ["-blockdev", f"driver=file,node-name=file-{dev},filename={self.images[dev]}",
                    "-blockdev", f"driver={self.fmt},node-name={self.node(dev)},file=file-{dev}",
                    "-device", f"ide-hd,drive={self.node(dev)},id={dev}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        support.wait_for_path(self.qmp_sock, proc=self.proc)
        self.mon = support.qmp_connect(self.watch_sock, self.proc)

    def cmd(self, _cmd: str, **args):
        r = self.mon.cmd_raw(_cmd, args or None)
        if "error" in r:
            raise AssertionError(f"QMP {_cmd} {args}: {r['error']}")
        return r["return"]

    def write(self, dev: str, offset: int, length: int, pattern: int) -> None:
        """A guest write: fill [offset, offset+length) with *pattern*."""
        out = self.cmd("human-monitor-command",
                       **{"command-line": f'qemu-io -d {dev} "write -P {pattern:#x} {offset} {length}"'})
        assert "error" not in out.lower() and "fail" not in out.lower(), out
        self.model[dev][offset:offset + length] = bytes([pattern]) * length

    def snapshot(self) -> dict[str, bytes]:
        return {dev: bytes(m) for dev, m in self.model.items()}

    # -- what qemu holds ------------------------------------------------------
    def exports(self) -> list:
        return self.cmd("query-block-exports")

    def jobs(self) -> list:
        return self.cmd("query-block-jobs")

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.cmd("query-named-block-nodes", flat=True)
                if not n["node-name"].startswith("#")}

    def bitmaps(self, dev: str) -> dict[str, dict]:
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == self.node(dev):
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        raise AssertionError(f"no node {self.node(dev)}")

    def assert_clean(self) -> None:
        """Nothing of a backup is left: no export, job, extra node, read bitmap."""
        assert self.exports() == []
        assert self.jobs() == []
        expected = {self.node(d) for d in self.disks} | {f"file-{d}" for d in self.disks}
        assert self.node_names() == expected
        for dev in self.disks:
            assert [b for b in self.bitmaps(dev) if "-read" in b] == []

    def kill(self) -> None:
        """SIGKILL qemu (persistent bitmaps stay marked in-use in the image)."""
        self._close_mon()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.mon is not None:
                self.mon.cmd_raw("quit")
            self.proc.wait(15)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._close_mon()
            self.proc = None

    def _close_mon(self) -> None:
        if self.mon is not None:
            try:
                self.mon.close()
            except Exception:   # qemu already gone after quit: EOF on close
                pass
            self.mon = None


class Qsd:
    """qemu-storage-daemon with one qcow2 node per disk, each with a writable FUSE
    export standing in for the guest (writes through it reach the node's users
    the way a guest's do)."""

    def __init__(self, tmp: Path, disks: dict[str, int]):
        assert os.path.exists("/dev/fuse"), "/dev/fuse is needed for the FUSE exports"
        self.tmp = Path(tmp)
        self.disks = disks
        self.qmp_sock = str(self.tmp / "qsd-qmp.sock")
        self.model = {d: bytearray(size) for d, size in disks.items()}
        self.views = {d: self.tmp / f"{d}.guest" for d in disks}
        cmd = [support.require_tool("qemu-storage-daemon")]
        for d, size in disks.items():
            img = str(self.tmp / f"{d}.qcow2")
            support.run([support.require_tool("qemu-img"), "create", "-q", "-f", "qcow2", img, str(size)])
            self.views[d].touch()
            cmd += ["--blockdev", f"driver=file,node-name=file-{d},filename={img}",
                    "--blockdev", f"driver=qcow2,node-name={d},file=file-{d}",
                    "--export", f"type=fuse,id=guest-{d},node-name={d},mountpoint={self.views[d]},writable=on"]
        cmd += ["--chardev", f"socket,path={self.qmp_sock},server=on,wait=off,id=m", "--monitor", "chardev=m"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        support.wait_for_path(self.qmp_sock, proc=self.proc)

    def write(self, d: str, offset: int, data: bytes) -> None:
        with open(self.views[d], "r+b", buffering=0) as f:
            f.seek(offset)
            f.write(data)
            os.fsync(f.fileno())
        self.model[d][offset:offset + len(data)] = data

    def snapshot(self) -> dict[str, bytes]:
        return {d: bytes(m) for d, m in self.model.items()}

    def query(self, cmd: str, **args):
        """One QMP command on a short connection (qsd's monitor serves one client at a time)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(self.qmp_sock)
        mon.connect()
        try:
            return mon.cmd(cmd, **args)
        finally:
            mon.close()

    def stop(self) -> None:
        support.stop(self.proc)
