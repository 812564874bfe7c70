"""How a backup runs: the knobs the CLI sets and the engine's modules read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


class ProgressBar(Protocol):
    """The part of a tqdm bar the engine uses (progress.NoBar is one)."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


@dataclass
class BackupOptions:
    connections: int = 4
    no_fallback: bool = False
    progress: Callable[[int, str], ProgressBar] | None = None     # (total_bytes, description) -> bar
    retries: int = 3                        # per chunk after a server error (EIO...), before SourceFailed
    reconnects: int = 2                     # pool: reconnect attempts (and resends) after a dropped connection
    retry_delay: float = 0.2                # first back-off, doubled each time
    inflight_bytes: int = 32 << 20          # bound on chunk data being read or prepared (see DiskPipeline)
    adaptive: bool = True                   # compress only with CPU to spare, else store raw (adaptive.py)
    check_clean: float = 0.5                # incremental: % of clean chunks read to test the bitmap (chaincheck.py)
