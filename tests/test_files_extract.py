"""`files --extract` against a hostile guest, without an appliance: a fake session whose
`tar-out` and `download` give bytes the test chooses, which is exactly what a guest
filesystem (or an appliance it has taken over) controls. The extraction code under test is
the real one; only guestfish is replaced. The appliance path is covered by test_files.py."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from nbdbackup.cli.commands.files import _ls_line, shown
from nbdbackup.engine.guestfs_extract import extract
from nbdbackup.engine.guestfs_model import Entry
from nbdbackup.errors import NoSpaceError, UsageError


class FakeSession:
    """tar-out copies a prepared archive, download writes prepared bytes; records how."""

    def __init__(self, entries: dict[str, Entry], tars: dict[str, bytes] | None = None,
                 files: dict[str, bytes] | None = None, du_kib: int = 4):
        self.entries, self.tars, self.files, self.du_kib = entries, tars or {}, files or {}, du_kib
        self.calls: list[tuple] = []

    def stat(self, path: str) -> Entry:
        return self.entries[path]

    def call(self, cmd: str, *args: str, timeout: float | None = 3600) -> str:
        self.calls.append((cmd, args, timeout))
        if cmd == "du":
            return f"{self.du_kib}\n"
        if cmd == "tar-out":
            self._check_private(args[1])
            Path(args[1]).write_bytes(self.tars[args[0]])
            return ""
        if cmd == "download":
            self._check_private(args[1])
            Path(args[1]).write_bytes(self.files[args[0]])
            return ""
        raise AssertionError(cmd)

    @staticmethod
    def _check_private(path: str) -> None:
        # guestfish opens this path by name: it must be in a directory only we can enter
        parent = os.stat(os.path.dirname(path))
        assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == os.getuid()
        assert not os.path.lexists(path)


def d(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | mode, 2, 0, 0, 4096, 1_600_000_000 * 10**9)


def f(name: str, size: int, mode: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | mode, 1, 0, 0, size, 1_600_000_000 * 10**9)


def ln(name: str, target: str) -> Entry:
    e = Entry(name, stat.S_IFLNK | 0o777, 1, 0, 0, len(target), 1_600_000_000 * 10**9)
    e.target = target
    return e


def archive(*members: tuple) -> bytes:
    """(name, kind, extra, mode) tuples: kind is dir, file (extra = bytes), sym/hard (extra = target),
    fifo or chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, extra, mode in members:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, 1_500_000_000
            data = None
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "file":
                ti.size, data = len(extra), io.BytesIO(extra)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(ti, data)
    return buf.getvalue()


def cve_2025_4517_chain(prefix: str = "") -> list[tuple]:
    """The public PoC's shape: 16 directories of 247 characters with one-letter links to them,
    a link that climbs back 16 levels, and `escape`, which the kernel resolves to "/" while
    os.path.realpath (past PATH_MAX) believes it is inside."""
    comp, steps, path, out = "d" * 247, "abcdefghijklmnop", "", []
    for s in steps:
        out.append((prefix + os.path.join(path, comp), "dir", None, 0o755))
        out.append((prefix + os.path.join(path, s), "sym", comp, 0o777))
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    out.append((prefix + linkpath, "sym", "../" * len(steps), 0o777))
    out.append((prefix + "escape", "sym", linkpath + "/.." * 16, 0o777))
    return out


@pytest.fixture
def to(tmp_path):
    out = tmp_path / "to"
    out.mkdir(mode=0o700)
    return out


def test_cve_2025_4517_archive_writes_nothing_outside(tmp_path, to):
    victim = tmp_path / "victim"
    victim.mkdir()
    tar = archive(*cve_2025_4517_chain(),
                  ("escape" + str(victim) + "/pwned", "file", b"written by the guest\n", 0o644))
    g = FakeSession({"/x": d("x")}, tars={"/x": tar})
    done, = extract(g, ["/x"], str(to))
    assert not (victim / "pwned").exists()
    assert any(s.startswith("escape: a symlink") for s in done.skipped), done.skipped
    # the harmless in-tree link of the chain is kept as a symlink
    assert os.readlink(to / "x" / "a") == "d" * 247
    # nothing but the extracted entry is left in --to (the private scratch directory is gone)
    assert os.listdir(to) == ["x"]


