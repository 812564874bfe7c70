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


def _aligned(data: bytes, room: int = 8192):
    import mmap

    buf = mmap.mmap(-1, len(data) + room)
    buf[:len(data)] = data
    buf[len(data):len(data) + 4096] = b"\xff" * 4096     # what lies past the end is not stored
    return buf


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, (1 << 20) + 123])
def test_put_aligned_stores_exactly_the_prefix(backend, n):
    data = os.urandom(n)
    buf = _aligned(data)
    backend.put_aligned(f"packs/aa/{n}.pack", buf, n)
    buf.close()
    assert backend.size(f"packs/aa/{n}.pack") == n
    assert backend.get(f"packs/aa/{n}.pack") == data


def test_local_put_aligned_on_tmpfs(tmp_path):
    """/dev/shm (tmpfs): with or without O_DIRECT there, the object is exact."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        os.mkdir(os.path.join(d, "tmp"))
        b = LocalBackend(os.path.join(d, "root"), os.path.join(d, "tmp"))
        data = os.urandom(100_000)
        buf = _aligned(data)
        b.put_aligned("packs/ab/z.pack", buf, len(data))
        buf.close()
        assert b.get("packs/ab/z.pack") == data
        assert os.listdir(os.path.join(d, "tmp")) == []


def test_local_put_aligned_falls_back_when_the_device_refuses_o_direct(tmp_path, monkeypatch):
    """EINVAL from an O_DIRECT write (alignment the device does not take): written again, buffered."""
    import errno

    from nbdbackup.repo import backends

    (tmp_path / "tmp").mkdir()
    b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(backends.os, "pwrite", pwrite)
    data = os.urandom(10_000)
    buf = _aligned(data)
    b.put_aligned("packs/ab/w.pack", buf, len(data))
    buf.close()
    assert refused, "the file system here took no O_DIRECT open: nothing was refused"
    assert b.get("packs/ab/w.pack") == data
