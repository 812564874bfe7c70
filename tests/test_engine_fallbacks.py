"""Rules that keep incrementals honest (managed-image mode).

A missing bitmap, an in-use (inconsistent) bitmap, a parent that is gone, and
someone else's bitmap each fall back to a full with a warning, or exit 13
with --no-fallback. A failed or killed run never makes a later incremental
miss a change.
"""

import json
import os
import signal
import subprocess
import time

from helpers import support
from helpers.engine_util import (
    MiB,
    backup,
    bitmaps,
    init_repo,
    make_image,
    nbb,
    qio,
    random_file,
    restore_equals,
    snapshot_raw,
)
from helpers.repo import pack_files


def _setup(tmp_path, name="vm.qcow2", size=16 * MiB):
    img = make_image(tmp_path / name, size)
    qio(img, "write -q -P 0x11 0 2M")
    repo = init_repo(tmp_path / "repo", "64K")
    full = backup(repo, "full", "--image", str(img))
    return img, repo, full


def _expect_fallback(repo, img, tmp_path, reason_re):
    p = nbb(repo, "incremental", "--no-fallback", "--image", str(img), check=False)
    assert p.returncode == 13, p.stderr
    assert "cannot take an incremental" in p.stderr and "Traceback" not in p.stderr
    p = nbb(repo, "--json", "incremental", "--image", str(img))
    info = json.loads(p.stdout)
    assert info["kind"] == "full" and info["parent"] is None
    assert "taking a full backup instead" in p.stderr
    import re
    assert re.search(reason_re, p.stderr), p.stderr
    assert restore_equals(repo, info["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    # and the chain works again afterwards
    qio(img, "write -q -P 0x66 5M 64k")
    inc = backup(repo, "incremental", "--image", str(img))
    assert inc["kind"] == "incremental" and inc["parent"] == info["id"]
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now2.raw"), tmp_path)
    return info


def test_bitmap_lifecycle_one_bitmap_per_repository(tmp_path):
    img, repo, full = _setup(tmp_path)
    names = [b["name"] for b in bitmaps(img)]
    assert len(names) == 1 and full["checkpoint"] in names[0]
    # a second repository keeps its own, independent chain of the same disk
    repo2 = init_repo(tmp_path / "repo2", "64K")
    f2 = backup(repo2, "full", "--image", str(img))
    assert len(bitmaps(img)) == 2
    qio(img, "write -q -P 0x22 3M 64k")
    inc = backup(repo, "incremental", "--image", str(img))
    inc2 = backup(repo2, "incremental", "--image", str(img))
    assert inc["parent"] == full["id"] and inc2["parent"] == f2["id"]
    assert inc["read_bytes"] == inc2["read_bytes"] == 64 * 1024
    assert len(bitmaps(img)) == 2      # old generations removed after commit


def test_missing_bitmap_falls_back(tmp_path):
    img, repo, full = _setup(tmp_path)
    for b in bitmaps(img):
        support.run(["qemu-img", "bitmap", "--remove", str(img), b["name"]])
    qio(img, "write -q -P 0x33 4M 64k")
    _expect_fallback(repo, img, tmp_path, "no dirty bitmap of this repository")


def test_in_use_bitmap_falls_back(tmp_path):
    img, repo, full = _setup(tmp_path)
    # a writer that dies without closing the image leaves the bitmap marked in-use
    sock = tmp_path / "w.sock"
    # -t: without it qemu-nbd exits cleanly (clearing in-use) when qemu-io disconnects
    proc = subprocess.Popen([support.require_tool("qemu-nbd"), "-t", "-k", str(sock), "-f", "qcow2", str(img)],
                            stderr=subprocess.PIPE)
    try:
        support.wait_for_path(sock, proc=proc)
        support.run(["qemu-io", "-f", "raw", "-c", "write -q -P 0x44 6M 64k", f"nbd+unix:///?socket={sock}"])
    finally:
        proc.kill()
        proc.wait()
    assert any("in-use" in b["flags"] for b in bitmaps(img))
    _expect_fallback(repo, img, tmp_path, "in-use")


def test_forgotten_parent_falls_back(tmp_path):
    img, repo, full = _setup(tmp_path)
    qio(img, "write -q -P 0x55 7M 64k")
    inc = backup(repo, "incremental", "--image", str(img))
    nbb(repo, "forget", inc["id"])
    qio(img, "write -q -P 0x56 9M 64k")
    # the bitmap on the image started at the forgotten backup: the latest one left
    # (the full) is NOT its parent, so an incremental against it would miss 7M
    _expect_fallback(repo, img, tmp_path, "no committed backup")


def test_someone_elses_bitmap_falls_back(tmp_path):
    img, repo, full = _setup(tmp_path)
    # a copy of the image carries the bitmap of disk "vm" into disk "copy"
    copy = tmp_path / "copy.qcow2"
    support.run(["cp", str(img), str(copy)])
    qio(copy, "write -q -P 0x57 1M 64k")
    _expect_fallback(repo, copy, tmp_path, "another disk's bitmap|no committed backup")


def test_not_qcow2_falls_back(tmp_path):
    img = make_image(tmp_path / "plain.raw", 8 * MiB, fmt="raw")
    qio(img, "write -q -P 0x11 0 1M", fmt="raw")
    repo = init_repo(tmp_path / "repo", "64K")
    full = backup(repo, "full", "--image", str(img))
    assert full["disk"] == "plain" and full["read_bytes"] == 1 * MiB
    p = nbb(repo, "incremental", "--no-fallback", "--image", str(img), check=False)
    assert p.returncode == 13 and "not qcow2" in p.stderr


def _children(pid: int, name: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        comm = st[st.index("(") + 1:st.rindex(")")]
        ppid = int(st[st.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == name:
            out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    """Running, or a zombie leader whose other threads are still exiting (they may still
    hold the image's lock: a process's files are closed when its last thread exits)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _qemu_nbd_children_mid_backup(proc, what: str, repo) -> list[int]:
    """The qemu-nbd children of a running `nbdbackup full`, once it has sealed its first
    pack (a fixed sleep is too long now that a backup of this image takes well under a second)."""
    deadline = time.monotonic() + 30
    kids = []
    while not kids and time.monotonic() < deadline and proc.poll() is None:
        kids = _children(proc.pid, "qemu-nbd")
        time.sleep(0.005)
    assert kids, "qemu-nbd never started"
    before = len(pack_files(repo, in_progress=True))     # sealed or being sealed
    while proc.poll() is None and len(pack_files(repo, in_progress=True)) == before and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the backup finished before it could be {what}"
    return kids


_MID_BACKUP_DATA = 448 * MiB    # random: hundreds of milliseconds of reading left after the first 16 MiB


def test_sigkill_mid_backup_leaves_no_server_and_loses_no_change(tmp_path):
    img, repo, full = _setup(tmp_path, size=512 * MiB)
    rnd = random_file(tmp_path / "r.bin", _MID_BACKUP_DATA, seed=3)
    qio(img, f"write -q -s {rnd} 64M {_MID_BACKUP_DATA}")     # the change the killed run must not lose
    proc = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "full", "--image", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        kids = _qemu_nbd_children_mid_backup(proc, "killed", repo)
        cmdline = open(f"/proc/{kids[0]}/cmdline", "rb").read().split(b"\0")
        sockdir = os.path.dirname(cmdline[cmdline.index(b"--socket") + 1].decode())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        support.stop(proc)
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(k) for k in kids), "qemu-nbd outlived the killed nbdbackup"
    qio(img, "write -q -P 0x12 1M 4k")          # the image is not locked any more
    assert [b["id"] for b in json.loads(nbb(repo, "--json", "list").stdout)] == [full["id"]]
    # the next incremental is relative to the committed full and holds every change
    inc = backup(repo, "incremental", "--image", str(img))
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    assert len(bitmaps(img)) == 1               # the killed run's bitmap was cleaned up
    assert not os.path.exists(sockdir)          # and its private socket dir


def test_image_in_use_is_refused(tmp_path):
    img, repo, full = _setup(tmp_path)
    with support.qemu_nbd(img, tmp_path / "w.sock", readonly=False):
        p = nbb(repo, "incremental", "--image", str(img), check=False)
    assert p.returncode == 3 and "in use" in p.stderr and "Traceback" not in p.stderr
    assert len(json.loads(nbb(repo, "--json", "list").stdout)) == 1


def test_sigterm_mid_backup_cleans_up(tmp_path):
    img, repo, full = _setup(tmp_path, size=512 * MiB)
    rnd = random_file(tmp_path / "r.bin", _MID_BACKUP_DATA, seed=4)
    qio(img, f"write -q -s {rnd} 64M {_MID_BACKUP_DATA}")
    proc = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "full", "--image", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        kids = _qemu_nbd_children_mid_backup(proc, "stopped", repo)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        support.stop(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not any(_alive(k) for k in kids)
    assert [b["id"] for b in json.loads(nbb(repo, "--json", "list").stdout)] == [full["id"]]
    # the interrupted run removed the bitmap it had added; the full's bitmap remains
    names = [b["name"] for b in bitmaps(img)]
    assert len(names) == 1 and names[0].endswith(full["checkpoint"]), names
