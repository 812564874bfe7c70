"""A synchronous QMP connection built on the asyncio `qemu.qmp` library.

The library's client runs in a private event loop on a daemon thread, so the
(synchronous, threaded) engine never shares an event loop with it. Every call
has a timeout; a QMP socket that accepts but never greets (another client is
already connected: each -qmp socket serves one) fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout

from ..errors import QmpCommandError, SourceFailed, SourceUnreachable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


class Qmp:
    """One QMP session; use as a context manager or call close()."""

    def __init__(self, path: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT):
        from qemu.qmp import QMPClient

        self.path = path
        self.command_timeout = command_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._client = QMPClient("nbdbackup")
        try:
            self._run(self._client.connect(path), connect_timeout)
        except FutureTimeout:
            self.close()
            raise SourceUnreachable(
                f"QMP socket {path} accepted the connection but qemu did not greet within "
                f"{connect_timeout:.0f}s", hint="each -qmp socket serves one client: is another "
                "client (libvirt, a monitor) connected to it? give qemu a second -qmp socket") from None
        except Exception as e:
            self.close()
            raise SourceUnreachable(f"cannot connect to QMP socket {path}: {_reason(e)}",
                                    hint="is the VM running, and is PATH its -qmp unix socket?") from None

    def _run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def cmd(self, name: str, args: dict | None = None, *, timeout: float | None = None):
        """Execute *name*; return its result or raise QmpCommandError / SourceFailed."""
        from qemu.qmp import ExecuteError

        log.debug("QMP -> %s %s", name, args or "")
        try:
            res = self._run(self._client.execute(name, args or None), timeout or self.command_timeout)
        except ExecuteError as e:
            log.debug("QMP <- %s error: %s", name, e)
            raise QmpCommandError(name, e.error_class, str(e)) from None
        except FutureTimeout:
            raise SourceFailed(f"QMP {name} got no answer within {timeout or self.command_timeout:.0f}s "
                               f"on {self.path}") from None
        except Exception as e:
            raise SourceFailed(f"QMP connection to {self.path} failed during {name}: {_reason(e)}") from None
        return res

    def listen(self, names: list[str]) -> "EventQueue":
        """Queue the events *names* from now on (register before the command that causes them)."""
        from qemu.qmp import EventListener

        listener = EventListener(names)
        self._client.register_listener(listener)
        return EventQueue(self._loop, listener)

    @property
    def connected(self) -> bool:
        """False once qemu closed the session (it quit or was killed)."""
        return self._client.runstate.name == "RUNNING"

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._client.runstate.name != "IDLE":
                self._run(self._client.disconnect(), 5.0)
        except Exception as e:  # closing a broken session: nothing left to do
            log.debug("QMP disconnect: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EventQueue:
    """Events of one Qmp.listen(), taken in order; get() waits at most *timeout* seconds."""

    def __init__(self, loop, listener):
        self._loop = loop           # the session's loop (Qmp's thread)
        self._listener = listener
        # one listener.get() kept alive across timed-out calls: cancelling it could drop an
        # event it took just as the timeout struck (a lost BLOCK_JOB_COMPLETED became exit 24)
        self._pending = None

    def get(self, timeout: float) -> dict | None:
        """The next event as a dict ({"event": NAME, "data": {...}, "timestamp": ...}), or None
        when none came within *timeout* seconds."""
        if self._pending is None:
            self._pending = asyncio.run_coroutine_threadsafe(self._listener.get(), self._loop)
        try:
            event = self._pending.result(timeout)
        except FutureTimeout:
            return None
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        return dict(event)


def _reason(e: BaseException) -> str:
    # qemu.qmp wraps OS errors in ConnectError(msg, exc); show the root cause.
    inner = getattr(e, "exc", None)
    return f"{e}: {inner}" if inner is not None and str(inner) not in str(e) else str(e) or type(e).__name__
