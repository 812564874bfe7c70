"""`nbdbackup copy`: backups replicated into a second repository (local and S3+PostgreSQL).

Every copy is restored through the installed CLI and compared with the source's disk bytes (not
just with the source repository). Damage, crashes (SIGKILL of the copy), a held lock, a chunk size
mismatch, a dangling parent and the source's retention are each driven for real.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from helpers.repo import CHUNK_SIZE, disk_data, mixed_image, new_repo, read_all, write_backup
from helpers.support import kill_if_running, nbdbackup, nbdbackup_exe
from nbdbackup.repo import Repository

CS = CHUNK_SIZE
SEED = int(os.environ.get("NBDBACKUP_TEST_SEED", "1312"))


# --- where the two repositories live ---------------------------------------------------------

@dataclass
class Site:
    spec: str                       # --repo / --to
    index_url: str | None = None    # a PostgreSQL database of its own (S3), else the SQLite file

    @property
    def on_s3(self) -> bool:
        return self.spec.startswith("s3://")

    def init(self, **options) -> Repository:
        if self.index_url:
            options["index_url"] = self.index_url
        return new_repo(self.spec, **options)

    def open(self) -> Repository:
        return Repository.open(self.spec, index_url=self.index_url)

    def src_args(self) -> list[str]:
        return ["--repo", self.spec] + (["--index-url", self.index_url] if self.index_url else [])

    def dest_args(self) -> list[str]:
        return ["--to", self.spec] + (["--dest-index-url", self.index_url] if self.index_url else [])

    def __str__(self) -> str:
        return self.spec


@pytest.fixture
def make_site(request, tmp_path, monkeypatch):
    """make_site(kind, name): a place for a repository: "local" (a directory) or "s3" (a fresh
    bucket on the session's radosgw and a fresh PostgreSQL database), removed after the test."""
    from helpers.ceph import make_bucket, remove_bucket

    cleanups = []

    def make(kind: str, name: str) -> Site:
        if kind == "local":
            return Site(str(tmp_path / name))
        s3 = request.getfixturevalue("ceph_s3")
        pg = request.getfixturevalue("pg_server")
        s3.set_env(monkeypatch)
        monkeypatch.setenv("PGPASSWORD", pg.env.get("PGPASSWORD", "") or "testpass")
        db = pg.create_database()
        bucket = make_bucket(s3)
        cleanups.append(lambda: remove_bucket(s3, bucket))
        cleanups.append(lambda: pg.drop_database(db))
        return Site(f"s3://{bucket}", pg.db_url(db))

    yield make
    for c in reversed(cleanups):
        c()


def _copy(src: Site, dst: Site, *what, check=True, env=None, **kw):
    p = nbdbackup(*src.src_args(), "--json", "copy", *dst.dest_args(), *what, check=False, env=env, **kw)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _restore_cli(site: Site, ref: str, tmp_path) -> bytes:
    out = tmp_path / f"restored-{ref}.raw"
    out.unlink(missing_ok=True)
    args = ["--repo", site.spec] + (["--index-url", site.index_url] if site.index_url else [])
    nbdbackup(*args, "-q", "restore", ref, out)
    return out.read_bytes()


def _changed(a: bytes, b: bytes) -> list[int]:
    return [i for i in range((len(b) + CS - 1) // CS) if a[i * CS:(i + 1) * CS] != b[i * CS:(i + 1) * CS]]


def _same_identity(x, y) -> None:
    assert (x.id, x.disk, x.kind, x.parent, x.created, x.size, x.set_id) == \
           (y.id, y.disk, y.kind, y.parent, y.created, y.size, y.set_id)


# --- the round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("kinds", [("local", "s3"), ("s3", "local")], ids=["local-to-s3", "s3-to-local"])
def test_copy_round_trip_second_run_and_nightly_incremental(make_site, tmp_path, kinds):
    rng = random.Random(SEED)
    src, dst = make_site(kinds[0], "src"), make_site(kinds[1], "dst")
    disks = {}
    with src.init() as s:
        disks["vm1"] = [mixed_image(tmp_path / "vm1.raw", 96 * CS + 1234, SEED)]     # an unaligned tail
        full = write_backup(s, "vm1", disks["vm1"][0], zero_holes=True)
        v2 = disk_data(rng, 96, base=disks["vm1"][0][:96 * CS], change=0.2) + disks["vm1"][0][96 * CS:]
        disks["vm1"].append(v2)
        inc = write_backup(s, "vm1", v2, parent=full, changed=_changed(disks["vm1"][0], v2))
        # a two-disk set: it must arrive whole
        a, b = disk_data(rng, 40), disk_data(rng, 24)
        ws = []
        write_backup(s, "db-a", a, set_writers=ws)
        write_backup(s, "db-b", b, set_writers=ws)
        set_infos = s.commit_set(ws, read_bytes=[len(a), len(b)], duration_s=0.0)
        disks["db-a"], disks["db-b"] = [a], [b]
        src_infos = {i.id: i for i in s.list_backups()}
    with dst.init():
        pass

    out = json.loads(_copy(src, dst, "--all").stdout)
    assert out["backups_copied"] == 4 and out["backups_skipped"] == 0 and out["failed"] == []
    assert {c["id"] for c in out["copied"]} == set(src_infos)
    for c in out["copied"]:
        assert set(c) >= {"id", "disk", "kind", "parent", "base", "bytes_sent", "chunks_read", "chunks_skipped"}
    assert out["bytes_sent"] == sum(c["bytes_sent"] for c in out["copied"]) > 0
    with dst.open() as d:
        got = {i.id: i for i in d.list_backups()}
    assert set(got) == set(src_infos)
    for bid, info in src_infos.items():
        _same_identity(got[bid], info)
        assert got[bid].bitmap is None and got[bid].checkpoint is None
    assert {got[i.id].set_id for i in set_infos} == {set_infos[0].set_id}
    # the incremental was built on its parent: only its changes were read
    (inc_out,) = [c for c in out["copied"] if c["id"] == inc.id]
    assert inc_out["base"] == full.id and inc_out["chunks_read"] <= len(_changed(disks["vm1"][0], v2))

    # bit-exact against the source's disk bytes, through the CLI's restore of the destination
    assert _restore_cli(dst, full.id, tmp_path) == disks["vm1"][0]
    assert _restore_cli(dst, inc.id, tmp_path) == disks["vm1"][1]
    assert _restore_cli(dst, set_infos[0].id, tmp_path) == disks["db-a"][0]
    assert _restore_cli(dst, set_infos[1].id, tmp_path) == disks["db-b"][0]
    nbdbackup(*dst.src_args(), "verify")

    # a second run copies nothing
    again = json.loads(_copy(src, dst, "--all").stdout)
    assert again["backups_copied"] == 0 and again["backups_skipped"] == 4 and again["bytes_sent"] == 0

    # the nightly incremental: only its new chunks (and changed map segments) are sent
    with src.open() as s:
        v3 = disk_data(rng, 96, base=v2[:96 * CS], change=0.1) + v2[96 * CS:]
        inc2 = write_backup(s, "vm1", v3, parent=inc, changed=_changed(v2, v3))
    night = json.loads(_copy(src, dst, "vm1").stdout)
    assert [c["id"] for c in night["copied"]] == [inc2.id]
    assert night["copied"][0]["base"] == inc.id
    # same compression level, same new chunks, same changed segments: the very bytes the source stored
    assert night["bytes_sent"] == inc2.stored_bytes > 0
    assert _restore_cli(dst, inc2.id, tmp_path) == v3


def test_set_member_brings_its_set_and_a_copy_of_a_copy(make_site, tmp_path):
    rng = random.Random(SEED + 1)
    src, mid, dst = make_site("local", "src"), make_site("local", "mid"), make_site("local", "dst")
    with src.init() as s:
        ws = []
        a, b = disk_data(rng, 8), disk_data(rng, 8)
        write_backup(s, "a", a, set_writers=ws)
        write_backup(s, "b", b, set_writers=ws)
        ia, ib = s.commit_set(ws)
    mid.init().close()
    dst.init().close()
    out = json.loads(_copy(src, mid, ia.id).stdout)
    assert sorted(c["id"] for c in out["copied"]) == sorted([ia.id, ib.id])
    _copy(src, dst, "--disk", "b")          # names b's latest, and so its set
    # a copy of a copy keeps the identity too, and a set already there is skipped
    out = json.loads(_copy(mid, dst, "--all").stdout)
    assert out["backups_copied"] == 0 and out["backups_skipped"] == 2
    with dst.open() as d:
        for x, y in zip(sorted(d.list_backups(), key=lambda i: i.id), sorted([ia, ib], key=lambda i: i.id)):
            _same_identity(x, y)
        assert read_all(d, ia.id) == a and read_all(d, ib.id) == b


def test_dangling_parent_in_the_destination(make_site, tmp_path):
    """An incremental copied without its parent is complete; every command takes the missing id."""
    rng = random.Random(SEED + 2)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        v1 = disk_data(rng, 48)
        full = write_backup(s, "vm1", v1)
        v2 = disk_data(rng, 48, base=v1, change=0.25)
        inc = write_backup(s, "vm1", v2, parent=full, changed=_changed(v1, v2))
    dst.init().close()
    out = json.loads(_copy(src, dst, inc.id).stdout)
    assert out["copied"][0]["base"] is None and out["copied"][0]["parent"] == full.id
    d_args = ["--repo", dst.spec]
    listed = json.loads(nbdbackup(*d_args, "--json", "list").stdout)
    assert [(b["id"], b["parent"]) for b in listed] == [(inc.id, full.id)]
    assert _restore_cli(dst, inc.id, tmp_path) == v2
    nbdbackup(*d_args, "verify")
    # an incremental on top of it (its parent's parent is not there)
    with dst.open() as d:
        v3 = disk_data(rng, 48, base=v2, change=0.1)
        inc3 = write_backup(d, "vm1", v3, parent=d.get_backup(inc.id), changed=_changed(v2, v3))
    assert _restore_cli(dst, inc3.id, tmp_path) == v3
    nbdbackup(*d_args, "prune", "--keep-last", "1")
    nbdbackup(*d_args, "gc", "--grace", "0")
    assert [b["id"] for b in json.loads(nbdbackup(*d_args, "--json", "list").stdout)] == [inc3.id]
    assert _restore_cli(dst, inc3.id, tmp_path) == v3
    nbdbackup(*d_args, "verify")
    nbdbackup(*d_args, "forget", inc3.id)
    nbdbackup(*d_args, "gc", "--grace", "0")
    # copying the parent later fills the gap; the copy of inc comes back built on it
    out = json.loads(_copy(src, dst, "--all").stdout)
    assert [c["id"] for c in out["copied"]] == [full.id, inc.id]
    assert out["copied"][1]["base"] == full.id
    assert _restore_cli(dst, inc.id, tmp_path) == v2


def test_source_retention_never_touches_the_destination(make_site, tmp_path):
    rng = random.Random(SEED + 3)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    datas = {}
    with src.init() as s:
        prev = None
        data = disk_data(rng, 32)
        for _ in range(3):
            info = write_backup(s, "vm1", data, parent=prev, changed=None)
            datas[info.id] = data
            prev, data = info, disk_data(rng, 32, base=data, change=0.3)
    dst.init().close()
    _copy(src, dst, "--all")
    ids = list(datas)
    nbdbackup("--repo", src.spec, "forget", ids[0])
    nbdbackup("--repo", src.spec, "prune", "--keep-last", "1")
    nbdbackup("--repo", src.spec, "gc", "--grace", "0")
    with src.open() as s:
        assert [b.id for b in s.list_backups()] == [ids[2]]
    with dst.open() as d:
        assert [b.id for b in d.list_backups()] == ids
    for bid, data in datas.items():
        assert _restore_cli(dst, bid, tmp_path) == data
    nbdbackup("--repo", dst.spec, "verify")
    # the pruned source's copy run skips what is there and never forgets anything
    out = json.loads(_copy(src, dst, "--all").stdout)
    assert out["backups_skipped"] == 1 and out["backups_copied"] == 0
    with dst.open() as d:
        assert len(d.list_backups()) == 3


# --- refusals and failures ----------------------------------------------------------------------

def test_chunk_size_mismatch_is_refused_before_anything_is_written(make_site, tmp_path):
    rng = random.Random(SEED + 4)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        write_backup(s, "vm1", disk_data(rng, 8))
    dst.init(chunk_size=2 * CS).close()
    before = sorted(os.listdir(os.path.join(dst.spec, "packs")))
    p = nbdbackup("--repo", src.spec, "copy", "--to", dst.spec, "--all", check=False)
    assert p.returncode == 2, p.stderr
    assert str(CS) in p.stderr and str(2 * CS) in p.stderr and "chunk size" in p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(os.path.join(dst.spec, "packs"))) == before
    with dst.open() as d:
        assert d.list_backups() == []


def test_nothing_named_to_copy_is_a_usage_error(make_site):
    src, dst = make_site("local", "src"), make_site("local", "dst")
    src.init().close()
    dst.init().close()
    for what in ([], ["--all", "vm1"]):
        p = nbdbackup("--repo", src.spec, "copy", "--to", dst.spec, *what, check=False)
        assert p.returncode == 2 and "BACKUP" in p.stderr, p.stderr


def test_damaged_source_chunk_stops_that_backup_only(make_site, tmp_path):
    from nbdbackup.repo import maps

    rng = random.Random(SEED + 5)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        bad_data = disk_data(rng, 16)
        good_data = disk_data(rng, 16)
        bad = write_backup(s, "vm1", bad_data)
        good = write_backup(s, "vm2", good_data)
        # flip one payload byte of one chunk only vm1 holds
        with s.open_image(bad) as img:
            idx = next(i for i in range(img.nchunks) if not img.is_zero(i)
                       and bad_data[i * CS:(i + 1) * CS] not in
                       {good_data[j * CS:(j + 1) * CS] for j in range(16)})
            h = img.chunk_ref(idx)
        loc = s.store.chunk_locations([h])[h]
    from nbdbackup.repo.packs import pack_object_name
    with open(os.path.join(src.spec, pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + loc.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x41]))
    dst.init().close()
    p = _copy(src, dst, "--all", check=False)
    assert p.returncode == 9, p.stderr
    off = idx * CS
    n = maps.chunk_len(idx, bad.size, CS)
    assert f"disk offset {off} (length {n})" in p.stderr and bad.id in p.stderr
    assert "Traceback" not in p.stderr
    out = json.loads(p.stdout)
    assert [c["id"] for c in out["copied"]] == [good.id]
    assert [f["ids"] for f in out["failed"]] == [[bad.id]] and out["failed"][0]["exit_code"] == 9
    with dst.open() as d:
        assert [b.id for b in d.list_backups()] == [good.id]
    nbdbackup("--repo", dst.spec, "verify")
    assert _restore_cli(dst, good.id, tmp_path) == good_data


def test_held_disk_lock_in_the_destination_is_exit_3(make_site):
    rng = random.Random(SEED + 6)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        write_backup(s, "vm1", disk_data(rng, 8))
    with dst.init() as d:
        held = d.lock("disk-vm1", exclusive=True, purpose="a backup of vm1 on another host")
        try:
            p = _copy(src, dst, "--all", check=False)
        finally:
            held.release()
        assert p.returncode == 3, p.stderr
        assert d.list_backups() == []
    out = json.loads(_copy(src, dst, "--all").stdout)        # once the lock is free, the copy goes
    assert out["backups_copied"] == 1


# --- crashes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dest_kind", ["local", "s3"])
def test_sigkill_at_random_points_then_verify_and_rerun(make_site, tmp_path, dest_kind):
    rng = random.Random(SEED + 7)
    src, dst = make_site("local", "src"), make_site(dest_kind, "dst")
    datas = {}
    with src.init(pack_size=1 << 20) as s:
        prev, data = None, disk_data(rng, 512)
        for k in range(3):
            info = write_backup(s, f"vm{k % 2}", data)
            datas[info.id] = data
            data = disk_data(rng, 512, base=data, change=0.5)
        del prev
    dst.init(pack_size=1 << 20).close()
    # the kill instants are fractions of how long a whole copy takes here and now (a fixed
    # delay lets a quiet machine finish before every kill, a busy one die before any pack)
    scratch = make_site(dest_kind, "scratch")
    scratch.init(pack_size=1 << 20).close()
    t0 = time.monotonic()
    subprocess.run([nbdbackup_exe(), *src.src_args(), "-q", "copy", *scratch.dest_args(), "--all"],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    whole = time.monotonic() - t0
    cmd = [nbdbackup_exe(), *src.src_args(), "-q", "copy", *dst.dest_args(), "--all"]
    kills = 0
    # the first kill lands in the first half of a whole copy; later runs have less left to do
    delays = [whole * rng.uniform(0.15, 0.5), whole * rng.uniform(0.1, 0.4), whole * rng.uniform(0.05, 0.3)]
    for k, delay in enumerate(delays):
        sig = signal.SIGTERM if k == 1 else signal.SIGKILL     # one polite stop among the kills
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(delay)
            signalled = proc.poll() is None
            if signalled:
                proc.send_signal(sig)
                kills += 1
            _, err = proc.communicate(timeout=120)
        finally:
            kill_if_running(proc)
        # a SIGTERM before the CLI installed its handler (still starting up) ends it the default way
        if signalled and sig == signal.SIGTERM and proc.returncode not in (0, -signal.SIGTERM):
            assert proc.returncode == 130, err
            assert "run it again: it goes on without sending again" in err, err
        # consistent after every kill: whatever is listed is whole and verifies
        v_args = ["--repo", dst.spec] + (["--index-url", dst.index_url] if dst.index_url else [])
        p = nbdbackup(*v_args, "--json", "verify", check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        with dst.open() as d:
            for b in d.list_backups():
                assert read_all(d, b.id) == datas[b.id]
    assert kills >= 1, "the copy always finished before the kill: give it more data"
    out = json.loads(_copy(src, dst, "--all").stdout)
    assert out["backups_copied"] + out["backups_skipped"] == 3
    with dst.open() as d:
        assert {b.id for b in d.list_backups()} == set(datas)
        for bid, data in datas.items():
            assert read_all(d, bid) == data
    again = json.loads(_copy(src, dst, "--all").stdout)
    assert again["backups_copied"] == 0


def test_a_copy_waiting_for_the_disk_lock_skips_what_arrived_meanwhile(make_site):
    """Two overlapping copy runs (cron): the one that waited (--lock-wait) behind the other finds
    the backup committed once it holds the disk lock, and skips it instead of failing."""
    from nbdbackup.progress import NoBar
    from nbdbackup.repo.copy import copy_backups, select_backups

    rng = random.Random(SEED + 8)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        write_backup(s, "vm1", disk_data(rng, 8))
    dst.init().close()
    procs = []

    def start_other_run(total, desc):
        if not procs:       # our writer holds disk-vm1 now: the CLI run blocks on it
            procs.append(subprocess.Popen([nbdbackup_exe(), "--repo", src.spec, "--json", "--lock-wait", "60",
                                           "copy", "--to", dst.spec, "--all"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(2.0)
        return NoBar()

    with src.open() as s, dst.open() as d:
        result = copy_backups(s, d, select_backups(s, everything=True), progress=start_other_run)
    assert len(result.copied) == 1
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        kill_if_running(procs[0])
    assert procs[0].returncode == 0, err
    doc = json.loads(out)
    assert doc["backups_copied"] == 0 and doc["backups_skipped"] == 1


def test_progress_bar_on_a_terminal_and_the_summary_line(make_site, tmp_path):
    from helpers.support import nbdbackup_on_a_tty

    rng = random.Random(SEED + 9)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        info = write_backup(s, "vm1", disk_data(rng, 64))
    dst.init().close()
    tty = nbdbackup_on_a_tty("--repo", src.spec, "copy", "--to", dst.spec, "--all")
    assert "copy vm1" in tty and "%|" in tty, tty          # tqdm's bar, named after the disk
    assert "copied 1 backup(s), skipped 0" in tty and "sent" in tty and "chunk(s) skipped" in tty, tty
    # without a terminal: no bar, one line per backup on stdout, the summary on stderr
    p = nbdbackup("--repo", src.spec, "copy", "--to", dst.spec, "--all")
    assert p.stdout.splitlines() == [f"skipped {info.id}  vm1  (the destination has it)"]
    assert "%|" not in p.stderr and "copied 0 backup(s), skipped 1" in p.stderr


def test_an_id_the_destination_holds_for_another_disk_is_a_conflict_not_a_skip(make_site):
    import sqlite3

    rng = random.Random(SEED + 11)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init() as s:
        a = write_backup(s, "vm1", disk_data(rng, 8))
        b = write_backup(s, "vm2", disk_data(rng, 8))
    dst.init().close()
    _copy(src, dst, a.id)
    # the destination's row of a.id now claims another disk (what a foreign backup with that id looks like)
    with sqlite3.connect(os.path.join(dst.spec, "index.sqlite")) as c:
        c.execute("UPDATE backups SET disk = 'other' WHERE id = ?", (a.id,))
    p = _copy(src, dst, "--all", check=False)
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert [f["ids"] for f in out["failed"]] == [[a.id]] and "not a copy of it" in out["failed"][0]["error"]
    assert [c["id"] for c in out["copied"]] == [b.id] and out["skipped"] == []


def test_real_engine_backups_copied_then_an_incremental_on_a_dangling_parent(make_site, tmp_path):
    """qemu-nbd exports a qcow2: the source gets a full and an incremental (bitmap b1) from the
    engine; only the incremental is copied. The destination's own next incremental (bitmap b2,
    parent = the copy, whose parent is missing) passes the chain check and restores exactly."""
    from helpers import support
    from helpers.engine_util import MiB, make_image, qio, snapshot_raw

    src, dst = make_site("local", "src"), make_site("local", "dst")
    img = make_image(tmp_path / "d.qcow2", 16 * MiB)
    qio(img, "write -q -P 0xa1 0 3M", "write -q -P 0xa2 9M 1M")
    nbdbackup("--repo", src.spec, "init", "--chunk-size", "64K")
    nbdbackup("--repo", dst.spec, "init", "--chunk-size", "64K")
    sock = tmp_path / "s.sock"

    def backup(site, kind, *extra, bitmaps=()):
        with support.qemu_nbd(img, sock, bitmaps=bitmaps) as uri:
            p = nbdbackup("--repo", site.spec, "--json", kind, "--source", uri, "--disk", "web", *extra)
        return json.loads(p.stdout)

    full = backup(src, "full")
    support.run(["qemu-img", "bitmap", "--add", str(img), "b1"])
    qio(img, "write -q -P 0xb1 4M 192k", "write -q -z 0 1M")
    snap1 = snapshot_raw(img, tmp_path / "s1.raw").read_bytes()
    inc = backup(src, "incremental", "--bitmap", "b1", bitmaps=("b1",))
    assert inc["parent"] == full["id"]
    out = json.loads(_copy(src, dst, inc["id"]).stdout)
    assert out["copied"][0]["base"] is None
    assert _restore_cli(dst, inc["id"], tmp_path) == snap1

    support.run(["qemu-img", "bitmap", "--add", str(img), "b2"])
    qio(img, "write -q -P 0xc1 12M 128k")
    snap2 = snapshot_raw(img, tmp_path / "s2.raw").read_bytes()
    mine = backup(dst, "incremental", "--bitmap", "b2", "--no-fallback", bitmaps=("b2",))
    assert mine["kind"] == "incremental" and mine["parent"] == inc["id"] and mine["read_bytes"] == 128 * 1024
    assert _restore_cli(dst, mine["id"], tmp_path) == snap2
    nbdbackup("--repo", dst.spec, "verify")


def test_rerun_after_a_kill_does_not_send_again_what_arrived(make_site, tmp_path):
    """SIGKILL once the destination has indexed a few packs: nothing is listed, and the rerun finds
    those chunks there (chunks_skipped) and sends less than a copy from scratch."""
    import sqlite3

    rng = random.Random(SEED + 12)
    src, dst, fresh = make_site("local", "src"), make_site("local", "dst"), make_site("local", "fresh")
    with src.init(pack_size=1 << 20) as s:
        data = disk_data(rng, 640)
        info = write_backup(s, "vm1", data)
    dst.init(pack_size=1 << 20).close()
    fresh.init(pack_size=1 << 20).close()
    proc = subprocess.Popen([nbdbackup_exe(), "--repo", src.spec, "-q", "copy", "--to", dst.spec, "--all"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with sqlite3.connect(f"file:{dst.spec}/index.sqlite?mode=ro", uri=True) as c:
                if c.execute("SELECT count(*) FROM packs").fetchone()[0] >= 3:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, "the copy finished before three packs were seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_if_running(proc)
    with dst.open() as d:
        assert d.list_backups() == []
    rerun = json.loads(_copy(src, dst, "--all").stdout)
    scratch = json.loads(_copy(src, fresh, "--all").stdout)
    assert rerun["backups_copied"] == 1 and rerun["chunks_skipped"] > 0
    assert rerun["bytes_sent"] < scratch["bytes_sent"]
    with dst.open() as d:
        assert read_all(d, info.id) == data


# --- between id spaces: plaintext -> encrypted, key A -> key B, encrypted -> plaintext ----------

def _open_keyed(site, key):
    return Repository.open(site.spec, index_url=site.index_url, master_key=key)


def _init_keyed(site, key, **options):
    if site.index_url:
        options["index_url"] = site.index_url
    options.setdefault("chunk_size", CS)
    return Repository.init(site.spec, master_key=key, **options)


@pytest.mark.parametrize("direction", ["plain-to-encrypted", "key-a-to-key-b", "encrypted-to-plain"])
def test_copy_between_id_spaces_maps_ids_and_restores_exactly(make_site, tmp_path, direction):
    from nbdbackup.repo.copy import copy_backups, select_backups
    from nbdbackup.repo.crypto import MasterKey

    rng = random.Random(SEED + 10)
    key_a = MasterKey.generate() if direction != "plain-to-encrypted" else None
    key_b = MasterKey.generate() if direction != "encrypted-to-plain" else None
    src, dst = make_site("local", "src"), make_site("local", "dst")
    marker = b"COPY-MARKER-" + os.urandom(8).hex().encode()
    v1 = bytearray(disk_data(rng, 48))
    v1[5 * CS + 100:5 * CS + 100 + len(marker)] = marker
    v1 = bytes(v1)
    with _init_keyed(src, key_a) as s:
        full = write_backup(s, "vm1", v1)
        v2 = disk_data(rng, 48, base=v1, change=0.2)
        inc = write_backup(s, "vm1", v2, parent=full, changed=_changed(v1, v2))
    _init_keyed(dst, key_b).close()
    with _open_keyed(src, key_a) as s, _open_keyed(dst, key_b) as d:
        r = copy_backups(s, d, select_backups(s, [full.id]))
        assert [c.info.id for c in r.copied] == [full.id]
        with s.open_image(full) as si, d.open_image(full.id) as di:
            # ids differ between the spaces (none of the non-zero entries is shared), data is equal
            pairs = [(si.chunk_ref(i), di.chunk_ref(i)) for i in range(si.nchunks)]
            assert all((a == bytes(32)) == (b == bytes(32)) for a, b in pairs)
            assert not any(a == b for a, b in pairs if a != bytes(32))
        r = copy_backups(s, d, select_backups(s, everything=True))
        assert [c.info.id for c in r.copied] == [inc.id] and r.copied[0].base == full.id
        assert r.copied[0].chunks_read <= len(_changed(v1, v2))
        assert read_all(d, full.id) == v1 and read_all(d, inc.id) == v2
        again = copy_backups(s, d, select_backups(s, everything=True))
        assert again.copied == [] and len(again.skipped) == 2
        for b in d.list_backups():
            _same_identity(b, s.get_backup(b.id))
    if key_b is not None:       # the destination's storage holds neither the marker nor its plaintext id
        from nbdbackup.repo.chunks import hash_bytes
        plain_id = hash_bytes(v1[5 * CS:6 * CS])
        blobs = [p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()]
        assert blobs and not any(marker in b or plain_id in b for b in blobs)


# --- the CLI with keys: NBDBACKUP_PASSPHRASE for the source, the dest options for DEST ----------

PW_B, PW_C = "copy-test passphrase B", "copy-test passphrase C"


def _cli(*args, passphrase=None, dest_passphrase=None, check=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBDBACKUP_")}
    if passphrase:
        env["NBDBACKUP_PASSPHRASE"] = passphrase
    if dest_passphrase:
        env["NBDBACKUP_DEST_PASSPHRASE"] = dest_passphrase
    p = subprocess.run([nbdbackup_exe(), *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    for secret in (PW_B, PW_C):
        assert secret not in p.stdout and secret not in p.stderr
    return p


def _init_encrypted(site: Site, passphrase: str) -> None:
    _cli(*site.src_args(), "init", "--encryption", "--kdf-memory", "8", "--chunk-size", "64K",
         passphrase=passphrase, check=True)


def test_cli_plaintext_to_encrypted_s3_then_key_b_to_key_c_then_to_plaintext(make_site, tmp_path):
    rng = random.Random(SEED + 13)
    src, enc_b, enc_c, plain = (make_site("local", "src"), make_site("s3", "b"), make_site("local", "c"),
                                make_site("local", "plain"))
    with src.init() as s:
        v1 = disk_data(rng, 64)
        full = write_backup(s, "vm1", v1)
        v2 = disk_data(rng, 64, base=v1, change=0.2)
        inc = write_backup(s, "vm1", v2, parent=full, changed=_changed(v1, v2))
    _init_encrypted(enc_b, PW_B)
    _init_encrypted(enc_c, PW_C)
    plain.init().close()

    # plaintext (local) -> encrypted (S3): the destination's passphrase from NBDBACKUP_DEST_PASSPHRASE
    p = _cli(*src.src_args(), "--json", "copy", *enc_b.dest_args(), "--all", dest_passphrase=PW_B, check=True)
    assert json.loads(p.stdout)["backups_copied"] == 2 and "not encrypted" not in p.stderr
    for bid, data in ((full.id, v1), (inc.id, v2)):
        out = tmp_path / f"b-{bid}.raw"
        _cli(*enc_b.src_args(), "restore", bid, out, passphrase=PW_B, check=True)
        assert out.read_bytes() == data
    p = _cli(*src.src_args(), "--json", "copy", *enc_b.dest_args(), "--all", dest_passphrase=PW_B, check=True)
    assert json.loads(p.stdout)["backups_copied"] == 0

    # a wrong destination passphrase is refused (19) before anything is written
    p = _cli(*enc_b.src_args(), "copy", *enc_c.dest_args(), "--all", passphrase=PW_B, dest_passphrase=PW_B)
    assert p.returncode == 19, p.stderr
    # no destination passphrase, no terminal: a usage error naming the ways to give it
    p = _cli(*enc_b.src_args(), "copy", *enc_c.dest_args(), "--all", passphrase=PW_B)
    assert p.returncode == 2 and "NBDBACKUP_DEST_PASSPHRASE" in p.stderr, p.stderr

    # key B -> key C, the destination's passphrase from --dest-passphrase-file: re-encrypted
    pw_file = tmp_path / "pw-c"
    pw_file.write_text(PW_C + "\n")
    p = _cli(*enc_b.src_args(), "--json", "copy", *enc_c.dest_args(), "--dest-passphrase-file", pw_file, "--all",
             passphrase=PW_B, check=True)
    assert json.loads(p.stdout)["backups_copied"] == 2
    for bid, data in ((full.id, v1), (inc.id, v2)):
        out = tmp_path / f"c-{bid}.raw"
        _cli(*enc_c.src_args(), "restore", bid, out, passphrase=PW_C, check=True)
        assert out.read_bytes() == data
    _cli(*enc_c.src_args(), "verify", passphrase=PW_C, check=True)

    # encrypted -> plaintext works, with a warning
    p = _cli(*enc_c.src_args(), "--json", "copy", *plain.dest_args(), "--all", passphrase=PW_C, check=True)
    assert "not encrypted" in p.stderr or "unencrypted" in p.stderr, p.stderr
    assert json.loads(p.stdout)["backups_copied"] == 2
    assert _restore_cli(plain, inc.id, tmp_path) == v2


def test_a_record_failing_authentication_in_an_encrypted_source_is_never_copied(make_site, tmp_path):
    from nbdbackup.errors import ChunkCorrupt
    from nbdbackup.repo.copy import copy_backups, select_backups
    from nbdbackup.repo.crypto import MasterKey
    from nbdbackup.repo.packs import pack_object_name

    rng = random.Random(SEED + 14)
    key = MasterKey.generate()
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with _init_keyed(src, key) as s:
        bad_data, good_data = disk_data(rng, 12), disk_data(rng, 12)
        bad = write_backup(s, "vm1", bad_data)
        good = write_backup(s, "vm2", good_data)
        with s.open_image(bad) as img:
            idx = next(i for i in range(img.nchunks) if not img.is_zero(i) and bad_data[i * CS:(i + 1) * CS]
                       not in {good_data[j * CS:(j + 1) * CS] for j in range(12)})
            h = img.chunk_ref(idx)
        loc = s.store.chunk_locations([h])[h]
    with open(os.path.join(src.spec, pack_object_name(loc.pack)), "r+b") as f:
        f.seek(loc.offset + 3)          # inside the nonce: the record no longer authenticates
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    dst.init().close()
    with _open_keyed(src, key) as s, dst.open() as d:
        r = copy_backups(s, d, select_backups(s, everything=True))
        assert [c.info.id for c in r.copied] == [good.id]
        (failure,) = r.failed
        assert failure.ids == [bad.id] and isinstance(failure.error, ChunkCorrupt)
        assert failure.error.offset == idx * CS
        assert [b.id for b in d.list_backups()] == [good.id]
        assert read_all(d, good.id) == good_data


def test_copies_built_on_a_base_of_another_size_are_exact(make_site):
    """A disk that grew (to an unaligned size) and shrank again: positions past the base's
    inheritable ones are always put, so nothing of the base leaks into the copy."""
    from nbdbackup.repo.copy import copy_backups, select_backups

    rng = random.Random(SEED + 15)
    src, dst = make_site("local", "src"), make_site("local", "dst")
    with src.init(segment_len=8) as s:
        v1 = disk_data(rng, 20)[:20 * CS - 777]
        b1 = write_backup(s, "vm1", v1)
        v2 = v1 + disk_data(rng, 7)[:5 * CS + 99]          # grown; the old short chunk now whole
        b2 = write_backup(s, "vm1", v2, parent=b1, changed=range(19, (len(v2) + CS - 1) // CS))
        v3 = v2[:9 * CS + 5]                                 # shrunk into a short chunk
        b3 = write_backup(s, "vm1", v3, parent=b2, changed=[9])
        v4 = v3 + bytes(3 * CS)                              # grown with zeros
        b4 = write_backup(s, "vm1", v4, parent=b3, changed=range(9, 13))
    dst.init(segment_len=16).close()       # another segment length: maps are rebuilt, not copied
    with src.open() as s, dst.open() as d:
        copy_backups(s, d, select_backups(s, [b1.id]))
        r = copy_backups(s, d, select_backups(s, everything=True))
        assert [(c.info.id, c.base) for c in r.copied] == [(b2.id, b1.id), (b3.id, b2.id), (b4.id, b3.id)]
        for info, data in ((b1, v1), (b2, v2), (b3, v3), (b4, v4)):
            assert read_all(d, info.id) == data


def test_network_gone_mid_copy_then_rerun(make_site, tmp_path, fault_proxy):
    """The S3 destination's network goes away mid-copy (every request fails and its connection
    closes): the copy exits 17 after its retries with nothing half-copied listed; once the network
    is back the rerun completes without sending again what arrived, and every copy restores exactly."""
    from helpers.places import stored_names

    rng = random.Random(SEED + 11)
    src, dst = make_site("local", "src"), make_site("s3", "dst")
    datas = {}
    with src.init(pack_size=1 << 20) as s:
        data = disk_data(rng, 512)
        for k in range(3):
            info = write_backup(s, f"vm{k}", data)
            datas[info.id] = data
            data = disk_data(rng, 512, base=data, change=0.7)
    dst.init(pack_size=1 << 20).close()
    via_proxy = [*dst.dest_args(), "--dest-s3-endpoint", fault_proxy.endpoint]
    cmd = [nbdbackup_exe(), *src.src_args(), "--json", "copy", *via_proxy, "--all"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(stored_names(dst.spec, "packs/")) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the copy ended before the network could go: give it more data"
        fault_proxy.fail(None)                      # the network is gone, for good
        out, err = proc.communicate(timeout=180)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 17, err
    assert "after retries" in err and "Traceback" not in err, err
    landed = len(stored_names(dst.spec, "packs/"))
    with dst.open() as d:                           # straight to radosgw: consistent, only whole copies
        for b in d.list_backups():
            assert read_all(d, b.id) == datas[b.id]
        first_run = len(d.list_backups())
    assert first_run < 3
    v = nbdbackup(*dst.src_args(), "--json", "verify", check=False)
    assert v.returncode == 0, v.stdout + v.stderr

    fault_proxy.passthrough()
    # the rerun names the destination's index the other way, by NBDBACKUP_DEST_INDEX_URL
    p = nbdbackup(*src.src_args(), "--json", "copy", "--to", dst.spec, "--dest-s3-endpoint", fault_proxy.endpoint,
                  "--all", check=False, env={"NBDBACKUP_DEST_INDEX_URL": dst.index_url})
    assert p.returncode == 0, p.stderr
    again = json.loads(p.stdout)
    assert again["backups_copied"] == 3 - first_run and again["backups_skipped"] == first_run
    if first_run == 0:          # the packs of the interrupted backup that were indexed are not sent again
        assert landed >= 3 and again["chunks_skipped"] > 0, again
    with dst.open() as d:
        assert sorted(b.id for b in d.list_backups()) == sorted(datas)
        for bid, want in datas.items():
            assert read_all(d, bid) == want
