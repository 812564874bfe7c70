"""Storage backends for pack files: an interface and a local directory (memory: memory_backend.py,
S3: s3backend.py).

A backend stores named immutable objects ("packs/ab/abcd....pack"). put() is
atomic, durable when it returns, and create-only: the object is either complete
under its name or absent, and a name that exists is never overwritten (put()
raises FileExistsError, leaving the old object as it was), so two writers (two
hosts on one bucket) can never clobber each other. Readers use get() with ranges
(the local backend: get_ranges(), many at once), or get_into() the reader's own
buffers; objects are never modified."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import storage_error
from ..fsutil import IOV_MAX, fsync_path, preadv_all, scatter


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its name, size in bytes and modification time (POSIX seconds)."""

    name: str
    size: int
    mtime: float


class StorageBackend:
    """Interface. Names are '/'-separated relative paths without '..'."""

    def put(self, name: str, parts: Iterable[bytes]) -> None:
        """Store the concatenation of *parts* under *name*, durably and atomically.

        Create-only: FileExistsError when *name* exists (the stored object is left intact)."""
        raise NotImplementedError

    def put_aligned(self, name: str, buf, length: int) -> None:
        """put() of buf[:length], where *buf* is page-aligned (an anonymous mmap) with at
        least a page of room after *length*: the local backend writes it with O_DIRECT."""
        with memoryview(buf) as mv, mv[:length] as data:
            self.put(name, [data])

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) (to the end when length is None).

        Raises FileNotFoundError for a missing object. May return fewer bytes
        when the range runs past the end (the caller checks)."""
        raise NotImplementedError

    def get_into(self, name: str, offset: int, buffers: list) -> int:
        """*buffers* (writable) filled back to back with the bytes from *offset*; the bytes
        filled, fewer than asked only where the object ends. FileNotFoundError as get()."""
        return scatter(self.get(name, offset, sum(len(b) for b in buffers)), buffers)

    def size(self, name: str) -> int:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove *name*; missing is not an error."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Names starting with *prefix*, sorted."""
        raise NotImplementedError

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """ObjectInfo of the objects whose names start with *prefix*, sorted by name."""
        raise NotImplementedError

    def remove_incomplete(self, older_than: float) -> tuple[int, int]:
        """Remove unfinished uploads (temporary files, multipart uploads) started before POSIX
        time *older_than*: (how many, their bytes so far). Younger ones may be in progress."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def check_name(name: str) -> None:
    """ValueError unless *name* is a '/'-separated relative name without '', '.' or '..' parts."""
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"bad object name {name!r}")


class LocalBackend(StorageBackend):
    """Objects are files under *root*; writes go through *tmp_dir* + link.

    Durability: the temporary file is fsync'ed, hard-linked into place (link(2)
    fails with EEXIST where rename(2) would replace: that makes put() create-only),
    unlinked from *tmp_dir*, and the target directory fsync'ed (its parent too when
    the directory is new) before put() returns.
    """

    MAX_OPEN = 128

    def __init__(self, root: str, tmp_dir: str):
        self.root = root
        self.tmp_dir = tmp_dir
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # name -> [fd, users]
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        check_name(name)
        return os.path.join(self.root, *name.split("/"))

    def put(self, name: str, parts: Iterable[bytes]) -> None:
        self._store(name, lambda fd: _write_all(fd, parts))

    def put_aligned(self, name: str, buf, length: int) -> None:
        # O_DIRECT: a pack goes from our (reused) buffer to the disk, past the page cache:
        # no copy into fresh cache pages, no writeback later, and the host's cache of the
        # VMs' disks is not evicted by backup data nobody reads back soon.
        self._store(name, lambda fd: _write_direct(fd, buf, length), direct=True)

    def _store(self, name: str, write, direct: bool = False) -> None:
        path = self._path(name)
        tmp = os.path.join(self.tmp_dir, f"{uuid.uuid4().hex}.tmp")
        try:
            fd = _open_new(tmp, direct)
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(path)
            self._make_dirs(parent)
            os.link(tmp, path)          # atomic and create-only: EEXIST when the name exists
            os.unlink(tmp)
            fsync_path(parent, directory=True)
        except FileExistsError:
            _unlink_quiet(tmp)
            raise FileExistsError(errno.EEXIST, "object exists (put never overwrites)", name) from None
        except OSError as e:
            _unlink_quiet(tmp)
            known = storage_error(e.errno, self.root, f"writing {name}")   # full, read-only, forbidden
            if known is not None:
                raise known from e
            raise

    def _make_dirs(self, d: str) -> None:
        """Create directory *d* (packs/<xx>) and its missing parents below root, fsync'ing the
        parent of each one created: the new directory's entry must be as durable as the file
        renamed into it (packs/ itself is fsync'ed when packs/<xx>/ appears)."""
        if os.path.isdir(d):
            return
        if not d.startswith(self.root + os.sep):    # root itself (a bare backend in tests): as before
            os.makedirs(d, exist_ok=True)
            return
        up = os.path.dirname(d)
        self._make_dirs(up)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass            # made meanwhile by another writer; fsync its entry here too
        fsync_path(up, directory=True)

    def _acquire(self, name: str) -> int:
        """An open fd for *name*, pinned until _release (so it is never closed under a reader)."""
        with self._lock:
            ent = self._fds.get(name)
            if ent is not None:
                ent[1] += 1
                self._fds.move_to_end(name)
                return ent[0]
        fd = os.open(self._path(name), os.O_RDONLY)
        with self._lock:
            ent = self._fds.get(name)
            if ent is not None:  # another thread won the race
                os.close(fd)
                ent[1] += 1
                return ent[0]
            self._fds[name] = [fd, 1]
            self._evict_locked()
        return fd

    def _release(self, name: str) -> None:
        with self._lock:
            ent = self._fds.get(name)
            if ent is not None:
                ent[1] -= 1

    def _evict_locked(self) -> None:
        if len(self._fds) <= self.MAX_OPEN:
            return
        for n in list(self._fds):
            if len(self._fds) <= self.MAX_OPEN:
                break
            fd, refs = self._fds[n]
            if refs == 0:
                del self._fds[n]
                os.close(fd)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.get_ranges(name, [(offset, length)])[0]

    def get_ranges(self, name: str, ranges) -> list[bytes]:
        """get() of each (offset, length) of one object: one open, a pread each (no copy to split)."""
        fd = self._acquire(name)
        try:
            return [os.pread(fd, max(os.fstat(fd).st_size - a if n is None else n, 0), a) for a, n in ranges]
        finally:
            self._release(name)

    def get_into(self, name: str, offset: int, buffers: list) -> int:
        """One preadv (per IOV_MAX buffers) straight into the reader's buffers: a raw chunk goes
        from the page cache to where it is written out, with no bytes object between."""
        fd = self._acquire(name)
        try:
            return preadv_all(fd, offset, buffers)
        finally:
            self._release(name)

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def delete(self, name: str) -> None:
        with self._lock:
            ent = self._fds.get(name)
            if ent is not None and ent[1] == 0:
                del self._fds[name]
                os.close(ent[0])
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_path(os.path.dirname(path), directory=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        names = []
        # walk only below the prefix's directory: listing keys/ must not walk every pack
        top = os.path.join(self.root, prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                n = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
                if n.startswith(prefix):
                    names.append(n)
        return iter(sorted(names))

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        out = []
        for n in self.list(prefix):
            try:
                st = os.stat(self._path(n))
            except FileNotFoundError:
                continue            # deleted since the walk
            out.append(ObjectInfo(n, st.st_size, st.st_mtime))
        return iter(out)

    def remove_incomplete(self, older_than: float) -> tuple[int, int]:
        """The *.tmp files in tmp_dir last written before *older_than* (a killed writer's)."""
        count = nbytes = 0
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return 0, 0
        for p in (os.path.join(self.tmp_dir, f) for f in names if f.endswith(".tmp")):
            try:
                if (st := os.stat(p)).st_mtime >= older_than or not os.path.isfile(p):
                    continue
                os.unlink(p)
            except FileNotFoundError:
                continue
            count += 1
            nbytes += st.st_size
        return count, nbytes

    def close(self) -> None:
        with self._lock:
            fds = [fd for fd, _refs in self._fds.values()]
            self._fds.clear()
        for fd in fds:
            os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass




def _write_all(fd: int, parts: Iterable[bytes]) -> None:
    """Write every part, up to IOV_MAX of them per writev() call."""
    pending = [memoryview(p) for p in parts if len(p)]
    while pending:
        batch = pending[:IOV_MAX]
        n = os.writev(fd, batch)
        done = 0
        while done < len(batch) and n >= len(batch[done]):
            n -= len(batch[done])
            done += 1
        if done < len(batch) and n:
            batch[done] = batch[done][n:]
        pending = batch[done:] + pending[len(batch):]


_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_ALIGN = 4096


def _open_new(path: str, direct: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:     # EINVAL: this file system has no O_DIRECT (tmpfs...)
                raise
            _unlink_quiet(path)
    return os.open(path, flags, 0o644)


def _write_direct(fd: int, buf, length: int) -> None:
    """buf[:length] to the new file *fd*: whole pages (O_DIRECT needs them), then cut
    the file to *length*. Falls back to a plain write where O_DIRECT is refused."""
    import fcntl

    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    padded = -(-length // _DIRECT_ALIGN) * _DIRECT_ALIGN
    with memoryview(buf) as mv:
        if fl & _O_DIRECT and padded <= len(mv):
            try:
                _pwrite_all(fd, mv[:padded])
                os.ftruncate(fd, length)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:   # alignment this device does not accept
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~_O_DIRECT)
                os.ftruncate(fd, 0)
        _pwrite_all(fd, mv[:length])


def _pwrite_all(fd: int, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], pos)
