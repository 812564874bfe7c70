"""Replies of one NBD connection: packing them, and holding small ones back to send together.

Every reply is written with one write() call on the event loop (or two back-to-back
for big data, which nothing can come between), so replies from concurrent tasks
never interleave. While more requests are already buffered, small replies are held
in a cork list and sent in one write (one syscall, one wake-up of the client).
"""

from __future__ import annotations

import asyncio
import logging
import struct

from ..errors import is_no_space
from . import proto

log = logging.getLogger("nbdbackup.server")

SIMPLE = proto.SIMPLE_REPLY
SR = proto.STRUCTURED_REPLY
SR_DATA = struct.Struct(">IHHQIQ")   # structured reply header + OFFSET_DATA offset, packed at once
SR_HOLE = struct.Struct(">IHHQIQI")  # structured reply header + OFFSET_HOLE payload
SR_ERR = struct.Struct(">IHHQIIH")   # structured reply header + error payload head
SMAGIC = proto.SIMPLE_REPLY_MAGIC
XMAGIC = proto.STRUCTURED_REPLY_MAGIC
DONE = proto.REPLY_FLAG_DONE

SEND_TIMEOUT = 120.0       # a client that stops reading replies is dropped
CORK_BYTES = 1 << 20       # held-back fast replies are sent once they reach this


class Replies:
    def __init__(self, writer: asyncio.StreamWriter, structured: bool):
        self.writer = writer
        self.structured = structured
        self.closed = False
        self.cork: list | None = None    # replies held back while more requests are buffered
        self.cork_bytes = 0

    def _out(self, data) -> None:
        # A vanished client's replies are dropped quietly (asyncio would log each one).
        if self.cork is not None:
            self.cork.append(data)
            self.cork_bytes += len(data)
        elif not self.closed and not self.writer.transport.is_closing():
            self.writer.write(data)

    def _uncork(self) -> None:
        """Send the held-back replies in one write (one syscall, one wake-up of the client)."""
        parts, self.cork, self.cork_bytes = self.cork, None, 0
        if parts:
            self._out(b"".join(parts) if len(parts) > 1 else parts[0])

    def _hold(self) -> None:
        self.cork = [] if self.cork is None else self.cork

    async def _after_inline(self) -> None:
        """Keep holding replies while they are few; else send them, and wait while the
        client leaves more than the transport's bound unread (as after every reply)."""
        if self.cork is not None and self.cork_bytes < CORK_BYTES:
            return
        self._uncork()
        await self._drain()

    def _io_error(self, cookie: int, e: OSError) -> None:     # inline paths and tasks alike
        log.error("I/O error, answering %s: %s", "ENOSPC" if is_no_space(e) else "EIO", e)
        self.reply_err(cookie, proto.ENOSPC if is_no_space(e) else proto.EIO, "server I/O error")

    async def _drain(self) -> None:
        t = self.writer.transport
        if t is not None and t.get_write_buffer_size() > (1 << 20):
            await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT)

    def reply_ok(self, cookie: int) -> None:
        if self.structured:
            self._out(SR.pack(XMAGIC, DONE, proto.REPLY_TYPE_NONE, cookie, 0))
        else:
            self._out(SIMPLE.pack(SMAGIC, 0, cookie))

    def reply_err(self, cookie: int, err: int, msg: str = "") -> None:
        if self.structured:
            m = msg.encode()[:512]
            self._out(SR_ERR.pack(XMAGIC, DONE, proto.REPLY_TYPE_ERROR, cookie, 6 + len(m), err, len(m)) + m)
        else:
            self._out(SIMPLE.pack(SMAGIC, err, cookie))

    def reply_read(self, cookie: int, pieces: list, df: bool) -> None:
        if not self.structured:
            parts = [SIMPLE.pack(SMAGIC, 0, cookie)]
            parts += [bytes(n) if d is None else d for _, n, d in pieces]
            self._out(b"".join(parts))
            return
        if len(pieces) == 1 and pieces[0][2] is not None:   # the hot path
            off, n, d = pieces[0]
            hdr = SR_DATA.pack(XMAGIC, DONE, proto.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n, off)
            if n >= 65536 and not self.closed and not self.writer.transport.is_closing():
                # Two back-to-back writes (nothing can come between them on the
                # loop) spare a copy of the data; held-back replies go first.
                self._uncork()
                self.writer.write(hdr)
                self.writer.write(d)
            elif self.cork is not None:    # joined once, with the other held replies
                self.cork += (hdr, d)
                self.cork_bytes += len(hdr) + n
            else:
                self._out(b"".join((hdr, d)))
            return
        # Runs: consecutive data pieces become one OFFSET_DATA chunk; zero pieces
        # become OFFSET_HOLE, unless DF asks for one chunk with everything.
        runs: list[list] = []
        for off, n, d in pieces:
            is_data = df or d is not None
            if runs and runs[-1][0] == is_data:
                runs[-1][2] += n
                runs[-1][3].append(bytes(n) if d is None else d)
            else:
                runs.append([is_data, off, n, [bytes(n) if d is None else d]])
        parts = []
        last = len(runs) - 1
        for k, (is_data, off, n, datas) in enumerate(runs):
            fl = DONE if k == last else 0
            if is_data:
                parts.append(SR_DATA.pack(XMAGIC, fl, proto.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n, off))
                parts += datas
            else:
                parts.append(SR_HOLE.pack(XMAGIC, fl, proto.REPLY_TYPE_OFFSET_HOLE, cookie, 12, off, n))
        self._out(b"".join(parts))
