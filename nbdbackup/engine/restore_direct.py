"""O_DIRECT writes of a raw file target (engine/restore_targets.py FileTarget).

A buffered write puts every restored byte in fresh page-cache pages, and in a VM with free
page reporting each fresh page also faults in the host: 512 MiB written buffered cost
0.7-1.3 s of kernel time here (0.15 s on a quiet moment), the same from reused page-aligned
buffers with O_DIRECT 0.07 s; nor does a restore evict the host's cache with a disk nobody
reads back soon. So a run's chunks (checked, as ever, before they get here) are copied into a
reused page-aligned buffer and written from it past the page cache. fsync still decides
durability (the device's cache, the file's metadata).

What O_DIRECT cannot take goes through the page cache as before: a run not on 4 KiB
boundaries (the last chunk of a disk whose size is not a multiple of 4 KiB), and everything
on a file system or device that refuses it (EINVAL: tmpfs refuses the open, some devices an
alignment); the caller is told by write_run() returning False.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..fsutil import BufferPool

ALIGN = 4096                # offsets, lengths and buffer addresses: what every device takes
UNIT = 4 << 20              # bytes per aligned buffer and per direct pwrite
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectWriter:
    """Direct writes to an open file (a second, O_DIRECT descriptor of it)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.refused = False        # the device refused an alignment: every run buffered from then on
        self._buffers = BufferPool(UNIT)    # for runs not already in an aligned buffer

    @classmethod
    def open(cls, fd: int) -> "DirectWriter | None":
        """A writer for the file open as *fd* (reopened through /proc: the same inode, whatever
        its name now), or None where that reopen fails for any reason (O_DIRECT refused, no /proc,
        no fd left): never an error of the restore's own."""
        if not _O_DIRECT:
            return None
        try:
            return cls(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT))
        except OSError:     # EINVAL (no O_DIRECT here), no /proc, EMFILE, a sandbox's EACCES...:
            return None     # the page cache path works wherever the first descriptor does

    def write_run(self, offset: int, buffers: list) -> bool:
        """*buffers* written back to back from *offset*, True; False (nothing to rely on
        written) when this run cannot go direct: the caller writes it through the page cache."""
        if self.refused or offset % ALIGN or sum(len(b) for b in buffers) % ALIGN:
            return False
        if len(buffers) == 1 and _aligned(buffers[0]):
            with memoryview(buffers[0]) as whole:      # the reader's own aligned buffer: no copy
                return self._write(whole, offset)
        buf = self._buffers.take()
        try:
            with memoryview(buf) as out:
                fill = 0
                for b in buffers:
                    with memoryview(b) as src:
                        pos = 0
                        while pos < len(src):
                            n = min(len(src) - pos, UNIT - fill)
                            out[fill:fill + n] = src[pos:pos + n]
                            fill, pos = fill + n, pos + n
                            if fill == UNIT:
                                if not self._write(out, offset):
                                    return False
                                offset, fill = offset + fill, 0
                return not fill or self._write(out[:fill], offset)
        finally:
            self._buffers.give(buf)

    def _write(self, view: memoryview, offset: int) -> bool:
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL:     # an alignment this device does not take: buffered from now on
                raise
            self.refused = True
            return False
        return True

    def close(self) -> None:
        """Once no write runs any more (finish, abort)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._buffers.clear()       # unmapped with their last reference (a failed write's traceback may hold one)


def _aligned(buf) -> bool:
    """*buf* starts on an ALIGN boundary (only a writable buffer can say where it is)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf)) % ALIGN == 0
    except (TypeError, ValueError):     # read-only (bytes) or empty
        return False
