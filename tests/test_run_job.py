"""`nbdbackup run JOBFILE` without libvirt: qcow2 images and an NBD export (qemu-nbd) in one
job file, run by the installed CLI the way a timer runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import support
from helpers.engine_util import MiB, init_repo, make_image, nbb, qio, random_file, restore_equals, snapshot_raw
from nbdbackup.errors import ExitCode

KiB = 1 << 10
PASSPHRASE = "job test passphrase 7f3a"


def run_job(jobfile: Path, *args, check_rc: int | None = 0, env=None, timeout=600) -> subprocess.CompletedProcess:
    p = support.nbdbackup("run", str(jobfile), *args, check=False, env=env, timeout=timeout)
    if check_rc is not None:
        assert p.returncode == check_rc, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def run_json(jobfile: Path, *args, check_rc: int | None = 0, env=None) -> dict:
    p = run_job(jobfile, "--json", *args, check_rc=check_rc, env=env)
    return json.loads(p.stdout)


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def backups_of(repo: Path, disk: str | None = None) -> list[dict]:
    out = json.loads(nbb(repo, "--json", "list").stdout)
    return [b for b in out if disk is None or b["disk"] == disk]


def by_disk(doc: dict) -> dict[str, dict]:
    return {b["disk"]: b for s in doc["sources"] for b in s["backups"]}


@pytest.fixture
def fleet(tmp_path):
    """A repository, two qcow2 images and a qcow2 with a dirty bitmap served by the caller
    through qemu-nbd (nbd source), with data written in each."""
    repo = init_repo(tmp_path / "repo")
    a = make_image(tmp_path / "web.qcow2", 8 * MiB)
    b = make_image(tmp_path / "db.qcow2", 8 * MiB)
    n = make_image(tmp_path / "exp.qcow2", 8 * MiB)
    qio(a, "write -P 0x11 0 3M")
    qio(b, "write -P 0x22 1M 2M")
    qio(n, "write -P 0x33 0 1M")
    support.run(["qemu-img", "bitmap", "--add", str(n), "b0"])   # records every write from now on
    return tmp_path, repo, a, b, n


def fleet_job(tmp: Path, sock: Path, extra: str = "") -> Path:
    return write_job(tmp / "fleet.toml", f"""
repository = "repo"          # relative to the job file
concurrency = 2
{extra}
[[source]]
image = "web.qcow2"

[[source]]
image = "db.qcow2"
disk = "db-root"

[[source]]
nbd = "nbd+unix:///?socket={sock}"
disk = "exp"
bitmap = "b0"
""")


def test_full_then_incremental_reads_only_changes(fleet):
    tmp, repo, a, b, n = fleet
    sock = tmp / "nbd.sock"
    job = fleet_job(tmp, sock)
    with support.qemu_nbd(n, sock, bitmaps=("b0",)):
        first = run_json(job)
    assert first["ok"] and first["sources_failed"] == 0
    got = by_disk(first)
    assert set(got) == {"web", "db-root", "exp"}
    assert {d: g["kind"] for d, g in got.items()} == {"web": "full", "db-root": "full", "exp": "full"}
    assert got["web"]["read_bytes"] == 3 * MiB and got["db-root"]["read_bytes"] == 2 * MiB
    assert got["exp"]["read_bytes"] == 1 * MiB

    qio(a, "write -P 0x44 1M 64K")
    qio(n, "write -P 0x55 4M 128K")
    with support.qemu_nbd(n, sock, bitmaps=("b0",)):
        second = run_json(job)
    got2 = by_disk(second)
    assert {d: g["kind"] for d, g in got2.items()} == {"web": "incremental", "db-root": "incremental",
                                                        "exp": "incremental"}
    assert got2["web"]["read_bytes"] == 64 * KiB          # only the chunk the write dirtied
    assert got2["db-root"]["read_bytes"] == 0
    # the export's bitmap, added after the first write, holds only the new one
    assert got2["exp"]["read_bytes"] == 128 * KiB
    for disk, image in (("web", a), ("db-root", b), ("exp", n)):
        assert got2[disk]["parent"] == got[disk]["id"]
        assert restore_equals(repo, got2[disk]["id"], snapshot_raw(image, tmp / f"{disk}.now"), tmp)


def test_failed_source_does_not_stop_the_others(fleet):
    tmp, repo, a, b, n = fleet
    job = write_job(tmp / "job.toml", """
