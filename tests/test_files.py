"""`nbdbackup files`: files out of a backup through our NBD server and a real libguestfs
appliance (guestfish). Disks are made without mounting anything (sfdisk, mke2fs -d,
mkfs.xfs -p, mkntfs; LVM by guestfish itself), backed up, then read back.

Every appliance launch is real and costs 20-60 s under TCG, so launches are counted:
one per disk for the engine tests (list + ls + extract + a missing path in one session),
one per CLI call for the end-to-end ones.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import support
from helpers.repo import new_repo_path
from helpers.support import nbdbackup, require_tool, run
from nbdbackup.engine.guestfs import GuestfsSession, served_backup
from nbdbackup.errors import ExitCode, NoFilesystem, PathNotFound, UsageError
from nbdbackup.repo import Repository

TCG = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
MiB = 1 << 20
SECTOR = 512
PASSPHRASE = "files-test passphrase 4711"


# --- disks, made without mounting ------------------------------------------------------------

def populate(src: Path, seed: int) -> dict:
    """A small tree: a nested file, a 5 MiB file, odd names, a symlink; returns what to expect."""
    (src / "etc" / "deep" / "er").mkdir(parents=True)
    nested = src / "etc" / "deep" / "er" / "nested.conf"
    nested.write_text(f"nested file {seed}\n")
    nested.chmod(0o640)
    os.utime(nested, (1_600_000_000, 1_600_000_000 + seed))
    big = src / "big.bin"
    big.write_bytes(os.urandom(5 * MiB))
    big.chmod(0o600)
    os.utime(big, (1_650_000_000, 1_650_000_000 + seed))
    (src / 'we ird "name"').write_text("spaces and quotes\n")
    (src / "link").symlink_to("etc/deep/er/nested.conf")
    (src / "escape").symlink_to("/etc/passwd")        # absolute: never extracted as a link out
    os.utime(src / "etc" / "deep", (1_610_000_000, 1_610_000_000))
    return {"nested": nested, "big": big}


def ext4_image(path: Path, size: int, src: Path, label: str) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    run([require_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", label, "-d", str(src), str(path)])


def xfs_image(path: Path, size: int, src_file: Path) -> None:
    proto = path.with_suffix(".proto")
    proto.write_text(f"/dev/null\n0 0\nd--755 0 0\nxfsdir d--750 0 0\ninside.txt ---644 0 0 {src_file}\n$\n$\n")
    with open(path, "wb") as f:
        f.truncate(size)
    run([require_tool("mkfs.xfs"), "-q", "-f", "-L", "xfsfs", "-p", str(proto), str(path)])


def partitioned(disk: Path, size: int, table: str, parts: list[tuple[int, Path | None]]) -> None:
    """*disk*: an sfdisk *table* ("gpt"/"dos") with partitions (start sector, image or None)."""
    with open(disk, "wb") as f:
        f.truncate(size)
    lines = [f"label: {table}"]
    for start, image in parts:
        sectors = (image.stat().st_size // SECTOR) if image else 8 * MiB // SECTOR
        lines.append(f"start={start}, size={sectors}, type=linux")
    run([require_tool("sfdisk"), "-q", str(disk)], input="\n".join(lines) + "\n", text=True)
    for start, image in parts:
        if image:
            run(["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={start * SECTOR}", "oflag=seek_bytes",
                 "conv=notrunc,sparse", "status=none"])


def back_up(repo: str, image: Path, disk: str, env: dict | None = None) -> str:
    out = nbdbackup("--repo", repo, "--json", "full", "--image", image, "--format", "raw", "--disk", disk,
                    env=env).stdout
    return json.loads(out)["id"]


def session(served) -> GuestfsSession:
    g = GuestfsSession(env={**os.environ, **TCG})
    g.add_nbd(served.socket, served.export)
    g.launch()
    return g


def assert_same_file(got: Path, want: Path) -> None:
    assert got.read_bytes() == want.read_bytes()
    assert stat.S_IMODE(got.stat().st_mode) == stat.S_IMODE(want.stat().st_mode)
    assert int(got.stat().st_mtime) == int(want.stat().st_mtime)


# --- engine: one appliance per disk ----------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory):
    """GPT: ext4 (populated), XFS (one file), NTFS (empty), an unformatted partition."""
    d = tmp_path_factory.mktemp("gpt")
    src = d / "src"
    src.mkdir()
    want = populate(src, 1)
    ext4_image(d / "p1.ext4", 24 * MiB, src, "rootfs")
    xfs_image(d / "p2.xfs", 300 * MiB, want["nested"])
    ntfs = d / "p3.ntfs"
    with open(ntfs, "wb") as f:
        f.truncate(8 * MiB)
    run([require_tool("mkntfs"), "-q", "-F", "-Q", "-L", "winfs", str(ntfs)])
    disk = d / "gpt.raw"
    partitioned(disk, 360 * MiB, "gpt", [(2048, d / "p1.ext4"), (2048 + 24 * 2048, d / "p2.xfs"),
                                         (2048 + 324 * 2048, ntfs), (2048 + 332 * 2048, None)])
    repo = new_repo_path(d / "repo")
    return {"dir": d, "repo": repo, "id": back_up(repo, disk, "gpt"), "src": src, **want}


def test_gpt_ext4_xfs_ntfs_list_extract_and_missing(gpt_disk, tmp_path):
    with Repository.open(gpt_disk["repo"]) as repo, served_backup(repo, gpt_disk["id"]) as served, \
            session(served) as g:
        layout = g.layout()
        assert layout.partition_table == "gpt"
        types = {f.device: f.type for f in layout.filesystems}
        assert types["/dev/sda1"] == "ext4" and types["/dev/sda2"] == "xfs"
        assert types["/dev/sda4"] == "unknown"
        by_dev = {f.device: f for f in layout.filesystems}
        assert by_dev["/dev/sda1"].label == "rootfs" and by_dev["/dev/sda1"].size == 24 * MiB
        with pytest.raises(UsageError, match="/dev/sda1 \\(ext4\\).*/dev/sda2 \\(xfs\\)"):
            g.choose(layout, None)          # several: a plain PATH names the choices
        with pytest.raises(UsageError, match="no such filesystem"):
            g.choose(layout, "/dev/sdz9")
        with pytest.raises(NoFilesystem):
            g.choose(layout, "/dev/sda4")

        g.mount(g.choose(layout, "/dev/sda1"))
        entries = {e.name: e for e in g.listdir("/")}
        assert {"big.bin", "etc", "link", 'we ird "name"', "escape", "lost+found"} <= set(entries)
        assert entries["big.bin"].size == 5 * MiB and entries["big.bin"].mode_string == "-rw-------"
        assert entries["link"].target == "etc/deep/er/nested.conf"
        assert entries["etc"].is_dir
        nested = g.listdir("/etc/deep/er")
        assert [(e.name, e.mode_string, e.mtime_ns // 10**9) for e in nested] == \
            [("nested.conf", "-rw-r-----", int(gpt_disk["nested"].stat().st_mtime))]
        with pytest.raises(PathNotFound):
            g.listdir("/etc/nope")
        with pytest.raises(PathNotFound):
            g.extract(["/big.bin", "/no/such/file"], str(tmp_path))
        assert list(tmp_path.iterdir()) == []          # checked before anything was written

        x, y = tmp_path / "x", tmp_path / "y"
        x.mkdir()
        y.mkdir()
        g.extract(["/etc/deep/er/nested.conf", "/big.bin", "/link"], str(x))
        assert_same_file(x / "nested.conf", gpt_disk["nested"])
        assert_same_file(x / "big.bin", gpt_disk["big"])
        assert os.readlink(x / "link") == "etc/deep/er/nested.conf"
        # "/" lands in the directory itself: the whole tree, with modes and mtimes
        root, = g.extract(["/"], str(y))
        assert_same_file(y / "etc" / "deep" / "er" / "nested.conf", gpt_disk["nested"])
        assert_same_file(y / "big.bin", gpt_disk["big"])
        assert int((y / "etc" / "deep").stat().st_mtime) == 1_610_000_000
        assert (y / 'we ird "name"').read_text() == "spaces and quotes\n"
        assert not (y / "escape").exists() and any("escape" in s for s in root.skipped)
        assert os.readlink(y / "link") == "etc/deep/er/nested.conf"
        with pytest.raises(UsageError, match="not overwriting"):
            g.extract(["/big.bin"], str(x))
        (x / "big.bin").write_bytes(b"changed")
        g.extract(["/big.bin"], str(x), force=True)
        assert_same_file(x / "big.bin", gpt_disk["big"])

        g.mount(g.choose(layout, "/dev/sda2"))      # XFS, in the same appliance
        assert [e.name for e in g.listdir("/xfsdir")] == ["inside.txt"]
        g.extract(["/xfsdir"], str(tmp_path))
        assert (tmp_path / "xfsdir" / "inside.txt").read_bytes() == gpt_disk["nested"].read_bytes()
        assert stat.S_IMODE((tmp_path / "xfsdir").stat().st_mode) == 0o750

        ntfs = by_dev["/dev/sda3"]          # Debian's appliance mounts NTFS (ntfs-3g)
        assert (ntfs.type, ntfs.label) == ("ntfs", "winfs")
        g.mount(ntfs)
        assert g.stat("/").is_dir
        with pytest.raises(PathNotFound):
            g.listdir("/nothing-here")


@pytest.fixture(scope="module")
def lvm_disk(tmp_path_factory):
    """MBR + LVM, made by guestfish itself (no loop devices here): an ext4 LV with a file."""
    d = tmp_path_factory.mktemp("lvm")
    payload = d / "payload.bin"
    payload.write_bytes(os.urandom(300_000))
    disk = d / "lvm.raw"
    run([require_tool("guestfish"), "-N", f"{disk}=lvfs:/dev/vg0/data:ext4:64M:mbr", "-m", "/dev/vg0/data",
         "mkdir", "/sub", ":", "upload", str(payload), "/sub/payload.bin", ":", "chmod", "0604",
         "/sub/payload.bin"], env={**os.environ, **TCG}, timeout=600)
    repo = new_repo_path(d / "repo")
    return {"repo": repo, "id": back_up(repo, disk, "lvm"), "payload": payload}


def test_mbr_lvm(lvm_disk, tmp_path):
    with Repository.open(lvm_disk["repo"]) as repo, served_backup(repo, "lvm") as served, \
            session(served) as g:
        layout = g.layout()
        assert layout.partition_table == "msdos"
        fs = g.choose(layout, None)         # the PV is no filesystem: the LV is the only one
        assert (fs.device, fs.type) == ("/dev/vg0/data", "ext4")
        g.mount(fs)
        g.extract(["/sub"], str(tmp_path))
        got = tmp_path / "sub" / "payload.bin"
        assert got.read_bytes() == lvm_disk["payload"].read_bytes()
        assert stat.S_IMODE(got.stat().st_mode) == 0o604


# --- the CLI end to end ----------------------------------------------------------------------

def test_cli_extract_on_every_place(place, tmp_path, monkeypatch):
    """A filesystem on the whole disk (no partition table), backed up into an encrypted
    repository and extracted by the CLI on each repository place; --json reports what was
    written, and the passphrase appears nowhere."""
    src = tmp_path / "src"
    src.mkdir()
    want = populate(src, 2)
    disk = tmp_path / "whole.ext4"
    ext4_image(disk, 16 * MiB, src, "whole")
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASSPHRASE)
    nbdbackup("--repo", place, "init", "--encryption", "--kdf-memory", "8", env=place.env)
    backup = back_up(place, disk, "whole", env=place.env)
    out = tmp_path / "out"
    out.mkdir()
    r = nbdbackup("--repo", place, "--json", "files", backup, "--extract", "/etc", "/big.bin", "--to", out,
                  env={**place.env, **TCG})
    doc = json.loads(r.stdout)
    assert doc["backup"] == backup and doc["filesystem"]["device"] == "/dev/sda"
    assert {(x["path"], x["type"]) for x in doc["extracted"]} == {("/etc", "directory"), ("/big.bin", "file")}
    assert_same_file(out / "etc" / "deep" / "er" / "nested.conf", want["nested"])
    assert_same_file(out / "big.bin", want["big"])
    assert PASSPHRASE not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def cli_repo(tmp_path_factory):
    """One repository: an MBR disk with one populated ext4, and a blank disk."""
    d = tmp_path_factory.mktemp("cli")
    src = d / "src"
    src.mkdir()
    want = populate(src, 3)
    ext4_image(d / "p1.ext4", 16 * MiB, src, "mbrfs")
    disk = d / "mbr.raw"
    partitioned(disk, 20 * MiB, "dos", [(2048, d / "p1.ext4")])
    blank = d / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 * MiB)
    repo = new_repo_path(d / "repo")
    return {"repo": repo, "mbr": back_up(repo, disk, "mbr"), "blank": back_up(repo, blank, "blank"), **want}


def test_cli_lists_a_directory(cli_repo):
    # No backend chosen: where KVM fails (as here), the command falls back to TCG and says so.
    assert not any(k.startswith("LIBGUESTFS_") for k in os.environ)
    r = nbdbackup("--repo", cli_repo["repo"], "files", "mbr", "/etc/deep/er")
    if r.stderr:
        assert "retrying under TCG" in r.stderr and "LIBGUESTFS_BACKEND_SETTINGS=force_tcg" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    line, = r.stdout.splitlines()
    mtime = int(cli_repo["nested"].stat().st_mtime)
    assert line.split()[0] == "-rw-r-----" and line.split()[4] == str(len(cli_repo["nested"].read_bytes()))
    assert line.endswith(" nested.conf")
    from datetime import datetime, timezone
    assert datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%d %H:%M") in line


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_leaves_no_guestfish_or_appliance(cli_repo):
    """guestfish --listen is our child's child, out of PR_SET_PDEATHSIG's reach: a SIGKILLed
    `files` used to leave it and its qemu running; the watchdog ends them."""
    value = f"{os.getpid()}-{time.monotonic_ns()}"         # inherited by guestfish
    tag = f"NBDBACKUP_TEST_TAG={value}".encode()
    env = {**os.environ, **TCG, "NBDBACKUP_TEST_TAG": value}
    proc = subprocess.Popen([support.nbdbackup_exe(), "--repo", cli_repo["repo"], "files", "mbr", "/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        servers, appliance = [], []
        while not appliance:        # kill it once the appliance's qemu runs
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no appliance started within 120 s"
            ours = support.child_pids(proc.pid)     # guestfish --listen's parent, not the server
            servers = [p for p in _tagged(tag) if _comm(p) == "guestfish" and p not in ours]
            appliance = [c for g in servers for c in support.child_pids(g) if "qemu" in _comm(c)]
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in [*servers, *appliance]):
        assert time.monotonic() < deadline, f"guestfish {servers} or its qemu {appliance} outlived `files`"
        time.sleep(0.1)


def _tagged(tag: bytes) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if tag in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    out.append(int(d))
            except OSError:
                continue
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_cli_disk_without_filesystem_exits_21(cli_repo):
    r = nbdbackup("--repo", cli_repo["repo"], "files", "blank", "/", check=False, env=TCG)
    assert r.returncode == ExitCode.NO_FILESYSTEM, r.stderr
    assert "no filesystem found" in r.stderr and "Traceback" not in r.stderr


def test_cli_appliance_failure_exits_23(cli_repo, tmp_path):
    bogus = tmp_path / "no-qemu"
    bogus.write_text("#!/bin/sh\necho broken hypervisor >&2\nexit 1\n")
    bogus.chmod(0o755)
    r = nbdbackup("--repo", cli_repo["repo"], "files", "mbr", check=False, env={**TCG, "LIBGUESTFS_HV": str(bogus)})
    assert r.returncode == ExitCode.APPLIANCE_FAILED, r.stderr
    assert "LIBGUESTFS_BACKEND_SETTINGS=force_tcg" in r.stderr and "libguestfs-test-tool" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["/", "--fs", "sda1"], "not a device name"),
    (["/", "--fs", "/dev/sda1 /dev/sdb"], "not a device name"),
    (["/etc", "--extract", "/x", "--to", "."], "not both"),
    (["--extract", "/x"], "needs --to"),
])
def test_cli_bad_arguments_exit_2_before_any_launch(cli_repo, argv, message):
    r = nbdbackup("--repo", cli_repo["repo"], "files", "mbr", *argv, check=False, env=TCG, timeout=30)
    assert r.returncode == ExitCode.USAGE and message in r.stderr, r.stderr


def test_cli_without_guestfish_exits_2(cli_repo, tmp_path):
    path = ":".join(p for p in os.environ["PATH"].split(":") if not Path(p, "guestfish").exists())
    r = nbdbackup("--repo", cli_repo["repo"], "files", "mbr", check=False, env={"PATH": path})
    assert r.returncode == ExitCode.USAGE and "apt install libguestfs-tools" in r.stderr, r.stderr


def test_guestfish_is_installed():
    # `files` tests must fail, not skip, without libguestfs.
    assert subprocess.run([require_tool("guestfish"), "--version"], capture_output=True).returncode == 0
