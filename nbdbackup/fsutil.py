"""Small file-system and memory helpers shared by the repository, the engine and restore."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque

LOW_SPACE = 1 << 20     # below this much free room, a write (SQLite's -wal/-shm included) is about to fail


def fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file, or a directory (so that a rename or unlink in it is durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """*data* at *path* with *mode*, whole or not at all: a temporary file beside it (O_EXCL,
    so never through a planted name), fsynced, renamed over the old one (a symlink there is
    replaced, not followed), the directory fsynced. A reader sees the old file or the new."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
            os.fchmod(fd, mode)         # exactly *mode*, whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_path(directory, directory=True)


def write_blocker(path: str) -> int | None:
    """Why nothing can be written at *path* (a directory, or a file and its directory), as an
    errno: EROFS when its file system is mounted read-only, ENOSPC when it has (almost) no
    free room, EACCES when this user may not write there; None when nothing visible stops it.
    Errors such as SQLite's "disk I/O error" do not say which; the file system does."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(d)
    except OSError as e:
        return errno.EACCES if e.errno in (errno.EACCES, errno.EPERM) else None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail     # root may use the reserved blocks
    if st.f_blocks and free * st.f_frsize < LOW_SPACE:
        return errno.ENOSPC
    if not os.access(d, os.W_OK | os.X_OK):
        return errno.EACCES
    if d != path and os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return errno.EACCES
    return None


IOV_MAX = 1024              # buffers per readv/writev call (Linux UIO_MAXIOV)


def pwritev_all(fd: int, offset: int, buffers: list) -> int:
    """*buffers* written back to back from *offset* (short writes continued, IOV_MAX
    buffers per call); the end offset."""
    views = [memoryview(b) for b in buffers]
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset)
        offset += n
        _advance(views, n)
    return offset


def preadv_all(fd: int, offset: int, buffers: list) -> int:
    """*buffers* filled back to back from *offset* (short reads continued, IOV_MAX buffers per
    call) up to the end of the file; the bytes read (fewer than asked only at the end)."""
    views = [memoryview(b) for b in buffers]
    got = 0
    while views:
        n = os.preadv(fd, views[:IOV_MAX], offset + got)
        if not n:
            break
        got += n
        _advance(views, n)
    return got


def _advance(views: list, n: int) -> None:
    """Drop the first *n* bytes of *views* (what one vectored call moved)."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
    if n:
        views[0] = views[0][n:]


def scatter(data, buffers: list) -> int:
    """*data* copied into *buffers* back to back, as far as it goes; the bytes copied."""
    pos = 0
    with memoryview(data) as src:
        for b in buffers:
            if pos == len(src):
                break
            n = min(len(b), len(src) - pos)
            b[:n] = src[pos:pos + n]
            pos += n
    return pos


def anonymous_map(size: int) -> mmap.mmap:
    """Page-aligned private memory. MAP_PRIVATE: mmap's default for anonymous maps
    is shared (shmem), whose page faults cost half as much again."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)


def default_state_dir() -> str:
    """Where this host keeps nbdbackup's state ($NBDBACKUP_STATE_DIR, else $XDG_STATE_HOME/nbdbackup)."""
    env = os.environ.get("NBDBACKUP_STATE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "nbdbackup")


_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_sync_file_range = None     # libc's, loaded on first use; False where there is none


def _libc_sync_file_range():
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        try:
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            f.restype = ctypes.c_int
            _sync_file_range = f
        except (OSError, AttributeError):
            _sync_file_range = False
    return _sync_file_range


class WritebackWindow:
    """Writeback of a file being written, kept close behind the writes (nbdcopy's way with a
    file it writes): after each write its range is handed to the disk at once
    (sync_file_range WRITE, no waiting); once more than *window* bytes are in flight, the
    oldest ranges are waited for and, with *evict*, dropped from the page cache
    (POSIX_FADV_DONTNEED). So the disk writes beside the copy, the final fsync waits only
    for the last window, and the page cache holds about a window of the file: its pages
    are used again, not fresh ones each time (in a VM fresh pages may each fault in the
    host too). fsync still decides durability. An error of a wait is raised: the kernel
    reports a writeback error once per descriptor, so a later fsync might not see it."""

    def __init__(self, fd: int, window: int = 32 << 20, *, evict: bool = True):
        self.fd, self.window, self.evict = fd, window, evict
        self._ranges: deque[tuple[int, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()

    def wrote(self, offset: int, length: int) -> None:
        srf = _libc_sync_file_range()
        if not srf or length <= 0:
            return
        srf(self.fd, offset, length, _SYNC_FILE_RANGE_WRITE)     # a hint; the call releases the GIL
        due = []
        with self._lock:
            self._ranges.append((offset, length))
            self._bytes += length
            while self._bytes > self.window:
                due.append(self._ranges.popleft())
                self._bytes -= due[-1][1]
        for off, n in due:
            if srf(self.fd, off, n, _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                   | _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
                e = _last_errno()
                raise OSError(e, os.strerror(e))
            if self.evict:
                os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)


def _last_errno() -> int:
    import ctypes

    return ctypes.get_errno()
