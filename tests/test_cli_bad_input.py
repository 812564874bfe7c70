"""Realistic operator mistakes get a clear message and a documented exit code.

Each test is the regression test of one fix found by a bad-input audit: the
command must fail with the right ExitCode, say what was wrong, never print a
traceback or "internal error", and leave nothing changed.
"""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from helpers.support import nbdbackup, nbdbackup_exe, qemu_nbd, require_tool, stop, wait_listening
from nbdbackup.errors import ExitCode


def assert_clean_error(p, code, *needles):
    assert p.returncode == code, f"exit {p.returncode}, wanted {int(code)}:\n{p.stderr}"
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, f"{n!r} not in stderr:\n{p.stderr}"


@pytest.fixture(scope="module")
def repo_with_backup(tmp_path_factory):
    """A repository holding one full backup of a 1 MiB disk named 'disk'."""
    require_tool("qemu-img")
    require_tool("qemu-nbd")
    d = tmp_path_factory.mktemp("badinput")
    img = d / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    repo = d / "repo"
    nbdbackup("init", "--repo", repo)
    nbdbackup("--repo", repo, "-q", "full", "--image", img)
    return repo


# --- restore targets ---------------------------------------------------------

def test_restore_force_refuses_to_replace_a_fifo(repo_with_backup, tmp_path):
    # Before the fix, --force renamed a regular file over the path: a device
    # node such as /dev/full (or this FIFO) was silently replaced.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = nbdbackup("--repo", repo_with_backup, "restore", "--force", "disk", fifo, check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "neither a regular file nor a block device")
    assert fifo.is_fifo()
    assert not [f for f in os.listdir(tmp_path) if f != "fifo"], "restore left files behind"


def test_restore_to_directory_says_directory_not_force(repo_with_backup, tmp_path):
    p = nbdbackup("--repo", repo_with_backup, "restore", "disk", tmp_path, check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "is a directory", "disk.raw")
    assert "--force" not in p.stderr    # --force cannot help with a directory
    assert os.listdir(tmp_path) == []


def test_restore_to_malformed_nbd_uri_is_usage_error(repo_with_backup, tmp_path):
    # `nbd:/x` used to be taken as a file "x" in a directory named "nbd:".
    p = nbdbackup("--repo", repo_with_backup, "restore", "disk", "nbd:/x", check=False, timeout=60, cwd=tmp_path)
    assert_clean_error(p, ExitCode.USAGE, "malformed NBD URI")
    assert os.listdir(tmp_path) == []


# --- common options and repository paths -------------------------------------

@pytest.mark.parametrize("value,needle", [("-5", "must be 0 or more"), ("nan", "must be 0 or more"),
                                          ("abc", "invalid number of seconds")])
def test_lock_wait_must_be_a_non_negative_number(tmp_path, value, needle):
    p = nbdbackup("--repo", tmp_path, "--lock-wait", value, "list", check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "--lock-wait", needle)


def test_log_file_in_missing_directory(tmp_path):
    p = nbdbackup("--repo", tmp_path, "--log-file", tmp_path / "nodir" / "log", "list", check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "cannot open log file", "No such file or directory", "hint:")
    assert "[Errno" not in p.stderr


def test_repo_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "disk.qcow2"
    f.write_bytes(b"not a repo")
    p = nbdbackup("--repo", f, "list", check=False, timeout=60)
    assert_clean_error(p, ExitCode.NOT_A_REPOSITORY, "it is a file, not a directory", "nbdbackup init")
    assert f.read_bytes() == b"not a repo"


