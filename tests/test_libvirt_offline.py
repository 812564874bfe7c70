"""Shut-off libvirt domains backed up from their images (sources/libvirt_offline.py), and the
checkpoint chain across start and stop (sources/libvirt_checkpoints.py), against the real
libvirtd of qemu:///system.

A running domain's guest writes go through HMP qemu-io on its virtio disk; a shut-off
domain's images are written with qemu-io on the file, as an admin (or another tool) might.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import support
from helpers.engine_util import MiB, init_repo, nbb, qio, random_file, restore_equals, snapshot_raw
from helpers.libvirt import URI, disk_now, guest_write, virsh

pytestmark = pytest.mark.libvirt

@pytest.fixture
def shut_off(libvirt_domain):
    """shut_off(disks) -> TestDomain: a persistent domain, defined but not running."""
    return lambda disks=(("qcow2", 64 * MiB),): libvirt_domain(disks, persistent=True, running=False)


# --- driving a shut-off backup -----------------------------------------------------------------

def _offline(repo: Path, name: str, kind: str, *flags: str, check: bool = True, popen: bool = False):
    """`nbdbackup KIND --libvirt NAME` of a shut-off domain (the CLI hands it to
    OfflineDomainSource); with check, ({target: backup}, stderr)."""
    return _backup(repo, name, kind, *flags, check=check, popen=popen)


def _backup(repo: Path, name: str, kind: str, *flags: str, check: bool = True, popen: bool = False):
    args = ["--repo", str(repo), "--json", kind, "--libvirt", name, "--connections", "2", *flags]
    if popen:
        return subprocess.Popen([support.nbdbackup_exe(), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    p = support.nbdbackup(*args, check=False)
    if not check:
        return p
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    return {b["disk"].rsplit("-", 1)[1]: b for b in (out if isinstance(out, list) else [out])}, p.stderr


# --- looking at the state ----------------------------------------------------------------------

def _repo_id(repo: Path) -> str:
    return json.loads((repo / "config.json").read_text())["repo_id"]


def _bitmaps(img: Path) -> dict[str, list[str]]:
    out = json.loads(support.run(["qemu-img", "info", "-U", "--output=json", str(img)]).stdout)
    return {b["name"]: b["flags"] for b in (out.get("format-specific") or {}).get("data", {}).get("bitmaps", [])}


def _checkpoints(name: str) -> list[str]:
    return sorted(virsh("checkpoint-list", name, "--name").stdout.split())


def _checkpoint_disks(name: str, checkpoint: str) -> dict[str, str]:
    xml = ET.fromstring(virsh("checkpoint-dumpxml", name, checkpoint, "--no-domain").stdout)
    return {d.get("name"): d.get("checkpoint") for d in xml.findall("./disks/disk")}


def _reconcile(name: str, repo: Path, want: str | None) -> str | None:
    import libvirt

    from nbdbackup.sources.libvirt_checkpoints import reconcile_checkpoints
    from nbdbackup.sources.libvirt_domain import backup_disks

    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        return reconcile_checkpoints(dom, _repo_id(repo), backup_disks(dom.XMLDesc(0))[0], want)
    finally:
        conn.close()


# --- tests -------------------------------------------------------------------------------------

def test_chain_goes_on_across_start_and_stop(shut_off, tmp_path):
    dom = shut_off([("qcow2", 64 * MiB)])
    name, images = dom.name, dom.disks
    img = images["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    snaps = {}
    # another tool's and another repository's checkpoints, and another repository's bitmap
    # that libvirt does not know: never used, never removed
    foreign = ["virtnbdbackup.0", "nbdbackup-" + "0" * 32 + "-20261201T000000Z-00000000"]
    dom.start()
    for checkpoint in foreign:
        virsh("checkpoint-create-as", name, checkpoint, "--diskspec", "vda,checkpoint=bitmap")
    dom.stop()
    foreign_bitmap = "nbdbackup-" + "f" * 32 + "-20261201T000000Z-ffffffff"
    support.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", str(img), foreign_bitmap])

    def checkpoints() -> list[str]:
        every = _checkpoints(name)
        assert set(foreign) <= set(every), every
        return [c for c in every if c not in foreign]

    def bitmaps() -> list[str]:
        every = _bitmaps(img)
        assert set(foreign) | {foreign_bitmap} <= set(every), every
        return [b for b in every if b.startswith(prefix)]

    full, _ = _offline(repo, name, "full")
    full = full["vda"]
    assert full["kind"] == "full" and full["disk"] == f"{name}-vda" and full["source"] == f"libvirt:{name}/vda"
    assert full["checkpoint"]
    assert full["domain"] == name and full["vm"], full         # the set carries the domain's definition
    snaps[full["id"]] = snapshot_raw(img, tmp_path / "full.raw")
    assert bitmaps() == [prefix + full["checkpoint"]]
    # libvirt knows the checkpoint the images now hold: redefined on the inactive domain
    assert checkpoints() == [prefix + full["checkpoint"]]
    assert _checkpoint_disks(name, prefix + full["checkpoint"]) == {"vda": "bitmap"}

    qio(img, "write -q -P 0x22 8M 64K")                       # written while shut off
    inc1, _ = _offline(repo, name, "incremental")
    inc1 = inc1["vda"]
    assert inc1["kind"] == "incremental" and inc1["parent"] == full["id"]
    assert 0 < inc1["read_bytes"] <= 64 * 1024, inc1
    snaps[inc1["id"]] = snapshot_raw(img, tmp_path / "inc1.raw")
    assert bitmaps() == [prefix + inc1["checkpoint"]]
    assert checkpoints() == [prefix + inc1["checkpoint"]]      # the old one's metadata went

    # start: libvirt validates the checkpoint against the running qemu's bitmaps
    dom.start()
    assert _reconcile(name, repo, inc1["checkpoint"]) is None
    assert checkpoints() == [prefix + inc1["checkpoint"]]
    guest_write(dom, "vda", 0x33, 20 * MiB, 64 * 1024)
    dom.stop()
    flags = _bitmaps(img)[prefix + inc1["checkpoint"]]
    assert "auto" in flags and "in-use" not in flags, flags     # saved by qemu on SIGTERM

    inc2, _ = _offline(repo, name, "incremental")
    inc2 = inc2["vda"]
    assert inc2["kind"] == "incremental" and inc2["parent"] == inc1["id"]
    assert 0 < inc2["read_bytes"] <= 64 * 1024, inc2        # exactly the guest's write
    snaps[inc2["id"]] = snapshot_raw(img, tmp_path / "inc2.raw")
    assert checkpoints() == [prefix + inc2["checkpoint"]]

    assert all("auto" in _bitmaps(img)[b] for b in [*foreign, foreign_bitmap])
    for backup_id, snap in snaps.items():
        assert restore_equals(repo, backup_id, snap, tmp_path), backup_id


def test_lost_bitmap_means_a_full_and_13_with_no_fallback(shut_off, tmp_path):
    dom = shut_off([("qcow2", 32 * MiB)])
    name, images = dom.name, dom.disks
    img = images["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    qio(img, "write -q -P 0x44 1M 64K")
    support.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(img), prefix + full["vda"]["checkpoint"]])

    p = _offline(repo, name, "incremental", "--no-fallback", check=False)
    assert p.returncode == 13, p.stdout + p.stderr
    assert "no dirty bitmap of this repository" in p.stderr, p.stderr
    assert _bitmaps(img) == {}                                  # the refused run left nothing
    assert _checkpoints(name) == [prefix + full["vda"]["checkpoint"]]

    again, err = _offline(repo, name, "incremental")
    assert again["vda"]["kind"] == "full" and "taking a full backup instead" in err, err
    assert restore_equals(repo, again["vda"]["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    assert _checkpoints(name) == [prefix + again["vda"]["checkpoint"]]
    # the running domain's reconcile says why an older checkpoint is no base, and drops it
    dom.start()
    why = _reconcile(name, repo, full["vda"]["checkpoint"])
    assert why and "missing or broken bitmap" in why, why
    assert _checkpoints(name) == [prefix + again["vda"]["checkpoint"]]
    assert _reconcile(name, repo, again["vda"]["checkpoint"]) is None


def test_raw_disk_is_full_each_time_beside_an_incremental_qcow2(shut_off, tmp_path):
    dom = shut_off([("qcow2", 32 * MiB), ("raw", 8 * MiB)])
    name, images = dom.name, dom.disks
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    assert full["vda"]["set_id"] and full["vda"]["set_id"] == full["vdb"]["set_id"]
    assert full["vda"]["created"] == full["vdb"]["created"]
    assert full["vda"]["checkpoint"] and full["vdb"]["checkpoint"] is None
    assert _checkpoint_disks(name, prefix + full["vda"]["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}

    qio(images["vda"], "write -q -P 0x55 3M 64K")
    qio(images["vdb"], "write -q -P 0x66 5M 64K", fmt="raw")
    inc, err = _offline(repo, name, "incremental", "--no-fallback")      # a raw disk is no broken chain
    assert inc["vda"]["kind"] == "incremental" and inc["vda"]["read_bytes"] <= 64 * 1024
    # a full: every allocated byte again (the first MiB and the new write), not just the change
    assert inc["vdb"]["kind"] == "full" and inc["vdb"]["read_bytes"] >= 1 * MiB + 64 * 1024, inc["vdb"]
    assert "vdb" in err and "not qcow2" in err, err
    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        snap = tmp_path / f"{target}.raw"
        support.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(images[target]), str(snap)])
        assert restore_equals(repo, inc[target]["id"], snap, tmp_path), target
    assert _checkpoints(name) == [prefix + inc["vda"]["checkpoint"]]
    # libvirt lost the checkpoint (as when a run is killed between its commit and the redefine):
    # the running side's reconcile brings it back from the bitmap qemu has
    virsh("checkpoint-delete", name, prefix + inc["vda"]["checkpoint"], "--metadata")
    dom.start()
    assert _reconcile(name, repo, inc["vda"]["checkpoint"]) is None
    assert _checkpoints(name) == [prefix + inc["vda"]["checkpoint"]]
    assert _checkpoint_disks(name, prefix + inc["vda"]["checkpoint"]) == {"vda": "bitmap", "vdb": "no"}


def test_killed_offline_run_loses_nothing(shut_off, tmp_path):
    dom = shut_off([("qcow2", 96 * MiB)])
    name, img = dom.name, dom.disks["vda"]
    data = random_file(tmp_path / "data.raw", 96 * MiB, seed=14)
    qio(img, f"write -q -s {data} 0 96M")
    data.unlink()
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, name, "full")
    full = full["vda"]
    # change most of the disk so that the incremental reads long enough to be killed
    change = random_file(tmp_path / "change.raw", 80 * MiB, seed=15)
    qio(img, f"write -q -s {change} 0 80M", "write -q -P 0x77 90M 64K")

    _kill_when_served(_offline(repo, name, "incremental", popen=True), img, delay=0.05)   # into the read
    assert [b["id"] for b in json.loads(nbb(repo, "--json", "list").stdout)] == [full["id"]]
    leftover = set(_bitmaps(img)) - {prefix + full["checkpoint"]}
    assert len(leftover) == 1, _bitmaps(img)

    qio(img, "write -q -P 0x78 91M 64K")
    inc, _ = _offline(repo, name, "incremental")
    inc = inc["vda"]
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    assert list(_bitmaps(img)) == [prefix + inc["checkpoint"]]     # the killed run's bitmap is gone
    assert _checkpoints(name) == [prefix + inc["checkpoint"]]
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("nbdbackup-nbd-")
                and _owner_gone(Path(tempfile.gettempdir(), n))]

    # killed again, and then the domain is started: the running side removes the leftover
    qio(img, f"write -q -s {change} 0 80M")
    _kill_when_served(_offline(repo, name, "incremental", popen=True), img)
    assert len(set(_bitmaps(img)) - {prefix + inc["checkpoint"]}) == 1, _bitmaps(img)
    dom.start()
    assert _reconcile(name, repo, inc["checkpoint"]) is None
    guest_write(dom, "vda", 0x79, 92 * MiB, 64 * 1024)
    dom.stop()
    assert list(_bitmaps(img)) == [prefix + inc["checkpoint"]]
    assert _checkpoints(name) == [prefix + inc["checkpoint"]]
    last, _ = _offline(repo, name, "incremental")
    assert last["vda"]["kind"] == "incremental" and last["vda"]["parent"] == inc["id"]
    assert restore_equals(repo, last["vda"]["id"], snapshot_raw(img, tmp_path / "last.raw"), tmp_path)


def _kill_when_served(proc: subprocess.Popen, img: Path, delay: float = 0.0) -> None:
    deadline = time.monotonic() + 60
    while not _served(img):                                     # bitmap added, qemu-nbd serving
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _served(img: Path) -> bool:
    """Whether a qemu-nbd of a backup run serves *img* (its private dir names the image)."""
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob("nbdbackup-nbd-*"):
        try:
            if (d / "image").read_text() == os.path.realpath(img) and (d / "nbd.sock").exists():
                return True
        except OSError:
            continue
    return False


def _owner_gone(d: Path) -> bool:
    try:
        os.kill(int((d / "owner").read_text()), 0)
        return False
    except (OSError, ValueError):
        return True



@pytest.mark.parametrize("disks", [[("qcow2", 64 * MiB)], [("qcow2", 32 * MiB), ("raw", 8 * MiB)]],
                         ids=["qcow2", "qcow2+raw"])
def test_running_and_shut_off_backups_are_one_chain(libvirt_domain, tmp_path, disks):
    """running full -> guest write -> stop -> shut-off incremental -> write to the image ->
    start -> running incremental -> guest write -> stop -> shut-off incremental."""
    dom = libvirt_domain(disks, persistent=True, running=True)
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    snaps: dict[str, Path] = {}
    step = iter(range(100))

    def backup(kind: str, *, expect: str, parent: dict | None, dirty_max: int | None = 64 * 1024):
        got, err = _backup(repo, dom.name, kind)
        vda = got["vda"]
        assert vda["kind"] == expect and vda["parent"] == (parent["id"] if parent else None), (vda, err)
        if dirty_max is not None:
            assert 0 < vda["read_bytes"] <= dirty_max, vda      # only the change
        assert _checkpoints(dom.name) == [prefix + vda["checkpoint"]]
        for target, info in got.items():
            assert info["source"] == f"libvirt:{dom.name}/{target}"
            snaps[info["id"]] = disk_now(dom.disks[target], tmp_path / f"{target}-{next(step)}.raw")
        if "vdb" in got:            # raw: a full each time, and never a checkpoint
            assert got["vdb"]["kind"] == "full" and got["vdb"]["checkpoint"] is None
            assert got["vdb"]["set_id"] == vda["set_id"]
            assert kind == "full" or "not qcow2" in err, err
        return vda

    full = backup("full", expect="full", parent=None, dirty_max=None)
    guest_write(dom, "vda", 0x33, 4 * MiB, 64 * 1024)
    dom.stop()
    flags = _bitmaps(dom.disks["vda"])[prefix + full["checkpoint"]]
    assert "auto" in flags and "in-use" not in flags, flags        # qemu saved it on SIGTERM

    off1 = backup("incremental", expect="incremental", parent=full)
    qio(dom.disks["vda"], "write -q -P 0x44 12M 64K")                # while shut off
    dom.start()
    run1 = backup("incremental", expect="incremental", parent=off1)  # libvirt's job sees that write
    guest_write(dom, "vda", 0x55, 30 * MiB, 64 * 1024)
    dom.stop()
    backup("incremental", expect="incremental", parent=run1)

    for backup_id, snap in snaps.items():
        assert restore_equals(repo, backup_id, snap, tmp_path), backup_id


def test_killed_qemu_means_a_full(libvirt_domain, tmp_path):
    """qemu killed outright (a host crash, an OOM kill): a checkpoint libvirt made while it ran
    never reached the image (qemu writes new persistent bitmaps when it closes the image), and a
    bitmap it loaded at start is left marked in-use (it may miss writes). Either way the next
    shut-off backup is a full with the reason (13 with --no-fallback), and the chain starts
    again from there."""
    dom = libvirt_domain([("qcow2", 32 * MiB)], persistent=True, running=True)
    img = dom.disks["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"

    def kill_qemu(pattern: int) -> None:
        guest_write(dom, "vda", pattern, 2 * MiB, 64 * 1024)
        os.kill(int(Path(f"/run/libvirt/qemu/{dom.name}.pid").read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while dom.is_active():
            assert time.monotonic() < deadline, "libvirt did not notice qemu's death"
            time.sleep(0.1)

    def full_instead(why: str) -> dict:
        p = _offline(repo, dom.name, "incremental", "--no-fallback", check=False)
        assert p.returncode == 13 and why in p.stderr, p.stdout + p.stderr
        got, err = _offline(repo, dom.name, "incremental")
        assert got["vda"]["kind"] == "full" and why in err, err
        assert restore_equals(repo, got["vda"]["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
        assert list(_bitmaps(img)) == [prefix + got["vda"]["checkpoint"]]
        assert _checkpoints(dom.name) == [prefix + got["vda"]["checkpoint"]]
        return got["vda"]

    running, _ = _backup(repo, dom.name, "full")
    kill_qemu(0x66)
    assert prefix + running["vda"]["checkpoint"] not in _bitmaps(img)
    first = full_instead("no dirty bitmap of this repository")

    dom.start()                     # qemu loads the bitmap the shut-off full added...
    kill_qemu(0x67)                 # ...and dies holding it
    assert "in-use" in _bitmaps(img)[prefix + first["checkpoint"]]
    second = full_instead("in-use")

    qio(img, "write -q -P 0x68 9M 64K")
    last, _ = _offline(repo, dom.name, "incremental")
    assert last["vda"]["kind"] == "incremental" and last["vda"]["parent"] == second["id"]


def test_domain_started_under_a_shut_off_backup_is_refused_clearly(libvirt_domain, tmp_path):
    """LibvirtSource saw the domain shut off, then it started: its images are qemu's now. The
    shut-off source says so (exit 3) and leaves no bitmap or checkpoint behind."""
    import libvirt

    from nbdbackup.engine.backup import run_backup
    from nbdbackup.engine.options import BackupOptions
    from nbdbackup.errors import LockedError
    from nbdbackup.repo.repository import Repository
    from nbdbackup.sources.libvirt_domain import backup_disks, disk_name
    from nbdbackup.sources.libvirt_offline import OfflineDomainSource

    dom = libvirt_domain([("qcow2", 32 * MiB)], persistent=True, running=False)
    repo = init_repo(tmp_path / "repo", "64K")
    conn = libvirt.open(URI)
    try:
        vdom = conn.lookupByName(dom.name)
        disks, _ = backup_disks(vdom.XMLDesc(0))
        source = OfflineDomainSource(vdom, dom.name, disks, {d.target: disk_name(dom.name, d.target) for d in disks})
        dom.start()
        with Repository.open(str(repo)) as r, pytest.raises(LockedError, match="was started") as e:
            run_backup(r, source, "full", BackupOptions(connections=2))
        assert e.value.exit_code == 3
    finally:
        conn.close()
    assert _checkpoints(dom.name) == []
    assert nbb(repo, "--json", "list").stdout.strip() == "[]"
    dom.stop()
    assert _bitmaps(dom.disks["vda"]) == {}


def test_bitmap_deleted_while_shut_off_then_a_running_backup(shut_off, tmp_path):
    """libvirt still has the checkpoint, but its bitmap was removed from the image while the
    domain was shut off: the running backup must not trust libvirt's metadata alone."""
    dom = shut_off([("qcow2", 32 * MiB)])
    img = dom.disks["vda"]
    repo = init_repo(tmp_path / "repo", "64K")
    prefix = f"nbdbackup-{_repo_id(repo)}-"
    full, _ = _offline(repo, dom.name, "full")
    support.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(img), prefix + full["vda"]["checkpoint"]])
    qio(img, "write -q -P 0x45 5M 64K")
    dom.start()
    p = _backup(repo, dom.name, "incremental", "--no-fallback", check=False)
    assert p.returncode == 13, p.stdout + p.stderr
    got, err = _backup(repo, dom.name, "incremental")
    assert got["vda"]["kind"] == "full" and "taking a full backup instead" in err, err
    assert restore_equals(repo, got["vda"]["id"], disk_now(img, tmp_path / "now.raw"), tmp_path)
    assert _checkpoints(dom.name) == [prefix + got["vda"]["checkpoint"]]
