"""Walk an export's extents lazily, one block-status window at a time.

Memory stays bounded by one window's reply, whatever the export's size:
nothing is collected, runs are merged and yielded as they come. A server
may answer for less than the window; the walk continues from where the
shortest context's answer ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..errors import NbdProtocolError, NotFound, UsageError
from . import proto

# Block status lengths are u32; stay aligned for any minimum block size up to 1 MiB.
DEFAULT_WINDOW = (1 << 32) - (1 << 20)


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    dirty: bool      # must be read (True everywhere without a bitmap)
    zero: bool       # reads as zeroes (False everywhere without base:allocation)

    @property
    def end(self) -> int:
        return self.offset + self.length


def _range(source, offset: int, length: int | None) -> tuple[int, int]:
    size = source.size
    end = size if length is None else offset + length
    if offset < 0 or end < offset or end > size:
        raise UsageError(f"range [{offset}, {end}) is outside the export (size {size})")
    return offset, end


def _windows(source, contexts: list[str], offset: int, end: int, window: int) -> Iterator[tuple[int, list[list]]]:
    """(pos, [[length, flags]...] per context) for consecutive pieces, all covering the same length."""
    pos = offset
    while pos < end:
        ask = min(window, end - pos)
        reply = source.block_status(pos, ask)
        lists = []
        for name in contexts:
            got = reply.get(name)
            if not got:
                raise NbdProtocolError(f"the server sent no block status for {name} at offset {pos}")
            lists.append(got)
        covered = min(sum(n for n, _ in lst) for lst in lists)
        covered = min(covered, ask)
        out = []
        for lst in lists:
            clipped, left = [], covered
            for n, f in lst:
                if left <= 0:
                    break
                clipped.append((min(n, left), f))
                left -= n
            out.append(clipped)
        yield pos, out
        pos += covered


def walk_context(source, context: str, offset: int = 0, length: int | None = None,
                 window: int = DEFAULT_WINDOW) -> Iterator[tuple[int, int, int]]:
    """(offset, length, flags) of one context; adjacent extents with equal flags merged."""
    offset, end = _range(source, offset, length)
    if context not in source.contexts:
        raise NotFound(f"the server did not agree to meta context {context!r}",
                       hint="see the offered contexts with `nbdbackup info URI`")
    cur = None
    for pos, (lst,) in _windows(source, [context], offset, end, window):
        for n, f in lst:
            if cur and cur[2] == f:
                cur[1] += n
            else:
                if cur:
                    yield tuple(cur)
                cur = [pos, n, f]
            pos += n
    if cur:
        yield tuple(cur)


def walk_extents(source, bitmap_context: str | None = None, offset: int = 0, length: int | None = None,
                 window: int = DEFAULT_WINDOW) -> Iterator[Extent]:
    """Runs of (dirty, zero) merged from base:allocation and a dirty bitmap.

    *source* is a Client or a ConnectionPool. Without a bitmap everything is
    dirty; without base:allocation nothing is known to be zero.
    """
    offset, end = _range(source, offset, length)
    if bitmap_context is not None and bitmap_context not in source.contexts:
        raise NotFound(f"the server did not agree to meta context {bitmap_context!r} (no such bitmap?)")
    contexts = []
    use_alloc = proto.CONTEXT_BASE_ALLOCATION in source.contexts
    if use_alloc:
        contexts.append(proto.CONTEXT_BASE_ALLOCATION)
    if bitmap_context is not None:
        contexts.append(bitmap_context)

    cur: list | None = None   # [offset, length, dirty, zero]

    def runs():
        if not contexts:
            if end > offset:
                yield offset, end - offset, True, False
            return
        for pos, lists in _windows(source, contexts, offset, end, window):
            alloc = lists[0] if use_alloc else None
            bitmap = lists[-1] if bitmap_context is not None else None
            yield from _merge(pos, alloc, bitmap)

    for pos, n, dirty, zero in runs():
        if cur and cur[2] == dirty and cur[3] == zero:
            cur[1] += n
        else:
            if cur:
                yield Extent(*cur)
            cur = [pos, n, dirty, zero]
    if cur:
        yield Extent(*cur)


def _merge(pos: int, alloc, bitmap):
    """Intersect two extent lists of equal total length into (pos, len, dirty, zero) runs."""
    a = iter(alloc or ())
    b = iter(bitmap or ())
    an = bn = 0
    af = bf = 0
    total = sum(n for n, _ in (alloc or bitmap))
    done = 0
    while done < total:
        if alloc is not None and an == 0:
            an, af = next(a)
        if bitmap is not None and bn == 0:
            bn, bf = next(b)
        step = min(x for x in (an if alloc is not None else None, bn if bitmap is not None else None)
                   if x is not None)
        zero = bool(af & proto.STATE_ZERO) if alloc is not None else False
        dirty = bool(bf & proto.STATE_DIRTY) if bitmap is not None else True
        yield pos + done, step, dirty, zero
        done += step
        an -= step if alloc is not None else 0
        bn -= step if bitmap is not None else 0
