"""A local (offline) qcow2 image that the tool backs up and tracks itself.

Bitmap lifecycle, generation-named: every backup adds a fresh persistent
bitmap `nbdbackup-<repo_id>-<checkpoint>` before reading (nothing writes to
an offline image in between) and records <checkpoint> on the backup. An
incremental reads the bitmap of the newest committed backup that opened one
(repo.find_by_checkpoint), so its parent is exactly the point in time its
dirty set starts at. Older bitmaps of this repository go only after the
commit; a failed run drops the bitmap it added, so the chain it would have
started never exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING

from ..errors import LockedError, SourceUnreachable
from .base import DiskPlan, Source, raise_if_no_fallback
from .qemu_tools import ImageBitmap, ImageInfo, QemuNbd, bitmap_add, bitmap_remove, check_image, image_info

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository

log = logging.getLogger(__name__)

DIRTY_PREFIX = "qemu:dirty-bitmap:"


def default_disk_name(path: str) -> str:
    """The image's file name without its extension (`/vm/web.qcow2` -> `web`)."""
    return os.path.splitext(os.path.basename(path))[0]


def bitmap_prefix(repo_id: str) -> str:
    return f"nbdbackup-{repo_id}-"


def new_checkpoint() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


class ImageSource(Source):
    """One image. *checkpoint* (a new_checkpoint() value) is the generation this run opens,
    when a caller backs several images up as one set (a shut-off libvirt domain: one
    checkpoint for all its disks); *source* is what the backup records as its source."""

    def __init__(self, path: str, disk: str | None = None, *, connections: int = 4, fmt: str | None = None,
                 checkpoint: str | None = None, source: str | None = None):
        self.path = os.path.abspath(path)
        self.format = fmt           # None: probed by qemu-img
        self.disk = disk or default_disk_name(path)
        self.connections = max(1, connections)
        self.checkpoint = checkpoint
        self.source = source or f"image:{self.path}"
        self.nbd: QemuNbd | None = None
        self._added: str | None = None      # bitmap this run created (dropped on failure)
        self._prefix = ""
        self._image_lock = None             # the repository's lock of this image, held until close()

    # -- choosing the dirty set ---------------------------------------------
    def _pick_bitmap(self, repo: Repository,
                     info: ImageInfo) -> tuple[ImageBitmap | None, BackupInfo | None, str | None]:
        """(bitmap, parent backup, None) or (None, None, reason for a full)."""
        if info.format != "qcow2":
            return None, None, f"{self.path} is {info.format}, not qcow2: it cannot hold dirty bitmaps"
        ours = [b for b in info.bitmaps if b.name.startswith(self._prefix)]
        if not ours:
            return None, None, f"no dirty bitmap of this repository on {self.path}"
        usable = []
        for b in ours:
            parent = repo.find_by_checkpoint(self.disk, b.name[len(self._prefix):])
            if parent is not None and parent.disk == self.disk:
                usable.append((parent.created, b, parent))
        if not usable:
            names = ", ".join(b.name for b in ours)
            return None, None, (f"no committed backup of disk {self.disk!r} opened bitmap {names} "
                                "(forgotten, pruned, never committed, or another disk's bitmap)")
        _, bitmap, parent = max(usable, key=lambda t: t[0])
        if bitmap.in_use:
            return None, None, (f"bitmap {bitmap.name} is marked in-use on a closed image: a writer "
                                "died without saving it, so it may miss changes")
        if not bitmap.enabled:
            return None, None, f"bitmap {bitmap.name} is disabled: it did not track every change"
        return bitmap, parent, None

    def _lock_image(self, repo: Repository) -> None:
        """One run of this repository per image at a time; a loser learns which run has it
        (from the lock's holder file), not qemu's bare "Failed to get lock"."""
        name = "image-" + hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()[:16]
        try:
            self._image_lock = repo.host_locks.lock(name, exclusive=True, wait=repo.lock_wait,
                                                    purpose=f"the lock of image {self.path}")
        except LockedError as e:
            who = "; ".join(f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}: {h.get('command')}"
                            for h in repo.host_locks.holders(name)) or str(e)
            raise LockedError(f"another nbdbackup run is backing up image {self.path}: {who}",
                              hint="wait for it to finish, or pass --lock-wait SECONDS") from None

    def _open_info(self):
        """qemu-img info, and the checks that keep a wrong guess or a damaged image from being backed up."""
        info = image_info(self.path, self.format)      # LockedError when a writer has it open
        if info.probed and info.format == "raw":
            log.warning("%s has no image header qemu recognises: backing it up as raw bytes "
                        "(pass --format raw to say so)", self.path)
        if info.corrupt:
            raise SourceUnreachable(f"image {self.path} is marked corrupt by qemu",
                                    hint="repair a copy with `qemu-img check -r all` (or restore the image), "
                                         "then retry")
        if info.format == "qcow2":
            check_image(self.path, info.format)
        return info

    # -- Source interface -----------------------------------------------------
    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        self._prefix = bitmap_prefix(repo.repo_id)
        self._lock_image(repo)
        info = self._open_info()
        bitmap = parent = reason = None
        if kind == "incremental":
            bitmap, parent, reason = self._pick_bitmap(repo, info)
            if reason:
                raise_if_no_fallback(self.disk, reason, no_fallback)
                log.warning("%s; taking a full backup instead", reason)
                kind = "full"
        checkpoint = None
        if info.format == "qcow2":
            checkpoint = self.checkpoint or new_checkpoint()
            bitmap_add(self.path, self._prefix + checkpoint)
            self._added = self._prefix + checkpoint     # only once it exists: failed() removes it
        self.nbd = QemuNbd(self.path, info.format, connections=self.connections,
                           bitmap=bitmap.name if bitmap else None)
        return [DiskPlan(
            disk=self.disk, uri=self.nbd.uri, kind=kind,
            bitmap_context=DIRTY_PREFIX + bitmap.name if bitmap else None,
            bitmap=bitmap.name if bitmap else None,
            parent_id=parent.id if parent else None,
            checkpoint=checkpoint, fallback_reason=reason,
            extra={"source": self.source, "format": info.format},
        )]

    def committed(self, plans: list[DiskPlan], infos: list[BackupInfo]) -> None:
        self._stop_nbd()
        keep, self._added = self._added, None
        try:
            stale = [b.name for b in image_info(self.path, self.format).bitmaps
                     if b.name.startswith(self._prefix) and b.name != keep]
        except Exception as e:  # the backup is committed; a leftover bitmap only costs a superset
            log.warning("could not list old bitmaps on %s: %s", self.path, e)
            return
        for name in stale:
            try:
                bitmap_remove(self.path, name)
            except Exception as e:
                log.warning("could not remove old bitmap %s: %s", name, e)

    def failed(self, exc: BaseException | None) -> None:
        self._stop_nbd()
        added, self._added = self._added, None
        if added:
            try:
                bitmap_remove(self.path, added)
            except Exception as e:  # harmless: no committed backup names its checkpoint
                log.warning("could not remove bitmap %s of the failed run: %s", added, e)

    def close(self) -> None:
        try:
            if self._added:     # neither committed() nor failed() ran
                self.failed(None)
            self._stop_nbd()
        finally:
            lock, self._image_lock = self._image_lock, None
            if lock is not None:
                lock.release()

    def _stop_nbd(self) -> None:
        if self.nbd is not None:
            self.nbd.stop()
            self.nbd = None