def test_init_where_a_directory_cannot_be_made(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    p = nbdbackup("init", "--repo", f / "repo", check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "cannot create repository directory", "Not a directory")
    assert "[Errno" not in p.stderr
    assert f.read_bytes() == b"x"


# --- QMP ----------------------------------------------------------------------

def test_qmp_connect_failure_is_one_clean_message(tmp_path):
    # qemu.qmp logs its own ERROR lines for a failed connect; on stderr the
    # user should see only our message with its hint (the library's lines go
    # to -vv and --log-file).
    nbdbackup("init", "--repo", tmp_path / "r")
    p = nbdbackup("--repo", tmp_path / "r", "full", "--qmp", tmp_path / "no.sock", "--node", "drive0",
                  check=False, timeout=60)
    assert_clean_error(p, ExitCode.SOURCE_UNREACHABLE, "cannot connect to QMP socket", "hint:")
    assert "ERROR" not in p.stderr, p.stderr
    assert p.stderr.count("No such file or directory") == 1, p.stderr


# --- serve --------------------------------------------------------------------

def test_serve_on_a_port_in_use_says_what_to_do(tmp_path):
    nbdbackup("init", "--repo", tmp_path / "r")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = nbdbackup("--repo", tmp_path / "r", "serve", "--listen", f"127.0.0.1:{port}", "--insecure-tcp",
                      check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, f"cannot listen on 127.0.0.1:{port}", "already in use",
                       "choose another --listen")


# --- logs ---------------------------------------------------------------------

def test_log_file_records_the_run_the_error_and_the_exit_code(tmp_path):
    # A cron job's only record is --log-file: it must say what ran and how it ended.
    repo, log = tmp_path / "r", tmp_path / "nbdbackup.log"
    nbdbackup("init", "--repo", repo)
    p = nbdbackup("--repo", repo, "--log-file", log, "restore", "nosuch", tmp_path / "x.raw", check=False, timeout=60)
    assert_clean_error(p, ExitCode.NOT_FOUND, "no backup id or disk named 'nosuch'")
    text = log.read_text()
    assert "run: nbdbackup --repo" in text and "restore nosuch" in text, text
    assert "no backup id or disk named 'nosuch'" in text, text
    assert f"exit {int(ExitCode.NOT_FOUND)}: no such backup" in text, text
    assert p.stderr.count("no backup id") == 1, p.stderr     # not repeated on stderr
    nbdbackup("--repo", repo, "--log-file", log, "list", timeout=60)
    assert log.read_text().rstrip().endswith("exit 0: success")


def test_log_file_keeps_the_summary_line_even_when_quiet(tmp_path):
    # cron runs with --quiet; the log file is where "what did last night's backup do" is answered
    repo, log = tmp_path / "r", tmp_path / "nbdbackup.log"
    nbdbackup("init", "--repo", repo, "--quiet")
    p = nbdbackup("--repo", repo, "--log-file", log, "--quiet", "verify", timeout=60)
    assert p.stderr == "", p.stderr
    text = log.read_text()
    assert "verified 0 backup(s)" in text, text
    assert text.rstrip().endswith("exit 0: success"), text


def test_index_url_password_is_never_shown(tmp_path):
    repo, log = tmp_path / "r", tmp_path / "nbdbackup.log"
    nbdbackup("init", "--repo", repo)
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/db"
    p = nbdbackup("--repo", repo, "--index-url", url, "--log-file", log, "list", check=False, timeout=60)
    assert p.returncode == ExitCode.STORAGE_UNREACHABLE, p.stderr   # nothing listens on port 1
    assert "Traceback" not in p.stderr and "127.0.0.1:1/db" in p.stderr, p.stderr
    assert "s3cret-pw" not in p.stderr and "s3cret-pw" not in log.read_text()


# --- demo -----------------------------------------------------------------------

def test_demo_never_deletes_a_repository_in_its_workdir(tmp_path):
    # `demo --workdir DIR` used to rmtree DIR/repo whatever it was.
    require_tool("qemu-img")
    require_tool("qemu-io")
    require_tool("qemu-nbd")
    nbdbackup("init", "--repo", tmp_path / "repo")
    (tmp_path / "repo" / "precious").write_text("keep me")
    p = nbdbackup("demo", "--workdir", tmp_path, check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "already holds repo", "--workdir")
    assert (tmp_path / "repo" / "precious").read_text() == "keep me"
    assert (tmp_path / "repo" / "config.json").exists()


@pytest.mark.parametrize("size,needle", [("abc", "invalid size"), ("0", "at least 128M"),
                                         ("64M", "at least 128M")])
def test_demo_size_is_checked_up_front(tmp_path, size, needle):
    p = nbdbackup("demo", "--size", size, "--workdir", tmp_path / "w", check=False, timeout=60)
    assert_clean_error(p, ExitCode.USAGE, "--size", needle)
    assert not (tmp_path / "w").exists()


# --- NBD sources ----------------------------------------------------------------

def test_unknown_export_is_not_found(tmp_path):
    # The exit-code table says 11 is "no such backup, disk or export".
    require_tool("qemu-img")
    require_tool("qemu-nbd")
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    nbdbackup("init", "--repo", tmp_path / "r")
    with qemu_nbd(img, tmp_path / "s") as uri:
        bad = uri.replace(":///", ":///nosuch")
        for args in (("info", bad), ("--repo", tmp_path / "r", "full", "--source", bad, "--disk", "d")):
            p = nbdbackup(*args, check=False, timeout=60)
            assert_clean_error(p, ExitCode.NOT_FOUND, "no export named 'nosuch'", "nbdinfo --list")
    assert json.loads(nbdbackup("--repo", tmp_path / "r", "--json", "list").stdout) == []


def test_serve_overlay_dir_that_is_a_file(tmp_path):
    nbdbackup("init", "--repo", tmp_path / "r")
    f = tmp_path / "file"
    f.write_bytes(b"x")
    for d, needle in ((f, "it is a file, not a directory"), (f / "sub", "Not a directory")):
        p = nbdbackup("--repo", tmp_path / "r", "serve", "--writable", "--overlay-dir", d,
                      "--listen", f"unix:{tmp_path}/s.sock", check=False, timeout=60)
        assert_clean_error(p, ExitCode.USAGE, "cannot make an overlay directory", needle, "--overlay-dir")
        assert "[Errno" not in p.stderr
    assert f.read_bytes() == b"x"


# --- Ctrl-C -------------------------------------------------------------------

def test_sigint_mid_backup_commits_nothing_and_says_how_to_reclaim(tmp_path):
    nbdkit = require_tool("nbdkit")
    repo, sock = tmp_path / "r", tmp_path / "slow.sock"
    nbdbackup("init", "--repo", repo)
    # A 64 MiB export read at 8 MiB/s: the backup is surely still running after 2 s.
    server = subprocess.Popen([nbdkit, "-f", "-U", str(sock), "--filter=rate", "random", "size=64M", "rate=8M"],
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(sock, proc=server)
        p = subprocess.Popen([nbdbackup_exe(), "--repo", str(repo), "full", "--source",
                              f"nbd+unix:///?socket={sock}", "--disk", "slow"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=60)
        # In-flight reads at a slow server used to hold the exit ~45 s (30 s drain per connection).
        assert time.monotonic() - t0 < 15, f"exit took {time.monotonic() - t0:.0f}s after SIGINT"
    finally:
        stop(server)
    assert p.returncode == ExitCode.INTERRUPTED, err
    assert "Traceback" not in err and "nothing half-done was committed" in err and "nbdbackup gc" in err, err
    assert json.loads(nbdbackup("--repo", repo, "--json", "list").stdout) == []
    assert "all intact" in nbdbackup("--repo", repo, "verify").stderr


def test_bitmap_granularity_sizes():
    """--bitmap-granularity takes the same size syntax as --chunk-size, up to 2G."""
    import argparse

    import pytest

    from nbdbackup.cli.backupargs import granularity_type

    assert granularity_type("64K") == 64 * 1024
    assert granularity_type("2G") == 2 ** 31        # the largest the error message names
    assert granularity_type("1MiB") == 2 ** 20
    for bad in ("3K", "abc", "4G", "256", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            granularity_type(bad)


# --- --json errors -----------------------------------------------------------------

def test_json_errors_are_json_on_stdout_too(tmp_path):
    # A script that parses stdout (`... --json | jq`) learns what went wrong, not just "no output".
    import json

    repo = tmp_path / "r"
    nbdbackup("init", "--repo", repo, "--quiet")
    p = nbdbackup("--repo", repo, "--json", "restore", "nosuch", tmp_path / "x.raw", check=False, timeout=60)
    assert_clean_error(p, ExitCode.NOT_FOUND, "no backup id or disk named 'nosuch'")
    err = json.loads(p.stdout)
    assert err["exit_code"] == int(ExitCode.NOT_FOUND) and err["meaning"].startswith("no such backup")
    assert "nosuch" in err["error"] and err["hint"] == "see `nbdbackup list`"
    p = nbdbackup("--repo", tmp_path / "missing", "list", "--json", check=False, timeout=60)
    err = json.loads(p.stdout)
    assert err["exit_code"] == p.returncode != 0 and err["error"], p.stdout
    ok = nbdbackup("--repo", repo, "list", "--json", timeout=60)       # success: the normal output only
    assert json.loads(ok.stdout) == []


def test_list_of_an_unknown_disk_names_the_disks_there_are(repo_with_backup):
    # `list --disk dsik` (a typo) must not read as "this disk was never backed up" only
    p = nbdbackup("--repo", repo_with_backup, "list", "--disk", "dsik", timeout=60)
    assert "(no backups of disk dsik; disks with backups: disk)" in p.stderr, p.stderr
    p = nbdbackup("--repo", repo_with_backup, "list", "--disk", "dsik", "--json", timeout=60)
    assert p.stdout.strip() == "[]"