repository = "repo"
[[source]]
image = "web.qcow2"
[[source]]
image = "gone.qcow2"
[[source]]
image = "db.qcow2"
""")
    doc = run_json(job, check_rc=ExitCode.SOME_SOURCES_FAILED)
    assert not doc["ok"] and doc["sources_failed"] == 1
    results = {s["source"]: s for s in doc["sources"]}
    gone = results[f"image:{tmp}/gone.qcow2"]
    assert gone["result"] == "failed" and gone["exit_code"] == ExitCode.SOURCE_UNREACHABLE
    assert "gone.qcow2" in gone["error"] and gone["backups"] == []
    assert {b["disk"] for b in backups_of(repo)} == {"web", "db"}

    text = run_job(job, check_rc=ExitCode.SOME_SOURCES_FAILED)
    lines = text.stderr.splitlines()
    assert any(re.search(r"image:\S+gone\.qcow2\s+-\s+incremental.*FAILED \(exit 4\)", ln) for ln in lines), lines
    assert any(re.match(r"image:\S+web\.qcow2\s+web\s+incremental\s", ln) for ln in lines), lines
    assert any("2 of 3 source(s) succeeded" in ln for ln in lines)
    # each child's stderr reached ours with its source in front
    assert any(ln.startswith(f"[image:{tmp}/gone.qcow2] nbdbackup: error:") for ln in lines), lines


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _watch(proc: subprocess.Popen, interval: float = 0.01) -> tuple[int, list[list[str]], set[bytes]]:
    """Until *proc* exits: the most backup children seen at once, every child's cmdline, and the
    environments of the programs those children start (qemu-nbd)."""
    most, seen, grand_envs = 0, {}, set()
    while proc.poll() is None:
        kids = {k: _cmdline(k) for k in support.child_pids(proc.pid)}
        backups = [k for k, c in kids.items() if "incremental" in c or "full" in c]
        most = max(most, len(backups))
        seen.update({k: c for k, c in kids.items() if c and c != [""]})
        # a grandchild still between fork and exec shows the child's own environment (the one
        # the child was started with), not what it will run with: only exec'd programs count
        grand_envs.update(_environ(g) for k in backups for g in support.child_pids(k)
                          if _cmdline(g) not in ([], [""], kids[k]))
        time.sleep(interval)
    return most, list(seen.values()), grand_envs


def test_concurrency_runs_two_at_once_and_passphrase_stays_out_of_argv(tmp_path):
    env = {"NBDBACKUP_PASSPHRASE": PASSPHRASE}
    support.nbdbackup("--repo", tmp_path / "repo", "init", "--encryption", "--kdf-memory", "8",
                      "--chunk-size", "64K", env=env)
    for i in range(3):
        img = make_image(tmp_path / f"d{i}.qcow2", 32 * MiB)
        qio(img, f"write -P 0x{i + 1:02x} 0 24M")
    job = write_job(tmp_path / "job.toml", 'repository = "repo"\nconcurrency = 2\n'
                    + "".join(f'[[source]]\nimage = "d{i}.qcow2"\n' for i in range(3)))
    proc = subprocess.Popen([support.nbdbackup_exe(), "run", "--json", str(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
    most, cmdlines, grand_envs = _watch(proc)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert most == 2, f"{most} backups at once with concurrency = 2"
    assert len([c for c in cmdlines if "--image" in c]) == 3
    for c in cmdlines:
        assert PASSPHRASE not in " ".join(c), c
    # the children took it out of their environment before starting qemu-nbd (envsecrets)
    assert grand_envs - {b""}, "no program started by a child was seen"
    assert not [e for e in grand_envs if PASSPHRASE.encode() in e]
    assert PASSPHRASE not in out + err
    spans = sorted((s["started"], s["ended"]) for s in json.loads(out)["sources"])
    assert spans[1][0] < spans[0][1], f"the first two did not overlap: {spans}"
    assert spans[2][0] >= min(spans[0][1], spans[1][1]) - 0.1, f"the third started before a slot was free: {spans}"
    # the backups are in the encrypted repository, readable with the passphrase
    got = json.loads(support.nbdbackup("--repo", tmp_path / "repo", "--json", "list", env=env).stdout)
    assert sorted(b["disk"] for b in got) == ["d0", "d1", "d2"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_takes_its_children_along(tmp_path, sig):
    init_repo(tmp_path / "repo")
    raw = random_file(tmp_path / "big.raw", 160 * MiB)       # random: slow to compress, time to kill
    img = tmp_path / "big.qcow2"
    support.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)])
    raw.unlink()
    job = write_job(tmp_path / "job.toml", 'repository = "repo"\n[[source]]\nimage = "big.qcow2"\n')
    proc = subprocess.Popen([support.nbdbackup_exe(), "run", str(job)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        family: set[int] = set()
        while time.monotonic() < deadline and not any("qemu-nbd" in " ".join(_cmdline(g))
                                                      for k in support.child_pids(proc.pid)
                                                      for g in support.child_pids(k)):
            time.sleep(0.02)
        kids = support.child_pids(proc.pid)
        family = set(kids) | {g for k in kids for g in support.child_pids(k)}
        assert any("qemu-nbd" in " ".join(_cmdline(g)) for g in family), "the backup never started qemu-nbd"
        proc.send_signal(sig)
        assert proc.wait(60) == (-signal.SIGKILL if sig == signal.SIGKILL else ExitCode.INTERRUPTED)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                                  Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                                                  for p in family):
            time.sleep(0.05)
        alive = [(p, _cmdline(p)) for p in family if os.path.exists(f"/proc/{p}")
                 and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        assert not alive, f"outlived the killed run: {alive}"
    finally:
        support.kill_if_running(proc)
    # nothing half-done was committed, and the next run backs the image up
    assert backups_of(tmp_path / "repo") == []
    doc = run_json(job)
    assert by_disk(doc)["big"]["kind"] == "full"


GOOD_SOURCE = '[[source]]\nimage = "web.qcow2"\n'
# (job file, line the message names, text it names: the key, or what is wrong)
BAD_JOBS = [
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'disk = "x\n', 4, "line 4", id="toml-syntax"),
    pytest.param('repository = "repo"\nconcurency = 2\n' + GOOD_SOURCE, 2, "'concurency'", id="unknown-top-key"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '\n[[source]]\nimage = "db.qcow2"\ncompres-all = true\n',
                 7, "[[source]] #2 key 'compres-all'", id="unknown-source-key"),
    pytest.param('repository = "repo"\nconcurrency = "2"\n' + GOOD_SOURCE, 2, "'concurrency': must be a whole number",
                 id="wrong-type"),
    pytest.param('repository = "repo"\nconcurrency = 0\n' + GOOD_SOURCE, 2, "between 1 and 64", id="out-of-range"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'nbd = "nbd://h/x"\ndisk = "x"\n', 4, "'nbd'",
                 id="two-kinds"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '[[source]]\nlibvirt = "web[12"\n', 5, "not a valid glob",
                 id="bad-glob"),
    pytest.param('repository = "repo"\npassphrase = "hunter2-secret"\n' + GOOD_SOURCE, 2, "looks like a secret",
                 id="inline-passphrase"),
    pytest.param('repository = "repo"\nindex-url = "postgresql://u:hunter2-secret@db/x"\n' + GOOD_SOURCE, 2,
                 "'index-url': has a password", id="url-password"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '\n[prune]\nkeep-daily = -1\n', 6,
                 "[prune] key 'keep-daily'", id="prune-negative"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '\n[prun]\nkeep-daily = 7\n', 5, "'prun': unknown",
                 id="unknown-table"),
    pytest.param(GOOD_SOURCE, 1, "no repository", id="no-repository"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'full = true\nno-fallback = true\n', 5,
                 "'no-fallback': is for incrementals", id="full-and-no-fallback"),
    pytest.param('repository = "repo"\n\n[[source]]\nnbd = "nbd+unix:///x"\n', 3, "needs disk = NAME",
                 id="nbd-without-disk"),
    pytest.param('repository = "repo"\n[[source]]\nqmp = "/run/q.sock"\nnode = ["a", "b"]\ndisk = ["x"]\n', 5,
                 "'disk': names 1 disk(s) for 2 node(s)", id="qmp-disks"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '[[source]]\nlibvirt = "web*"\ndisk = { vda = "w" }\n',
                 6, "'disk': renames one domain's disks", id="glob-with-disk-names"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + '\n[prune]\n', 5, "keeps nothing", id="empty-prune"),
    pytest.param('repository = "repo"\nindex-url = "postgresql://u@db/x?password=hunter2"\n' + GOOD_SOURCE, 2,
                 "'index-url': has a password", id="url-password-query"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'disk = "a\\u0000b"\n', 4, "NUL", id="nul"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'disk = "--help"\n', 4, "must not start with '-'",
                 id="option-shaped"),
    pytest.param('repository = "repo"\n' + GOOD_SOURCE + 'disk = "../x"\n', 4, "invalid disk name",
                 id="bad-disk-name"),
]


@pytest.fixture(scope="module")
def bad_job_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("badjobs")
    init_repo(d / "repo")
    qio(make_image(d / "web.qcow2", 1 * MiB), "write -P 0x66 0 64K")
    return d


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.mark.parametrize("text,line,named", BAD_JOBS)
def test_bad_job_files_are_refused_before_anything_runs(bad_job_dir, text, line, named):
    job = write_job(bad_job_dir / "bad.toml", text)
    before = _tree(bad_job_dir / "repo")
    image_before = (bad_job_dir / "web.qcow2").stat().st_mtime_ns
    p = run_job(job, "--metrics-file", bad_job_dir / "m.prom", check_rc=ExitCode.USAGE)
    msg = p.stderr
    assert f"{job}, line {line}" in msg or f"line {line}," in msg, msg
    assert named in msg, msg
    assert "hunter2" not in msg + p.stdout
    assert _tree(bad_job_dir / "repo") == before        # no backup, no lock, no index change
    assert (bad_job_dir / "web.qcow2").stat().st_mtime_ns == image_before     # no bitmap added
    assert not (bad_job_dir / "m.prom").exists()
    assert backups_of(bad_job_dir / "repo") == []


def test_dry_run_prints_commands_and_runs_nothing(bad_job_dir, tmp_path):
    job = write_job(tmp_path / "job.toml", f'repository = "{bad_job_dir}/repo"\nconcurrency = 2\n'
                    f'[[source]]\nimage = "{bad_job_dir}/web.qcow2"\nconnections = 2\nno-fallback = true\n'
                    '[[source]]\nnbd = "nbd://10.0.0.9/vdb"\ndisk = "vm9-vdb"\n')
    p = run_job(job, "--dry-run")
    cmds = p.stdout.splitlines()
    assert len(cmds) == 2
    assert re.search(r" -m nbdbackup --repo \S+/repo --json incremental --image \S+/web\.qcow2 "
                     r"--connections 2 --no-fallback$", cmds[0]), cmds[0]
    assert cmds[1].endswith(" full --source nbd://10.0.0.9/vdb --disk vm9-vdb"), cmds[1]   # no bitmap: full
    assert " full --image" in run_job(job, "--dry-run", "--full").stdout
    assert backups_of(bad_job_dir / "repo") == []


# --- metrics ---------------------------------------------------------------------------

METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]\w*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"\})? '
                         r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


def check_exposition(text: str) -> dict[str, dict[str, float]]:
    """The text format's rules, line by line; {family: {label value: number}}."""
    assert text.endswith("\n")
    helped, typed, done, current = set(), set(), set(), None
    values: dict[str, dict[str, float]] = {}
    for ln in text.splitlines():
        assert ln and ln == ln.strip(), repr(ln)
        if ln.startswith("# HELP "):
            name = ln.split()[2]
            assert name not in helped and name not in done, f"second HELP of {name}"
            helped.add(name)
            continue
        if ln.startswith("# TYPE "):
            _, _, name, kind = ln.split()
            assert name in helped and name not in typed and name not in values, f"TYPE of {name} out of place"
            assert kind == "gauge"
            typed.add(name)
            continue
        assert not ln.startswith("#"), ln
        m = METRIC_LINE.match(ln)
        assert m, f"not a sample line: {ln!r}"
        name = m.group(1)
        assert name.startswith("nbdbackup_") and name in typed, f"sample of {name} before its HELP/TYPE"
        if current != name:
            assert name not in done, f"samples of {name} are not together"
            if current:
                done.add(current)
            current = name
        label = m.group(4).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") if m.group(2) else ""
        assert label not in values.setdefault(name, {}), f"{name}{{{label}}} twice"
        values[name][label] = float(m.group(5))
    # names with units: seconds and bytes where they are
    for name in values:
        assert not name.endswith("_total"), name
        if "timestamp" in name or "duration" in name:
            assert name.endswith("_seconds"), name
        if name.endswith(("read", "stored")):
            pytest.fail(f"{name} lacks its unit")
    return values


