"""Helpers shared by the tests: real tools, started for real, cleaned up always.

A test that needs an external tool calls require_tool(): when the tool is
missing the test FAILS (it never skips), because CI must install it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEBIAN_PACKAGE = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-system-x86_64": "qemu-system-x86",
    "nbdkit": "nbdkit",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "nbd-server": "nbd-server",
    "virsh": "libvirt-clients",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "setpriv": "util-linux",
}


def require_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None) \
        or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if not path:
        import pytest

        pkg = DEBIAN_PACKAGE.get(name, "?")
        pytest.fail(f"required tool {name!r} is not installed (Debian package {pkg}); "
                    "tests never skip for a missing tool: run .ci/run or the README's install command",
                    pytrace=False)
    return path


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    p = subprocess.run(cmd, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} failed with {p.returncode}:\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def wait_for_path(path: str | Path, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process exited with {proc.returncode} before creating {path}: {out}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {path}")


SO_ACCEPTCON = 0x10000   # /proc/net/unix flag of a listening socket


def wait_listening(sock: str | Path, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until *sock* is a listening unix socket.

    The path appears at bind(), a moment before listen(); on a busy machine a
    client can land in between and get "Connection refused". /proc/net/unix
    tells without connecting (a probe would use up a server's only client).
    """
    wait_for_path(sock, timeout=timeout, proc=proc)
    deadline = time.monotonic() + timeout
    path = str(sock)
    while time.monotonic() < deadline:
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[7] == path and int(f[3], 16) & SO_ACCEPTCON:
                return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening on {sock}")
        time.sleep(0.01)
    raise AssertionError(f"{sock} exists but nothing listens on it")


def qmp_connect(sock: str | Path, proc: subprocess.Popen | None = None, timeout: float | None = 30.0):
    """A QMP monitor connected to qemu's *sock* once it listens (qemu.qmp's legacy client),
    its commands timing out after *timeout* seconds (None: never)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    wait_listening(sock, proc=proc)
    mon = QEMUMonitorProtocol(str(sock))
    mon.connect()
    if timeout is not None:
        mon.settimeout(timeout)
    return mon


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {host}:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_if_running(proc: subprocess.Popen) -> None:
    """SIGKILL *proc* if it has not exited, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM *proc*, then SIGKILL it if it is not gone after *timeout* seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_if_running(proc)


@contextlib.contextmanager
def running(cmd: list[str], ready):
    """*cmd* in the background (stderr kept for ready's error message) until the block ends,
    then stopped; ready(proc) returns once it serves (e.g. wait_listening)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready(proc)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def qemu_nbd(image: str | Path, sock: str | Path, *, fmt: str = "qcow2", connections: int = 4,
             bitmaps: tuple[str, ...] = (), readonly: bool = True, extra: tuple[str, ...] = ()):
    """qemu-nbd serving *image* on unix socket *sock*; yields the NBD URI."""
    exe = require_tool("qemu-nbd")
    cmd = [exe, "-t", "-e", str(connections), "-k", str(sock), "-f", fmt]
    if readonly:
        cmd.append("-r")
    for b in bitmaps:
        cmd += ["-B", b]
    cmd += [*extra, str(image)]
    with running(cmd, lambda proc: wait_listening(sock, proc=proc)):
        yield f"nbd+unix:///?socket={sock}"


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is *pid* (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat_line = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def nbdbackup_exe() -> str:
    """The installed console script beside this interpreter (never the source tree)."""
    exe = Path(sys.executable).parent / "nbdbackup"
    if not exe.exists():
        raise AssertionError(f"{exe} not found: install the package first (pip install '.[test]')")
    return str(exe)


def nbdbackup_on_a_tty(*args, timeout: float = 120) -> str:
    """Run the CLI with stderr on a terminal (a pty of a real size: a fresh one is 0x0,
    where tqdm draws nothing); what it wrote there. The run must succeed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([nbdbackup_exe(), *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:          # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=timeout)
    finally:
        os.close(master)
        kill_if_running(proc)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def nbdbackup(*args, check=True, env=None, cwd=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does."""
    e = dict(os.environ, **(env or {}))     # conftest keeps NBDBACKUP_* out of os.environ
    cmd = [nbdbackup_exe(), *map(str, args)]
    return run(cmd, check=check, env=e, cwd=cwd, timeout=timeout, **kw)


# --- file systems that fail the way real ones do (we are root in CI) ---------------

def _mount(*args: str) -> None:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"mount {' '.join(args)} failed: {p.stderr.strip()} "
                             "(these tests need root / CAP_SYS_ADMIN; they never skip)")


def _umount(path: str | Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(mountpoint: str | Path, size: str):
    """A fresh tmpfs of *size* (e.g. "6m") at *mountpoint* (created): a disk that really fills up."""
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint))
    try:
        yield Path(mountpoint)
    finally:
        _umount(mountpoint)


@contextlib.contextmanager
def read_only_view(src: str | Path, mountpoint: str | Path):
    """*src* bind-mounted read-only at *mountpoint*: an offsite copy mounted read-only."""
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(src), str(mountpoint))
    try:
        _mount("-o", "remount,bind,ro", str(mountpoint))
        yield Path(mountpoint)
    finally:
        _umount(mountpoint)


def fill_up(directory: str | Path, leave: int = 0) -> Path:
    """Fill *directory*'s file system with one file until at most *leave* bytes are free."""
    path = Path(directory) / "filler"
    st = os.statvfs(directory)
    todo = max(st.f_bavail * st.f_frsize - leave, 0)
    block = b"\xa5" * (1 << 20)
    with open(path, "wb") as f:
        try:
            while todo > 0:
                todo -= f.write(block[:min(todo, len(block))])
            f.flush()
        except OSError:     # ENOSPC: full is what we wanted
            pass
    return path


def nbdbackup_without_dac_override(*args, timeout=120) -> subprocess.CompletedProcess:
    """Run the CLI as root without the capabilities that let root ignore file permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): files of other users then refuse it as they
    would any user. Unlike running as another user, the venv and the checkout may sit where
    only root can read them (pyenv under /root, a CI clone in a private directory)."""
    setpriv = require_tool("setpriv")
    caps = "-dac_override,-dac_read_search"
    return run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--", nbdbackup_exe(),
                *map(str, args)], check=False, timeout=timeout)
