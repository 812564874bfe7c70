"""What a backup source provides to the engine.

A source (any NBD URI, a local image the tool manages, a live VM through QMP)
turns "back up these disks" into NBD exports the engine reads, and owns the
bitmap lifecycle around the commit. The engine calls, in order:

    plans = source.prepare(repo, kind, no_fallback)   # exports are up
    vm = source.vm_definition()      # stored with the set (None: no VM definition)
    ... read each plan.uri, write a backup per plan ...
    source.committed(plans, infos)   # only after the index commit succeeded
or  source.failed(exc)               # on any failure before/at commit
    source.close()                   # always, tears down what prepare() made
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ChainBroken

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from ..repo.vmdef import VmDefinition


@dataclass
class DiskPlan:
    disk: str                       # disk name in the repository
    uri: str                        # NBD URI to read this disk from
    kind: str                       # "full" or "incremental" (after any fallback)
    bitmap_context: str | None = None   # meta context with the dirty set, e.g. "qemu:dirty-bitmap:x"
    bitmap: str | None = None       # bitmap name recorded on the backup (the one read)
    parent_id: str | None = None    # backup the dirty set is relative to (incremental only)
    checkpoint: str | None = None   # bitmap generation this backup opens (recorded on the backup)
    fallback_reason: str | None = None  # why an asked-for incremental became a full
    extra: dict = field(default_factory=dict)   # source-private state


def raise_if_no_fallback(disk: str, reason: str, no_fallback: bool) -> None:
    """An incremental of *disk* cannot be trusted (*reason*): with --no-fallback that is
    ChainBroken (exit 13); otherwise the caller warns and plans a full backup."""
    if no_fallback:
        raise ChainBroken(f"cannot take an incremental of {disk}: {reason}",
                          hint="run `nbdbackup full`, or drop --no-fallback")


class Source:
    """Base class; see the module docstring for the call order."""

    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        raise NotImplementedError

    def vm_definition(self) -> VmDefinition | None:
        """Called once after prepare(): the VM definition to store with every backup of this
        run's set (a libvirt domain's XML and NVRAM), or None."""
        return None

    def committed(self, plans: list[DiskPlan], infos: list[BackupInfo]) -> None:
        """All backups of *plans* are committed: advance bitmaps."""

    def failed(self, exc: BaseException | None) -> None:
        """The run failed: keep every change for the next run (merge bitmaps back)."""

    def close(self) -> None:
        """Always called: remove exports, stop servers, delete scratch files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