def test_second_run_never_writes_through_a_link_left_by_the_first(tmp_path, to):
    """exp2: Monday's archive is benign-looking; Tuesday's has escape/... as real directories."""
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = to / "x"
    planted.mkdir()
    (planted / "escape").symlink_to("/")          # what a weaker extractor would have left
    parts = ("escape" + str(victim)).split("/")
    tue = archive(*[("/".join(parts[:i]), "dir", None, 0o755) for i in range(1, len(parts) + 1)],
                  ("escape" + str(victim) + "/pwned2", "file", b"run 2\n", 0o644))
    g = FakeSession({"/x": d("x")}, tars={"/x": tue})
    with pytest.raises(UsageError, match="not overwriting"):
        extract(g, ["/x"], str(to))                # without --force an existing name is refused
    extract(g, ["/x"], str(to), force=True)      # --force replaces x whole, never merges into it
    assert not (victim / "pwned2").exists()
    assert (to / "x" / "escape").is_dir() and not (to / "x" / "escape").is_symlink()
    assert (to / "x" / ("escape" + str(victim)) / "pwned2").read_bytes() == b"run 2\n"


@pytest.mark.parametrize("target", ["/root/.ssh", "../victim", "a/../../b", "", "x/../.."])
def test_top_level_symlink_leaving_to_is_skipped(to, target):
    g = FakeSession({"/home": ln("home", target)})
    done, = extract(g, ["/home"], str(to))
    assert done.skipped and not os.path.lexists(to / "home")


def test_top_level_symlink_inside_is_kept_as_a_link(to):
    g = FakeSession({"/link": ln("link", "etc/hostname")})
    extract(g, ["/link"], str(to))
    assert os.readlink(to / "link") == "etc/hostname"


def test_force_replaces_an_existing_symlink_instead_of_writing_through_it(tmp_path, to):
    victim = tmp_path / "victim"
    victim.mkdir()
    (to / "home").symlink_to(victim)
    (to / "f").symlink_to(victim / "file")
    tar = archive((".", "dir", None, 0o755), ("authorized_keys", "file", b"ssh-ed25519 guest\n", 0o600))
    g = FakeSession({"/home": d("home"), "/f": f("f", 4)}, tars={"/home": tar}, files={"/f": b"data"})
    extract(g, ["/home", "/f"], str(to), force=True)
    assert os.listdir(victim) == []
    assert (to / "home" / "authorized_keys").read_bytes() == b"ssh-ed25519 guest\n"
    assert not (to / "home").is_symlink() and not (to / "f").is_symlink()
    assert (to / "f").read_bytes() == b"data"


def test_modes_never_gain_group_or_other_write_and_to_is_left_alone(to):
    tar = archive((".", "dir", None, 0o777), ("etc", "dir", None, 0o777), ("tmp", "dir", None, 0o1777),
                  ("etc/passwd", "file", b"root:x:0:0\n", 0o6777), ("etc/private", "dir", None, 0o700))
    g = FakeSession({"/": d("/", 0o777), "/big": f("big", 3, 0o4777)}, tars={"/": tar}, files={"/big": b"abc"})
    extract(g, ["/"], str(to))
    extract(g, ["/big"], str(to))
    mode = lambda p: stat.S_IMODE(os.lstat(p).st_mode)    # noqa: E731
    assert mode(to) == 0o700                                  # --to itself is never chmodded
    assert mode(to / "etc") == 0o755 and mode(to / "tmp") == 0o755
    assert mode(to / "etc" / "passwd") == 0o755 and mode(to / "big") == 0o755
    assert mode(to / "etc" / "private") == 0o700
    assert int(os.stat(to / "etc").st_mtime) == 1_500_000_000


def test_unsafe_members_are_skipped_and_reported(tmp_path, to):
    outside = tmp_path / "outside"
    tar = archive(("/abs", "file", b"x", 0o644), ("../up", "file", b"x", 0o644),
                  ("ok/../../up2", "file", b"x", 0o644), ("dev", "chr", None, 0o644),
                  ("fifo", "fifo", None, 0o644), ("ln", "sym", "/etc", 0o777),
                  ("ln/shadow", "file", b"through a link", 0o644),
                  ("rel", "sym", "sub", 0o777), ("sub", "dir", None, 0o755),
                  ("rel/inside", "file", b"below an in-tree link", 0o644),
                  ("sub/real", "file", b"real data", 0o640), ("hard", "hard", "sub/real", 0o640),
                  ("hard2", "hard", "/etc/shadow", 0o640), ("sub/real", "file", b"again", 0o644))
    g = FakeSession({"/x": d("x")}, tars={"/x": tar})
    done, = extract(g, ["/x"], str(to))
    x = to / "x"
    assert sorted(os.listdir(x)) == ["hard", "ln", "rel", "sub"]
    # the refused link's name became a real directory for the member below it: inside --to
    assert (x / "ln").is_dir() and not (x / "ln").is_symlink()
    assert sorted(os.listdir(x / "sub")) == ["real"]
    assert (x / "sub" / "real").read_bytes() == b"real data"          # the first one, not overwritten
    # a hard link becomes an independent copy, never a host hard link
    assert (x / "hard").read_bytes() == b"real data" and os.stat(x / "hard").st_nlink == 1
    assert os.readlink(x / "rel") == "sub"
    assert not outside.exists() and not (tmp_path / "up").exists()
    reasons = "\n".join(done.skipped)
    for name in ("/abs", "../up", "ok/../../up2", "dev", "fifo", "ln: a symlink", "rel/inside", "hard2",
                 "sub/real: a second"):
        assert name in reasons, (name, reasons)
    assert done.files == 3      # sub/real, hard, ln/shadow


