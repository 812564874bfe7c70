"""A source that fails mid-backup: retries, then exit 12 with nothing committed."""

import contextlib
import json
import struct
import subprocess
import time

from helpers import support
from helpers.engine_util import MiB, init_repo, make_image, nbb, qio, random_file


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
    """Block status that always fails: retried like reads (3 times), then exit 12, nothing listed."""
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--filter=error", "memory", "size=8M", "error-extents=EIO",
                "error-extents-rate=100%") as uri:
        p = nbb(repo, "full", "--source", uri, "--disk", "bad", check=False)
    assert p.returncode == 12 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("retrying") == 3 and "failed after 4 attempt(s)" in p.stderr, p.stderr
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


def test_extent_errors_are_retried_like_reads(tmp_path):
    """Block status fails (EIO) until the error file goes: retried with back-off, then the backup completes."""
    size = 8 * MiB
    repo = init_repo(tmp_path / "repo", "64K")
    inject = tmp_path / "inject-extents"
    inject.touch()
    # sparse-random answers block status (data and holes); pattern has no extents for the filter to fail
    with nbdkit(tmp_path, "--filter=error", "sparse-random", f"size={size}", "seed=7", "percent=50", "runlength=65536",
                "error-extents=EIO", "error-extents-rate=100%", f"error-extents-file={inject}") as uri:
        bk = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "--json", "full", "--source", uri,
                               "--disk", "flaky"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            err = ""
            for line in bk.stderr:          # the first failure: the server recovers
                err += line
                if "retrying" in line:
                    inject.unlink()
                    break
            out, rest = bk.communicate(timeout=120)
        finally:
            support.stop(bk)
        err += rest
        assert bk.returncode == 0, err
        expected = tmp_path / "expected.raw"
        support.run([support.require_tool("nbdcopy"), uri, str(expected)])
    assert "block status of" in err and "EIO" in err, err
    info = json.loads(out)
    assert info["read_bytes"] > 0
    restored = tmp_path / "flaky.raw"
    nbb(repo, "restore", info["id"], str(restored))
    assert restored.read_bytes() == expected.read_bytes()


def _unalignable_tail(tmp_path, *args):
    """An export whose size (1 MiB + 512) is not a multiple of its minimum block size (4096),
    under a policy that refuses unaligned requests (EINVAL): the tail cannot be asked for."""
    repo = init_repo(tmp_path / "repo", "64K")
    with nbdkit(tmp_path, "--filter=blocksize-policy", *args, "size=1049088",
                "blocksize-minimum=4096", "blocksize-error-policy=error") as uri:
        p = nbb(repo, "full", "--source", uri, "--disk", "odd", check=False)
    assert p.returncode == 12 and "Traceback" not in p.stderr, p.stderr
    assert "retrying" not in p.stderr, p.stderr     # deterministic: reported at once
    assert "EINVAL" in p.stderr and "size 1049088" in p.stderr and "aligned to 4096 bytes" in p.stderr
    assert "the last 512 bytes cannot be asked for" in p.stderr, p.stderr
    assert _listed(repo) == []
    return p.stderr


def test_unalignable_block_status_is_reported_at_once(tmp_path):
    err = _unalignable_tail(tmp_path, "memory")
    assert "block status of 1049088 bytes at offset 0" in err, err


def test_unalignable_read_is_reported_at_once(tmp_path):
    # --no-sr: no structured replies, so no block status: the tail's READ is what the server refuses
    err = _unalignable_tail(tmp_path, "--no-sr", "pattern")
    assert "reading 512 bytes at offset 1048576" in err, err
