"""RepoContext: the part of a repository that writers, images and the set commit use.

They get this instead of the whole Repository (restic's narrow interfaces), so
repository.py may import them without them importing it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .backends import StorageBackend
from .codec import RecordCodec
from .config import RepoConfig
from .index import IndexHandle
from .indexsql import IndexSql
from .locks import FlockLocks, RepoLock
from .store import ObjectStore

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class RepoContext:
    path: str                  # the repository directory (error messages, file system checks)
    config: RepoConfig
    index: IndexHandle         # the index: .engine (SQLAlchemy, made when first used) and .sql
    backend: StorageBackend    # where pack files live
    store: ObjectStore         # record lookups and checked record reads
    codec: RecordCodec         # how bytes become records and back (plaintext or sealed)
    locks: FlockLocks          # the lock service (flock files here; PostgreSQL for many hosts)
    lock_wait: float           # seconds a lock is waited for before LockedError

    @property
    def index_db(self) -> Engine:
        """The index's SQLAlchemy engine (not the engine/ package)."""
        return self.index.engine

    @property
    def sql(self) -> IndexSql:
        """The index for the read path's text statements and the leases (indexsql)."""
        return self.index.sql

    def lock(self, name: str, *, exclusive: bool, purpose: str | None = None,
             wait: float | None = None) -> RepoLock:
        """Take lock *name* (LockedError after lock_wait seconds)."""
        return self.locks.lock(name, exclusive=exclusive, wait=self.lock_wait if wait is None else wait,
                               purpose=purpose)
