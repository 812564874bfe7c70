"""Taking the writers, readers AND gc locks exclusively (rebuild-index, migrate).

gc itself no longer comes here: it runs beside writers and readers and takes
only the gc lock (one gc at a time, repo/gc.py); what needs the repository to
itself (rebuild-index, migrate) takes all three, so it excludes gc too.

Never holds one while waiting for the other: a gc waiting (--lock-wait) for a
long restore must not block the nightly backups meanwhile. While either lock
is busy gc only probes (a flock held for two system calls, no holder file);
when both look free it takes both without waiting, releasing what it got if
the second is busy after all, until the repository's lock_wait runs out.
Once the wait is over the real attempt runs, so the error names the holder, and
says from the holder files what kind of run it is: a backup (writers, shared), a
restore/serve/verify (readers, shared), or another gc/rebuild-index (exclusive).
"""

from __future__ import annotations

import contextlib
import time

from ..errors import LockedError

_RETRY = 0.2


_PURPOSE = "exclusive access for "
_SHARED_REASON = {"writers": "a backup is running", "readers": "a restore, serve or verify is reading"}
NAMES = ("writers", "readers", "gc")


def _busy_reason(locks, name: str) -> str:
    """Who holds lock *name*, in words, from its holder records."""
    holders = locks.holders(name)
    for h in holders:
        if h.get("mode") == "exclusive":
            purpose = h.get("purpose") or ""
            other = purpose[len(_PURPOSE):].split()[0] if purpose.startswith(_PURPOSE) else \
                "migrate" if "migrate" in purpose else "exclusive run (gc, rebuild-index or migrate)"
            return f"another {other} is running"
    if holders and name == "gc":
        return "a gc is running"
    if holders:
        return _SHARED_REASON.get(name, f"lock {name} is held")
    return "another run holds the repository"


@contextlib.contextmanager
def exclusive_access(repo, what: str):
    deadline = time.monotonic() + max(repo.lock_wait, 0.0)
    while True:
        taken = []
        name = NAMES[0]
        try:
            # while a reader or writer runs, only probe: a backup or restore starting meanwhile
            # must not meet a gc that is merely waiting
            if time.monotonic() < deadline and not all(repo.locks.probe_free(n) for n in NAMES):
                time.sleep(_RETRY)
                continue
            for name in NAMES:
                taken.append(repo.lock(name, exclusive=True, wait=0, purpose=_PURPOSE + what))
            break
        except LockedError as e:
            for lk in reversed(taken):
                lk.release()
            if time.monotonic() >= deadline:
                raise LockedError(f"{_busy_reason(repo.locks, name)}, so {what} cannot run now: {e}",
                                  hint=e.hint) from None
            time.sleep(_RETRY)
    try:
        yield
    finally:
        for lk in reversed(taken):
            lk.release()
