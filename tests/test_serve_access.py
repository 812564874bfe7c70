"""Who can reach `nbdbackup serve`: the default unix socket is the owner's alone; other
users get in only when --socket-group/--socket-mode say so; TCP needs TLS or --insecure-tcp.

Checked with a real other user (runuser -u nobody) and real clients (nbdinfo, nbdcopy).
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import support
from helpers.repo import repo_with_vm1
from helpers.serve import serve
from nbdbackup.errors import UsageError
from nbdbackup.nbd import server_socket

DEFAULT_DIR = "/run/nbdbackup"          # the tests run as root
DEFAULT_SOCK = f"{DEFAULT_DIR}/serve.sock"
OTHER_USER, OTHER_GROUP = "nobody", "nogroup"

# A raw connect(2) as the other user, with the system python (the venv may be out of its reach).
RAW_CONNECT = ("import socket, sys\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               "try:\n"
               "    s.connect(sys.argv[1]); print('connected:', s.recv(8).hex())\n"
               "except OSError as e:\n"
               "    print('refused:', e.strerror); sys.exit(1)\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-access")
    data, _ = repo_with_vm1(d, 512 * 1024, 9)
    return d / "repo", data


def as_other_user(*cmd, binary: bool = False) -> subprocess.CompletedProcess:
    runuser = support.require_tool("runuser")
    return subprocess.run([runuser, "-u", OTHER_USER, "--", *map(str, cmd)], capture_output=True,
                          text=not binary, timeout=60)


def other_user_can_list(sock: str) -> bool:
    nbdinfo = support.require_tool("nbdinfo")
    p = as_other_user(nbdinfo, "--list", f"nbd+unix:///?socket={sock}")
    return p.returncode == 0 and "vm1" in p.stdout


def other_user_can_connect(sock: str) -> bool:
    p = as_other_user("/usr/bin/python3", "-c", RAW_CONNECT, sock)
    return p.returncode == 0 and p.stdout.startswith("connected: 4e42444d41474943")   # "NBDMAGIC"


def tcp_listening_inodes() -> set[str]:
    out = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":
                out.add(parts[9])
    return out


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def test_default_serve_is_for_its_owner_only(repo, tmp_path):
    path, data = repo
    nbdinfo = support.require_tool("nbdinfo")
    with serve(path, tmp_path, "--json", sock=DEFAULT_SOCK, listen="") as s:
        st, dst = os.lstat(DEFAULT_SOCK), os.lstat(DEFAULT_DIR)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == 0
        assert not socket_inodes(s.proc.pid) & tcp_listening_inodes(), "the default serve listens on TCP"
        # The start-up report names the socket (stderr banner and --json).
        assert f"listening on unix:{DEFAULT_SOCK}" in s.log() and "mode 0600" in s.log()
        doc = s.json_report()
        assert doc["socket"] == DEFAULT_SOCK and doc["socket_mode"] == "0600" and doc["socket_group"] is None
        # root (the owner) is served; the other user can neither list nor even connect.
        assert "vm1" in support.run([nbdinfo, "--list", f"nbd+unix:///?socket={DEFAULT_SOCK}"]).stdout
        assert not other_user_can_list(DEFAULT_SOCK)
        p = as_other_user("/usr/bin/python3", "-c", RAW_CONNECT, DEFAULT_SOCK)
        assert p.returncode == 1 and "refused: Permission denied" in p.stdout, p.stdout + p.stderr
        nbdcopy = support.require_tool("nbdcopy")
        assert as_other_user(nbdcopy, f"nbd+unix:///vm1?socket={DEFAULT_SOCK}", "-", binary=True).returncode != 0


def test_socket_group_and_mode_let_others_in_on_purpose(repo, tmp_path):
    path, data = repo
    nbdcopy = support.require_tool("nbdcopy")
    nogroup = grp.getgrnam(OTHER_GROUP).gr_gid
    with serve(path, tmp_path, "--socket-group", OTHER_GROUP, sock=DEFAULT_SOCK, listen="") as s:
        st, dst = os.lstat(DEFAULT_SOCK), os.lstat(DEFAULT_DIR)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nogroup
        assert stat.S_IMODE(dst.st_mode) == 0o710 and dst.st_gid == nogroup    # search, not list or write
        assert f"group {OTHER_GROUP} can connect" in s.log()
        assert other_user_can_list(DEFAULT_SOCK) and other_user_can_connect(DEFAULT_SOCK)
        p = as_other_user(nbdcopy, f"nbd+unix:///vm1?socket={DEFAULT_SOCK}", "-", binary=True)
        assert p.returncode == 0 and p.stdout == data
        assert as_other_user("ls", DEFAULT_DIR).returncode != 0                 # the directory is not listable
    with serve(path, tmp_path, "--socket-mode", "0666", sock=DEFAULT_SOCK, listen=""):
        assert stat.S_IMODE(os.lstat(DEFAULT_SOCK).st_mode) == 0o666
        assert stat.S_IMODE(os.lstat(DEFAULT_DIR).st_mode) == 0o711
        assert other_user_can_list(DEFAULT_SOCK)
    # The next default run takes the access back: the directory is private again.
    with serve(path, tmp_path, sock=DEFAULT_SOCK, listen=""):
        dst = os.lstat(DEFAULT_DIR)
        assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_gid == os.getegid()
        assert not other_user_can_connect(DEFAULT_SOCK)


def test_explicit_unix_socket_is_owner_only_too(repo, tmp_path):
    path, _ = repo
    with serve(path, tmp_path) as s:
        assert stat.S_IMODE(os.lstat(s.sock).st_mode) == 0o600
    # A group let in on a socket in a directory it cannot search: said at start.
    with serve(path, tmp_path, "--socket-group", OTHER_GROUP) as s:
        st = os.lstat(s.sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(OTHER_GROUP).gr_gid
        assert "not searchable by them" in s.log()
        assert not other_user_can_connect(s.sock)


def test_tcp_needs_tls_or_insecure_tcp(repo, tmp_path):
    path, _ = repo
    port = support.free_port()
    for extra in ([], ["--writable"]):
        p = support.nbdbackup("serve", "--repo", path, "--listen", f"127.0.0.1:{port}", *extra,
                              check=False, timeout=30)
        assert p.returncode == 2, p.stderr
        assert "without TLS" in p.stderr and "--insecure-tcp" in p.stderr and "hint:" in p.stderr
        assert "Traceback" not in p.stderr
    p = support.nbdbackup("serve", "--repo", path, "--listen", f"127.0.0.1:{port}", "--insecure-tcp",
                          "--socket-mode", "0660", check=False, timeout=30)
    assert p.returncode == 2 and "unix sockets only" in p.stderr
    for _ in range(2):                      # the warning comes on every start
        with serve(path, tmp_path, "--insecure-tcp", port=port) as s:
            assert "WARNING: --insecure-tcp" in s.log() and "without TLS" in s.log()


@pytest.mark.parametrize("args, needle", [
    (["--socket-mode", "rw"], "octal mode"),
    (["--socket-mode", "1777"], "octal mode"),
    (["--socket-group", "no-such-group-here"], "no such group"),
])
def test_bad_socket_options_are_usage_errors(repo, tmp_path, args, needle):
    path, _ = repo
    p = support.nbdbackup("serve", "--repo", path, "--listen", f"unix:{tmp_path}/s.sock", *args,
                          check=False, timeout=30)
    assert p.returncode == 2 and needle in p.stderr and "hint:" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_private_directory_that_is_not_ours_is_refused(tmp_path):
    """A squatted runtime directory (another user's, or a symlink) is never used."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UsageError, match="belongs to uid 65534") as ei:
        server_socket.check_private_dir(str(theirs))
    assert "--listen unix:PATH" in ei.value.hint
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(UsageError, match="cannot use"):
        server_socket.check_private_dir(str(link))
    fresh = tmp_path / "fresh"
    server_socket.check_private_dir(str(fresh))
    assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    server_socket.check_private_dir(str(open_to_all))     # ours, but nobody else may write in it
    assert stat.S_IMODE(os.lstat(open_to_all).st_mode) == 0o755
    with pytest.raises(UsageError, match="cannot use") as ei:
        server_socket.check_private_dir(str(tmp_path / "no" / "parent"))
    assert "--listen unix:PATH" in ei.value.hint


def test_runtime_directory_for_each_kind_of_user():
    """Non-root: $XDG_RUNTIME_DIR when it is ours, else a per-uid directory in the temp dir
    (asked as the real other user, with the system python and a copy of this source tree)."""
    import shutil
    import tempfile

    import nbdbackup

    assert server_socket.runtime_dir() == DEFAULT_DIR         # root
    base = tempfile.mkdtemp(prefix="nbdb-rt-", dir="/tmp")    # reachable by the other user
    try:
        os.chmod(base, 0o1777)                               # like /tmp
        # a copy of the source the other user can read, wherever the checkout lives (a CI
        # clone may sit under root's private home)
        src = os.path.join(base, "src")
        shutil.copytree(os.path.dirname(nbdbackup.__file__), os.path.join(src, "nbdbackup"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, _dirs, files in os.walk(src):
            os.chmod(dirpath, 0o755)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
        xdg = os.path.join(base, "xdg")
        os.mkdir(xdg, 0o700)
        ask = "from nbdbackup.nbd.server_socket import runtime_dir; print(runtime_dir())"

        def runtime_dir_of_other_user(xdg_dir: str | None) -> str:
            env = [f"TMPDIR={base}", f"PYTHONPATH={src}"] + ([f"XDG_RUNTIME_DIR={xdg_dir}"] if xdg_dir else [])
            p = as_other_user("env", "-i", *env, "/usr/bin/python3", "-c", ask)
            assert p.returncode == 0, p.stderr
            return p.stdout.strip()

        assert runtime_dir_of_other_user(xdg) == f"{base}/nbdbackup-65534"    # root's xdg: not used
        os.chown(xdg, 65534, 65534)
        assert runtime_dir_of_other_user(xdg) == f"{xdg}/nbdbackup"
        assert runtime_dir_of_other_user(None) == f"{base}/nbdbackup-65534"
    finally:
        shutil.rmtree(base)
