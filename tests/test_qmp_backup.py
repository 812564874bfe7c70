"""Live backups through QMP against a real qemu-system-x86_64 (no guest OS).

The source is driven through the engine's run_backup (the same path the CLI
takes), so a test can act between prepare() and the reads: that is where a
guest write lands "after the transaction, before reading finishes".
Restored content is compared with a byte model of every guest write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import support
from helpers.qmp_vm import MiB, Vm
from helpers.repo import new_repo
from nbdbackup.engine.backup import BackupOptions, run_backup
from nbdbackup.errors import ChainBroken, NbdBackupError, NotFound, UsageError
from nbdbackup.sources.qmp import QmpSource


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_STATE_DIR", str(tmp_path / "state"))
    repo = new_repo(tmp_path / "repo")
    vms = []

    def make_vm(disks=None, **kw):
        d = tmp_path / f"vm{len(vms)}"
        d.mkdir()
        vm = Vm(d, disks or {"vda": 8 * MiB, "vdb": 4 * MiB}, **kw)
        vms.append(vm)
        return vm

    try:
        yield repo, make_vm, tmp_path
    finally:
        for vm in vms:
            vm.stop()
        repo.close()


def backup(repo, vm, kind, *, nodes=None, hook=None, **kw):
    class Hooked(QmpSource):
        def prepare(self, *a):
            plans = super().prepare(*a)
            if hook:
                hook(plans)
            return plans

    src = Hooked(vm.qmp_sock, nodes or list(vm.disks), **kw)
    return run_backup(repo, src, kind, BackupOptions(connections=2))


def content(repo, info) -> bytes:
    with repo.open_image(info) as img:
        return img.read(0, info.size)


def assert_restores(repo, results, expected: dict[str, bytes]) -> None:
    assert {r.info.disk for r in results} == set(expected)
    for r in results:
        assert content(repo, r.info) == expected[r.info.disk], f"disk {r.info.disk} differs"


def our_bitmaps(vm, dev):
    return {n: b for n, b in vm.bitmaps(dev).items() if n.startswith("nbdbackup-")}


def test_full_incremental_two_disks_one_set_writes_after_transaction_excluded(env):
    repo, make_vm, tmp_path = env
    vm = make_vm()
    vm.write("vda", 0, 100_000, 0x11)
    vm.write("vdb", 3 * MiB, 5000, 0x22)
    at_full = vm.snapshot()

    def write_late(plans):      # after the transaction, before any read
        for p in plans:         # qemu lets the reader spread over several connections
            support.run([support.require_tool("nbdinfo"), "--can", "multi-conn", p.uri])
        vm.write("vda", 0, 4096, 0x99)
        vm.write("vdb", 3 * MiB, 4096, 0x98)
        vm.write("vda", 6 * MiB, 65536, 0x97)

    full = backup(repo, vm, "full", hook=write_late)
    assert [r.info.kind for r in full] == ["full", "full"]
    assert_restores(repo, full, at_full)
    assert full[0].info.set_id and full[0].info.set_id == full[1].info.set_id
    assert full[0].info.created == full[1].info.created
    assert full[0].info.checkpoint == full[1].info.checkpoint
    vm.assert_clean()
    assert all(len(our_bitmaps(vm, d)) == 1 for d in vm.disks)

    vm.write("vda", 5 * MiB, 70_000, 0x44)
    at_incr = vm.snapshot()

    def write_late2(plans):
        vm.write("vdb", 0, 512, 0x55)

    incr = backup(repo, vm, "incremental", hook=write_late2)
    assert [r.info.kind for r in incr] == ["incremental", "incremental"]
    assert [r.info.parent for r in incr] == [r.info.id for r in full]
    assert_restores(repo, incr, at_incr)          # has the late writes of the full, not its own
    # exactly the chunks written since the full's transaction (its late writes included)
    assert incr[0].stats.read_bytes == 4 * 64 * 1024
    assert incr[1].stats.read_bytes == 64 * 1024
    vm.assert_clean()

    at_incr2 = vm.snapshot()
    incr2 = backup(repo, vm, "incremental")
    assert_restores(repo, incr2, at_incr2)        # the late write of the previous run is here
    assert incr2[1].stats.read_bytes == 64 * 1024
    vm.assert_clean()
    for d in vm.disks:
        bms = our_bitmaps(vm, d)
        assert len(bms) == 1, bms                 # bitmaps do not pile up
        (b,) = bms.values()
        assert b["recording"] and b["persistent"] and b["granularity"] == 64 * 1024
        assert b["name"].endswith(incr2[0].info.checkpoint)
    assert not [p for p in os.listdir(tmp_path / "state") if p.endswith(".json")]


def test_node_names_device_ids_and_disk_names(env):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    vm.write("vda", 0, 4096, 0x31)
    r = backup(repo, vm, "full", nodes=["node-vda"], disks=["web"], granularity=128 * 1024)
    assert r[0].info.disk == "web"
    (b,) = our_bitmaps(vm, "vda").values()
    assert b["granularity"] == 128 * 1024
    r = backup(repo, vm, "incremental", nodes=["vda"], disks=["web"])    # the device id
    assert r[0].info.kind == "incremental"
    with pytest.raises(NotFound, match="nosuch"):
        backup(repo, vm, "full", nodes=["nosuch"])
    with pytest.raises(UsageError, match="same block node"):
        backup(repo, vm, "full", nodes=["vda", "node-vda"], disks=["a", "b"])
    vm.assert_clean()


def test_failed_run_merges_bitmaps_back(env):
    repo, make_vm, tmp_path = env
    vm = make_vm({"vda": 8 * MiB})
    vm.write("vda", 0, 65536, 0x11)
    backup(repo, vm, "full")
    vm.write("vda", 2 * MiB, 65536, 0x22)          # dirty before the failed run

    def break_source(plans):   # a real source error: the export vanishes under the reader
        vm.write("vda", 4 * MiB, 65536, 0x33)       # after the transaction
        for e in vm.exports():
            vm.cmd("block-export-del", id=e["id"], mode="hard")

    with pytest.raises(NbdBackupError):
        backup(repo, vm, "incremental", hook=break_source)
    vm.assert_clean()
    bms = our_bitmaps(vm, "vda")
    assert len(bms) == 2, bms
    recording = [b for b in bms.values() if b["recording"]]
    anchor = [b for b in bms.values() if not b["recording"]]
    assert len(recording) == 1 and len(anchor) == 1
    assert recording[0]["count"] == 2 * 65536      # the old change merged in + the late write
    assert len(repo.list_backups("vda")) == 1

    vm.write("vda", 6 * MiB, 65536, 0x44)
    expected = vm.snapshot()
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "incremental"
    assert_restores(repo, r, expected)
    assert r[0].stats.read_bytes == 3 * 65536
    assert len(our_bitmaps(vm, "vda")) == 1


def test_fallbacks_and_no_fallback(env):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    with pytest.raises(ChainBroken, match="no dirty bitmap"):
        run_backup(repo, QmpSource(vm.qmp_sock, ["vda"]), "incremental", BackupOptions(no_fallback=True))
    vm.assert_clean()
    assert our_bitmaps(vm, "vda") == {}
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full" and "no dirty bitmap" in r[0].fallback_reason

    # a bitmap no committed backup opened (the backup was forgotten)
    for b in our_bitmaps(vm, "vda"):
        vm.cmd("block-dirty-bitmap-remove", node="node-vda", name=b)
    vm.cmd("block-dirty-bitmap-add", node="node-vda", persistent=True,
           name=f"nbdbackup-{repo.repo_id}-20200101T000000Z-0000abcd")
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full" and "no committed backup" in r[0].fallback_reason
    assert len(our_bitmaps(vm, "vda")) == 1

    # someone disabled our bitmap: it missed changes
    (name,) = our_bitmaps(vm, "vda")
    vm.cmd("block-dirty-bitmap-disable", node="node-vda", name=name)
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full" and "recording" in r[0].fallback_reason
    vm.assert_clean()


def test_inconsistent_bitmap_after_qemu_crash_falls_back(env):
    repo, make_vm, tmp_path = env
    vm = make_vm({"vda": 4 * MiB})
    vm.write("vda", 0, 65536, 0x11)
    backup(repo, vm, "full")
    vm.stop()
    vm.start()
    vm.write("vda", MiB, 65536, 0x12)
    r = backup(repo, vm, "incremental")       # a clean restart keeps the chain
    assert r[0].info.kind == "incremental" and r[0].stats.read_bytes == 65536
    assert_restores(repo, r, vm.snapshot())
    vm.stop()          # the bitmap is saved in the image...
    vm.start()         # ...loaded again (and marked in-use in the image)...
    vm.kill()          # ...and qemu dies without saving it
    vm.start()
    (b,) = our_bitmaps(vm, "vda").values()
    assert b.get("inconsistent")
    with pytest.raises(ChainBroken, match="inconsistent"):
        run_backup(repo, QmpSource(vm.qmp_sock, ["vda"]), "incremental", BackupOptions(no_fallback=True))
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full" and "inconsistent" in r[0].fallback_reason
    raw = tmp_path / "now.raw"      # the CPU is stopped and nothing writes: the image is the truth
    support.run(["qemu-img", "convert", "-U", "-O", "raw", vm.images["vda"], str(raw)])
    assert content(repo, r[0].info) == raw.read_bytes()
    bms = our_bitmaps(vm, "vda")
    assert len(bms) == 1 and not any(b.get("inconsistent") for b in bms.values())
    vm.assert_clean()


def test_restart_with_non_persistent_bitmap_falls_back(env):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB}, fmt="raw")     # raw cannot store bitmaps
    vm.write("vda", 0, 65536, 0x11)
    backup(repo, vm, "full")
    (b,) = our_bitmaps(vm, "vda").values()
    assert not b["persistent"]
    vm.write("vda", MiB, 65536, 0x12)
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "incremental"
    assert_restores(repo, r, vm.snapshot())
    vm.stop()
    vm.start()
    vm.write("vda", 2 * MiB, 65536, 0x13)
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full" and "not persistent" in r[0].fallback_reason
    assert_restores(repo, r, vm.snapshot())


def test_existing_nbd_server_needs_its_address(env):
    repo, make_vm, tmp_path = env
    vm = make_vm({"vda": 4 * MiB})
    sock = str(tmp_path / "theirs.sock")
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    vm.write("vda", 0, 65536, 0x11)
    with pytest.raises(UsageError, match="--nbd-server") as ei:
        backup(repo, vm, "full")
    assert "qemu 7.2 cannot tell where it listens" in str(ei.value)
    vm.assert_clean()
    assert our_bitmaps(vm, "vda") == {}
    r = backup(repo, vm, "full", nbd_server=f"nbd+unix:///?socket={sock}")
    assert_restores(repo, r, vm.snapshot())
    vm.assert_clean()
    # their server still runs: starting another fails
    with pytest.raises(AssertionError, match="already running"):
        vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock + "2"}})


KILLED_RUN = r"""
import sys, time
from nbdbackup.repo.repository import Repository
from nbdbackup.sources.qmp import QmpSource
repo = Repository.open(sys.argv[1])
plans = QmpSource(sys.argv[2], sys.argv[3:]).prepare(repo, "incremental", False)
print(" ".join(p.kind for p in plans), flush=True)
time.sleep(600)
"""


def test_sigkill_mid_run_loses_no_change_and_next_run_cleans_up(env):
    repo, make_vm, tmp_path = env
    vm = make_vm()
    vm.write("vda", 0, 65536, 0x11)
    backup(repo, vm, "full")
    vm.write("vda", MiB, 65536, 0x22)              # in the dirty set of the killed run
    vm.write("vdb", 2 * MiB, 65536, 0x23)
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, repo.path, vm.qmp_sock, *vm.disks],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ))
    try:
        line = child.stdout.readline()
        assert line.split() == ["incremental", "incremental"], child.stderr.read()
        vm.write("vda", 3 * MiB, 65536, 0x33)      # after its transaction
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # what the killed run left: exports, jobs, overlay nodes, files, its server
    assert len(vm.exports()) == 2 and len(vm.jobs()) == 2
    (state_file,) = [p for p in (tmp_path / "state").iterdir() if p.suffix == ".json"]
    state = json.loads(state_file.read_text())
    scratch = state["files"]
    assert all(os.path.exists(f) for f in scratch) and len(scratch) == 2
    server_sock = state["server"]["socket"]
    assert os.path.exists(server_sock)
    assert all(len(our_bitmaps(vm, d)) == 2 for d in vm.disks)     # old (stopped) + new

    vm.write("vdb", 0, 65536, 0x44)
    expected = vm.snapshot()
    r = backup(repo, vm, "incremental")
    assert [x.info.kind for x in r] == ["incremental", "incremental"]
    assert_restores(repo, r, expected)
    assert r[0].stats.read_bytes == 2 * 65536 and r[1].stats.read_bytes == 2 * 65536
    vm.assert_clean()
    assert all(len(our_bitmaps(vm, d)) == 1 for d in vm.disks)
    assert not any(os.path.exists(f) for f in scratch)
    assert not state_file.exists()
    # the killed run's NBD server is gone too: qemu runs none now
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "probe.sock")}})
    vm.cmd("nbd-server-stop")


def test_failing_transaction_changes_nothing(env, monkeypatch):
    """One disk's part of the transaction fails: no disk gets a new bitmap or a
    stopped old one (the transaction is atomic), and everything added is removed."""
    from nbdbackup.sources import qmp_bitmaps

    repo, make_vm, _ = env
    vm = make_vm()
    backup(repo, vm, "full")
    before = {d: our_bitmaps(vm, d) for d in vm.disks}
    real = qmp_bitmaps.transaction_actions

    def broken(node, choice, *a):
        acts = real(node, choice, *a)
        if node.name == "node-vdb":
            acts[-1]["data"]["target"] = "no-such-node"
        return acts

    monkeypatch.setattr(qmp_bitmaps, "transaction_actions", broken)
    with pytest.raises(NbdBackupError, match="no-such-node"):
        backup(repo, vm, "incremental")
    vm.assert_clean()
    assert {d: our_bitmaps(vm, d) for d in vm.disks} == before
    assert len(repo.list_backups()) == 2


def test_bad_scratch_dir_and_busy_qmp_socket(env, tmp_path):
    from nbdbackup.errors import SourceUnreachable
    from nbdbackup.sources.qmp_conn import Qmp

    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    with pytest.raises(UsageError, match="scratch-dir"):
        backup(repo, vm, "full", scratch_dir=str(tmp_path / "missing"))
    vm.assert_clean()
    assert our_bitmaps(vm, "vda") == {}
    # the watcher holds the second socket: qemu never greets a second client there
    with pytest.raises(SourceUnreachable, match="did not greet"):
        Qmp(vm.watch_sock, connect_timeout=1.0)


def test_second_run_of_same_repository_on_same_vm_is_locked_out(env, tmp_path):
    from nbdbackup.errors import LockedError
    from nbdbackup.sources.qmp_state import StateFile

    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    other = StateFile(str(tmp_path / "state"), repo.repo_id, vm.qmp_sock)
    other.lock()
    try:
        with pytest.raises(LockedError):
            backup(repo, vm, "full")
    finally:
        other.unlock()
    vm.assert_clean()
    backup(repo, vm, "full")


def test_qemu_dying_mid_run_is_a_clear_error(env):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    vm.write("vda", 0, 65536, 0x11)
    with pytest.raises(NbdBackupError):
        backup(repo, vm, "full", hook=lambda plans: vm.kill())
    assert repo.list_backups() == []
    vm.start()          # the next run on the restarted VM works (and takes a full)
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "full"
    vm.assert_clean()


def test_our_server_outlives_the_run_while_someone_else_exports_on_it(env, tmp_path):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    seen = {}

    def add_theirs(plans):
        vm.cmd("block-export-add", type="nbd", id="theirs", **{"node-name": "node-vda"},
               name="theirs", writable=False)
        seen["uri"] = plans[0].uri.split("?")[1]

    backup(repo, vm, "full", hook=add_theirs)
    assert [e["id"] for e in vm.exports()] == ["theirs"]
    (state_file,) = [p for p in (tmp_path / "state").iterdir() if p.suffix == ".json"]
    sock = json.loads(state_file.read_text())["server"]["socket"]
    assert seen["uri"] == f"socket={sock}"
    p = support.run([support.require_tool("nbdinfo"), "--size", f"nbd+unix:///theirs?socket={sock}"])
    assert p.stdout.strip() == str(4 * MiB)
    backup(repo, vm, "incremental")         # reuses our server instead of failing
    assert os.path.exists(state_file)
    vm.cmd("block-export-del", id="theirs")
    backup(repo, vm, "incremental")         # now nobody else needs it: stopped
    assert not state_file.exists()
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "probe.sock")}})


def test_qemu_storage_daemon_two_disks_late_writes_excluded(env, tmp_path):
    """The same guarantees on qemu-storage-daemon, guest writes through FUSE."""
    from helpers.qmp_vm import Qsd

    repo, _, _ = env
    qsd = Qsd(tmp_path, {"d0": 4 * MiB, "d1": 4 * MiB})
    try:
        qsd.write("d0", 0, b"\x11" * 70_000)
        qsd.write("d1", MiB, b"\x12" * 4096)
        at_full = qsd.snapshot()

        def late(plans):
            qsd.write("d0", 0, b"\x99" * 4096)
            qsd.write("d1", 3 * MiB, b"\x98" * 4096)

        src = QmpSource(qsd.qmp_sock, ["d0", "d1"])
        full = run_backup(repo, HookedSource(src, late), "full", BackupOptions(connections=2))
        assert_restores(repo, full, at_full)
        assert full[0].info.set_id == full[1].info.set_id
        expected = qsd.snapshot()
        incr = run_backup(repo, QmpSource(qsd.qmp_sock, ["d0", "d1"]), "incremental", BackupOptions())
        assert [r.info.kind for r in incr] == ["incremental", "incremental"]
        assert_restores(repo, incr, expected)
        assert [r.stats.read_bytes for r in incr] == [65536, 65536]
        assert sorted(e["id"] for e in qsd.query("query-block-exports")) == ["guest-d0", "guest-d1"]
        assert qsd.query("query-block-jobs") == []
    finally:
        qsd.stop()


class HookedSource:
    """Calls *hook(plans)* right after the wrapped source's prepare()."""

    def __init__(self, src, hook):
        self.src, self.hook = src, hook

    def prepare(self, *a):
        plans = self.src.prepare(*a)
        self.hook(plans)
        return plans

    def __getattr__(self, name):
        return getattr(self.src, name)


