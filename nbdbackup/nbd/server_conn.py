"""Transmission phase for one client: parse requests, answer per the NBD spec.

Requests that need no backup read (cached reads, writes whose backing bytes
are cached) are answered inline (no task, no thread hop), their replies
batched while more requests are buffered (server_replies); the rest run as
tasks so a slow chunk read never stalls other requests on the connection.
"""

from __future__ import annotations

import asyncio
import logging

from . import proto
from .server_handshake import Session
from .server_replies import CORK_BYTES, Replies
from .server_view import ChunkReadError, ExportView

log = logging.getLogger("nbdbackup.server")

REQUEST = proto.REQUEST
REQUEST_MAGIC = proto.REQUEST_MAGIC
SR = proto.STRUCTURED_REPLY
XMAGIC = proto.STRUCTURED_REPLY_MAGIC
DONE = proto.REPLY_FLAG_DONE

PAYLOAD_TIMEOUT = 60.0     # once a write header arrived, its payload must follow
MAX_INFLIGHT = 64          # concurrent slow requests per connection
READ_BUDGET = 96 << 20     # bytes of slow reads and writes in flight per connection (bounds memory)
DRAIN_LIMIT = 64 << 20     # oversized write payloads up to this are drained; beyond: disconnect
MAX_EXTENTS = 65536
SMALL_REQUEST = 32768      # reads and writes up to this are answered in one pass over the buffer

# FUA is valid on every command once SEND_FUA is advertised (the spec: accept,
# even if only by ignoring it).
_FUA = proto.CMD_FLAG_FUA
ALLOWED_FLAGS = {
    proto.CMD_READ: _FUA | proto.CMD_FLAG_DF,
    proto.CMD_WRITE: _FUA,
    proto.CMD_FLUSH: _FUA,
    proto.CMD_TRIM: _FUA,
    proto.CMD_CACHE: _FUA,
    proto.CMD_WRITE_ZEROES: _FUA | proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FAST_ZERO,
    proto.CMD_BLOCK_STATUS: _FUA | proto.CMD_FLAG_REQ_ONE,
}