def test_metrics_file(fleet):
    tmp, repo, a, b, n = fleet
    weird = tmp / 'odd "q\\uote.qcow2'      # a path that needs label escaping, and is missing
    job = write_job(tmp / "job.toml", f"""
repository = "repo"
metrics-file = "metrics/nbdbackup.prom"
[[source]]
image = "web.qcow2"
[[source]]
image = '{weird}'
""")
    (tmp / "metrics").mkdir()
    prom = tmp / "metrics" / "nbdbackup.prom"
    t0 = time.time()
    doc = run_json(job, check_rc=ExitCode.SOME_SOURCES_FAILED)
    text = prom.read_text()
    values = check_exposition(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"nbdbackup_last_success_timestamp_seconds", "nbdbackup_last_run_success",
            "nbdbackup_last_run_duration_seconds", "nbdbackup_last_run_read_bytes",
            "nbdbackup_last_run_stored_bytes", "nbdbackup_repository_backups",
            "nbdbackup_source_last_run_success", "nbdbackup_run_start_timestamp_seconds",
            "nbdbackup_run_end_timestamp_seconds", "nbdbackup_run_sources_failed"} <= set(families)
    assert all(f.type == "gauge" for f in families.values())
    web = by_disk(doc)["web"]
    created = backups_of(repo, "web")[-1]["created"]
    from datetime import datetime
    assert values["nbdbackup_last_success_timestamp_seconds"]["web"] == pytest.approx(
        datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp(), abs=0.001)
    assert values["nbdbackup_last_run_success"] == {"web": 1, 'odd "q\\uote': 0}
    assert values["nbdbackup_last_run_read_bytes"]["web"] == web["read_bytes"] == 3 * MiB
    assert values["nbdbackup_last_run_stored_bytes"]["web"] == web["stored_bytes"]
    assert values["nbdbackup_repository_backups"] == {"web": 1, 'odd "q\\uote': 0}
    assert values["nbdbackup_source_last_run_success"] == {f"image:{tmp}/web.qcow2": 1, f"image:{weird}": 0}
    assert values["nbdbackup_run_sources_failed"] == {"": 1}
    start = values["nbdbackup_run_start_timestamp_seconds"][""]
    assert t0 - 1 <= start <= values["nbdbackup_run_end_timestamp_seconds"][""] <= time.time()
    # the prometheus parser reads the escaped label back the same way
    parsed = {s.labels.get("source"): s.value for s in families["nbdbackup_source_last_run_success"].samples}
    assert parsed[f"image:{weird}"] == 0
    assert oct(prom.stat().st_mode & 0o777) == "0o644"

    # second run: web's image is gone now, so its last success stays the first run's backup;
    # the file is replaced by a rename, the old one (still open here) never half-written
    a.rename(tmp / "web.moved")
    old_inode = prom.stat().st_ino
    with open(prom) as old:
        run_job(job, "--json", check_rc=ExitCode.SOME_SOURCES_FAILED)
        assert old.read() == text
    assert prom.stat().st_ino != old_inode
    values2 = check_exposition(prom.read_text())
    assert values2["nbdbackup_last_run_success"]["web"] == 0
    assert values2["nbdbackup_last_success_timestamp_seconds"]["web"] == \
        values["nbdbackup_last_success_timestamp_seconds"]["web"]
    assert values2["nbdbackup_repository_backups"]["web"] == 1
    assert values2["nbdbackup_run_sources_failed"] == {"": 2}
    assert sorted(os.listdir(tmp / "metrics")) == ["nbdbackup.prom"]     # no temporary file left
    # --metrics-file on the command line wins over the job's
    run_job(job, "--metrics-file", tmp / "other.prom", check_rc=ExitCode.SOME_SOURCES_FAILED)
    check_exposition((tmp / "other.prom").read_text())


