"""A watchdog that ends the guestfish server if we die.

The server is our child's child (`guestfish --listen` forks and its parent exits), so no
PR_SET_PDEATHSIG reaches it. The watchdog, a tiny python of its own, holds the read end of a
pipe whose write end only we hold (pipes are not inherited by other children). EOF without
the byte release() sends means we died, SIGKILL too: it then ends the server, and libguestfs's
recovery process ends the appliance's qemu. It checks first that the pid is still a guestfish
(a pid is reused once its process is gone).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

SCRIPT = """
import os, signal, sys, time
pid = int(sys.argv[1])
if sys.stdin.buffer.read(1) != b"":
    sys.exit(0)
try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        ours = b"guestfish" in f.read()
except OSError:
    ours = False
if ours:
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
    else:
        os.kill(pid, signal.SIGKILL)
"""


class Watchdog:
    """Ends guestfish *pid* once we are gone, unless release() came first."""

    def __init__(self, pid: int):
        read_end, self._pipe = os.pipe()
        try:
            # its own session: a terminal's SIGHUP or ^C to our group must not take it with us
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", SCRIPT, str(pid)], stdin=read_end,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={}, start_new_session=True)
        except BaseException:
            os.close(self._pipe)
            raise
        finally:
            os.close(read_end)

    def release(self) -> None:
        """A clean stop: the server is ended already; the watchdog exits doing nothing."""
        fd, self._pipe = self._pipe, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"x")
            os.close(fd)
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
