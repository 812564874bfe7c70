"""Where a restore writes: a sparse file, a block device, or an NBD export.

Every target offers write(offset, data) and write_run(offset, buffers) (neighbouring
chunks: O_DIRECT pwrites from an aligned buffer on a raw file, else one pwritev on a file
or device; both thread-safe), zero(offset, length)
for ranges that must read back as zeros, finish() which makes the data
durable (fsync / NBD FLUSH) and puts it in place, and abort() which leaves
an existing file as it was.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import subprocess
import threading

from ..errors import NbdBackupError, NoSpaceError, SourceUnreachable, UsageError, is_no_space
from ..fsutil import WritebackWindow, fsync_path, pwritev_all

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
ZERO_STEP = 8 << 20
WRITE_REQUEST = 256 << 10     # NBD target: bytes per WRITE (nbdcopy's default request size)
FLUSH_EVERY = 64 << 20                # NBD target: an early FLUSH sent after this many bytes written

# A file target is written to TEMP_PREFIX<target name>-<8 hex digits> beside it (plus
# <that>.qcow2 while converting), flock'ed by its writer until renamed into place.
TEMP_PREFIX = ".nbdbackup-restore-"
_NAME_KEEP = 200                      # of the target's name: the temp name must fit in 255 bytes
_TEMP_TAIL = re.compile(r"[0-9a-f]{8}(\.qcow2)?")
_OLD_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}(\.qcow2)?")   # before the target's name was in it


def temp_prefix(path: str) -> str:
    """The name prefix of the temp files of restores to *path* (in its directory)."""
    return f"{TEMP_PREFIX}{os.path.basename(path)[:_NAME_KEEP]}-"


def remove_leftovers(path: str) -> list[tuple[str, int]]:
    """Remove the temp files that killed restores to *path* left beside it: (path, bytes on disk)
    of each. A file whose writer still runs is kept: the writer holds a flock on it."""
    d = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(path)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    mine = sorted(n for n in names if n.startswith(prefix) and _TEMP_TAIL.fullmatch(n[len(prefix):]))
    removed = []
    for name in mine:
        base = name.removesuffix(".qcow2")    # a qcow2 being converted lives as long as its raw temp
        fd = _open_unlocked(os.path.join(d, base))
        if fd is None and (base == name or os.path.exists(os.path.join(d, base))):
            continue                          # locked: that restore is running (or it just finished)
        try:
            n = _unlink_counting(os.path.join(d, name))
            if n is not None:
                removed.append((os.path.join(d, name), n))
        finally:
            if fd is not None:
                os.close(fd)
    old = sorted(n for n in names if _OLD_TEMP.fullmatch(n))
    if old:
        log.warning("%s holds %d temporary file(s) of restores by an older nbdbackup, target unknown: %s; "
                    "remove them once no restore runs there", d, len(old), ", ".join(old))
    return removed


def _open_unlocked(p: str) -> int | None:
    """An fd holding the flock of temp file *p*, or None when it is locked (its writer runs) or gone."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlink_counting(p: str) -> int | None:
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            return None
        os.unlink(p)
    except OSError:
        return None
    return st.st_blocks * 512


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
        self._write_lock = threading.Lock()
        self.leftovers_removed = remove_leftovers(path)
        if self.leftovers_removed:
            total = sum(n for _, n in self.leftovers_removed)
            log.warning("removed %d temporary file(s) left by killed restores to %s (%d bytes on disk): %s",
                        len(self.leftovers_removed), path, total,
                        ", ".join(os.path.basename(p) for p, _ in self.leftovers_removed))
        d = os.path.dirname(os.path.abspath(path))
        try:
            self.fd, self.tmp = _create_locked_temp(d, temp_prefix(path))
        except OSError as e:
            raise SourceUnreachable(f"cannot create a file in {d}: {e.strerror}") from None
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:          # EFBIG: the file system (or RLIMIT_FSIZE) caps file sizes
            self.abort()
            if is_no_space(e):
                raise NoSpaceError(f"no space left in {d} for the restore: {e.strerror}",
                                   hint="free space there and restore again; the backup is intact") from None
            raise SourceUnreachable(f"cannot make a file of {size} bytes in {d}: {e.strerror}",
                                    hint="restore to a file system that can hold the whole disk") from None
        # raw: the page cache keeps about a window of it; qcow2: qemu-img reads the raw temp back
        self._writeback = WritebackWindow(self.fd, evict=fmt == "raw")

    def write(self, offset: int, data: bytes) -> None:
        self.write_run(offset, [data])

    def write_run(self, offset: int, buffers: list) -> None:
        """*buffers* written back to back from *offset*, their writeback started at once and
        waited for a window behind (fsutil.WritebackWindow, as nbdcopy writes a file): the
        final fsync would otherwise find the whole disk dirty in the page cache and wait
        for all of it (512 MiB bench disk: fsync 0.56 s after a 0.6 s copy).
        One pwritev at a time: ext4 takes the inode's lock for each buffered write anyway,
        and writers queued on it spin in the kernel (8% of a restore's CPU in perf) where
        they sleep on ours."""
        with self._write_lock:
            end = pwritev_all(self.fd, offset, buffers)
        self._writeback.wrote(offset, end - offset)

    def zero(self, offset: int, length: int) -> None:
        pass    # holes of the fresh file read as zeros

    def finish(self) -> None:
        # The fd (and its flock) stays open until the file is in place: while it is held, a
        # restore to the same target started meanwhile knows this temp file is not a leftover.
        os.fsync(self.fd)
        done = self.tmp
        if self.fmt == "qcow2":
            done = self._convert_to_qcow2()
        os.chmod(done, 0o644 & ~_umask())
        os.replace(done, self.path)
        if done != self.tmp:
            _unlink(self.tmp)
        fsync_path(os.path.dirname(os.path.abspath(self.path)), directory=True)
        os.close(self.fd)
        self.fd = -1

    def _convert_to_qcow2(self) -> str:
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
        return out

    def abort(self) -> None:
        _unlink(self.tmp)
        _unlink(self.tmp + ".qcow2")
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        self._writeback = WritebackWindow(self.fd)

    def write(self, offset: int, data: bytes) -> None:
        self.write_run(offset, [data])

    def write_run(self, offset: int, buffers: list) -> None:
        end = pwritev_all(self.fd, offset, buffers)
        self._writeback.wrote(offset, end - offset)

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
    min_workers = 8     # each batch waits for its writes' replies: with 4, qemu-nbd idled (restore 1.5 -> 2.0 s)

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
        self._lock = threading.Lock()
        self._unflushed = 0         # bytes written since the last early FLUSH was sent
        self._flushes: list = []    # early FLUSHes not known to have succeeded

    def write(self, offset: int, data: bytes) -> None:
        self.pool.write(offset, data)

    def write_run(self, offset: int, buffers: list) -> None:
        # all sent before any reply is awaited: a run's requests are in flight together; every
        # one settled before this returns or raises (the caller reuses the buffers)
        sent = []
        try:
            for b in buffers:
                with memoryview(b) as view:
                    for at in range(0, len(view), WRITE_REQUEST):
                        sent.append(self.pool.submit_write(offset + at, view[at:at + WRITE_REQUEST]))
                    offset += len(view)
        finally:
            for f in sent:
                f.exception()
        for f in sent:
            f.result()
        with self._lock:
            self._unflushed += sum(len(b) for b in buffers)
            if self._unflushed < FLUSH_EVERY:
                return
            self._unflushed = 0
            # The server's writeback starts now, beside the copy, not all in finish()'s FLUSH
            # (512 MiB bench disk into qemu-nbd: that one waited 0.55-0.6 s). Not awaited here.
            self._flushes = [f for f in self._flushes if not f.done() or f.exception()]
            self._flushes.append(self.pool.submit_flush())

    def zero(self, offset: int, length: int) -> None:
        self.pool.write_zeroes(offset, length)

    def finish(self) -> None:
        # With multi-conn one FLUSH covers every connection; without it there is only one.
        for f in self._flushes:
            f.result()              # an early flush that failed fails the restore
        self.pool.flush()
        self.pool.close()

    def abort(self) -> None:
        self.pool.close()


Target = FileTarget | BlockDeviceTarget | NbdTarget     # write(), finish() or abort()


def open_target(target: str, size: int, *, fmt: str, force: bool, connections: int) -> Target:
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


def _create_locked_temp(d: str, prefix: str) -> tuple[int, str]:
    """A new temp file in *d*, flock'ed. A restore cleaning leftovers may take the lock between
    our create and our flock and remove the file: then it has no links, and we make another."""
    while True:
        p = os.path.join(d, prefix + secrets.token_hex(4))
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:       # a file system without flock: cleaners cannot lock it either
                return fd, p
            if os.fstat(fd).st_nlink > 0:
                return fd, p
        except BaseException:
            os.close(fd)
            _unlink(p)
            raise
        os.close(fd)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