def test_prune_from_the_job_file_only_touches_disks_backed_up(fleet):
    tmp, repo, a, b, n = fleet
    for _ in range(2):
        nbb(repo, "full", "--image", a)
        nbb(repo, "full", "--image", b)
    b.rename(tmp / "db.away")       # db's source fails this run: its backups stay
    job = write_job(tmp / "job.toml", """
repository = "repo"
[[source]]
image = "web.qcow2"
[[source]]
image = "db.qcow2"
[prune]
keep-last = 1
""")
    doc = run_json(job, check_rc=ExitCode.SOME_SOURCES_FAILED)
    assert doc["prune"]["result"] == "ok" and doc["prune"]["disks"] == ["web"]
    assert doc["prune"]["removed"] == 2
    web = backups_of(repo, "web")
    assert [x["id"] for x in web] == [by_disk(doc)["web"]["id"]]
    assert len(backups_of(repo, "db")) == 2


# --- examples ----------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_job_file_and_units():
    import shlex

    from nbdbackup.cli.main import build_parser
    from nbdbackup.jobs.jobfile import load

    job = load(str(EXAMPLES / "fleet.toml"))
    assert [s.kind for s in job.sources] == ["libvirt", "libvirt", "image"]
    assert job.prune == {"daily": 7, "weekly": 4, "monthly": 6} and job.concurrency == 2
    assert job.metrics_file.startswith("/var/lib/prometheus/node-exporter/")
    unit = (EXAMPLES / "nbdbackup-run.service").read_text()
    execs = [shlex.split(ln.split("=", 1)[1].lstrip("-")) for ln in unit.splitlines()
             if ln.startswith(("ExecStart=", "ExecStopPost="))]
    commands = [build_parser().parse_args(argv[1:]) for argv in execs]
    assert [c.command for c in commands] == ["run", "gc"]      # gc after every run, failed or not
    assert commands[0].jobfile == "/etc/nbdbackup/fleet.toml"
    assert "OnCalendar=" in (EXAMPLES / "nbdbackup-run.timer").read_text()
    assert "time() - nbdbackup_last_success_timestamp_seconds > 26*3600" in unit
    # systemd must leave the run's 90 s stop grace for its sources to end their jobs
    import inspect

    from nbdbackup.jobs import children
    grace = inspect.signature(children.run_all).parameters["grace_s"].default
    stop = int(next(ln for ln in unit.splitlines() if ln.startswith("TimeoutStopSec=")).split("=")[1])
    assert stop > grace, (stop, grace)


