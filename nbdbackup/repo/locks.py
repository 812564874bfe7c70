"""flock-based repository locks with holder information.

A lock is a file in locks/; flock() is released by the kernel when the
holder dies, so a killed run never leaves a lock behind. Beside it each
holder writes `<lock>@<pid>-<n>.holder` (pid, host, command line, since) so a
blocked user is told who holds it; info files of dead pids on this host are
removed when seen. Where locks/ cannot be written (a read-only mount, another
user's repository) a shared lock is an flock on the file opened read-only and
no holder file is written; on a read-only file system without the lock file no
lock is taken at all, since nobody can write there (docs/design.md).

Lock names used by the repository:
  writers       shared by every backup writer; exclusive for gc
  disk-<name>   exclusive per disk while a backup of it is written
  image-<hash>  exclusive per --image file while a run uses it (sources/image.py)
  readers       shared by readers (restore, serve, verify); exclusive for gc
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import time

from ..errors import LockedError, storage_error

_HOST = socket.gethostname()

# A shared lock is tried this long even with --lock-wait 0: a gc waiting for its exclusive
# locks holds one for an instant when it probes (exclusive.py), and a backup or restore
# starting at that instant must not fail. A held exclusive lock still fails after it.
SHARED_GRACE_S = 0.1


def pid_alive(pid: int) -> bool:
    """Is process *pid* of this host alive (not necessarily ours)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def masked_command(argv: list[str] | None = None) -> str:
    """The command line for a holder row, passwords of URLs masked."""
    cmd = " ".join(sys.argv if argv is None else argv)
    cmd = re.sub(r"(://[^/:@\s]*:)[^@\s]*@", r"\1***@", cmd)
    return re.sub(r"(password=)[^&\s]*", r"\1***", cmd, flags=re.IGNORECASE)



class RepoLock:
    """One held lock; release() (or close of the process) frees it."""

    def __init__(self, lock_dir: str, name: str, *, exclusive: bool, wait: float = 0.0,
                 purpose: str | None = None):
        self.lock_dir = lock_dir
        self.name = name
        self.exclusive = exclusive
        self.path = os.path.join(lock_dir, name)
        self._fd: int | None = None
        self._info_path: str | None = None
        self._acquire(wait, purpose)

    def _acquire(self, wait: float, purpose: str | None) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            fd = self._open_read_only(e)
            if fd is None:
                return      # a read-only file system: nobody can write, so nothing to lock against
        op = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + max(wait, 0.0 if self.exclusive else SHARED_GRACE_S)
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockedError(self._blocked_message(purpose),
                                      hint="wait for it to finish, or pass --lock-wait SECONDS") from None
                pause = 0.1 if wait > 0 else 0.005    # within the short grace only, retry often
                time.sleep(min(pause, max(deadline - time.monotonic(), pause / 10)))
        self._fd = fd
        if not os.access(self.lock_dir, os.W_OK):
            return      # a read-only locks/: holder info is a courtesy we cannot give here
        read_holders(self.lock_dir, self.name)   # drops info files of dead holders
        self._info_path = f"{self.path}@{os.getpid()}-{id(self):x}.holder"   # '@' never occurs in lock names
        info = {"pid": os.getpid(), "host": _HOST, "command": masked_command(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "mode": "exclusive" if self.exclusive else "shared", "purpose": purpose}
        try:
            with open(self._info_path, "w") as f:
                json.dump(info, f)
        except OSError:
            self._info_path = None   # the lock itself is what counts; info is a courtesy

    def _open_read_only(self, e: OSError) -> int | None:
        """Where locks/ cannot be written, a shared lock is taken on the lock file opened
        read-only (flock needs no write access); exclusive ones cannot be had there."""
        what = f"taking the {self.name} lock"
        if self.exclusive or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise storage_error(e.errno, self.lock_dir, what) or e
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if e.errno == errno.EROFS:
                return None
            raise storage_error(e.errno, self.lock_dir, what) from None
        except OSError as e2:
            raise storage_error(e2.errno, self.lock_dir, what) or e2 from None

    def _blocked_message(self, purpose: str | None) -> str:
        what = purpose or f"lock {self.name}"
        hs = read_holders(self.lock_dir, self.name)
        if not hs:
            return f"repository is locked: cannot take {what} (holder unknown)"
        desc = "; ".join(f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} "
                         f"({h.get('mode')}): {h.get('command')}" for h in hs)
        return f"repository is locked: cannot take {what}; held by {desc}"

    def release(self) -> None:
        if self._fd is None:
            return
        if self._info_path:
            try:
                os.unlink(self._info_path)
            except OSError:
                pass
        os.close(self._fd)   # drops the flock
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class FlockLocks:
    """The lock service of a repository on one host: flock'ed files in *lock_dir*.

    The interface every lock service has (an index on PostgreSQL has another, for many
    hosts): lock() takes one, probe_free() tests one without waiting or leaving a trace,
    holders() says who holds one (pid, host, command, since, mode, purpose)."""

    def __init__(self, lock_dir: str):
        self.lock_dir = lock_dir

    def lock(self, name: str, *, exclusive: bool, wait: float = 0.0, purpose: str | None = None) -> RepoLock:
        return RepoLock(self.lock_dir, name, exclusive=exclusive, wait=wait, purpose=purpose)

    def probe_free(self, name: str) -> bool:
        """Is lock *name* free right now? Holds it for two system calls only (no holder file)."""
        try:
            fd = os.open(os.path.join(self.lock_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return True          # let the real attempt report the problem
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)         # drops the probe's lock

    def holders(self, name: str) -> list[dict]:
        return read_holders(self.lock_dir, name)

    def close(self) -> None:
        pass


def read_holders(lock_dir: str, name: str) -> list[dict]:
    """Holder infos of lock *name*; removes info files of dead local pids."""
    out = []
    try:
        entries = os.listdir(lock_dir)
    except OSError:
        return out
    for f in sorted(entries):
        if not (f.startswith(name + "@") and f.endswith(".holder")):
            continue
        p = os.path.join(lock_dir, f)
        try:
            with open(p) as fh:
                info = json.load(fh)
        except (OSError, ValueError):
            continue
        if info.get("host") == _HOST and not pid_alive(int(info.get("pid", 0))):
            try:
                os.unlink(p)
            except OSError:
                pass
            continue
        out.append(info)
    return out
