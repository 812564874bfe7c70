"""Repository: open/init, backup listing and lookup, writers and images.

Directory layout: config.json, index.sqlite (default index), packs/<xx>/,
locks/, tmp/. See docs/design.md "Repository" for the invariants.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import TYPE_CHECKING, Sequence

from ..errors import KeyRefused, NotFound, RepoDamaged, UsageError, is_no_space, storage_error
from ..fsutil import write_blocker
from . import backuprows, keys, remote, vmstore
from .backends import StorageBackend
from .codec import KeyMismatch, KeyRequired, codec_for
from .config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_LEVEL,
    DEFAULT_PACK_SIZE,
    DEFAULT_S3_PACK_SIZE,
    DEFAULT_SEGMENT_LEN,
    RepoConfig,
    read_config,
    write_config,
)
from .context import RepoContext
from .crypto import MasterKey
from .ids import check_disk_name, is_backup_id
from .image import BackupImage
from .index import IndexAccess, IndexHandle, check_revision, default_url, read_only_mode, url_without_password
from .indexerrors import index_errors
from .info import BackupInfo
from .keys import KdfParams, KeySource, UnlockedKey
from .leases import Holds, reader_lease
from .location import open_backend, parse_location
from .locks import FlockLocks, RepoLock
from .remote import host_lock_dir, lock_service
from .store import ObjectStore
from .vmdef import VmDefinition

if TYPE_CHECKING:       # writers, stats and Core queries import SQLAlchemy: a restore does without
    from .writer import BackupWriter

_DIRS = ("packs", "locks", "tmp")


class Repository(IndexAccess):
    def __init__(self, path: str, config: RepoConfig, index: IndexHandle, index_url: str, *, lock_wait: float = 0.0,
                 backend: StorageBackend | None = None, s3_endpoint: str | None = None,
                 master_key: MasterKey | None = None):
        # how bytes become records: plaintext, or sealed with the key (KeyRequired / KeyMismatch);
        # first, so a missing or wrong key opens nothing that would need closing
        self.codec = codec_for(config, master_key)
        self.location = parse_location(path)
        path = self.path = self.location.display
        self.config = config
        self.index = index
        self.index_url = index_url
        self.lock_wait = lock_wait
        self.lock_dir = os.path.join(path, "locks") if self.location.is_local else None
        self.backend = backend or open_backend(self.location, s3_endpoint=s3_endpoint)
        self.locks = lock_service(self.location, index.dialect, index_url, config.repo_id)
        self._host_locks = self.locks if isinstance(self.locks, FlockLocks) else None
        self.unlocked: UnlockedKey | None = None    # how open() unlocked an encrypted repository (key commands)
        self.store = ObjectStore(index, self.backend, self.codec)
        # what writers, images and the set commit get instead of the whole repository
        self.context = RepoContext(path=path, config=config, index=index, backend=self.backend,
                                   store=self.store, codec=self.codec, locks=self.locks, lock_wait=lock_wait)

    @property
    def host_locks(self) -> FlockLocks:
        """Locks of this host's own things (an --image file), never shared with other hosts: the
        repository's flock files, or for a PostgreSQL index flock files in this host's state
        directory (made when first needed, so reading commands write nothing there)."""
        if self._host_locks is None:
            self._host_locks = FlockLocks(host_lock_dir(self.config.repo_id))
        return self._host_locks

    # -- life cycle -----------------------------------------------------------
    @classmethod
    def init(cls, path: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE, index_url: str | None = None,
             compression_level: int = DEFAULT_LEVEL, backend: StorageBackend | None = None,
             segment_len: int = DEFAULT_SEGMENT_LEN, pack_size: int | None = None,
             s3_endpoint: str | None = None, encryption: bool = False, key_source: KeySource | None = None,
             kdf: KdfParams | None = None, master_key: MasterKey | None = None) -> "Repository":
        """Create a repository and its index (at the head revision).

        segment_len (map positions per segment) and pack_size (target pack
        bytes) are tuning knobs, stored in config.json; tests use small ones.
        encryption=True makes a new master key, wrapped under the passphrase of *key_source*
        (default: the environment's, else typed twice) with scrypt *kdf*, stored as a key object
        in the repository, or only in key_source.key_file when that is given. *master_key*
        (library use, tests): encrypted with that key, stored nowhere; open it with master_key too."""
        loc = parse_location(path)
        if pack_size is None:
            pack_size = DEFAULT_PACK_SIZE if loc.is_local else DEFAULT_S3_PACK_SIZE
        cfg = RepoConfig.new(chunk_size, compression_level, segment_len=segment_len, pack_size=pack_size)
        source = key_source or KeySource.from_env()
        new = keys.given_key(master_key) if master_key is not None else None    # library use (tests)
        encryption = encryption and master_key is None
        if new:
            cfg = keys.encrypted_config(cfg, new)
        if not loc.is_local:
            backend = backend or open_backend(loc, s3_endpoint=s3_endpoint)
            remote.check_s3_target(loc, index_url, backend)     # before anyone types a passphrase
            if encryption:
                new = keys.new_key(cfg.repo_id, loc.display, source, kdf)
                cfg = keys.encrypted_config(cfg, new)
            objects = [(new.origin, keys.doc_bytes(new.doc))] if new and new.stored_in_repository else []
            try:
                if new and new.in_file:
                    keys.store_new_key(backend, new)
                remote.init_s3(loc, cfg, index_url, backend, objects=objects)
            except BaseException:
                if new:
                    keys.remove_new_key(new)
                raise
            return cls._open(loc.display, index_url=index_url, backend=backend, s3_endpoint=s3_endpoint,
                             unlock=lambda *_: new)
        path = loc.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{path} exists and is not a directory")
        if os.path.isdir(path) and os.listdir(path):
            what = "a repository" if os.path.exists(os.path.join(path, "config.json")) else "a non-empty directory"
            raise UsageError(f"{path} is already {what}; refusing to initialise over it")
        if encryption:
            new = keys.new_key(cfg.repo_id, loc.display, source, kdf)
            cfg = keys.encrypted_config(cfg, new)
        created_dir = not os.path.exists(path)
        try:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                if is_no_space(e):
                    raise       # the CLI reports a full disk as such
                raise UsageError(f"cannot create repository directory {path}: {e.strerror}",
                                 hint="choose a path on a writable file system") from None
            for d in _DIRS:
                os.makedirs(os.path.join(path, d), exist_ok=True)
            for name in ("writers", "readers", "gc"):    # so a user who may only read the repository can lock
                open(os.path.join(path, "locks", name), "a").close()
            url = index_url or default_url(path)
            remote.create_index(url, path)
            if index_url:
                _write_index_url(path, index_url)
            if new:
                keys.store_new_key(backend or open_backend(loc), new)
            write_config(path, cfg)     # last: a directory with config.json is a repository
        except BaseException:
            if new:
                keys.remove_new_key(new)
            if created_dir:
                shutil.rmtree(path, ignore_errors=True)
            else:
                for name in os.listdir(path):
                    p = os.path.join(path, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
            raise
        return cls._open(path, index_url=index_url, backend=backend, unlock=lambda *_: new)

    @classmethod
    def open(cls, path: str, *, index_url: str | None = None, lock_wait: float = 0.0,
             backend: StorageBackend | None = None, check: bool = True,
             s3_endpoint: str | None = None, key_source: KeySource | None = None,
             master_key: MasterKey | None = None) -> "Repository":
        """Open an existing repository.

        NotARepository, RepoFormatError (newer format / index needs `nbdbackup migrate`),
        RepoDamaged (index missing or unreadable). check=False skips the index
        revision check (for `migrate` and `rebuild-index`). An encrypted repository is unlocked
        here, with *key_source* (None: the environment's, else a prompt on a terminal):
        KeyRefused (19) for a wrong passphrase or key, UsageError when none can be had."""
        source = key_source or KeySource.from_env()
        if master_key is not None:      # library use: the key itself (checked against config.json)
            return cls._open(path, index_url=index_url, lock_wait=lock_wait, backend=backend, check=check,
                             s3_endpoint=s3_endpoint,
                             unlock=lambda cfg, be, where: keys.unlock_given(cfg, be, master_key, where))
        return cls._open(path, index_url=index_url, lock_wait=lock_wait, backend=backend, check=check,
                         s3_endpoint=s3_endpoint,
                         unlock=lambda cfg, be, where: keys.unlock(cfg, be, source, where))

    @classmethod
    def _open(cls, path: str, *, index_url: str | None = None, lock_wait: float = 0.0,
              backend: StorageBackend | None = None, check: bool = True,
              s3_endpoint: str | None = None, unlock) -> "Repository":
        loc = parse_location(path)
        if loc.is_local:
            path = loc.path
            cfg = read_config(path)
            url = index_url or _read_index_url(path) or default_url(path)
        else:
            backend = backend or open_backend(loc, s3_endpoint=s3_endpoint)
            cfg, url = remote.open_s3(loc, backend, index_url)
        backend = backend or open_backend(loc, s3_endpoint=s3_endpoint)
        if cfg.encryption:
            keys.check_encryption(cfg.encryption, loc.display)
        unlocked = unlock(cfg, backend, loc.display)    # before the index is touched: a wrong key reads nothing
        if check and url.startswith("sqlite:///") and not os.path.exists(url.removeprefix("sqlite:///")):
            raise RepoDamaged(f"the index of {path} ({url.removeprefix('sqlite:///')}) is missing",
                              hint="`nbdbackup rebuild-index` recreates it from the packs")
        index = IndexHandle(url, read_only=read_only_mode(url))
        try:
            if check:
                check_revision(index.sql, loc.display)
            repo = cls(loc.display, cfg, index, url, lock_wait=lock_wait, backend=backend, s3_endpoint=s3_endpoint,
                       master_key=unlocked.master if unlocked else None)
        except KeyMismatch:
            index.dispose()
            raise KeyRefused(f"the key given is not the key of {loc.display}") from None
        except KeyRequired:
            index.dispose()
            raise UsageError(f"{loc.display} is encrypted: its key is needed") from None
        except BaseException:
            index.dispose()
            raise
        repo.unlocked = unlocked
        return repo

    def index_file_missing(self) -> bool:
        """True when the index is a SQLite file that does not exist (connecting would create it empty)."""
        if not self.index_url.startswith("sqlite:///") or self.index_url == "sqlite:///:memory:":
            return False
        return not os.path.exists(self.index_url.removeprefix("sqlite:///"))

    def close(self) -> None:
        self.locks.close()
        self.backend.close()
        self.index.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def repo_id(self) -> str:
        return self.config.repo_id

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def compression_level(self) -> int:
        return self.config.compression_level

    def lock(self, name: str, *, exclusive: bool, purpose: str | None = None,
             wait: float | None = None) -> RepoLock:
        """Take lock *name* in locks/ (LockedError after lock_wait seconds)."""
        return self.context.lock(name, exclusive=exclusive, purpose=purpose, wait=wait)

    # -- queries --------------------------------------------------------------
    def list_backups(self, disk: str | None = None) -> list[BackupInfo]:
        """Committed backups, oldest first."""
        return backuprows.list_backups(self.sql, disk)

    def verified_times(self) -> dict[str, int]:
        """backup id -> when a verify last found it clean (ms); backups never found clean are absent."""
        return backuprows.verified_times(self.sql)

    def get_backup(self, backup_id: str) -> BackupInfo:
        info = backuprows.get_backup(self.sql, backup_id)
        if info is None:
            raise NotFound(f"no backup with id {backup_id!r}", hint="see `nbdbackup list`")
        return info

    def latest(self, disk: str) -> BackupInfo | None:
        return backuprows.latest(self.sql, disk)

    def resolve(self, ref: str) -> BackupInfo:
        """A backup id, or a disk name meaning that disk's latest backup."""
        if isinstance(ref, BackupInfo):
            return ref
        if is_backup_id(ref):
            return self.get_backup(ref)
        try:
            check_disk_name(ref)
        except UsageError:
            raise NotFound(f"{ref!r} is neither a backup id nor a disk name",
                           hint="see `nbdbackup list`") from None
        info = self.latest(ref)
        if info is None:
            raise NotFound(f"no backup id or disk named {ref!r}", hint="see `nbdbackup list`")
        return info

    def find_by_checkpoint(self, disk: str, checkpoint: str) -> BackupInfo | None:
        """The (latest) backup of *disk* that opened bitmap generation *checkpoint*."""
        return backuprows.find_by_checkpoint(self.sql, disk, checkpoint)

    def disks(self) -> list[str]:
        return backuprows.disks(self.sql)

    def segment_refs(self, backup_id: str) -> list[bytes | None]:
        """The map of a backup: segment hashes in order (None = all-zero segment)."""
        return backuprows.segment_refs(self.sql, backup_id)

    def stats(self) -> dict:
        """Totals over the repository (definitions: `nbdbackup stats --help`)."""
        from .stats import repo_stats

        with index_errors("reading the index", index_db=self.index_db,
                          damaged_hint="`nbdbackup rebuild-index` recreates the index"):
            return repo_stats(self.index_db)

    # -- write and read -------------------------------------------------------
    def writer(self, disk: str, *, kind: str, size: int, parent: BackupInfo | None = None,
               bitmap: str | None = None, checkpoint: str | None = None, set_id: str | None = None,
               source: str | None = None, preserve: BackupInfo | None = None) -> BackupWriter:
        blocker = write_blocker(self.path) if self.location.is_local else None
        if blocker in (errno.EROFS, errno.EACCES):      # say so before any work, not at the first pack
            raise storage_error(blocker, self.path, f"writing a backup of {disk}")
        from .writer import BackupWriter

        return BackupWriter(self.context, disk, kind=kind, size=size, parent=parent, bitmap=bitmap,
                            checkpoint=checkpoint, set_id=set_id, source=source, preserve=preserve)

    def commit_set(self, writers: Sequence[BackupWriter], *, read_bytes: Sequence[int] | None = None,
                   duration_s: Sequence[float] | float | None = None, created=None,
                   set_id: str | None = None, vm: VmDefinition | None = None) -> list[BackupInfo]:
        """Commit several disks' writers in ONE index transaction (same set_id, same created);
        *vm*: the VM definition stored once with the set (every member names it)."""
        from .setcommit import commit_writers

        return commit_writers(self.context, writers, read_bytes=read_bytes, duration_s=duration_s,
                              created=created, set_id=set_id, vm=vm)

    def open_image(self, ref) -> BackupImage:
        """A checked reader of a backup; holds the shared readers lock (rebuild-index waits) and a
        read lease pinning the backup (forget refuses it, so gc keeps its data) until close()."""
        info = ref if isinstance(ref, BackupInfo) else self.resolve(ref)
        lk = self.lock("readers", exclusive=False, purpose="the repository's reader lock (rebuild-index runs)")
        try:
            lk = Holds(lk, reader_lease(self.sql, [info.id]))
            refs = self.checked_segment_refs(info)
        except BaseException:
            lk.release()
            raise
        return BackupImage(self.context, info, refs, lk)

    def vm_definition(self, info: BackupInfo) -> VmDefinition | None:
        """The VM definition stored with *info*'s set (None when it has none). *info*'s index rows
        are checked against its manifest first, so a `vm` or `domain` edited in the index is
        RepoDamaged (exit 9), as is a definition record that is missing, damaged or fails auth."""
        if info.vm is None:
            return None
        self.checked_segment_refs(info)
        try:
            return vmstore.load(self.context, info.vm)
        except RepoDamaged as e:
            raise RepoDamaged(f"backup {info.id}: {e}", hint=e.hint) from None

    def set_members(self, info: BackupInfo) -> list[BackupInfo]:
        """Every backup of *info*'s set by disk (`[info]` when it has no set id)."""
        return backuprows.set_members(self.index_db, info)

    def latest_domain_set(self, domain: str) -> list[BackupInfo]:
        """The newest set of libvirt domain *domain* (its members by disk); [] when none."""
        return backuprows.latest_domain_set(self.index_db, domain)

    def checked_segment_refs(self, info: BackupInfo) -> list[bytes | None]:
        """The map of *info*, checked against the backup's manifest (backuprows.checked_segment_refs)."""
        return backuprows.checked_segment_refs(self.context, info)


_INDEX_URL_FILE = "index-url"


def _write_index_url(path: str, url: str) -> None:
    with open(os.path.join(path, _INDEX_URL_FILE), "w") as f:
        f.write(url_without_password(url) + "\n")      # the password never goes into the repository


def _read_index_url(path: str) -> str | None:
    try:
        with open(os.path.join(path, _INDEX_URL_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
