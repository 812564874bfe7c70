"""Taking the writers AND readers locks exclusively (gc, rebuild-index).

Never holds one while waiting for the other: a gc waiting (--lock-wait) for a
long restore must not block the nightly backups meanwhile. Both locks are
tried without waiting; on failure whatever was taken is released and the
pair is tried again until the repository's lock_wait runs out.
"""

from __future__ import annotations

import contextlib
import time

from ..errors import LockedError

_RETRY = 0.1


@contextlib.contextmanager
def exclusive_access(repo, what: str):
    deadline = time.monotonic() + max(repo.lock_wait, 0.0)
    while True:
        taken = []
        try:
            taken.append(repo.lock("writers", exclusive=True, wait=0,
                                   purpose=f"exclusive access for {what} (a backup is running)"))
            taken.append(repo.lock("readers", exclusive=True, wait=0,
                                   purpose=f"exclusive access for {what} (a restore, serve or verify is reading)"))
            break
        except LockedError:
            for lk in reversed(taken):
                lk.release()
            if time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY)
    try:
        yield
    finally:
        for lk in reversed(taken):
            lk.release()
