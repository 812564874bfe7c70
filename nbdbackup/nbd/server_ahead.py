"""Read-ahead for sequential readers of an ExportView (see server_view's docstring).

A mixin: it shares the view's chunk state (_inflight, _ahead_busy) and starts
reads with the view's _start().
"""

from __future__ import annotations

import asyncio

READ_AHEAD = 4 << 20       # read past a sequential miss
MAX_AHEAD = 64             # chunks being read ahead per view, at most
_STREAMS = 32              # sequential streams remembered per view


class ReadAhead:
    def _read_ahead_of(self, idxs: list[int]) -> list[int]:
        """For misses *idxs* (sorted): the chunks to read ahead, when they continue a stream."""
        if not idxs or not self._ahead:
            return []
        first, last = idxs[0], idxs[-1]
        hit = first if first in self._next else first + 1 if first + 1 in self._next else None
        if hit is None:
            self._remember(last + 1)
            return []
        del self._next[hit]
        return self._window(last + 1)

    def _window(self, start: int) -> list[int]:
        """The chunks of the read-ahead window from *start* still to read (as room allows);
        remembers where the stream goes on and which chunk starts the window after it."""
        end = min(start + self._ahead, -(-self.size // self.cs))
        room = MAX_AHEAD - self._ahead_busy
        out = []
        for i in range(start, end):
            if len(out) >= room:
                end = i
                break
            if not self.backend.is_zero(i) and i not in self._inflight and not self.backend.cached_chunk(i):
                out.append(i)
        if end > start:
            self._triggers[(start + end) // 2] = end
            while len(self._triggers) > _STREAMS:
                del self._triggers[next(iter(self._triggers))]
        self._remember(end)
        return out

    def _touch(self, lo: int, hi: int) -> None:
        """A read of chunks [lo, hi] reached a window's middle: start the window after it."""
        for i in range(lo, hi + 1):
            end = self._triggers.pop(i, None)
            if end is None:
                continue
            self._next.pop(end, None)
            ahead = self._window(end)
            if ahead:
                self._start(ahead, asyncio.get_running_loop(), frozenset(ahead))

    def _remember(self, i: int) -> None:
        self._next[i] = None
        while len(self._next) > _STREAMS:
            del self._next[next(iter(self._next))]