def test_unreachable_libvirt_fails_its_glob_only(tmp_path):
    repo = init_repo(tmp_path / "repo")
    qio(make_image(tmp_path / "web.qcow2", 1 * MiB), "write -P 0x61 0 64K")
    job = write_job(tmp_path / "job.toml", f"""
repository = "repo"
[[source]]
libvirt = "web*"
connect = "qemu+unix:///system?socket={tmp_path}/no-libvirtd.sock"
[[source]]
image = "web.qcow2"
""")
    doc = run_json(job, check_rc=ExitCode.SOME_SOURCES_FAILED)
    glob = next(s for s in doc["sources"] if s["source"] == "libvirt:web*")
    assert glob["exit_code"] == ExitCode.SOURCE_UNREACHABLE and "cannot connect to libvirt" in glob["error"]
    assert [b["disk"] for b in backups_of(repo)] == ["web"]


def test_the_index_url_reaches_children_by_their_environment_only(tmp_path):
    """/proc/PID/cmdline is world-readable: a password in $NBDBACKUP_INDEX_URL (or --index-url)
    must not go onto a child's command line, nor into --dry-run's commands."""
    from types import SimpleNamespace

    from nbdbackup.jobs.jobfile import load
    from nbdbackup.jobs.runner import repo_argv, repo_environment

    job = load(str(write_job(tmp_path / "job.toml", 'repository = "repo"\n' + GOOD_SOURCE)))
    url = "postgresql+psycopg://u:hunter2-secret@db.example/nbd"
    args = SimpleNamespace(index_url=url, verbose=0, lock_wait=0)
    assert "hunter2" not in " ".join(repo_argv(job, args)) and "--index-url" not in repo_argv(job, args)
    assert repo_environment(job, args) == {"NBDBACKUP_INDEX_URL": url}
    p = run_job(tmp_path / "job.toml", "--dry-run", "--json", env=dict(os.environ, NBDBACKUP_INDEX_URL=url))
    assert "hunter2" not in p.stdout + p.stderr


