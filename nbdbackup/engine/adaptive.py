"""Adaptive compression (like `zstd --adapt`): compress a chunk whenever a core is free for it,
else hash it and store it raw (docs/design.md, "Chunk size and compression level", has
the figures)."""

from __future__ import annotations

import os
import threading
import time


class CoreGate:
    """Decides, per chunk, whether to compress it.

    The signal is the CPU time OTHER processes took over the last SAMPLE_S (Linux /proc/stat
    less this process's own /proc/self/stat): the backup's own threads (reading, hashing,
    compressing) are the work a free core is for, never a reason to stop. Chunks are left raw
    only while the other processes leave less than MIN_FREE_CORES of the `cores` CPUs free,
    i.e. compressing would only take CPU from them and slow the backup down. The NBD server
    (qemu-nbd) is one of the others.

    The price is a worse ratio when the CPU is short (DiskStats.uncompressed_chunks counts
    those chunks; .busiest_others says how busy the others were). cores=None: always compress;
    cores=0: never."""

    SAMPLE_S = 0.1
    MIN_FREE_CORES = 0.5

    def __init__(self, cores: int | None, cpu: CpuTimes | None = None):
        self.cores = cores
        self.lock = threading.Lock()
        self._cpu = cpu or (CpuTimes() if cores else None)
        self._spare = bool(cores) or cores is None
        self._next_sample = 0.0
        self.busiest_others = 0.0       # most cores the other processes took in a sample that left chunks raw

    def enter(self) -> bool:
        """A chunk starts being prepared: True if it should be compressed. Pair with leave()."""
        with self.lock:
            if self.cores is None:
                return True
            now = time.monotonic()
            if self._cpu is not None and now >= self._next_sample:
                self._next_sample = now + self.SAMPLE_S
                others = self._cpu.other_cores()
                if others is not None:
                    self._spare = self.cores - others >= self.MIN_FREE_CORES
                    if not self._spare:
                        self.busiest_others = max(self.busiest_others, others)
            return self._spare

    def leave(self) -> None:
        """A chunk is prepared (kept so that callers pair their calls; nothing is counted)."""

    def raw_reason(self) -> str:
        """Why chunks were left raw, for the summary line."""
        if not self.cores:
            return "no CPU to spare"
        return f"other processes kept {self.busiest_others:.1f} of {self.cores} cores busy"


def compression_gate(adaptive: bool) -> CoreGate:
    """The gate of a backup: adaptive (on this machine's CPUs), or one that always compresses."""
    return CoreGate(compression_cores() if adaptive else None)


class CpuTimes:
    """How many cores' worth of CPU time processes other than this one took between two
    calls: the machine's busy ticks (/proc/stat) less this process's (/proc/self/stat, every
    thread). Both count in USER_HZ ticks."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        """(all ticks, busy ticks, this process's ticks), or None where /proc cannot say."""
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
            with open("/proc/self/stat", "rb") as f:
                own = f.read().rsplit(b")", 1)[1].split()   # the name may hold spaces and ")"
        except OSError:
            return None
        if len(fields) < 6 or fields[0] != b"cpu" or len(own) < 13:
            return None
        ticks = [int(x) for x in fields[1:9]]    # user nice system idle iowait irq softirq steal
        total = sum(ticks)
        return total, total - ticks[3] - ticks[4], int(own[11]) + int(own[12])    # utime + stime

    def other_cores(self) -> float | None:
        """Cores the other processes kept busy since the last call; None when no tick passed
        (or /proc is unreadable): keep the previous decision."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        total, busy, own = (a - b for a, b in zip(now, last))
        cpus = os.cpu_count() or 1      # /proc/stat's first line sums every CPU of the machine
        return max(0, busy - own) / total * cpus


def compression_cores() -> int:
    """CPUs this process may run on, all of them usable for compression."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
