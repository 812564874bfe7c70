"""Thin wrappers around qemu-img and a qemu-nbd child that dies with us.

Used by the managed-image source. Each helper turns qemu's failure text into
an error from errors.py; "Failed to get ... lock" means another process has
the image open, which is reported as LockedError.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ..errors import LockedError, NbdBackupError, SourceUnreachable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
QEMU_TIMEOUT = 120.0


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}")
                                      if os.path.exists(p)), None)
    if not path:
        raise SourceUnreachable(f"{name} not found", hint="install Debian's qemu-utils package")
    return path


def _locked_error(path: str, stderr: str) -> NbdBackupError | None:
    if "lock" in stderr and ("Failed to get" in stderr or "another process" in stderr):
        other = _nbdbackup_serving(path)
        if other:
            return LockedError(f"image {path} is in use by another nbdbackup run: {other}",
                               hint="wait for that run to finish and retry")
        return LockedError(f"image {path} is in use by another process (qemu holds its lock)",
                           hint="shut the VM down (or stop whatever has the image open) and retry; "
                                "for a running VM use --source/--qmp instead of --image")
    return None


def qemu_img(path: str, *args: str) -> str:
    """Run `qemu-img ARGS... PATH`; return stdout or raise a clear error."""
    return _run_qemu_img([_tool("qemu-img"), *args, path], path, f"qemu-img {args[0]}")


def _run_qemu_img(cmd: list[str], path: str, what: str) -> str:
    """Run a qemu-img command line on image *path*; a lock or failure becomes a clear error."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceUnreachable(f"{what} on {path} timed out") from None
    if p.returncode != 0:
        err = p.stderr.strip()
        raise _locked_error(path, err) or SourceUnreachable(f"{what} failed on {path}: {err}")
    return p.stdout


@dataclass
class ImageBitmap:
    name: str
    flags: list[str]
    granularity: int

    @property
    def in_use(self) -> bool:
        """Left open by a writer that died: its contents cannot be trusted."""
        return "in-use" in self.flags

    @property
    def enabled(self) -> bool:
        return "auto" in self.flags


@dataclass
class ImageInfo:
    path: str
    format: str
    size: int
    bitmaps: list[ImageBitmap]
    probed: bool = True         # format guessed by qemu-img (no -f given)
    corrupt: bool = False       # qcow2's own corrupt flag


def image_info(path: str, fmt: str | None = None, *, force_share: bool = False) -> ImageInfo:
    """`qemu-img info` (format probed unless *fmt*); fails with LockedError when a writer has the image open.
    *force_share* (-U) reads an image a running qemu holds: only for the names in its header,
    whose bitmap flags then say in-use and whose contents may be mid-change."""
    if not os.path.exists(path):
        raise SourceUnreachable(f"image {path} does not exist")
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + (["-U"] if force_share else [])
    try:
        out = json.loads(qemu_img(path, *args))
    except SourceUnreachable as e:
        raise SourceUnreachable(str(e), hint=(f"is {path} really a {fmt} image?" if fmt else
                                              f"{path} may be damaged; `qemu-img check {path}` tells more")) from None
    spec = (out.get("format-specific") or {}).get("data") or {}
    bitmaps = [ImageBitmap(b["name"], list(b.get("flags", [])), int(b.get("granularity", 0)))
               for b in spec.get("bitmaps", [])]
    return ImageInfo(path, out["format"], int(out["virtual-size"]), bitmaps, probed=fmt is None,
                     corrupt=bool(spec.get("corrupt")))


# qemu-img check's exit codes: 0 clean, 2 corruptions, 3 only leaked clusters (harmless to a reader)
_CHECK_OK = (0, 3)


def check_image(path: str, fmt: str) -> None:
    """Refuse an image qemu-img check finds damaged (truncated, tables past the end...): qemu
    would read the missing parts as zeros, a backup of silently wrong data."""
    cmd = [_tool("qemu-img"), "check", "--output=json", "-f", fmt, path]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceUnreachable(f"qemu-img check on {path} timed out") from None
    if p.returncode in _CHECK_OK:
        return
    err = p.stderr.strip()
    locked = _locked_error(path, err)
    if locked:
        raise locked
    try:
        found = json.loads(p.stdout).get("corruptions", 0)
    except ValueError:
        found = 0
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    detail = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "") \
        if errors else (err or f"exit code {p.returncode}")
    what = f"{found} corruption(s)" if found else "errors"
    raise SourceUnreachable(f"image {path} is a damaged {fmt}: qemu-img check found {what}: {detail}",
                            hint="it was not backed up: qemu would read the damaged parts as zeros. Repair a "
                                 "copy with `qemu-img check -r all` (or restore the image), then retry")


