"""base:allocation extents of an ExportView: overlay states over the backup's zero map."""

from __future__ import annotations

from . import proto
from .overlay import BACKING, DATA


def view_extents(view, off: int, length: int, max_extents: int) -> list[tuple[int, int]]:
    """base:allocation extents (length, flags) of *view* from *off*, clamped to the request."""
    hz = proto.STATE_HOLE | proto.STATE_ZERO
    out: list[list[int]] = []

    def add(n: int, flags: int) -> bool:
        if out and out[-1][1] == flags:
            out[-1][0] += n
        elif len(out) >= max_extents:
            return False
        else:
            out.append([n, flags])
        return True

    cs = view.cs
    for a, b, st in view.segments(off, off + length):
        if st == DATA:
            ok = add(b - a, 0)
        elif st != BACKING:
            ok = add(b - a, hz)
        else:
            ok = True
            for i in view.chunk_range(a, b):
                lo = max(a, i * cs)
                hi = min(b, (i + 1) * cs)
                if not add(hi - lo, hz if view.backend.is_zero(i) else 0):
                    ok = False
                    break
        if not ok:
            break
    # Extent lengths are u32 on the wire.
    res = []
    for n, f in out:
        while n > 0:
            step = min(n, 0xFFFFF000)
            res.append((step, f))
            n -= step
    return res[:max_extents]
