"""The requests of one connection that were sent and not yet answered.

Sender threads add a Pending under the client's send lock; the connection's
receiver thread (replies.ReplyReader) looks each reply's cookie up here and
finishes the request, which resolves its Future. fail() ends the connection:
every request still outstanding fails with the same error, kept in .error.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from ..errors import NbdCommandError, NbdError
from . import proto
from .futures import resolve


class Pending:
    """One request waiting for its reply."""

    __slots__ = ("cmd", "offset", "length", "future", "buf", "df", "req_one", "cookie",
                 "ranges", "error", "extents", "content_chunks", "zero_holes", "result")

    def __init__(self, cmd: int, offset: int, length: int, *, buf: memoryview | None = None,
                 df: bool = False, req_one: bool = False, zero_holes: bool = False, result=None):
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.future: Future = Future()
        self.buf = buf
        self.df = df
        self.req_one = req_one
        self.cookie = 0
        self.ranges: list[tuple[int, int]] = []   # (offset, length) of data/hole chunks
        self.error: NbdCommandError | None = None
        self.extents: dict[str, list[tuple[int, int]]] = {}
        self.content_chunks = 0
        self.zero_holes = zero_holes   # False when buf started zeroed (a fresh bytearray)
        self.result = result           # what the future resolves to (default: None / extents)

    @property
    def what(self) -> str:
        return f"{proto.command_name(self.cmd)} [{self.offset}, +{self.length}]"

    def request_fields(self) -> dict[str, int]:
        """What an NbdCommandError for this request carries about it."""
        return {"command": self.cmd, "request_offset": self.offset, "request_length": self.length}


class InFlight:
    """Pending requests by cookie, and the error that ended the connection (None while alive)."""

    def __init__(self):
        self.error: NbdError | None = None
        self._by_cookie: dict[int, Pending] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def outstanding(self) -> int:
        return len(self._by_cookie)

    def add(self, p: Pending) -> None:
        with self._lock:
            self._by_cookie[p.cookie] = p

    def get(self, cookie: int) -> Pending | None:
        with self._lock:
            return self._by_cookie.get(cookie)

    def finish(self, p: Pending, result=None, exc=None) -> None:
        """*p* is answered: resolve its future with *result* or *exc*."""
        with self._lock:
            self._by_cookie.pop(p.cookie, None)
            if not self._by_cookie:
                self._idle.notify_all()
        resolve(p.future, result, exc)

    def fail(self, err: NbdError) -> None:
        """Fail every outstanding request; the connection is unusable from now on."""
        with self._lock:
            if self.error is None:
                self.error = err
            pending = list(self._by_cookie.values())
            self._by_cookie.clear()
            self._idle.notify_all()
        for p in pending:
            resolve(p.future, exc=err)

    def wait_idle(self, timeout: float) -> None:
        """Until nothing is outstanding, the connection failed, or *timeout* seconds passed."""
        with self._idle:
            self._idle.wait_for(lambda: not self._by_cookie or self.error is not None, timeout)