def bitmap_add(path: str, name: str) -> None:
    qemu_img_bitmap(path, "--add", name)


def qemu_img_bitmap(path: str, op: str, name: str) -> None:
    # qemu-img bitmap OP -f qcow2 PATH NAME: the image comes before the name.
    _run_qemu_img([_tool("qemu-img"), "bitmap", op, "-f", "qcow2", path, name], path,
                  f"qemu-img bitmap {op} {name}")


def bitmap_remove(path: str, name: str) -> None:
    qemu_img_bitmap(path, "--remove", name)


DIR_PREFIX = "nbdbackup-nbd-"


def remove_stale_dirs() -> None:
    """Private socket dirs left by runs that were killed (their owner pid is gone)."""
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(tmp, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            with open(os.path.join(path, "owner")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            continue                    # its owner still runs
        except ProcessLookupError:
            pass
        except (OSError, ValueError):   # no owner file (yet), or not ours: leave it
            continue
        log.debug("removing stale %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _nbdbackup_serving(path: str) -> str | None:
    """'pid N since T: COMMAND' of another live run whose qemu-nbd serves image *path*
    (its private dir names the image), or None."""
    tmp = tempfile.gettempdir()
    want = os.path.realpath(path)
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(DIR_PREFIX)]
    except OSError:
        return None
    for name in names:
        d = os.path.join(tmp, name)
        try:
            with open(os.path.join(d, "image")) as f:
                if f.read() != want:
                    continue
            with open(os.path.join(d, "owner")) as f:
                pid = int(f.read().strip())
            if pid == os.getpid():
                continue
            os.kill(pid, 0)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(d).st_mtime))
        except (OSError, ValueError):   # not ours, gone meanwhile, or half made
            continue
        return f"pid {pid} since {since}: {command}"
    return None


def _die_with_parent(parent_pid: int):
    """preexec_fn: ask the kernel to SIGKILL the child when our forking thread exits."""
    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os._exit(1)
    return setup


def _greets(path: str) -> bool:
    """Whether an NBD server on unix socket *path* sends its greeting (NBDMAGIC)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
        got = b""
        while len(got) < 8:
            data = s.recv(8 - len(got))
            if not data:
                return False
            got += data
        return got == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


class QemuNbd:
    """A read-only qemu-nbd on a private unix socket, tied to our lifetime.

    Must be started from the main thread: PR_SET_PDEATHSIG fires when the
    *thread* that forked exits, and only the main thread lives as long as we do.
    """

    def __init__(self, image: str, fmt: str, *, connections: int, bitmap: str | None = None,
                 start_timeout: float = 30.0):
        self.image = image
        remove_stale_dirs()
        self.dir = tempfile.mkdtemp(prefix=DIR_PREFIX)     # mode 0700: private
        with open(os.path.join(self.dir, "image"), "w") as f:     # so a run that loses the image lock can name us
            f.write(os.path.realpath(image))
        with open(os.path.join(self.dir, "owner"), "w") as f:
            f.write(str(os.getpid()))
        self.socket = os.path.join(self.dir, "nbd.sock")
        # one slot more than the pool uses: the readiness probe takes one for a moment
        cmd = [_tool("qemu-nbd"), "--read-only", "--persistent", "--shared", str(connections + 1),
               "--socket", self.socket, "--format", fmt, "--cache=none", "--aio=threads"]
        if bitmap:
            cmd += ["--bitmap", bitmap]
        cmd.append(image)
        self._stderr = tempfile.TemporaryFile(dir=self.dir)
        log.debug("starting %s", " ".join(cmd))
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, preexec_fn=_die_with_parent(os.getpid()),
                                         close_fds=True)
        except OSError as e:
            self._cleanup_dir()
            raise SourceUnreachable(f"cannot start qemu-nbd: {e}") from None
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self._stderr_text()
                raise _locked_error(self.image, err) or SourceUnreachable(
                    f"qemu-nbd could not serve {self.image}: {err or 'exit code %d' % self.proc.returncode}")
            # qemu-nbd listens before it opens the image: only a greeting means it is serving
            if os.path.exists(self.socket) and _greets(self.socket):
                return
            time.sleep(0.01)
        raise SourceUnreachable(f"qemu-nbd did not start serving {self.image} within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop qemu-nbd (SIGTERM, then SIGKILL) and remove the private directory."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None
        shutil.rmtree(self.dir, ignore_errors=True)