class Connection(Replies):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session,
                 max_block: int):
        super().__init__(writer, session.structured)
        self.reader = reader
        self.view: ExportView = session.view
        self.ctx_id = next(iter(session.contexts), None)
        self.max_block = max_block
        self.tasks: set[asyncio.Task] = set()
        self.write_tasks: set[asyncio.Task] = set()
        self.slots = asyncio.Semaphore(MAX_INFLIGHT)
        self.read_bytes = 0

    @staticmethod
    def _try(fn, *args):
        """fn(*args) of an inline path, or the OSError it raised (overlay file trouble)."""
        try:
            return fn(*args)
        except OSError as e:
            return e

    def _buffered(self) -> int:
        return len(self.reader._buffer)    # asyncio keeps no public accessor for it

    # --- the request loop -------------------------------------------------------
    async def serve(self) -> None:
        try:
            await self._loop()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
            log.debug("client gone: %s", e)
        finally:
            self._uncork()
            await self._finish()

    async def _finish(self) -> None:
        if self.tasks:
            done, pending = await asyncio.wait(list(self.tasks), timeout=10)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        self.closed = True

    async def _spawn(self, coro, cookie: int, write: bool = False, cost: int = 0) -> None:
        # Stop reading requests while too many (or too large) ones are pending:
        # a client cannot make us hold more than READ_BUDGET of replies.
        while cost and self.read_bytes + cost > READ_BUDGET and self.tasks:
            await asyncio.wait(list(self.tasks), return_when=asyncio.FIRST_COMPLETED)
        await self.slots.acquire()
        self.read_bytes += cost
        t = asyncio.create_task(self._guard(coro, cookie))
        self.tasks.add(t)
        if write:
            self.write_tasks.add(t)
        t.add_done_callback(lambda t: self._task_done(t, cost))

    def _task_done(self, t: asyncio.Task, cost: int) -> None:
        self.tasks.discard(t)
        self.write_tasks.discard(t)
        self.read_bytes -= cost
        self.slots.release()

    async def _guard(self, coro, cookie: int) -> None:
        try:
            await coro
        except ChunkReadError as e:
            log.error("read error, answering EIO: %s", e)
            self.reply_err(cookie, proto.EIO, "backup data is damaged in this range")
        except OSError as e:   # overlay file trouble (e.g. its disk is full)
            self._io_error(cookie, e)
        except asyncio.CancelledError:
            raise
        except Exception:      # a bug must not take the connection (or the server) down
            log.exception("internal error on request")
            self.reply_err(cookie, proto.EIO, "internal server error")
        try:
            await self._drain()
        except (ConnectionError, asyncio.TimeoutError):
            self.writer.transport.abort()

    async def _loop(self) -> None:
        read = self.reader.readexactly
        view = self.view
        size = view.size
        while True:
            answered = self._answer_buffered()
            if answered:
                await read(answered)       # here already: returns without waiting
                await self._after_inline()
                continue
            # Held-back replies never wait for the client: only for requests already here.
            if self.cork is not None and self._buffered() < REQUEST.size:
                self._uncork()
                await self._drain()
            magic, flags, typ, cookie, off, length = REQUEST.unpack(await read(28))
            if magic != REQUEST_MAGIC:
                log.warning("bad request magic %#x: disconnecting the client", magic)
                return
            allowed = ALLOWED_FLAGS.get(typ)
            if typ == proto.CMD_READ and flags == 0 and length and off + length <= size \
                    and length <= self.max_block:
                pieces = self._try(view.read_cached, off, length)
                if pieces is not None:
                    # While the next request is already here (a client with many in
                    # flight), replies wait to go out together.
                    self._hold()
                    if isinstance(pieces, OSError):
                        self._io_error(cookie, pieces)
                    else:
                        self.reply_read(cookie, pieces, False)
                    await self._after_inline()
                    continue
            if typ == proto.CMD_WRITE and not flags & ~_FUA and 0 < length <= self.max_block \
                    and off + length <= size and view.writable and self._buffered() >= length:
                data = await read(length)      # here already: returns without waiting
            elif typ == proto.CMD_WRITE:
                if self._buffered() < length:
                    self._uncork()     # the payload may take a while: send what is ready
                data = await self._payload(flags, off, length, cookie, allowed)
                if data is None:
                    continue
            if typ == proto.CMD_WRITE:
                # Inline when no backup read is needed, unless a slower write is still in
                # flight: an inline write never overtakes one.
                done = not self.write_tasks and self._try(view.write_cached, off, data)
                if done:
                    self._hold()
                    if isinstance(done, OSError):
                        self._io_error(cookie, done)
                    else:
                        self.reply_ok(cookie)
                    await self._after_inline()
                else:
                    self._uncork()
                    await self._spawn(self._write(cookie, flags, off, data), cookie, write=True, cost=len(data))
                continue
            self._uncork()
            if typ == proto.CMD_DISC:      # never answered, whatever its flags
                return
            if allowed is None or flags & ~allowed:
                self.reply_err(cookie, proto.EINVAL, "unknown command or flag")
            elif typ == proto.CMD_READ:
                await self._read_cmd(cookie, flags, off, length)
            elif typ == proto.CMD_FLUSH:
                await self._spawn(self._flush(cookie), cookie)
            elif typ == proto.CMD_BLOCK_STATUS:
                self._block_status(cookie, flags, off, length)
            elif off + length > size:
                self.reply_err(cookie, proto.ENOSPC if typ == proto.CMD_WRITE_ZEROES and view.writable
                               else proto.EINVAL, "request beyond the end of the export")
            elif typ == proto.CMD_CACHE:
                await self._spawn(self._cache(cookie, off, length), cookie)
            elif not view.writable:
                self.reply_err(cookie, proto.EPERM, "export is read-only")
            elif length == 0:
                self.reply_ok(cookie)
            else:   # TRIM / WRITE_ZEROES: both leave zeroes (TRIM may leave anything)
                done = not self.write_tasks and self._try(view.zero_cached, off, length)
                if isinstance(done, OSError):
                    self._io_error(cookie, done)
                elif done:
                    self.reply_ok(cookie)
                else:
                    await self._spawn(self._zero(cookie, off, length), cookie, write=True)
            await self._drain()

    def _answer_buffered(self) -> int:
        """Answer the small requests at the head of the reader's buffer that need no backup
        read (plain READs from cache and overlay, WRITEs with their payload here), replies
        held: one pass, no await per request. Neighbouring writes into written overlay blocks
        go to the file in one pwritev. Returns the bytes of the requests answered, which the
        caller consumes; stops at anything else."""
        buf = self.reader._buffer
        have = len(buf)
        pos = 0
        view = self.view
        ov = view.overlay
        limit = min(self.max_block, SMALL_REQUEST)
        run: list = []         # (offset, cookie, payload) of in-place writes not yet written
        while have - pos >= REQUEST.size and self.cork_bytes < CORK_BYTES:
            magic, flags, typ, cookie, off, length = REQUEST.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC or not 0 < length <= limit or off + length > view.size:
                break
            if typ == proto.CMD_READ and not flags:
                self._write_run(run)                 # a read sees every write sent before it
                run = []
                pieces = self._try(view.read_cached, off, length)
                if pieces is None:
                    break
                self._hold()
                if isinstance(pieces, OSError):
                    self._io_error(cookie, pieces)
                else:
                    self.reply_read(cookie, pieces, False)
                pos += REQUEST.size
                continue
            if typ != proto.CMD_WRITE or flags & ~_FUA or ov is None or self.write_tasks \
                    or have - pos < REQUEST.size + length:
                break
            data = bytes(buf[pos + REQUEST.size:pos + REQUEST.size + length])
            if ov.in_place(off, length) and len(run) < 256:
                run.append((off, cookie, data))
            else:
                self._write_run(run)
                run = []
                done = self._try(view.write_cached, off, data)
                if not done:
                    break                            # needs a backup read: the general path
                self._hold()
                if isinstance(done, OSError):
                    self._io_error(cookie, done)
                else:
                    self.reply_ok(cookie)
            pos += REQUEST.size + length
        self._write_run(run)
        return pos

    def _write_run(self, run: list) -> None:
        """Write and answer in-place writes; those that do not overlap commute, so each run
        of neighbours (clients send them in any order) is one pwritev."""
        if not run:
            return
        ov = self.view.overlay
        by_off = sorted(run, key=lambda w: w[0])
        if any(a[0] + len(a[2]) > b[0] for a, b in zip(by_off, by_off[1:])):
            chains = [[w] for w in run]          # overlapping: one at a time, in order
        else:
            chains = [[by_off[0]]]
            for w in by_off[1:]:
                last = chains[-1][-1]
                if last[0] + len(last[2]) == w[0]:
                    chains[-1].append(w)
                else:
                    chains.append([w])
        failed = {}
        for chain in chains:
            err = self._try(ov.pwrite_run, [d for _, _, d in chain], chain[0][0])
            if err is not None:    # one write: one answer for all of it (a failed write may be partial)
                failed.update((id(w), err) for w in chain)
        self._hold()
        for w in run:
            cookie = w[1]
            if id(w) in failed:
                self._io_error(cookie, failed[id(w)])
            else:
                self.reply_ok(cookie)

    async def _payload(self, flags, off, length, cookie, allowed) -> bytes | None:
        """Read a WRITE's payload, or drain it and answer the error."""
        err = msg = None
        if length > self.max_block:
            if length > DRAIN_LIMIT:
                raise ConnectionError(f"write payload of {length} bytes: disconnecting")
            err, msg = proto.EINVAL, "write larger than the maximum block size"
        elif flags & ~allowed:
            err, msg = proto.EINVAL, "unknown flag"
        elif not self.view.writable:
            err, msg = proto.EPERM, "export is read-only"
        elif off + length > self.view.size:
            err, msg = proto.ENOSPC, "write beyond the end of the export"
        if err is None:
            if not length:
                self.reply_ok(cookie)
                return None
            if self._buffered() >= length:     # here already: no wait, so no timer
                return await self.reader.readexactly(length)
            # asyncio.timeout, not wait_for: wait_for makes a task of every payload read
            async with asyncio.timeout(PAYLOAD_TIMEOUT):
                return await self.reader.readexactly(length)
        left = length
        while left:
            n = min(left, 1 << 20)
            async with asyncio.timeout(PAYLOAD_TIMEOUT):
                await self.reader.readexactly(n)
            left -= n
        self.reply_err(cookie, err, msg)
        return None

    async def _read_cmd(self, cookie: int, flags: int, off: int, length: int) -> None:
        df = bool(flags & proto.CMD_FLAG_DF)
        if df and not self.structured:
            self.reply_err(cookie, proto.EINVAL, "DF needs structured replies")
        elif length > self.max_block:
            # EOVERFLOW is the spec's answer only for a DF read too big for one chunk.
            self.reply_err(cookie, proto.EOVERFLOW if df else proto.EINVAL, "read larger than the maximum block size")
        elif off + length > self.view.size:
            self.reply_err(cookie, proto.EINVAL, "read beyond the end of the export")
        elif length == 0:
            self.reply_ok(cookie)
        else:
            pieces = self._try(self.view.read_cached, off, length)
            if isinstance(pieces, OSError):
                self._io_error(cookie, pieces)
            elif pieces is not None:
                self.reply_read(cookie, pieces, df)
            else:
                await self._spawn(self._read_slow(cookie, off, length, df), cookie, cost=length)

    async def _read_slow(self, cookie, off, length, df) -> None:
        pieces = await self.view.read(off, length)
        self.reply_read(cookie, pieces, df)

    async def _write(self, cookie, flags, off, data) -> None:
        await self.view.write(off, data)
        # FUA: the write is in the shared overlay before we answer, so it is
        # already visible to every connection; nothing more to do.
        self.reply_ok(cookie)

    async def _zero(self, cookie, off, length) -> None:
        await self.view.zero(off, length)
        self.reply_ok(cookie)

    async def _flush(self, cookie) -> None:
        # Writes are applied to the shared overlay before their reply, so they
        # are visible to all connections. Wait for writes still in flight here
        # so that FLUSH also covers them (stricter than the spec asks).
        me = asyncio.current_task()
        pending = [t for t in self.write_tasks if t is not me]
        if pending:
            await asyncio.wait(pending)
        self.reply_ok(cookie)

    async def _cache(self, cookie, off, length) -> None:
        if length:
            await self.view.prefetch(off, min(length, 64 << 20))
        self.reply_ok(cookie)

    def _block_status(self, cookie: int, flags: int, off: int, length: int) -> None:
        if not self.structured or self.ctx_id is None:
            self.reply_err(cookie, proto.EINVAL, "no meta context was negotiated")
            return
        if length == 0 or off + length > self.view.size:
            self.reply_err(cookie, proto.EINVAL, "block status range is empty or beyond the end")
            return
        ext = self.view.extents(off, length, 1 if flags & proto.CMD_FLAG_REQ_ONE else MAX_EXTENTS)
        body = proto.U32.pack(self.ctx_id) + b"".join(proto.EXTENT.pack(n, f) for n, f in ext)
        self._out(SR.pack(XMAGIC, DONE, proto.REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body)
