"""One conformance suite for every storage backend (local directory, memory, S3 on radosgw)."""

import os
import threading
import time

import pytest

from nbdbackup.errors import NoSpaceError
from nbdbackup.repo.backends import LocalBackend
from nbdbackup.repo.memory_backend import MemoryBackend


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        (tmp_path / "tmp").mkdir()
        b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
        os.makedirs(b.root)
    elif request.param == "s3":
        b = request.getfixturevalue("ceph_s3").backend(request.getfixturevalue("s3_bucket"), "repo/one")
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


def test_get_into_fills_buffers_back_to_back(backend):
    body = bytes(range(256)) * 40
    backend.put("packs/ab/y.pack", [body])
    bufs = [bytearray(n) for n in (3, 1000, 0, 4000)]
    assert backend.get_into("packs/ab/y.pack", 5, [memoryview(b) for b in bufs]) == 5003
    assert b"".join(bufs) == body[5:5008]
    # past the end: filled as far as the object goes, the count says how far
    tail = [bytearray(100), bytearray(100)]
    assert backend.get_into("packs/ab/y.pack", len(body) - 150, [memoryview(b) for b in tail]) == 150
    assert bytes(tail[0]) + bytes(tail[1][:50]) == body[-150:]
    with pytest.raises(FileNotFoundError):
        backend.get_into("packs/00/none.pack", 0, [memoryview(bytearray(1))])


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


def test_put_never_replaces(backend):
    """Create-only: a second put of a name fails and leaves the first object as it was."""
    backend.put("o", [b"first"])
    with pytest.raises(FileExistsError):
        backend.put("o", [b"second!", memoryview(b"?")])
    with pytest.raises(FileExistsError):
        backend.put_aligned("o", _aligned(b"third"), 5)
    assert backend.get("o") == b"first"
    assert list(backend.list()) == ["o"]


def test_racing_puts_have_exactly_one_winner(backend):
    """8 threads put different bytes under one name at once: one wins, 7 get FileExistsError,
    and the object holds the winner's bytes, whole."""
    start = threading.Barrier(8)
    won, lost = [], []

    def racer(i):
        data = bytes([i]) * (256 * 1024)
        start.wait()
        try:
            backend.put("packs/aa/race.pack", [data])
            won.append(data)
        except FileExistsError:
            lost.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert backend.get("packs/aa/race.pack") == won[0]


def test_list_info_sizes_and_mtimes(backend):
    t0 = time.time()
    for n, size in (("packs/b/2.pack", 5000), ("packs/a/1.pack", 0), ("other/x", 17)):
        backend.put(n, [b"x" * size])
    t1 = time.time()
    infos = list(backend.list_info("packs/"))
    assert [(i.name, i.size) for i in infos] == [("packs/a/1.pack", 0), ("packs/b/2.pack", 5000)]
    for i in infos:                      # S3 keeps whole seconds
        assert t0 - 2 <= i.mtime <= t1 + 2, (i, t0, t1)
    assert [i.name for i in backend.list_info()] == list(backend.list())


def _start_incomplete(backend) -> int:
    """An upload left unfinished, as a killed writer leaves it; its bytes (0: none possible)."""
    if isinstance(backend, LocalBackend):
        with open(os.path.join(backend.tmp_dir, "deadbeef.tmp"), "wb") as f:
            f.write(b"z" * 1234)
        return 1234
    if isinstance(backend, MemoryBackend):
        return 0
    c = backend.client
    up = c.create_multipart_upload(Bucket=backend.bucket, Key=backend.prefix + "packs/ab/half.pack")
    c.upload_part(Bucket=backend.bucket, Key=backend.prefix + "packs/ab/half.pack", UploadId=up["UploadId"],
                  PartNumber=1, Body=b"z" * 1234)
    return 1234


def test_remove_incomplete(backend):
    backend.put("packs/ab/done.pack", [b"kept"])
    nbytes = _start_incomplete(backend)
    assert backend.remove_incomplete(time.time() - 3600) == (0, 0)       # too young: maybe in progress
    assert backend.remove_incomplete(time.time() + 5) == ((1, nbytes) if nbytes else (0, 0))
    assert backend.remove_incomplete(time.time() + 5) == (0, 0)          # gone
    assert backend.get("packs/ab/done.pack") == b"kept"
    assert list(backend.list()) == ["packs/ab/done.pack"]


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


def test_local_refused_put_leaves_no_temporary(tmp_path):
    (tmp_path / "tmp").mkdir()
    b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
    b.put("packs/ab/y.pack", [b"data"])
    with pytest.raises(FileExistsError):
        b.put_aligned("packs/ab/y.pack", _aligned(b"other"), 5)
    assert (tmp_path / "root/packs/ab/y.pack").read_bytes() == b"data"
    assert os.listdir(tmp_path / "tmp") == []
    assert os.stat(tmp_path / "root/packs/ab/y.pack").st_nlink == 1     # tmp/'s name is gone


def test_local_remove_incomplete_keeps_young_and_foreign_files(tmp_path):
    (tmp_path / "tmp").mkdir()
    b = LocalBackend(str(tmp_path / "root"), str(tmp_path / "tmp"))
    for name, age in (("old.tmp", 7200), ("young.tmp", 10), ("other-file", 7200)):
        (tmp_path / "tmp" / name).write_bytes(b"x" * 10)
        t = time.time() - age
        os.utime(tmp_path / "tmp" / name, (t, t))
    assert b.remove_incomplete(time.time() - 3600) == (1, 10)
    assert sorted(os.listdir(tmp_path / "tmp")) == ["other-file", "young.tmp"]


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
