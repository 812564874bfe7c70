"""A tiny real Linux guest with Debian's qemu-guest-agent, for the --quiesce / --qga tests.

How it is built (no root, no mount, no network; cached, so only the first session pays):

- Kernel: Debian's /boot/vmlinuz-VER (linux-image-amd64), the newest one whose modules are in
  /lib/modules/VER. Its virtio and ext4 drivers are modules there.
- Initramfs: a newc cpio written here in Python (uncompressed, about 11 MiB) holding
  busybox-static (/bin/busybox, applets installed by /init), /usr/sbin/qemu-ga
  (qemu-guest-agent) and the shared libraries `ldd` names for it,
  the kernel modules `modprobe --show-depends` lists for virtio_pci, virtio_blk,
  virtio_console and ext4 (in that order; crc32c-intel fails to load under TCG, which has no
  SSE4.2, and crc32c_generic serves ext4 instead), /dev/console, and INIT below. It is cached as
  /var/tmp/nbdbackup-guest/initramfs-<sha256 of every input>.cpio, so a new kernel, qemu-ga,
  busybox or /init makes a new one; it is written under a temporary name and renamed, so
  concurrent sessions never read half a file.
- /init loads the modules, mounts /proc /sys /dev, turns off the kernel's periodic writeback
  (dirty_writeback_centisecs=0, dirty_expire_centisecs=1 h), mounts the ext4 disk /dev/vda on
  /mnt with `-o commit=600`, and runs qemu-ga on the virtio-serial port
  org.qemu.guest_agent.0 (the /dev/vportNpM whose sysfs name says so; no udev makes the
  /dev/virtio-ports/ link). So a file the guest writes stays in the page cache, not on the
  disk, until something syncs it: a freeze (FIFREEZE syncs and flushes the journal) does.
  Debian 12's qemu-ga (7.2) allows every RPC unless -b blocks it, guest-exec included.
- The disk: an ext4 image made on the host with `mke2fs -t ext4 -d DIR` (no mount), as qcow2.

The guest runs either as a libvirt domain (helpers.libvirt.make_domain(guest=...): kernel,
initrd and cmdline in <os>, the agent channel, the serial console to a file) or as a plain
qemu-system-x86_64 with a QMP socket and the agent's channel on a unix socket (PlainGuest).
Both run under TCG, as every other test VM does (CI need not have /dev/kvm); the tests print
how long the boot took.

Files are written and read back through the agent (guest-exec of busybox sh) and read out of a
restored raw image with debugfs (e2fsprogs), which needs neither root nor a mount.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import support

MiB = 1024 * 1024
AGENT_CHANNEL = "org.qemu.guest_agent.0"
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "ext4")
CACHE_DIR = Path("/var/tmp/nbdbackup-guest")
CMDLINE = "console=ttyS0 quiet"
BOOT_TIMEOUT = 180.0        # TCG on two shared cores; a normal boot takes a few seconds
FORMAT_VERSION = "1"        # bump when the cpio layout changes in a way the inputs do not show

DEBIAN_PACKAGES = {
    "busybox": "busybox-static", "qemu-ga": "qemu-guest-agent", "debugfs": "e2fsprogs",
    "mke2fs": "e2fsprogs", "modprobe": "kmod", "ldd": "libc-bin", "vmlinuz": "linux-image-amd64",
}

INIT = r"""#!/bin/sh
# nbdbackup test guest: PID 1 of the initramfs (tests/helpers/guest.py)
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "$m" || echo "nbdbackup-guest: insmod $m failed"; done
# nothing writes dirty pages back on its own: only a sync (or a freeze) puts them on the disk
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
n=0
while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done
mount -t ext4 -o commit=600 /dev/vda /mnt || echo "nbdbackup-guest: mounting /dev/vda failed"
port=""
n=0
while [ -z "$port" ] && [ $n -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "org.qemu.guest_agent.0" ] && port=/dev/${p##*/}
  done
  [ -z "$port" ] && sleep 0.1
  n=$((n+1))
done
echo "nbdbackup-guest: agent port ${port:-MISSING}"
mkdir -p /run /tmp /var/run
n=0
while true; do   # PID 1 never exits (the kernel would panic): restart the agent, say so 5 times
  qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid
  rc=$?
  [ $n -lt 5 ] && echo "nbdbackup-guest: qemu-ga exited with $rc"
  n=$((n+1))
  sleep 1
done
"""


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/bin/{name}")
                                       if os.path.exists(p)), None)
    if not path:
        import pytest

        pytest.fail(f"required tool {name!r} is not installed (Debian package "
                    f"{DEBIAN_PACKAGES.get(name, '?')}); tests never skip for a missing tool", pytrace=False)
    return path


def kernel() -> tuple[Path, str]:
    """(/boot/vmlinuz-VER, VER): the newest Debian kernel whose modules are installed."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        ver = vmlinuz.name[len("vmlinuz-"):]
        if Path("/lib/modules", ver, "modules.dep").exists() and os.access(vmlinuz, os.R_OK):
            found.append((tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", ver)), vmlinuz, ver))
    if not found:
        import pytest

        pytest.fail("no readable /boot/vmlinuz-VER with its /lib/modules/VER: install linux-image-amd64",
                    pytrace=False)
    _key, vmlinuz, ver = max(found)
    return vmlinuz, ver


# --- the initramfs ----------------------------------------------------------------------

def _modules(ver: str) -> list[str]:
    """Module files in load order (dependencies first, each once); built-ins need none."""
    out = "".join(support.run([_tool("modprobe"), "-S", ver, "--show-depends", m]).stdout
                  for m in MODULES)     # one module a call: modprobe names only the first
    paths: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod" and parts[1] not in paths:
            paths.append(parts[1])
    return paths


def _libraries(exe: str) -> dict[str, str]:
    """{path in the guest: real file on the host} of what `ldd EXE` names."""
    libs = {}
    for line in support.run([_tool("ldd"), exe]).stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            guest_path = m.group(m.lastindex)
            libs[guest_path] = os.path.realpath(guest_path)
    return libs


def _inputs() -> tuple[dict[str, str], list[str]]:
    """({guest path: host file}, module load order) of the initramfs."""
    _vmlinuz, ver = kernel()
    busybox = _tool("busybox")
    ldd = support.run([_tool("ldd"), busybox], check=False)
    if "=>" in ldd.stdout:      # a dynamic busybox (Debian's `busybox`) would need its libc too
        import pytest

        pytest.fail(f"{busybox} is dynamically linked: install busybox-static", pytrace=False)
    qga = _tool("qemu-ga")
    files = {"/bin/busybox": busybox, "/usr/sbin/qemu-ga": qga, **_libraries(qga)}
    modules = _modules(ver)
    for m in modules:
        files[m] = m
    return files, modules


class _Cpio:
    """A newc ("070701") archive, as the kernel's initramfs unpacker reads it."""

    def __init__(self, out):
        self.out, self.ino = out, 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.lstrip("/").encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name_b + b"\0" * (-(len(header) + len(name_b)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def initramfs() -> Path:
    """The cached initramfs (built when missing or when any input changed); world-readable."""
    files, modules = _inputs()
    digest = hashlib.sha256(FORMAT_VERSION.encode() + INIT.encode())
    for guest_path, host_path in sorted(files.items()):
        digest.update(guest_path.encode() + b"\0" + Path(host_path).read_bytes())
    out = CACHE_DIR / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    CACHE_DIR.chmod(0o755)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".initramfs-")
    try:
        with os.fdopen(fd, "wb") as f:
            cpio = _Cpio(f)
            dirs = {"/bin", "/sbin", "/usr", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/mnt", "/run",
                    "/tmp", "/var", "/etc"}
            for p in files:
                parent = os.path.dirname(p)
                while parent != "/":
                    dirs.add(parent)
                    parent = os.path.dirname(parent)
            for d in sorted(dirs):
                cpio.dir(d)
            cpio.chardev("/dev/console", 5, 1)     # the kernel opens it for /init's stdio
            for guest_path, host_path in sorted(files.items()):
                cpio.file(guest_path, Path(host_path).read_bytes())
            cpio.symlink("/bin/sh", "busybox")
            cpio.file("/modules.order", "".join(m + "\n" for m in modules).encode(), 0o644)
            cpio.file("/init", INIT.encode())
            cpio.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        for old in CACHE_DIR.glob("initramfs-*.cpio"):     # of older inputs; a day: no session uses it
            with contextlib.suppress(OSError):
                if old != out and time.time() - old.stat().st_mtime > 86400:
                    old.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


@dataclass(frozen=True)
class GuestOs:
    """What boots the guest: kernel, initramfs, kernel command line."""
    kernel: Path
    initrd: Path
    cmdline: str = CMDLINE


def guest_os() -> GuestOs:
    return GuestOs(kernel=kernel()[0], initrd=initramfs())


# --- the disk ----------------------------------------------------------------------------

def make_ext4_qcow2(path: Path, size: int = 32 * MiB, files: dict[str, bytes] | None = None) -> Path:
    """A qcow2 image at *path* holding one ext4 file system (no partition table) made with
    `mke2fs -d` from *files* (name -> content)."""
    with tempfile.TemporaryDirectory(prefix="nbdbackup-ext4-") as tmp:
        src = Path(tmp, "root")
        src.mkdir()
        for name, data in (files or {"hello": b"hello from the host\n"}).items():
            Path(src, name).write_bytes(data)
        raw = Path(tmp, "fs.raw")
        # lazy init off: no ext4lazyinit thread writing inode tables in the background
        support.run([_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                     "-d", str(src), str(raw), f"{size // 1024}k"])
        support.run([support.require_tool("qemu-img"), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                     str(path)])
    return path


def ext4_file(raw_image: Path, name: str) -> bytes | None:
    """The content of /NAME in the ext4 file system of *raw_image* as it is on the disk (debugfs
    reads the blocks; it replays no journal), or None when the disk has no such file."""
    p = support.run([_tool("debugfs"), "-R", f"stat /{name}", str(raw_image)], check=False)
    if p.returncode != 0 or "File not found" in p.stderr or "Inode:" not in p.stdout:
        return None
    p = subprocess.run([_tool("debugfs"), "-R", f"cat /{name}", str(raw_image)], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


# --- talking to the agent ------------------------------------------------------------------

class SocketAgent:
    """The host end of a plain qemu's agent channel (a unix socket): one JSON command a line.
    A connection is opened per command (the chardev serves one client at a time, and the
    backup under test needs it too); guest-sync first drops any stale reply."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __call__(self, cmd: str, args: dict | None = None, timeout: float = 20.0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.path)
            f = s.makefile("rwb")
            f.write(b"\xff")       # resets the agent's JSON parser after a client that left mid-message
            token = int.from_bytes(os.urandom(4), "big") >> 1
            for msg in ({"execute": "guest-sync", "arguments": {"id": token}},
                        {"execute": cmd} | ({"arguments": args} if args else {})):
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise AssertionError(f"the agent closed the channel during {msg['execute']}")
                    reply = json.loads(line.strip(b"\xff\r\n ") or b"{}")
                    if msg["execute"] != "guest-sync" or reply.get("return") == token:
                        break
            if "error" in reply:
                raise AgentError(f"agent {cmd}: {reply['error']}")
            return reply["return"]


class AgentError(AssertionError):
    pass


class LibvirtAgent:
    """A libvirt domain's agent, through `virsh qemu-agent-command` (libvirt owns the channel)."""

    def __init__(self, domain: str):
        self.domain = domain

    def __call__(self, cmd: str, args: dict | None = None, timeout: float = 20.0):
        from .libvirt import virsh

        msg = {"execute": cmd} | ({"arguments": args} if args else {})
        p = virsh("qemu-agent-command", "--timeout", str(int(timeout)), self.domain, json.dumps(msg),
                  check=False, timeout=timeout + 30)
        if p.returncode != 0:
            raise AgentError(f"agent {cmd} on {self.domain}: {p.stderr.strip()}")
        return json.loads(p.stdout)["return"]


def wait_ready(agent, console: Path | None, what: str, proc: subprocess.Popen | None = None) -> float:
    """Wait until the agent answers guest-ping (bounded); seconds it took. On timeout the
    assertion carries the guest's serial console."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < BOOT_TIMEOUT:
        if proc is not None and proc.poll() is not None:
            last = f"qemu exited with {proc.returncode}"
            break
        try:
            agent("guest-ping", timeout=10)   # a loaded TCG guest can take seconds
            return time.monotonic() - start
        except (AgentError, OSError, ValueError) as e:
            last = e
        time.sleep(0.5)
    log = console.read_text(errors="replace")[-6000:] if console and console.exists() else "(no console log)"
    raise AssertionError(f"{what}: the guest agent did not answer within {BOOT_TIMEOUT:.0f}s ({last}); "
                         f"its serial console:\n{log}")


def guest_sh(agent, script: str, timeout: float = 30.0) -> str:
    """Run `sh -c SCRIPT` in the guest (guest-exec) and wait for it; its stdout. Fails on a
    non-zero exit."""
    pid = agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = agent("guest-exec-status", {"pid": pid})
        if st.get("exited"):
            break
        assert time.monotonic() < deadline, f"guest command {script!r} did not end within {timeout}s"
        time.sleep(0.1)
    out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
    err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
    assert st.get("exitcode") == 0, f"guest command {script!r} exited with {st.get('exitcode')}: {err}"
    return out


def freeze_status(agent) -> str:
    return agent("guest-fsfreeze-status")


def ensure_thawed(agent) -> str:
    """Thaw when frozen (so one failed test does not block the next); the status before."""
    before = freeze_status(agent)
    if before != "thawed":
        agent("guest-fsfreeze-thaw")
    return before


# --- a plain qemu (no libvirt) ------------------------------------------------------------------

class PlainGuest:
    """The guest in qemu-system-x86_64 (TCG) with its disk as block node `node-vda`, a QMP
    socket for the tool, one for the test, and the agent's channel on a unix socket."""

    def __init__(self, tmp: Path, os_: GuestOs, disk: Path, *, wait: bool = True):
        """Start it; with *wait*, return once the agent answers (else call wait_booted()), so
        that a test module can boot it while it boots another guest."""
        self.tmp = Path(tmp)
        self.disk = disk
        self.qmp_sock = str(self.tmp / "qmp.sock")
        self.watch_sock = str(self.tmp / "watch.sock")
        self.agent_sock = str(self.tmp / "qga.sock")
        self.console = self.tmp / "console.log"
        self.node = "node-vda"
        cmd = [support.require_tool("qemu-system-x86_64"), "-machine", "pc,accel=tcg", "-m", "256",
               "-nodefaults", "-display", "none", "-no-reboot", "-S",
               "-kernel", str(os_.kernel), "-initrd", str(os_.initrd), "-append", os_.cmdline,
               "-serial", f"file:{self.console}",
               "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
               "-qmp", f"unix:{self.watch_sock},server=on,wait=off",
               "-blockdev", f"driver=file,node-name=file-vda,filename={disk}",
               "-blockdev", f"driver=qcow2,node-name={self.node},file=file-vda",
               "-device", f"virtio-blk-pci,drive={self.node},id=vda",
               "-chardev", f"socket,id=qga0,path={self.agent_sock},server=on,wait=off",
               "-device", "virtio-serial-pci",
               "-device", f"virtserialport,chardev=qga0,name={AGENT_CHANNEL},id=qga-port"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.agent = SocketAgent(self.agent_sock)
        self.mon = None
        self.boot_seconds: float | None = None
        try:
            self._start = time.monotonic()
            self._cont()
            if wait:
                self.wait_booted()
        except BaseException:
            self.stop()
            raise

    def _cont(self) -> None:
        """Connect the watching monitor to the paused VM (so no event is missed), then run it."""
        self.mon = support.qmp_connect(self.watch_sock, self.proc, timeout=None)
        self.mon.cmd("cont")

    def wait_booted(self) -> float:
        """Wait until the agent answers; seconds since the start."""
        if self.boot_seconds is None:
            self._wait_for_the_agents_port()
            wait_ready(self.agent, self.console, "plain qemu guest", self.proc)
            self.boot_seconds = time.monotonic() - self._start
        return self.boot_seconds

    def _wait_for_the_agents_port(self) -> None:
        """Wait until the guest opens the agent's port (the event libvirt waits for too). Only
        then may a client connect: a client that sent a command while no agent listened, and
        left, was seen to make the channel answer nobody after."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                ev = self.mon.pull_event(wait=1.0)
            except Exception:       # no event within the second (the binding's timeout error)
                ev = None
            if ev and ev.get("event") == "VSERPORT_CHANGE" and ev["data"].get("id") == "qga-port" \
                    and ev["data"].get("open"):
                return
        log = self.console.read_text(errors="replace")[-6000:] if self.console.exists() else "(no console log)"
        raise AssertionError(f"the guest never opened the agent's port within {BOOT_TIMEOUT:.0f}s "
                             f"(qemu: {self.proc.poll()}); its serial console:\n{log}")

    def stop(self) -> None:
        if self.mon is not None:
            with contextlib.suppress(Exception):
                self.mon.close()
            self.mon = None
        support.stop(self.proc)