def test_download_is_private_fd_based_and_without_timeout(to):
    g = FakeSession({"/f": f("f", 5, 0o640), "/x": d("x")}, files={"/f": b"hello"},
                    tars={"/x": archive(("a", "file", b"1", 0o644))})
    extract(g, ["/f", "/x"], str(to))
    assert {c[0]: c[2] for c in g.calls if c[0] != "du"} == {"download": None, "tar-out": None}
    assert (to / "f").read_bytes() == b"hello" and stat.S_IMODE(os.stat(to / "f").st_mode) == 0o640
    assert os.stat(to / "f").st_mtime_ns == 1_600_000_000 * 10**9


def test_download_replaced_by_a_symlink_is_not_followed(tmp_path, to):
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)

    class Swapping(FakeSession):
        def call(self, cmd, *args, timeout=3600):
            os.symlink(victim, args[1])             # what a racing local user would plant
            return ""
    with pytest.raises(Exception, match="left no file"):
        extract(Swapping({"/f": f("f", 1, 0o777)}), ["/f"], str(to))
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and not os.path.lexists(to / "f")


def test_free_space_is_checked_before_writing(to):
    free = os.statvfs(to).f_bavail * os.statvfs(to).f_frsize
    g = FakeSession({"/huge": f("huge", free + 2**30)}, files={"/huge": b""})
    with pytest.raises(NoSpaceError):
        extract(g, ["/huge"], str(to))
    assert not [c for c in g.calls if c[0] == "download"] and os.listdir(to) == []
    g = FakeSession({"/x": d("x")}, tars={"/x": b""}, du_kib=free // 1024 + 2**20)
    with pytest.raises(NoSpaceError):
        extract(g, ["/x"], str(to))
    assert os.listdir(to) == []


def test_root_extraction_refuses_existing_names_before_moving_any(to):
    (to / "b").write_text("mine")
    tar = archive(("a", "file", b"A", 0o644), ("b", "file", b"B", 0o644))
    g = FakeSession({"/": d("/")}, tars={"/": tar})
    with pytest.raises(UsageError, match="not overwriting"):
        extract(g, ["/"], str(to))
    assert sorted(os.listdir(to)) == ["b"] and (to / "b").read_text() == "mine"
    extract(g, ["/"], str(to), force=True)
    assert (to / "a").read_bytes() == b"A" and (to / "b").read_bytes() == b"B"


# --- printing guest names ---------------------------------------------------------------------

FORGED = "a\n-rwsr-xr-x   1     0     0   1234 2026-01-01 00:00 totally-normal\x1b]0;pwned\x07"


def test_ls_line_escapes_control_characters_and_bad_bytes():
    e = Entry(FORGED, stat.S_IFREG | 0o644, 1, 0, 0, 1, 0)
    line = _ls_line(e)
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line
    assert line.endswith("a\\n-rwsr-xr-x   1     0     0   1234 2026-01-01 00:00 totally-normal\\e]0;pwned\\a")
    bad = Entry(b"caf\xe9".decode("utf-8", "surrogateescape"), stat.S_IFLNK | 0o777, 1, 0, 0, 1, 0,
                target="t\u202eo\x85\\")
    assert _ls_line(bad).endswith("caf\\351 -> t\\342\\200\\256o\\302\\205\\\\")
    line.encode("ascii")


def test_shown_keeps_printable_text_and_escapes_what_stdout_cannot_encode():
    assert shown("Ünïcode name.txt", "utf-8") == "Ünïcode name.txt"
    assert shown("é", "ascii") == "\\303\\251"
    assert shown(None) == ""


def test_json_keeps_exact_names_and_round_trips():
    name = b"caf\xe9\n\x1b".decode("utf-8", "surrogateescape")
    doc = json.loads(json.dumps(Entry(name, stat.S_IFREG | 0o644, 1, 0, 0, 1, 0).to_json()))
    assert doc["name"].encode("utf-8", "surrogateescape") == b"caf\xe9\n\x1b"
