"""Names of what a QMP run creates inside qemu, and the state file it keeps.

Everything a run adds to qemu carries the repository's tag, so a later run of
the same repository finds leftovers by name after a crash (SIGKILL leaves no
chance to clean up). Things qemu cannot name for us (the scratch files, the
NBD server we started, and where it listens) are written to a per-repository,
per-VM state file *before* they are created; the file is locked for the
whole run so two runs of one repository never clean up each other's work.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass

from ..errors import LockedError, UsageError
from ..fsutil import write_atomically
from .image import bitmap_prefix

DIRTY_PREFIX = "qemu:dirty-bitmap:"
# Checkpoint bitmaps: bitmap_prefix + checkpoint (the same names the --image
# source uses, so a chain survives moving between offline and live backups).
CHECKPOINT_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


@dataclass(frozen=True)
class Names:
    repo_id: str

    @property
    def tag(self) -> str:
        # qemu node names are at most 31 characters: keep the tag short.
        rid = re.sub(r"[^A-Za-z0-9]", "", self.repo_id)[:12]
        return f"nbdb{rid}"

    @property
    def bitmap_prefix(self) -> str:
        return bitmap_prefix(self.repo_id)

    def checkpoint_bitmap(self, checkpoint: str) -> str:
        return self.bitmap_prefix + checkpoint

    def checkpoint_of(self, bitmap: str) -> str | None:
        """The checkpoint a bitmap of ours opened, or None for anything else."""
        if not bitmap.startswith(self.bitmap_prefix):
            return None
        cp = bitmap[len(self.bitmap_prefix):]
        return cp if CHECKPOINT_RE.match(cp) else None

    def read_bitmap(self, i: int) -> str:
        """The temporary, disabled union of the dirty bitmaps that disk *i* exports."""
        return f"{self.tag}-read{i}"

    def is_read_bitmap(self, bitmap: str) -> bool:
        return re.fullmatch(re.escape(self.tag) + r"-read\d+", bitmap) is not None

    def node(self, i: int) -> str:
        return f"{self.tag}-fl{i}"

    def file_node(self, i: int) -> str:
        return f"{self.tag}-ff{i}"

    def job(self, i: int) -> str:
        return f"{self.tag}-job{i}"

    def export(self, i: int) -> str:
        return f"{self.tag}-ex{i}"

    def ours(self, name: str) -> bool:
        """An export, job or node id made by a run of this repository."""
        return name.startswith(self.tag + "-")


class StateFile:
    """JSON state for one (repository, VM) pair, guarded by an exclusive flock."""

    def __init__(self, state_dir: str, repo_id: str, qmp_path: str):
        key = hashlib.sha256(f"{repo_id}\0{os.path.realpath(qmp_path)}".encode()).hexdigest()[:16]
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the state directory {state_dir}: {e.strerror}",
                             hint="pass a writable --state-dir") from None
        self.path = os.path.join(state_dir, f"qmp-{key}.json")
        self._lock_path = os.path.join(state_dir, f"qmp-{key}.lock")
        self._fd: int | None = None
        self.data: dict = {}

    def lock(self) -> None:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError("another nbdbackup run of this repository is backing up this VM",
                                  hint="wait for it to finish") from None
            raise
        self._fd = fd
        self.data = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}   # unreadable state: leftovers are still found by name inside qemu

    def save(self) -> None:
        """Write atomically; an empty state removes the file."""
        if not any(self.data.values()):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        write_atomically(self.path, json.dumps(self.data, indent=1).encode(), 0o600)

    def add(self, key: str, value: str) -> None:
        items = self.data.setdefault(key, [])
        if value not in items:
            items.append(value)
        self.save()

    def discard(self, key: str, value: str) -> None:
        items = self.data.get(key, [])
        if value in items:
            items.remove(value)
            self.save()

    def unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
