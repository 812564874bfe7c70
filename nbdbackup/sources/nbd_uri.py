"""Any NBD export, given by URI. The caller manages the bitmap.

For an incremental the caller promises that `qemu:dirty-bitmap:BITMAP` holds
every change since the parent was taken (libvirt pull mode's `backup-vda`).
The parent is the disk's latest backup unless --since names another. The
tool cannot check that promise; it only refuses what it can see is wrong:
no parent, or an export that does not offer the bitmap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import UsageError
from .base import DiskPlan, Source, raise_if_no_fallback

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository

log = logging.getLogger(__name__)

DIRTY_PREFIX = "qemu:dirty-bitmap:"


def export_offers(uri: str, context: str) -> bool:
    """Whether the export lets us negotiate *context*."""
    from ..nbd.client import Client

    with Client.connect(uri, meta_contexts=[context]) as c:
        return context in c.contexts


class NbdUriSource(Source):
    def __init__(self, uri: str, disk: str, *, bitmap: str | None = None, since: str | None = None):
        self.uri = uri
        self.disk = disk
        self.bitmap = bitmap
        self.since = since

    def _parent(self, repo: Repository) -> BackupInfo | None:
        if self.since:
            parent = repo.resolve(self.since)       # NotFound when it does not exist
            if parent.disk != self.disk:
                raise UsageError(f"--since {self.since} is a backup of disk {parent.disk!r}, not {self.disk!r}")
            return parent
        return repo.latest(self.disk)

    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        if kind == "full":
            return [DiskPlan(disk=self.disk, uri=self.uri, kind="full", extra={"source": self.uri})]
        if not self.bitmap:
            raise UsageError("an incremental from --source needs --bitmap NAME "
                             "(the export's qemu:dirty-bitmap:NAME holding changes since the parent)")
        context = DIRTY_PREFIX + self.bitmap
        parent = self._parent(repo)
        reason = None
        if parent is None:
            reason = f"disk {self.disk!r} has no backup yet to be incremental to"
        elif not export_offers(self.uri, context):
            reason = f"the export does not offer {context}"
        if reason:
            raise_if_no_fallback(self.disk, reason, no_fallback)
            log.warning("%s; taking a full backup instead", reason)
            return [DiskPlan(disk=self.disk, uri=self.uri, kind="full", fallback_reason=reason,
                             extra={"source": self.uri})]
        return [DiskPlan(disk=self.disk, uri=self.uri, kind="incremental", bitmap_context=context,
                         bitmap=self.bitmap, parent_id=parent.id, extra={"source": self.uri})]

