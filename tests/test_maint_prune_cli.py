"""`nbdbackup prune` through the CLI: dry-run output, JSON, real pruning, sets, --disk, errors."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo_path, write_backup
from helpers.support import nbdbackup
from nbdbackup.repo import Repository

UTC_ENV = {"TZ": "UTC"}

# the worked example of docs/maintenance.md (same as test_maint_prune.EXAMPLE)
TIMES = ["2026-11-26 10:00", "2026-11-26 08:00", "2026-11-25 22:00", "2026-11-25 12:00", "2026-11-24 12:00",
         "2026-11-23 12:00", "2026-11-22 12:00", "2026-11-20 12:00", "2026-11-15 12:00", "2026-10-31 12:00",
         "2026-10-01 12:00", "2026-09-15 12:00"]
KEPT = {1, 3, 5, 7, 9, 10, 12}
POLICY = ["--keep-last", "1", "--keep-daily", "2", "--keep-weekly", "2", "--keep-monthly", "2"]


def at(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=timezone.utc)


@pytest.fixture
def example(tmp_path):
    path = new_repo_path(tmp_path / "r")
    ids = {}
    with Repository.open(path) as repo:
        for n, t in enumerate(TIMES, 1):
            ids[n] = write_backup(repo, "vda", bytes([n]) * CS, created=at(t)).id
    return path, ids


def _ids(path):
    with Repository.open(path) as repo:
        return {b.id for b in repo.list_backups()}


def test_dry_run_shows_what_goes_and_why(example):
    path, ids = example
    p = nbdbackup("prune", "--repo", path, *POLICY, "--dry-run", env=UTC_ENV)
    lines = {ln.split()[1]: ln for ln in p.stdout.splitlines()}
    assert set(lines) == set(ids.values())
    for n, bid in ids.items():
        assert lines[bid].startswith("keep" if n in KEPT else "remove"), lines[bid]
    assert "last 1/1" in lines[ids[1]]
    assert "daily 2026-11-25" in lines[ids[3]]
    assert "weekly 2026-W47" in lines[ids[7]]
    assert "monthly 2026-09" in lines[ids[12]]
    assert "older backup in daily period 2026-11-25" in lines[ids[4]]
    assert "no rule keeps it" in lines[ids[6]]
    assert "would forget 5 of 12" in p.stderr
    assert _ids(path) == set(ids.values())          # dry run changed nothing


def test_json_then_real_prune(example):
    path, ids = example
    out = json.loads(nbdbackup("prune", "--repo", path, *POLICY, "--dry-run", "--json", env=UTC_ENV).stdout)
    assert out["dry_run"] is True and out["removed"] == 5 and out["kept"] == 7
    assert out["policy"]["keep_daily"] == 2 and out["policy"]["keep_hourly"] == 0
    by_id = {d["id"]: d for d in out["decisions"]}
    assert by_id[ids[9]] ["action"] == "keep" and by_id[ids[9]]["reasons"] == ["weekly 2026-W46"]
    assert by_id[ids[11]]["action"] == "remove"
    assert by_id[ids[1]]["created"] == "2026-11-26T10:00:00.000Z"
    out = json.loads(nbdbackup("prune", "--repo", path, *POLICY, "--json", env=UTC_ENV).stdout)
    assert out["dry_run"] is False and out["removed"] == 5
    assert _ids(path) == {ids[n] for n in KEPT}
    # running it again removes nothing more
    out = json.loads(nbdbackup("prune", "--repo", path, *POLICY, "--json", env=UTC_ENV).stdout)
    assert out["removed"] == 0
    # the data of what is kept is intact after gc
    nbdbackup("gc", "--repo", path)
    with Repository.open(path) as repo:
        for n in KEPT:
            with repo.open_image(ids[n]) as img:
                assert img.read(0, CS) == bytes([n]) * CS
    nbdbackup("verify", "--repo", path)


def test_time_zone_changes_day_boundaries(tmp_path):
    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        late = write_backup(repo, "vda", b"a" * CS, created=at("2026-11-25 15:00")).id
        early = write_backup(repo, "vda", b"b" * CS, created=at("2026-11-25 01:00")).id
    def kept(tz):
        out = json.loads(nbdbackup("prune", "--repo", path, "--keep-daily", "5", "--dry-run", "--json",
                                   env={"TZ": tz}).stdout)
        return {d["id"] for d in out["decisions"] if d["action"] == "keep"}
    assert kept("UTC") == {late}
    # POSIX TZ (no tzdata needed): UTC+10, so 01:00 on the 26th vs 11:00 on the 25th
    assert kept("XXX-10") == {late, early}


def _set(repo, created, disks):
    ws = []
    for disk, fill in disks:
        write_backup(repo, disk, bytes([fill]) * CS, set_writers=ws)
    return repo.commit_set(ws, read_bytes=[0] * len(ws), duration_s=[0.1] * len(ws), created=at(created))


def test_sets_are_kept_or_removed_whole(tmp_path):
    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        old_a, old_b = _set(repo, "2026-11-20 10:00", [("vda", 1), ("vdb", 2)])
        mid_a, mid_b = _set(repo, "2026-11-21 10:00", [("vda", 3), ("vdb", 4)])
        new_b = write_backup(repo, "vdb", b"\5" * CS, created=at("2026-11-22 10:00"))
    p = nbdbackup("prune", "--repo", path, "--keep-last", "1", "--dry-run", env=UTC_ENV)
    lines = {ln.split()[1]: ln for ln in p.stdout.splitlines()}
    # vda's newest is mid_a: its set partner mid_b is kept with it, although vdb's newest is new_b
    assert lines[mid_a.id].startswith("keep") and "last 1/1" in lines[mid_a.id]
    assert lines[mid_b.id].startswith("keep") and f"set {mid_a.set_id}" in lines[mid_b.id]
    assert lines[new_b.id].startswith("keep")
    assert lines[old_a.id].startswith("remove") and lines[old_b.id].startswith("remove")
    nbdbackup("prune", "--repo", path, "--keep-last", "1", env=UTC_ENV)
    assert _ids(path) == {mid_a.id, mid_b.id, new_b.id}
    # limited to vdb, a set with a member on vda stays whole (prune never touches vda)
    out = json.loads(nbdbackup("prune", "--repo", path, "--keep-last", "1", "--disk", "vdb", "--json",
                               env=UTC_ENV).stdout)
    assert {d["id"] for d in out["decisions"]} == {mid_b.id, new_b.id}
    assert out["removed"] == 0
    assert "not being pruned" in " ".join(d["reasons"][0] for d in out["decisions"] if d["id"] == mid_b.id)


def test_disk_filter_and_errors(tmp_path):
    path = new_repo_path(tmp_path / "r")
    with Repository.open(path) as repo:
        a = [write_backup(repo, "vda", bytes([i]) * CS, created=at(f"2026-11-2{i} 10:00")).id for i in range(1, 4)]
        b = [write_backup(repo, "vdb", bytes([i]) * CS, created=at(f"2026-11-2{i} 11:00")).id for i in range(1, 4)]
    nbdbackup("prune", "--repo", path, "--keep-last", "1", "--disk", "vda", env=UTC_ENV)
    assert _ids(path) == {a[2], *b}
    p = nbdbackup("prune", "--repo", path, "--dry-run", check=False)
    assert p.returncode == 2 and "--keep" in p.stderr
    p = nbdbackup("prune", "--repo", path, "--keep-last", "-1", check=False)
    assert p.returncode == 2
    p = nbdbackup("prune", "--repo", path, "--keep-last", "1", "--disk", "nosuch", check=False)
    assert p.returncode == 11 and "nosuch" in p.stderr
    assert _ids(path) == {a[2], *b}
