"""One conformance suite for every storage backend (local directory, memory)."""

import os

import pytest

from nbdbackup.errors import NoSpaceError
from nbdbackup.repo.backends import LocalBackend, MemoryBackend


@pytest.fixture(params=["local", "memory"])
def backend(request, tmp_path):
    if request.param == "local":
        (tmp_path / "tmp").mkdir()
        b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
        os.makedirs(b.root)
    else:
        b = MemoryBackend()
    yield b
    b.close()


def test_put_get_ranges(backend):
    backend.put("packs/ab/x.pack", [b"hello ", b"world"])
    assert backend.exists("packs/ab/x.pack")
    assert backend.size("packs/ab/x.pack") == 11
    assert backend.get("packs/ab/x.pack") == b"hello world"
    assert backend.get("packs/ab/x.pack", 6, 5) == b"world"
    assert backend.get("packs/ab/x.pack", 6) == b"world"
    assert backend.get("packs/ab/x.pack", 9, 10) == b"ld"   # short read past the end


def test_missing_object(backend):
    assert not backend.exists("packs/00/none.pack")
    with pytest.raises(FileNotFoundError):
        backend.get("packs/00/none.pack", 0, 1)
    with pytest.raises(FileNotFoundError):
        backend.size("packs/00/none.pack")
    backend.delete("packs/00/none.pack")   # missing is not an error


def test_list_and_delete(backend):
    for n in ("packs/b/2.pack", "packs/a/1.pack", "other/x"):
        backend.put(n, [n.encode()])
    assert list(backend.list("packs/")) == ["packs/a/1.pack", "packs/b/2.pack"]
    assert list(backend.list()) == ["other/x", "packs/a/1.pack", "packs/b/2.pack"]
    backend.get("packs/a/1.pack", 0, 1)
    backend.delete("packs/a/1.pack")
    assert not backend.exists("packs/a/1.pack")
    assert list(backend.list("packs/")) == ["packs/b/2.pack"]


def test_put_replaces_atomically(backend):
    backend.put("o", [b"first"])
    backend.put("o", [b"second!", memoryview(b"?")])
    assert backend.get("o") == b"second!?"


def test_bad_names(backend):
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            backend.put(bad, [b"x"])


def test_large_object_and_many_reads(backend):
    data = os.urandom(3 << 20)
    backend.put("big", [data[:1 << 20], data[1 << 20:]])
    for off in range(0, len(data), 777_777):
        assert backend.get("big", off, 4096) == data[off:off + 4096]


def test_local_put_is_renamed_from_tmp(tmp_path):
    (tmp_path / "tmp").mkdir()
    b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
    b.put("packs/ab/y.pack", [b"data"])
    assert (tmp_path / "root/packs/ab/y.pack").read_bytes() == b"data"
    assert os.listdir(tmp_path / "tmp") == []     # no temporary left behind


def test_memory_capacity_is_enospc():
    b = MemoryBackend(capacity=10)
    b.put("a", [b"12345"])
    with pytest.raises(NoSpaceError):
        b.put("b", [b"123456"])
    assert not b.exists("b")
    assert b.get("a") == b"12345"
