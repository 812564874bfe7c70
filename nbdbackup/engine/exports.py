"""The bridge between the repository and the NBD server.

RepoCatalog answers the server's ExportCatalog questions from the index:
every backup is an export named by its id, and each disk name is an alias
of that disk's latest backup, resolved when a client connects. Each call
asks the index again, so a backup committed while the server runs shows up
without a restart.

Chunk bytes come only from BackupImage.read_chunk (the checked read path
restore uses too), through one ChunkCache shared by all exports and
connections; decompressed chunks never change, so sharing them is safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..errors import NotFound, RepoDamaged, UsageError

if TYPE_CHECKING:
    from ..repo.image import BackupImage
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository


class ChunkCache:
    """Byte-bounded LRU of decompressed chunks; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, max_bytes)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        # Called for every request on the event loop: keep it short.
        with self._lock:
            data = self._d.get(key)
            if data is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: bytes, data: bytes) -> None:
        n = len(data)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._d[key] = data
            self.used += n
            while self.used > self.max_bytes:
                _, ev = self._d.popitem(last=False)
                self.used -= len(ev)


def describe_backup(info: BackupInfo) -> str:
    created = info.created.strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"disk {info.disk}, {info.kind} backup, {created}, {info.size} bytes"


class RepoBackend:
    """One backup image as an ExportBackend.

    Cache keys are chunk hashes, so backups sharing chunks share cache entries."""

    def __init__(self, img: BackupImage, key: str, cache: ChunkCache):
        self.img = img
        self.key = key
        self.size = img.size
        self.chunk_size = img.chunk_size
        self.cache = cache
        n = img.nchunks
        # The whole map up front (one index query per map segment), so the
        # request path never touches the index.
        self._zero = bytearray(n)
        refs = []
        for i in range(n):
            if img.is_zero(i):
                self._zero[i] = 1
                refs.append(bytes(32))
            else:
                r = img.chunk_ref(i)
                if len(r) != 32:   # keys are sliced at fixed width below
                    raise RepoDamaged(f"backup {key}: chunk {i} has a malformed map entry")
                refs.append(r)
        self._refs = b"".join(refs)

    def is_zero(self, i: int) -> bool:
        return self._zero[i] == 1

    def cached_chunk(self, i: int) -> bytes | None:
        return self.cache.get(self._refs[i * 32:i * 32 + 32])

    def read_chunk(self, i: int) -> bytes:
        data = self.img.read_chunk(i)      # checked: raises ChunkCorrupt on damage
        self.cache.put(self._refs[i * 32:i * 32 + 32], data)
        return data

    def read_chunks(self, idxs: list[int]) -> list:
        """Chunks *idxs* in one batched read: bytes, or the ChunkCorrupt of a damaged one."""
        out = self.img.try_chunks(idxs)
        for i, data in zip(idxs, out):
            if isinstance(data, bytes):
                self.cache.put(self._refs[i * 32:i * 32 + 32], data)
        return out

    def close(self) -> None:
        self.img.close()


class RepoCatalog:
    def __init__(self, repo: Repository, cache: ChunkCache, only: frozenset[str] | None = None):
        self.repo = repo
        self.cache = cache
        # serve --export, restore --live, files: only these backup ids, by id (no disk
        # aliases): a socket handed to another program (qemu under libvirt, libguestfs's
        # appliance) then reads these backups and nothing else
        self.only = only

    def _names(self) -> dict:
        """Export name -> BackupInfo: ids, then disk names for the latest backup."""
        backups = self.repo.list_backups()
        if self.only is not None:
            return {b.id: b for b in backups if b.id in self.only}
        names = {b.id: b for b in backups}
        latest: dict = {}
        for b in backups:
            cur = latest.get(b.disk)
            if cur is None or (b.created, b.id) > (cur.created, cur.id):
                latest[b.disk] = b
        for disk, b in latest.items():
            names.setdefault(disk, b)
        return names

    def list_exports(self) -> list[tuple[str, str]]:
        out = []
        for name, b in sorted(self._names().items(), key=lambda kv: (kv[1].disk, kv[0] != kv[1].disk, kv[0])):
            if name == b.id:
                out.append((name, describe_backup(b)))
            else:
                out.append((name, f"latest backup of disk {b.disk}: {b.id} ({describe_backup(b)})"))
        return out

    def resolve(self, name: str) -> str | None:
        """One indexed query: a backup id, or a disk name for its latest backup.

        The repository validates the name (ids and disk names have fixed
        shapes); anything else is simply not an export."""
        if not name or "\0" in name or (self.only is not None and name not in self.only):
            return None
        try:
            key = self.repo.resolve(name).id
        except (NotFound, UsageError):
            return None
        return key if self.only is None or key in self.only else None

    def _info(self, key: str):
        if self.only is not None and key not in self.only:
            raise NotFound(f"{key} is not exported")
        return self.repo.get_backup(key)      # NotFound if it was deleted meanwhile

    def describe(self, key: str) -> str:
        return describe_backup(self._info(key))

    def size(self, key: str) -> int:
        return self._info(key).size

    def open(self, key: str) -> RepoBackend:
        if self.only is not None and key not in self.only:
            raise NotFound(f"{key} is not exported")
        img = self.repo.open_image(self.repo.resolve(key))
        try:
            return RepoBackend(img, key, self.cache)
        except BaseException:
            img.close()
            raise
