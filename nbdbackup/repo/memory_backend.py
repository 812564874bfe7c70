"""MemoryBackend: a storage backend in a dict, for tests and as the model the others must match."""

from __future__ import annotations

import errno
import threading
import time
from typing import Iterable, Iterator

from ..errors import NoSpaceError
from .backends import ObjectInfo, StorageBackend, check_name


class MemoryBackend(StorageBackend):
    """Objects in a dict; for tests and as the model other backends must match.

    *capacity* (bytes) simulates a full disk: a put() that would exceed it
    raises NoSpaceError and stores nothing."""

    def __init__(self, capacity: int | None = None):
        self._objs: dict[str, bytes] = {}
        self._mtimes: dict[str, float] = {}
        self._lock = threading.Lock()
        self.capacity = capacity

    def put(self, name: str, parts: Iterable[bytes]) -> None:
        check_name(name)
        data = b"".join(bytes(p) for p in parts)
        with self._lock:
            if name in self._objs:
                raise FileExistsError(errno.EEXIST, "object exists (put never overwrites)", name)
            used = sum(len(v) for v in self._objs.values())
            if self.capacity is not None and used + len(data) > self.capacity:
                raise NoSpaceError(f"no space left in the memory backend while writing {name}")
            self._objs[name] = data
            self._mtimes[name] = time.time()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            data = self._objs.get(name)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", name)
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def size(self, name: str) -> int:
        with self._lock:
            if name not in self._objs:
                raise FileNotFoundError(errno.ENOENT, "no such object", name)
            return len(self._objs[name])

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._objs

    def delete(self, name: str) -> None:
        with self._lock:
            self._objs.pop(name, None)
            self._mtimes.pop(name, None)

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            return iter(sorted(n for n in self._objs if n.startswith(prefix)))

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            return iter([ObjectInfo(n, len(self._objs[n]), self._mtimes[n])
                         for n in sorted(self._objs) if n.startswith(prefix)])

    def remove_incomplete(self, older_than: float) -> tuple[int, int]:
        return 0, 0         # a put() here is one step: nothing is ever left half-written
