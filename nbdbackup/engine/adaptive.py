"""Adaptive compression (like `zstd --adapt`): compress a chunk only with CPU to spare,
else hash it and store it raw (docs/design.md, "Chunk size and compression level", has
the figures)."""

from __future__ import annotations

import os
import threading
import time


class CoreGate:
    """Decides, per chunk, whether to compress it. Two signals, both needed:

    - fewer than `cores` chunks are being prepared (`cores` is the CPU count less one,
      kept for the read/write path: socket copies, pack writes, our main thread);
    - the machine's CPUs were at least MIN_IDLE idle over the last SAMPLE_S (Linux
      /proc/stat). This sees the NBD server and every other process too: on a busy
      box compressing would only slow the backup; on a box with idle cores every
      chunk gets compressed.

    The price is a worse ratio when CPU is short (DiskStats.uncompressed_chunks
    counts those chunks). cores=None: always compress."""

    SAMPLE_S = 0.05
    MIN_IDLE = 0.20

    def __init__(self, cores: int | None, cpu: CpuTimes | None = None):
        self.cores = cores
        self.busy = 0
        self.lock = threading.Lock()
        self._cpu = cpu or (CpuTimes() if cores is not None else None)
        self._spare = True
        self._next_sample = 0.0

    def enter(self) -> bool:
        """A chunk starts being prepared: True if it should be compressed. Pair with leave()."""
        with self.lock:
            self.busy += 1
            if self.cores is None:
                return True
            if self.busy > self.cores:
                return False
            now = time.monotonic()
            if self._cpu is not None and now >= self._next_sample:
                self._next_sample = now + self.SAMPLE_S
                idle = self._cpu.idle_share()
                if idle is not None:
                    self._spare = idle >= self.MIN_IDLE
            return self._spare

    def leave(self) -> None:
        with self.lock:
            self.busy -= 1


def compression_gate(adaptive: bool) -> CoreGate:
    """The gate of a backup: adaptive (on this machine's CPUs), or one that always compresses."""
    return CoreGate(compression_cores() if adaptive else None)


class CpuTimes:
    """Share of CPU time the whole machine spent idle between two calls (/proc/stat)."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if len(fields) < 6 or fields[0] != b"cpu":
            return None
        ticks = [int(x) for x in fields[1:9]]    # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    def idle_share(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None         # unreadable, or no tick yet: keep the previous decision
        return (now[1] - last[1]) / (now[0] - last[0])


def compression_cores() -> int:
    """CPUs for compression: all we may run on but one (at least one)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n - 1)
