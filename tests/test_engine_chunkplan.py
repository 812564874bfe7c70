"""chunk_runs against a brute-force per-chunk reference."""

from collections import namedtuple

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.engine.chunkplan import CLEAN_ZERO, READ, SKIP, ZERO, Run, chunk_runs

Ext = namedtuple("Ext", "offset length dirty zero")


def reference(extents, cs, size, all_dirty=False, force_from=None, clean_zero=False):
    n = (size + cs - 1) // cs
    dirty = [False] * n
    zero = [True] * n
    covered = [0] * n
    for e in extents:
        for b in range(e.offset, min(e.offset + e.length, size)):
            ci = b // cs
            covered[ci] += 1
            dirty[ci] |= e.dirty or all_dirty
            zero[ci] &= e.zero
    acts = []
    for ci in range(n):
        clen = min(cs, size - ci * cs)
        d, z = dirty[ci], zero[ci]
        if covered[ci] < clen:       # gaps count as dirty data
            d, z = True, False
        if force_from is not None and ci >= force_from and not d:
            d, z = True, False
        acts.append((CLEAN_ZERO if z and clean_zero else SKIP) if not d else ZERO if z else READ)
    return acts


def expand(runs):
    acts = []
    pos = 0
    for r in runs:
        assert isinstance(r, Run) and r.start == pos and r.end > r.start
        acts += [r.action] * (r.end - r.start)
        pos = r.end
    return acts


@st.composite
def extent_lists(draw):
    cs = draw(st.sampled_from([4, 8, 16]))
    size = draw(st.integers(1, 120))
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=12)) if size > 1 else []))
    bounds = [0, *cuts, size]
    exts = [Ext(a, b - a, draw(st.booleans()), draw(st.booleans())) for a, b in zip(bounds, bounds[1:])]
    if exts and draw(st.booleans()):         # a gap, which must be read
        exts.pop(draw(st.integers(0, len(exts) - 1)))
    if exts and draw(st.booleans()):         # the last extent runs past the end
        last = exts[-1]
        exts[-1] = last._replace(length=last.length + 7)
    return cs, size, exts


@settings(max_examples=400, deadline=None)
@given(extent_lists(), st.booleans(), st.one_of(st.none(), st.integers(0, 40)), st.booleans())
def test_matches_reference(case, all_dirty, force_from, clean_zero):
    cs, size, exts = case
    runs = list(chunk_runs(exts, chunk_size=cs, size=size, all_dirty=all_dirty, force_from=force_from,
                           clean_zero=clean_zero))
    assert expand(runs) == reference(exts, cs, size, all_dirty, force_from, clean_zero)
    # merged: no two neighbours with the same action
    assert all(a.action != b.action for a, b in zip(runs, runs[1:]))


def test_big_disk_few_runs():
    """A 16 TiB disk with one dirty range gives three runs, not millions."""
    size = 16 << 40
    cs = 1 << 20
    exts = [Ext(0, 5 << 30, False, False), Ext(5 << 30, 64 << 10, True, False),
            Ext((5 << 30) + (64 << 10), size, False, True)]
    runs = list(chunk_runs(iter(exts), chunk_size=cs, size=size))
    assert runs == [Run(0, 5120, SKIP), Run(5120, 5121, READ), Run(5121, size // cs, SKIP)]
