"""The engine's retry policy for requests to the source, shared by the backup pipeline
and the chain check: a server error (EIO...) is retried opts.retries times with
back-off; the pool itself already reconnects and resends after a dropped connection."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, TypeVar

from ..errors import NbdCommandError, NbdConnectionError, NbdError, NbdProtocolError, SourceFailed
from ..nbd.proto import EINVAL
from .options import BackupOptions

if TYPE_CHECKING:
    from ..nbd.pool import ConnectionPool

log = logging.getLogger("nbdbackup.engine.backup")     # the pipeline's name in log files, as before the split

T = TypeVar("T")


def read_with_retries(pool: ConnectionPool, offset: int, length: int, opts: BackupOptions,
                      first_error: NbdError | None = None) -> bytes:
    """pool.read, again after a server error. *first_error*: how the first attempt
    (made asynchronously) failed."""
    def read() -> bytes:
        data = pool.read(offset, length)
        if len(data) != length:
            raise NbdProtocolError(f"read of {length} bytes at {offset} returned {len(data)}")
        return data
    return with_retries("reading", pool, offset, length, read, opts, first_error)


class RetryingBlockStatus:
    """The pool as walk_extents sees it, with block status retried like reads."""

    def __init__(self, pool: ConnectionPool, opts: BackupOptions):
        self.pool, self.opts = pool, opts

    size = property(lambda self: self.pool.size)
    contexts = property(lambda self: self.pool.contexts)

    def block_status(self, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
        return with_retries("block status of", self.pool, offset, length,
                            lambda: self.pool.block_status(offset, length), self.opts)


def with_retries(what: str, pool: ConnectionPool, offset: int, length: int, request: Callable[[], T],
                 opts: BackupOptions, first_error: NbdError | None = None) -> T:
    """request(), again after a server error, opts.retries times with back-off.
    A protocol violation is raised as it is; EINVAL (the server calls the request
    invalid: no retry changes that) and the last failure become SourceFailed."""
    delay = opts.retry_delay
    error, attempt = first_error, 0
    while True:
        if error is None:
            try:
                return request()
            except NbdError as e:
                error = e
        if isinstance(error, NbdProtocolError):
            raise error     # a misbehaving server: its own exit code, no retry
        if isinstance(error, NbdCommandError) and error.errno == EINVAL:
            raise invalid_request(what, pool, offset, length, error) from None
        if attempt == opts.retries or isinstance(error, NbdConnectionError):
            raise gave_up(what, offset, length, attempt + 1, error) from None
        log.warning("%s %d bytes at offset %d failed (%s); retrying in %.1fs", what, length, offset, error, delay)
        time.sleep(delay)
        delay *= 2
        error, attempt = None, attempt + 1


def gave_up(what: str, offset: int, length: int, attempts: int, error: NbdError) -> SourceFailed:
    """The request failed for good (retries used up, or the connection is gone)."""
    return SourceFailed(f"{what} {length} bytes at offset {offset} failed after {attempts} attempt(s): {error}",
                        hint="nothing was committed; check the NBD server and retry")


def invalid_request(what: str, pool: ConnectionPool, offset: int, length: int, e: NbdError) -> SourceFailed:
    """What was asked, what the server allows, and why it cannot be asked otherwise."""
    size, mb = pool.size, pool.min_block
    allows = (f"the export (size {size}) takes requests aligned to {mb} bytes (preferred "
              f"{pool.preferred_block}, at most {pool.max_block})")
    if size % mb and offset + length == size:
        why = (f"its size is not a multiple of its minimum block size, so the last {size % mb} bytes "
               "cannot be asked for in an aligned request")
        hint = (f"nothing was committed; make the export's size a multiple of {mb} bytes, "
                "or have the server accept unaligned tails")
    else:
        why = "a retry would be refused the same way"
        hint = "nothing was committed; check the server's block-size limits and log"
    return SourceFailed(f"{what} {length} bytes at offset {offset} was refused as invalid (EINVAL): {allows}; "
                        f"{why} (server said: {e})", hint=hint)
