"""RepoContext: the part of a repository that writers, images and the set commit use.

They get this instead of the whole Repository (restic's narrow interfaces), so
repository.py may import them without them importing it back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends import StorageBackend
from .codec import RecordCodec
from .config import RepoConfig
from .index import IndexAccess, IndexHandle
from .locks import FlockLocks, RepoLock
from .store import ObjectStore


@dataclass(frozen=True)
class RepoContext(IndexAccess):
    path: str                  # the repository directory (error messages, file system checks)
    config: RepoConfig
    index: IndexHandle         # the index: .engine (SQLAlchemy, made when first used) and .sql
    backend: StorageBackend    # where pack files live
    store: ObjectStore         # record lookups and checked record reads
    codec: RecordCodec         # how bytes become records and back (plaintext or sealed)
    locks: FlockLocks          # the lock service (flock files here; PostgreSQL for many hosts)
    lock_wait: float           # seconds a lock is waited for before LockedError

    def lock(self, name: str, *, exclusive: bool, purpose: str | None = None,
             wait: float | None = None) -> RepoLock:
        """Take lock *name* (LockedError after lock_wait seconds)."""
        return self.locks.lock(name, exclusive=exclusive, wait=self.lock_wait if wait is None else wait,
                               purpose=purpose)