def test_guest_writing_all_through_the_read_stays_out(env):
    """A "guest" thread writes continuously (own QMP socket) from the transaction
    until the backup is committed; the backup is the disk at the transaction."""
    import random
    import threading

    from qemu.qmp.legacy import QEMUMonitorProtocol

    repo, make_vm, tmp_path = env
    vm = make_vm({"vda": 32 * MiB})
    data = tmp_path / "fill.bin"
    data.write_bytes(random.Random(3).randbytes(24 * MiB))
    assert vm.cmd("human-monitor-command",
                  **{"command-line": f'qemu-io -d vda "write -s {data} 0 {24 * MiB}"'}) == ""
    vm.model["vda"][:24 * MiB] = data.read_bytes()
    backup(repo, vm, "full")
    stop = threading.Event()
    writes = []

    def guest():
        mon = QEMUMonitorProtocol(vm.guest_sock)
        mon.connect()
        rnd = random.Random(4)
        try:
            while not stop.is_set():
                off, pat = rnd.randrange(512) * 65536, rnd.randrange(1, 256)
                out = mon.cmd("human-monitor-command",
                              **{"command-line": f'qemu-io -d vda "write -P {pat} {off} 65536"'})
                assert out == "", out
                writes.append((off, pat))
        finally:
            mon.close()

    t = threading.Thread(target=guest, daemon=True)
    frozen_at = {}

    def start_guest(plans):
        frozen_at.update(vm.snapshot())
        t.start()
        deadline = time.monotonic() + 10
        while len(writes) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)

    vm.write("vda", 0, 65536, 0x77)
    try:
        r = backup(repo, vm, "incremental", hook=start_guest)
        during = len(writes)
    finally:
        stop.set()
        t.join(30)
    assert during >= 5, "the guest did not write while the backup read"
    assert_restores(repo, r, frozen_at)
    for off, pat in writes:
        vm.model["vda"][off:off + 65536] = bytes([pat]) * 65536
    r = backup(repo, vm, "incremental")
    assert_restores(repo, r, vm.snapshot())
    vm.assert_clean()


def test_disk_grown_between_backups(env):
    repo, make_vm, _ = env
    vm = make_vm({"vda": 4 * MiB})
    vm.write("vda", 4 * MiB - 4096, 4096, 0x21)
    backup(repo, vm, "full")
    vm.cmd("block_resize", **{"node-name": "node-vda", "size": 6 * MiB})
    vm.model["vda"] += bytes(2 * MiB)
    vm.write("vda", 5 * MiB, 65536, 0x22)
    r = backup(repo, vm, "incremental")
    assert r[0].info.kind == "incremental" and r[0].info.size == 6 * MiB
    assert_restores(repo, r, vm.snapshot())
    vm.assert_clean()