def test_metrics_keep_a_disk_the_jobs_libvirt_sources_no_longer_back_up():
    """A domain undefined (or renamed) since: its disks' last success stays in the file, so the
    26-hour alert fires instead of the series vanishing; disks of other domains stay out."""
    from nbdbackup.jobs.metrics import render
    from nbdbackup.jobs.runner import RunReport

    listing = [{"disk": "gone-vda", "created": "2026-11-30T01:00:00.000Z", "source": "libvirt:gone/vda"},
               {"disk": "gone-vda", "created": "2026-11-29T01:00:00.000Z", "source": "libvirt:gone/vda"},
               {"disk": "db-vda", "created": "2026-11-30T01:00:00.000Z", "source": "libvirt:db/vda"}]
    report = RunReport(started=1.0, ended=2.0, listing=listing, libvirt_patterns=["g*"])
    values = check_exposition(render(report))
    assert values["nbdbackup_last_success_timestamp_seconds"] == {"gone-vda": 1796000400.0}
    assert values["nbdbackup_repository_backups"] == {"gone-vda": 2}
    assert "nbdbackup_last_run_success" not in values          # this run did not try it
    assert values["nbdbackup_run_listing_success"] == {"": 1}
    unlisted = check_exposition(render(RunReport(started=1.0, ended=2.0, listing=None,
                                                 libvirt_patterns=["g*"])))
    assert unlisted["nbdbackup_run_listing_success"] == {"": 0}
