"""Small Future combinators for the client (results arrive on receiver threads)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError


def resolve(f: Future, result=None, exc: BaseException | None = None) -> None:
    """Complete *f*, unless the caller cancelled it meanwhile."""
    try:
        if exc is not None:
            f.set_exception(exc)
        else:
            f.set_result(result)
    except InvalidStateError:
        pass


def settle(f: Future, fn, *args) -> None:
    """Complete *f* with fn(*args), or with the exception it raised."""
    try:
        result = fn(*args)
    except BaseException as ex:  # noqa: BLE001 - surfaced through the future
        resolve(f, exc=ex)
    else:
        resolve(f, result)


def done_future(result=None) -> Future:
    f: Future = Future()
    f.set_result(result)
    return f


def relay(src: Future, dst: Future, result) -> None:
    """dst gets src's exception, or *result*."""
    e = src.exception()
    resolve(dst, result, e)


def then_map(src: Future, fn) -> Future:
    """A future of fn(src.result())."""
    out: Future = Future()

    def done(f: Future) -> None:
        e = f.exception()
        if e is not None:
            resolve(out, exc=e)
            return
        settle(out, fn, f.result())
    src.add_done_callback(done)
    return out


def gather(futs: list[Future], result_fn) -> Future:
    """One future for several: the first error, or result_fn() when all succeeded."""
    out: Future = Future()
    if not futs:
        resolve(out, result_fn())
        return out
    left = [len(futs)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def done(f: Future) -> None:
        e = f.exception()
        with lock:
            if e is not None:
                errors.append(e)
            left[0] -= 1
            last = left[0] == 0
        if not last:
            return
        if errors:
            resolve(out, exc=errors[0])
            return
        settle(out, result_fn)

    for f in futs:
        f.add_done_callback(done)
    return out


def then(futs: list[Future], next_fn) -> Future:
    """After all *futs* succeed, start next_fn() (a future) and follow it."""
    out: Future = Future()

    def first_done(g: Future) -> None:
        e = g.exception()
        if e is not None:
            resolve(out, exc=e)
            return
        try:
            nxt = next_fn()
        except BaseException as ex:  # noqa: BLE001
            resolve(out, exc=ex)
            return
        nxt.add_done_callback(lambda h: relay(h, out, None))

    gather(futs, lambda: None).add_done_callback(first_done)
    return out
