"""A repository the user cannot write: mounted read-only (an offsite copy) or owned by someone else.

Issue 10 item 7: on a read-only mount every command, restore included, exited 9 ("cannot read the
index ... unable to open database file", hint: rebuild-index). Reading commands must work there;
writing ones exit 14 (read-only file system) and a user without access gets 15, each with its hint.
"""

import json
import os
import shutil

import pytest

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo_path, pseudo, read_all, write_backup
from helpers.serve import serve
from helpers.support import nbdbackup, nbdbackup_without_dac_override, read_only_view, require_tool, run
from nbdbackup.errors import ExitCode
from nbdbackup.repo import Repository


def _assert_error(p, code, *needles):
    assert p.returncode == code, f"exit {p.returncode}, wanted {int(code)}:\n{p.stderr}"
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert "damaged" not in p.stderr and "rebuild-index` recreates" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, f"{n!r} not in:\n{p.stderr}"


@pytest.fixture
def source_repo(tmp_path):
    """A repository with two disks' backups; returns (path, {id: data})."""
    path = new_repo_path(tmp_path / "src", pack_size=256 * 1024)
    datas = {}
    with Repository.open(path) as repo:
        for disk, seed in (("vda", 1), ("vdb", 2)):
            data = pseudo(seed, 12 * CS)
            datas[write_backup(repo, disk, data).id] = data
    return path, datas


@pytest.mark.parametrize("lock_files", ["present", "absent"])
def test_reading_commands_work_on_a_read_only_mount(source_repo, tmp_path, lock_files):
    src, datas = source_repo
    if lock_files == "absent":      # a repository made before init created them, never read since
        for f in os.listdir(os.path.join(src, "locks")):
            os.unlink(os.path.join(src, "locks", f))
    with read_only_view(src, tmp_path / "ro") as ro:
        listed = json.loads(nbdbackup("--repo", ro, "--json", "list").stdout)
        assert sorted(b["id"] for b in listed) == sorted(datas)
        assert "all intact" in nbdbackup("--repo", ro, "verify").stderr
        assert json.loads(nbdbackup("--repo", ro, "--json", "stats").stdout)["backups"] == 2
        for bid, data in datas.items():
            out = tmp_path / f"{bid}.raw"
            nbdbackup("--repo", ro, "-q", "restore", bid, out)
            assert out.read_bytes() == data
        _serve_and_read(ro, tmp_path, datas)
    assert not os.path.exists(tmp_path / "ro" / "config.json")      # unmounted


def _serve_and_read(repo, tmp_path, datas):
    nbdcopy = require_tool("nbdcopy")
    with serve(repo, tmp_path) as s:       # the socket lives outside the read-only repository
        for bid, data in datas.items():
            out = tmp_path / f"served-{bid}.raw"
            run([nbdcopy, s.uri(bid), str(out)])
            assert out.read_bytes() == data


def test_a_read_only_copy_taken_with_a_write_ahead_log_shows_every_backup(tmp_path):
    # A copy made while a writer had the index open carries index.sqlite-wal holding the newest
    # commits; opening the copy "immutable" would silently drop them.
    path = new_repo_path(tmp_path / "live")
    repo = Repository.open(path)
    try:
        ids = [write_backup(repo, f"d{i}", pseudo(i, 2 * CS)).id for i in range(3)]
        assert os.path.getsize(os.path.join(path, "index.sqlite-wal")) > 0
        shutil.copytree(path, tmp_path / "copy")
    finally:
        repo.close()
    with read_only_view(tmp_path / "copy", tmp_path / "ro") as ro:
        listed = json.loads(nbdbackup("--repo", ro, "--json", "list").stdout)
        assert sorted(b["id"] for b in listed) == sorted(ids)
        assert "all intact" in nbdbackup("--repo", ro, "verify").stderr


def test_writing_commands_on_a_read_only_mount_exit_14(source_repo, tmp_path):
    src, datas = source_repo
    with Repository.open(src) as repo:      # so that prune has something to forget
        data = pseudo(3, 4 * CS)
        datas[write_backup(repo, "vda", data).id] = data
    qemu_img = require_tool("qemu-img")
    img = tmp_path / "new.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "1M"])
    with read_only_view(src, tmp_path / "ro") as ro:
        for args in (["forget", "vda"], ["prune", "--keep-last", "1"], ["gc"], ["rebuild-index"],
                     ["full", "--image", img, "--disk", "vdc"]):
            p = nbdbackup("--repo", ro, *args, check=False, timeout=120)
            _assert_error(p, ExitCode.READ_ONLY, "read-only file system", "remount it read-write",
                          "reading command")
    with Repository.open(src) as repo:      # nothing changed
        assert sorted(b.id for b in repo.list_backups()) == sorted(datas)
        for bid, data in datas.items():
            assert read_all(repo, bid) == data


def test_a_user_without_access_gets_permission_denied(source_repo, tmp_path):
    # Another user's 0700 repository: it said "not an nbdbackup repository (no config.json)".
    # The CLI runs as root without its file-permission override, so nobody's files refuse it.
    src, datas = source_repo
    private = tmp_path / "r"
    shutil.copytree(src, private)
    _chown_tree(private, "nobody")
    os.chmod(private, 0o700)
    for args in (["list"], ["verify"], ["forget", "vda"], ["restore", "vda", "/dev/null"]):
        p = nbdbackup_without_dac_override("--repo", private, *args)
        _assert_error(p, ExitCode.PERMISSION_DENIED, "permission denied", str(private), "owns the repository")
    # a repository behind a directory this user may not search: the same, not "no such directory"
    fence = tmp_path / "fence"
    fence.mkdir()
    shutil.copytree(src, fence / "r")
    _chown_tree(fence, "nobody")
    os.chmod(fence, 0o700)
    p = nbdbackup_without_dac_override("--repo", fence / "r", "list")
    _assert_error(p, ExitCode.PERMISSION_DENIED, "permission denied")
    # readable but not writable: a writing command is refused as such
    os.chmod(private, 0o755)
    p = nbdbackup_without_dac_override("--repo", private, "forget", "vda")
    _assert_error(p, ExitCode.PERMISSION_DENIED, "permission denied")
    with Repository.open(private) as repo:
        assert sorted(b.id for b in repo.list_backups()) == sorted(datas)


def _chown_tree(top, user):
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, -1)
