"""A shut-off libvirt domain, backed up from its disk images.

libvirt 9.0 runs no backup job on an inactive domain, but nothing writes to its images, so
every disk read from its image is trivially one point in time. Each disk goes through
ImageSource (qemu-nbd, the image lock, the format from the domain XML, never probed), all of
them with ONE new checkpoint: the persistent bitmap `bitmap_prefix(repo_id) + checkpoint`,
the same name a libvirt checkpoint of a running domain gives its bitmap, so the chain goes on
across start and stop. An incremental reads, per disk, the newest bitmap of this repository
that a committed backup of that disk opened (ImageSource's rule). A raw disk cannot hold a
bitmap: a full each time, with a warning (not a chain failure: --no-fallback does not refuse it).

After the commit, libvirt's checkpoint metadata follows the images (libvirt_checkpoints.py):
the new checkpoint is redefined, the older ones of this repository are forgotten. If that
fails (or the run is killed first), the next running backup's reconcile_checkpoints does it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import LockedError
from .base import DiskPlan, Source
from .image import ImageSource, new_checkpoint
from .libvirt_checkpoints import reconcile_checkpoints

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from .libvirt_domain import DomainDisk

log = logging.getLogger(__name__)


class OfflineDomainSource(Source):
    """*disks*: the domain's disks to back up (backup_disks()); *names*: target -> the disk's
    name in the repository, for every one of them. LibvirtSource keeps vm_definition()."""

    def __init__(self, dom, domain: str, disks: Sequence[DomainDisk], names: Mapping[str, str],
                 *, connections: int = 4):
        self.dom = dom
        self.domain = domain
        self.disks = list(disks)
        self.names = dict(names)
        self.connections = connections
        self.checkpoint: str | None = None
        self._images: list[ImageSource] = []
        self._repo_id = ""

    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        self._repo_id = repo.repo_id
        self.checkpoint = new_checkpoint()
        plans = []
        for disk in self.disks:
            image = ImageSource(disk.path, self.names[disk.target], connections=self.connections,
                                fmt=disk.fmt, checkpoint=self.checkpoint,
                                source=f"libvirt:{self.domain}/{disk.target}")
            self._images.append(image)      # before prepare(): failed()/close() undo a half-made one
            disk_kind, reason = kind, None
            if disk.fmt != "qcow2" and kind == "incremental":
                reason = (f"disk {disk.target} of domain {self.domain} is {disk.fmt}, not qcow2: it cannot "
                          "hold a checkpoint's bitmap, so it is backed up whole every time")
                log.warning("%s", reason)
                disk_kind = "full"
            try:
                [plan] = image.prepare(repo, disk_kind, no_fallback)
            except LockedError:
                if self._started():
                    raise LockedError(f"domain {self.domain} was started while its shut-off backup began",
                                      hint="run the backup again: it then uses libvirt's backup job") from None
                raise
            if reason:
                plan.fallback_reason = reason
            plans.append(plan)
        return plans

    def committed(self, plans: list[DiskPlan], infos: list[BackupInfo]) -> None:
        for image in self._images:
            image.committed(plans, infos)
        with_bitmap = [d for d, p in zip(self.disks, plans) if p.checkpoint]
        if not with_bitmap:
            return
        try:
            why = reconcile_checkpoints(self.dom, self._repo_id, with_bitmap, self.checkpoint)
        except Exception as e:      # committed and safe; the next running backup reconciles again
            why = str(e)
        if why:
            log.warning("libvirt was not told about checkpoint %s of domain %s (%s); the next backup "
                        "of the running domain does that", self.checkpoint, self.domain, why)

    def failed(self, exc: BaseException | None) -> None:
        for image in self._images:
            image.failed(exc)

    def close(self) -> None:
        images, self._images = self._images, []
        first: BaseException | None = None
        for image in images:        # every image's qemu-nbd and lock, even when one fails
            try:
                image.close()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first

    def _started(self) -> bool:
        try:
            return bool(self.dom.isActive())
        except Exception:
            return False
