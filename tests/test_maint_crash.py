"""Crash safety: SIGKILL a writer at named steps and at random instants.

After every kill: the repository opens, nothing half-done is listed (every
listed backup holds exactly the data of its version, sets are whole),
`verify` passes, and every earlier backup still restores bit-exact. At the
end, gc reclaims what the dead runs left behind (orphan packs, temporary
files, chunk rows no backup uses) and everything still restores.
The writer is tests/helpers/crash_writer.py, driving the Repository API.
The kill test runs once per repository place (local, local+pg, s3+pg: conftest's
`place` fixture); on S3 the kill points are object puts, half-sent uploads and
index commits instead of fsyncs and renames.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess

import helpers.crash_writer as W
from helpers.repo import indexed_packs, new_repo_path
from helpers.support import kill_if_running, nbdbackup
from nbdbackup.repo import Repository
from nbdbackup.repo.chunks import ZERO_REF
from nbdbackup.repo.verify import verify

SEED = 20261126

# steps inside pack writes (fsync of data / of the directory, rename into packs/, half-written
# data) and index commits (pack rows; the final backup rows), at several depths of a run
KILL_POINTS = ["fsync:1", "fsync:2", "fsync:5", "fsync:12", "rename:1", "rename:3", "rename:8",
               "write:1", "write:4", "write:10", "commit:1", "commit:2", "commit:4", "commit:7",
               "final:1", "final:2"]
# on S3: after an object is stored (not yet indexed), with a body half sent, and the index commits
S3_KILL_POINTS = ["put:1", "put:4", "upload:1", "upload:3", "commit:2", "commit:5", "final:1", "final:2"]
RANDOM_KILLS = 6


def _run_helper(repo, count, *, env_extra=None, kill_after=None):
    proc = subprocess.Popen(W.command(repo, SEED, count), env=W.environment(**(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if kill_after is not None:
            try:
                proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_if_running(proc)
    assert proc.returncode in (0, -signal.SIGKILL), f"helper failed ({proc.returncode}):\n{err}"
    return proc.returncode, out


def _pack_names(repo) -> set[str]:
    """Names of the pack objects in the repository's storage (any backend)."""
    return {n.rsplit("/", 1)[-1][:-5] for n in repo.backend.list("packs/") if n.endswith(".pack")}


def _orphans(repo_path, repo) -> int:
    """Leftovers of dead runs: unindexed pack objects, temp files, chunk rows no backup uses."""
    known = indexed_packs(repo)
    files = _pack_names(repo) - known
    tmp = os.listdir(os.path.join(repo_path, "tmp")) if repo.location.is_local else []
    live = set()
    for b in repo.list_backups():
        with repo.open_image(b) as img:
            live.update(img.chunk_ref(i) for i in range(img.nchunks))
    live.discard(ZERO_REF)
    return len(files) + len(tmp) + (repo.stats()["chunks"] - len(live))


def _check(repo_path, seen: dict[str, bytes]) -> int:
    """All invariants after a kill; returns the orphan count."""
    with Repository.open(repo_path) as repo:
        backups = repo.list_backups()
        sets: dict[str, set[str]] = {}
        versions = set()
        for b in backups:
            seed, version = W.parse_source(b.source)
            assert (b.disk, version) not in versions, f"version {version} of {b.disk} listed twice"
            versions.add((b.disk, version))
            want = W.content(seed, b.disk, version)
            with repo.open_image(b) as img:
                assert img.size == W.SIZE
                assert img.read(0, img.size) == want, f"backup {b.id} ({b.disk} v{version}) differs"
            if b.set_id:
                sets.setdefault(b.set_id, set()).add(b.disk)
            if b.id in seen:
                assert seen[b.id] == want
            seen[b.id] = want
        assert all(disks == set(W.DISKS) for disks in sets.values()), f"half a set listed: {sets}"
        assert set(seen) == {b.id for b in backups}, "a committed backup disappeared"
        report = verify(repo)
        assert report.ok, report.problem_lines()
        return _orphans(repo_path, repo)


def test_sigkill_at_any_step_leaves_a_consistent_repository(place):
    repo_path = place.spec
    new_repo_path(repo_path, pack_size=128 * 1024, segment_len=8, **place.init_options())
    seen: dict[str, bytes] = {}
    rc, _ = _run_helper(repo_path, 2)                    # a committed base to protect
    assert rc == 0
    _check(repo_path, seen)
    kills = 0
    orphans_seen = 0
    points = S3_KILL_POINTS if place.on_s3 else KILL_POINTS
    for point in points:
        rc, out = _run_helper(repo_path, 3, env_extra={"NBDBACKUP_CRASH_AT": point})
        assert rc == -signal.SIGKILL, f"kill point {point} was never reached"
        kills += 1
        orphans_seen = max(orphans_seen, _check(repo_path, seen))
    rng = random.Random(SEED)
    for _ in range(RANDOM_KILLS // 2 if place.on_s3 else RANDOM_KILLS):    # each check reads S3: fewer
        # far more work than fits before the kill, so the writer is always mid-run
        rc, out = _run_helper(repo_path, 200, kill_after=rng.uniform(0.2, 2.0))
        assert rc == -signal.SIGKILL
        kills += 1
        orphans_seen = max(orphans_seen, _check(repo_path, seen))
    assert kills == len(points) + (RANDOM_KILLS // 2 if place.on_s3 else RANDOM_KILLS)
    assert orphans_seen > 0                     # the kills really left debris for gc

    # the repository still takes backups, then gc reclaims every leftover
    rc, _ = _run_helper(repo_path, 2)
    assert rc == 0
    _check(repo_path, seen)
    p = nbdbackup("gc", "--repo", repo_path, "--json", "--grace", "0")
    assert '"skipped_damaged": []' in p.stdout
    with Repository.open(repo_path) as repo:
        assert _orphans(repo_path, repo) == 0
        assert _pack_names(repo) == indexed_packs(repo)     # the storage holds only what the index names
    _check(repo_path, seen)
    nbdbackup("verify", "--repo", repo_path)
    assert len(seen) >= 6


# gc's own steps: dead-row commit, new pack fsync/rename, index switch, deletion of old files
GC_KILL_POINTS = ["commit:1", "fsync:1", "rename:1", "fsync:2", "commit:2", "unlink:1", "unlink:3"]


def test_sigkill_during_gc_loses_nothing(tmp_path):
    import shutil

    base = str(tmp_path / "base")
    new_repo_path(base, pack_size=128 * 1024, segment_len=8)
    assert _run_helper(base, 6)[0] == 0
    with Repository.open(base) as repo:
        victims = [b.id for b in repo.list_backups() if not b.set_id][:2]
    nbdbackup("forget", "--repo", base, *victims)
    seen: dict[str, bytes] = {}
    _check(base, seen)
    for point in GC_KILL_POINTS:
        repo_path = str(tmp_path / f"gc-{point.replace(':', '-')}")
        shutil.copytree(base, repo_path)
        p = subprocess.run(W.command(repo_path, "gc"), env=W.environment(NBDBACKUP_CRASH_AT=point),
                           capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == -signal.SIGKILL, f"gc kill point {point} not reached: {p.returncode} {p.stderr}"
        _check(repo_path, dict(seen))                    # every backup intact, verify passes
        nbdbackup("gc", "--repo", repo_path, "--grace", "0")     # a later gc finishes the job
        with Repository.open(repo_path) as repo:
            assert _orphans(repo_path, repo) == 0
            assert _pack_names(repo) == indexed_packs(repo)
        _check(repo_path, dict(seen))
