"""A source that fails mid-backup: retries, then exit 12 with nothing committed."""

import contextlib
import json
import struct
import subprocess
import time

import support
from engine_util import MiB, init_repo, make_image, nbb, qio, random_file


@contextlib.contextmanager
def nbdkit(tmp_path, *args):
    exe = support.require_tool("nbdkit")
    sock = tmp_path / "kit.sock"
    proc = subprocess.Popen([exe, "-f", "-U", str(sock), *args], stderr=subprocess.PIPE, text=True)
    try:
        support.wait_for_path(sock, proc=proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        support.stop(proc)


def _pattern(size: int) -> bytes:
    # nbdkit-pattern-plugin: each 8-byte word holds its own offset, big-endian
    return b"".join(struct.pack(">Q", i) for i in range(0, size, 8))


def _listed(repo):
    return json.loads(nbb(repo, "--json", "list").stdout)


def test_every_read_failing_commits_nothing(tmp_path):
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--filter=error", "pattern", "size=8M", "error-pread=EIO",
                "error-pread-rate=100%") as uri:
        t0 = time.monotonic()
        p = nbb(repo, "full", "--source", uri, "--disk", "bad", check=False)
        elapsed = time.monotonic() - t0
    assert p.returncode == 12, p.stderr
    assert "nothing was committed" in p.stderr and "Traceback" not in p.stderr
    assert elapsed < 30          # fails fast once a chunk exhausted its retries
    assert _listed(repo) == []


def test_occasional_errors_are_retried(tmp_path):
    size = 8 * MiB
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--filter=error", "pattern", f"size={size}", "error-pread=EIO",
                "error-pread-rate=3%") as uri:
        p = nbb(repo, "--json", "full", "--source", uri, "--disk", "flaky")
    info = json.loads(p.stdout)
    assert info["read_bytes"] == size
    out = tmp_path / "flaky.raw"
    nbb(repo, "restore", info["id"], str(out))
    assert out.read_bytes() == _pattern(size)


def test_extent_errors_fail_cleanly(tmp_path):
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--filter=error", "memory", "size=8M", "error-extents=EIO",
                "error-extents-rate=100%") as uri:
        p = nbb(repo, "full", "--source", uri, "--disk", "bad", check=False)
    assert p.returncode == 12 and "Traceback" not in p.stderr, p.stderr
    assert _listed(repo) == []


def test_qemu_nbd_killed_during_backup(tmp_path):
    """A throttled qemu-nbd (8 MiB/s) is killed a second into a 32 MiB backup."""
    img = make_image(tmp_path / "slow.qcow2", 64 * MiB)
    rnd = random_file(tmp_path / "r.bin", 32 * MiB, seed=5)
    qio(img, f"write -q -s {rnd} 0 32M")
    repo = init_repo(tmp_path / "repo", "64K")
    sock = tmp_path / "slow.sock"
    srv = subprocess.Popen([support.require_tool("qemu-nbd"), "-r", "-t", "-e", "4", "-k", str(sock),
                            "--object", "throttle-group,id=tg0,x-bps-read=8388608", "--image-opts",
                            f"driver=throttle,throttle-group=tg0,file.driver=qcow2,"
                            f"file.file.driver=file,file.file.filename={img}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        support.wait_for_path(sock, proc=srv)
        bk = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "full", "--source",
                               f"nbd+unix:///?socket={sock}", "--disk", "slow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            assert bk.poll() is None, "the backup finished before the server was killed"
            srv.kill()
            srv.wait()
            out, err = bk.communicate(timeout=120)
        finally:
            support.stop(bk)
    finally:
        support.stop(srv)
    assert bk.returncode == 12, err
    assert "nothing was committed" in err and "Traceback" not in err
    assert _listed(repo) == []


def test_server_without_structured_replies(tmp_path):
    """No structured replies means no meta contexts: everything is read, zeros detected after reading."""
    size = 4 * MiB
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--no-sr", "pattern", f"size={size}") as uri:
        info = json.loads(nbb(repo, "--json", "full", "--source", uri, "--disk", "simple").stdout)
        p = nbb(repo, "incremental", "--source", uri, "--disk", "simple", "--bitmap", "b", "--no-fallback",
                check=False)
    assert info["read_bytes"] == size
    assert p.returncode == 13 and "qemu:dirty-bitmap:b" in p.stderr
    out = tmp_path / "simple.raw"
    nbb(repo, "restore", info["id"], str(out))
    assert out.read_bytes() == _pattern(size)
