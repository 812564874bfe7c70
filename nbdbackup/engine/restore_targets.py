"""Where a restore writes: a sparse file, a block device, or an NBD export.

Every target offers write(offset, data) (thread-safe), zero(offset, length)
for ranges that must read back as zeros, finish() which makes the data
durable (fsync / NBD FLUSH) and puts it in place, and abort() which leaves
an existing file as it was.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import subprocess
import tempfile

from ..errors import NbdBackupError, SourceUnreachable, UsageError
from ..fsutil import fsync_path

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
ZERO_STEP = 8 << 20


def is_nbd_uri(target: str) -> bool:
    # Any NBD scheme counts, even without "//": `nbd:/x` is a malformed URI to
    # report, not a file to create in a directory named "nbd:".
    return ":" in target and target.split(":", 1)[0] in ("nbd", "nbds", "nbd+unix", "nbds+unix")


class FileTarget:
    """A new sparse raw file (or qcow2 through qemu-img convert), written beside the
    target under a temporary name and renamed into place only when complete."""

    needs_zeroing = False       # a fresh file is all holes

    def __init__(self, path: str, size: int, *, fmt: str = "raw", force: bool = False):
        if fmt not in ("raw", "qcow2"):
            raise UsageError(f"unknown --format {fmt!r}: use raw or qcow2")
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory",
                             hint=f"give a file path, e.g. {os.path.join(path, 'disk.raw')}")
        if os.path.lexists(path) and not force:
            raise UsageError(f"{path} exists; pass --force to overwrite it")
        self.path, self.size, self.fmt = path, size, fmt
        d = os.path.dirname(os.path.abspath(path))
        try:
            self.fd, self.tmp = tempfile.mkstemp(prefix=".nbdbackup-restore-", dir=d)
        except OSError as e:
            raise SourceUnreachable(f"cannot create a file in {d}: {e.strerror}") from None
        os.ftruncate(self.fd, size)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data)
        while mv:
            n = os.pwrite(self.fd, mv, offset)
            mv, offset = mv[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        pass    # holes of the fresh file read as zeros

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.fmt == "qcow2":
            self._convert_to_qcow2()
        os.chmod(self.tmp, 0o644 & ~_umask())
        os.replace(self.tmp, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)), directory=True)

    def _convert_to_qcow2(self) -> None:
        # qemu-img convert detects zero blocks and leaves them unallocated: sparse and exact.
        out = self.tmp + ".qcow2"
        cmd = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", self.tmp, out]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=None)
        except FileNotFoundError:
            raise SourceUnreachable("qemu-img not found", hint="install Debian's qemu-utils") from None
        if p.returncode != 0:
            _unlink(out)
            raise NbdBackupError(f"qemu-img convert to qcow2 failed: {p.stderr.strip()}")
        fsync_path(out)
        os.replace(out, self.tmp)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _unlink(self.tmp)
        _unlink(self.tmp + ".qcow2")


class BlockDeviceTarget:
    """An existing block device at least as large as the disk; zeros are written explicitly."""

    needs_zeroing = True

    def __init__(self, path: str, size: int, *, force: bool = False):
        if not force:
            raise UsageError(f"{path} is a block device; pass --force to overwrite it")
        try:
            self.fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise SourceUnreachable(f"cannot open {path}: {e.strerror}") from None
        buf = bytearray(8)
        fcntl.ioctl(self.fd, BLKGETSIZE64, buf)
        dev_size = struct.unpack("Q", buf)[0]
        if dev_size < size:
            os.close(self.fd)
            raise UsageError(f"{path} holds {dev_size} bytes, the backup needs {size}")
        self.path, self.size = path, size

    def write(self, offset: int, data) -> None:
        FileTarget.write(self, offset, data)

    def zero(self, offset: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as e:
            log.debug("BLKZEROOUT failed (%s); writing zeros", e)
        z = bytes(min(ZERO_STEP, length))
        for pos in range(offset, offset + length, len(z)):
            self.write(pos, memoryview(z)[:min(len(z), offset + length - pos)])

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NbdTarget:
    """An existing writable export of exactly the disk's size, written over a pool."""

    needs_zeroing = True

    def __init__(self, uri: str, size: int, *, connections: int):
        from ..nbd.pool import ConnectionPool

        self.pool = ConnectionPool(uri, connections=connections, meta_contexts=[])
        if self.pool.read_only:
            self.pool.close()
            raise UsageError(f"NBD target {uri} is read-only")
        if self.pool.size != size:
            self.pool.close()
            raise UsageError(f"NBD target {uri} has {self.pool.size} bytes, the backup has {size}",
                             hint="create or resize the target to exactly the backup's size")

    def write(self, offset: int, data) -> None:
        self.pool.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.pool.write_zeroes(offset, length)

    def finish(self) -> None:
        # With multi-conn one FLUSH covers every connection; without it there is only one.
        self.pool.flush()
        self.pool.close()

    def abort(self) -> None:
        self.pool.close()


def open_target(target: str, size: int, *, fmt: str, force: bool, connections: int):
    if is_nbd_uri(target):
        if fmt != "raw":
            raise UsageError("--format applies to file targets, not NBD exports")
        return NbdTarget(target, size, connections=connections)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        if fmt != "raw":
            raise UsageError("--format applies to file targets, not block devices")
        return BlockDeviceTarget(target, size, force=force)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # A file target is renamed over the path: that would replace a device
        # node, FIFO or socket (e.g. /dev/full) with a regular file.
        raise UsageError(f"{target} is neither a regular file nor a block device; refusing to replace it",
                         hint="restore to a new file path, a block device or an NBD URI")
    return FileTarget(target, size, fmt=fmt, force=force)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
