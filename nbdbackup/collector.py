"""When Python's cycle collector may run: not during start-up, not inside a data pipeline.

A collection walks every tracked object of the process, and after start-up most of them
are what the imports made (SQLAlchemy builds many). Neither start-up nor a pipeline (the
backup's read -> prepare -> put loop) makes cycles worth collecting, so both hold the
collector off; it runs again once no holder is left. After start-up the objects alive
then are frozen (gc.freeze): later collections skip them. Freezing never keeps an object
alive: reference counting still frees it; only a cycle among frozen objects would stay.

Holders nest and may end in any order (start-up ends on a timer thread, possibly in the
middle of a pipeline), hence a count instead of each saving and restoring gc.isenabled().
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0


def hold() -> None:
    """Keep the collector off until the matching release()."""
    global _holders
    with _lock:
        _holders += 1
        gc.disable()


def release() -> None:
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            gc.enable()


@contextmanager
def held():
    hold()
    try:
        yield
    finally:
        release()


def start_up_done() -> None:
    """Start-up is over: freeze what it made, and release its hold."""
    gc.freeze()
    release()
