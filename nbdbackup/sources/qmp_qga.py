"""Freezing guest file systems through the qemu guest agent (--qga SOCKET).

The agent speaks line-delimited JSON over the host end of a virtio-serial
channel. A guest-sync with a random id first discards any stale reply left
in the channel by an earlier, interrupted client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import time

from ..errors import SourceFailed, SourceUnreachable

log = logging.getLogger(__name__)

TIMEOUT = 10.0
THAW_ATTEMPTS = 3


class GuestAgent:
    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise SourceUnreachable(f"cannot connect to the guest agent socket {path}: {e.strerror or e}",
                                    hint="is qemu-guest-agent running in the guest, and is PATH the "
                                         "host end of its channel (org.qemu.guest_agent.0)?") from None
        self._buf = b""
        self._sync()

    def _send(self, cmd: str, args: dict | None = None) -> None:
        msg = {"execute": cmd} | ({"arguments": args} if args else {})
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise SourceFailed(f"guest agent {self.path}: sending {cmd} failed: {e}") from None

    def _reply(self, cmd: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise SourceFailed(f"guest agent did not answer {cmd} within {self.timeout:.0f}s")
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise SourceFailed(f"guest agent {self.path}: no answer to {cmd}: {e}") from None
            if not chunk:
                raise SourceFailed(f"guest agent {self.path} closed the connection during {cmd}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line.strip(b"\xff") or b"{}")
        except ValueError:
            raise SourceFailed(f"guest agent sent something that is not JSON: {line[:80]!r}") from None
        return msg if isinstance(msg, dict) else {}

    def call(self, cmd: str, args: dict | None = None):
        self._send(cmd, args)
        msg = self._reply(cmd)
        if "error" in msg:
            desc = (msg["error"] or {}).get("desc", msg["error"])
            raise SourceFailed(f"guest agent {cmd} failed: {desc}")
        if "return" not in msg:
            raise SourceFailed(f"guest agent gave no result for {cmd}: {msg}")
        return msg["return"]

    def _sync(self) -> None:
        token = secrets.randbelow(2**31)
        self._send("guest-sync", {"id": token})
        for _ in range(64):     # skip stale replies of an earlier client
            if self._reply("guest-sync").get("return") == token:
                return
        raise SourceFailed(f"guest agent {self.path} did not echo guest-sync")

    def freeze(self) -> int:
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> None:
        """Thaw, retrying: a guest left frozen is worse than a failed backup."""
        last = None
        for _ in range(THAW_ATTEMPTS):
            try:
                self.call("guest-fsfreeze-thaw")
                return
            except SourceFailed as e:
                last = e
                log.warning("%s; retrying", e)
        raise SourceFailed(f"could not thaw the guest file systems: {last}",
                           hint="run `guest-fsfreeze-thaw` through the agent by hand NOW: "
                                "the guest's writes are blocked")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class Freeze:
    thawed = False      # True once the guest is known not to be frozen by us


@contextlib.contextmanager
def frozen(path: str | None):
    """Freeze the guest for the duration of the block (no-op without a path).

    Thaw runs on every exit, also when the freeze itself failed half-way.
    Yields a Freeze whose `thawed` tells, afterwards, whether thaw succeeded.
    """
    state = Freeze()
    if not path:
        state.thawed = True
        yield state
        return
    try:
        agent = GuestAgent(path)
    except BaseException:
        state.thawed = True     # never reached the guest: nothing frozen
        raise
    try:
        try:
            n = agent.freeze()
            log.info("guest agent froze %d file system(s)", n)
            yield state
        finally:
            agent.thaw()
            state.thawed = True
    finally:
        agent.close()


def thaw_leftover(path: str) -> None:
    """Thaw a guest that a killed run left frozen (best effort: warn on failure)."""
    try:
        agent = GuestAgent(path)
    except Exception as e:
        log.warning("a killed run may have left the guest frozen, and its agent %s is unreachable: %s",
                    path, e)
        return
    try:
        agent.thaw()
        log.warning("thawed the guest file systems a killed run had frozen")
    except Exception as e:
        log.warning("%s", e)
    finally:
        agent.close()
