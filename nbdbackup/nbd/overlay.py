"""Copy-on-write overlay for a writable export: a sparse file plus a block map.

Each overlay block is in one of three states: still the backup's bytes
(BACKING), written bytes in the sparse file (DATA), or zeroed by
WRITE_ZEROES/TRIM (ZERO, nothing stored). The backup is never written.

The overlay does no I/O on the backup itself: callers pass the backing bytes
of partially written blocks (see ExportView), so all methods here are
synchronous and quick, and run on the server's event loop, which makes each
call atomic with respect to other requests.
"""

from __future__ import annotations

import os

from ..fsutil import pwritev_all

BACKING = 0
DATA = 1
ZERO = 2

DEFAULT_BLOCK = 64 * 1024


class Overlay:
    def __init__(self, path: str, size: int, block: int = DEFAULT_BLOCK):
        self.path = path
        self.size = size
        self.block = block
        self.nblocks = (size + block - 1) // block
        # One byte per block: 16 MiB of RAM per TiB of disk, allocated lazily by the OS.
        self.state = bytearray(self.nblocks)
        self.written = 0          # blocks not in BACKING state; 0 means "no overlay effect"
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)

    def block_len(self, b: int) -> int:
        return min(self.block, self.size - b * self.block)

    def blocks(self, offset: int, length: int) -> range:
        return range(offset // self.block, (offset + length - 1) // self.block + 1)

    def backing_blocks_needed(self, offset: int, length: int) -> list[int]:
        """Blocks a write of [offset, offset+length) only partly covers and that
        still hold backup bytes: their backing data is needed to fill them."""
        need = []
        for b in self.blocks(offset, length):
            start = b * self.block
            end = start + self.block_len(b)
            partial = offset > start or offset + length < end
            if partial and self.state[b] == BACKING:
                need.append(b)
        return need

    def _set(self, b: int, st: int) -> None:
        if self.state[b] == BACKING and st != BACKING:
            self.written += 1
        self.state[b] = st

    def in_place(self, offset: int, length: int) -> bool:
        """A write of [offset, offset+length) lies inside one block the file already holds."""
        b = offset // self.block
        return self.state[b] == DATA and (offset + length - 1) // self.block == b

    def pwrite_run(self, datas: list, offset: int) -> None:
        """Contiguous in-place writes (see in_place) from *offset*, in one system call."""
        pwritev_all(self.fd, offset, datas)

    def write_in_place(self, offset: int, data) -> bool:
        """A write inside one block the file already holds: written at once, True; else False."""
        if not self.in_place(offset, len(data)):
            return False
        self._pwrite_all(data, offset)
        return True

    def write(self, offset: int, data, backing: dict[int, bytes]) -> None:
        """Write *data* at *offset*; *backing* maps partial BACKING blocks to their bytes."""
        mv = memoryview(data)
        length = len(mv)
        for b in self.blocks(offset, length):
            start = b * self.block
            blen = self.block_len(b)
            lo = max(offset, start)
            hi = min(offset + length, start + blen)
            piece = mv[lo - offset:hi - offset]
            if (lo == start and hi == start + blen) or self.state[b] == DATA:
                # A whole block, or one the file already holds: only the new bytes are written.
                self._pwrite_all(piece, lo)
            else:
                buf = bytearray(self._block_bytes(b, backing))
                buf[lo - start:hi - start] = piece
                self._pwrite_all(buf, start)
            self._set(b, DATA)

    def zero(self, offset: int, length: int, backing: dict[int, bytes]) -> None:
        """Make [offset, offset+length) read as zeroes."""
        for b in self.blocks(offset, length):
            start = b * self.block
            blen = self.block_len(b)
            lo = max(offset, start)
            hi = min(offset + length, start + blen)
            if lo == start and hi == start + blen:
                self._set(b, ZERO)
            elif self.state[b] != ZERO:
                buf = bytearray(self._block_bytes(b, backing))
                buf[lo - start:hi - start] = bytes(hi - lo)
                self._pwrite_all(buf, start)
                self._set(b, DATA)

    def _block_bytes(self, b: int, backing: dict[int, bytes]) -> bytes:
        st = self.state[b]
        if st == DATA:
            return self.pread(b * self.block, self.block_len(b))
        if st == ZERO:
            return bytes(self.block_len(b))
        return backing[b]

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:   # cannot happen on a file we truncated to size
            raise OSError(f"short read from overlay {self.path}")
        return data

    def _pwrite_all(self, data, offset: int) -> None:
        mv = memoryview(data)
        while len(mv):
            n = os.pwrite(self.fd, mv, offset)
            mv = mv[n:]
            offset += n

    def close(self, remove: bool = True) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
