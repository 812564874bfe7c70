"""`files --extract`: copy files, symlinks and directories out of a GuestfsSession's mounted
filesystem into --to.

The guest filesystem (and an appliance it may have taken over) controls every byte of the
`tar-out` archive and of `download`, and the command usually runs as root. So tarfile is only
a parser here: the tree is written by this module, one component at a time relative to open
directory fds (O_NOFOLLOW, O_EXCL), inside a fresh private (0700) directory in --to. Nothing
is ever written through a symlink, and --to only sees finished top-level entries renamed in."""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile

from ..errors import NbdBackupError, NoSpaceError, UsageError
from .guestfs_model import Entry, Extracted, GuestfsError, normalize_path, type_name

# Host modes: the guest's permission bits without setuid/setgid/sticky and without group or
# other write (a guest's 1777 /tmp must not become a root-owned world-writable directory).
MODE_MASK = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20


class _Refused(Exception):
    """A member that is not written; its message goes into Extracted.skipped."""


def extract(g, paths: list[str], to: str, *, force: bool = False) -> list[Extracted]:
    """Copy *paths* (files, directories, symlinks) into directory *to*, each under its own
    base name ("/" gives its top-level entries). An existing name in *to* is refused unless
    *force*, which replaces it whole (a directory too; never merging into it, never writing
    through it). Every path is checked before anything is written."""
    if not os.path.isdir(to):
        raise UsageError(f"--to {to}: not a directory", hint="create it first, or give an existing directory")
    plan = []
    for p in paths:
        p = normalize_path(p)
        plan.append((p, g.stat(p), posixpath.basename(p) if p != "/" else None))
    names = [n for _, _, n in plan]
    if len(set(names)) != len(names) or (None in names and len(names) > 1):
        raise UsageError("two --extract paths have the same base name (or \"/\" comes with others); they "
                         "would land on the same place in --to", hint="extract them one call at a time")
    to_fd = os.open(to, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not force:
            for _, _, name in plan:
                if name is not None and _lexists(name, to_fd):
                    raise UsageError(f"{os.path.join(to, name)} exists; not overwriting it",
                                     hint="remove it, or pass --force")
        # mkdtemp: 0700, a fresh unguessable name; guestfish writes into it by name, which is
        # safe only because no other user can enter it.
        private = tempfile.mkdtemp(prefix=".nbdbackup-files-", dir=to)
        priv_fd = os.open(private, _DIR_FLAGS)
        try:
            return [_extract_one(g, p, entry, name, to, to_fd, private, priv_fd, force)
                    for p, entry, name in plan]
        finally:
            os.close(priv_fd)
            shutil.rmtree(private, ignore_errors=True)
    finally:
        os.close(to_fd)


def _extract_one(g, path: str, entry: Entry, name: str | None, to: str, to_fd: int,
                 private: str, priv_fd: int, force: bool) -> Extracted:
    dest = os.path.join(to, name) if name is not None else to
    kind = type_name(entry.mode)
    if entry.is_dir:
        result = Extracted(path, dest, "directory")
        os.mkdir("tree", 0o700, dir_fd=priv_fd)
        tar_path = os.path.join(private, "archive.tar")
        _need_space(priv_fd, 2 * _du_bytes(g, path), f"{path} (its archive, then its tree)")
        g.call("tar-out", path, tar_path, "numericowner:true", timeout=None)
        tree_fd = os.open("tree", _DIR_FLAGS, dir_fd=priv_fd)
        try:
            with tarfile.open(tar_path) as tf:
                write_tree(tf, tree_fd, result)
        finally:
            os.close(tree_fd)
        os.unlink("archive.tar", dir_fd=priv_fd)
        if name is None:        # "/": its top-level entries go into --to, --to itself is left alone
            children = sorted(os.listdir(os.path.join(private, "tree")))
            existing = [c for c in children if _lexists(c, to_fd)]
            if existing and not force:
                raise UsageError(f"{len(existing)} name(s) in {to} exist, e.g. {os.path.join(to, existing[0])!r}; "
                                 "not overwriting them", hint="remove them, or pass --force")
            for child in children:
                _move_into_place(priv_fd, f"tree/{child}", to_fd, child)
            os.rmdir("tree", dir_fd=priv_fd)
        else:
            _move_into_place(priv_fd, "tree", to_fd, name)
        return result
    if stat.S_ISREG(entry.mode):
        _need_space(priv_fd, entry.size, path)
        g.call("download", path, os.path.join(private, "file"), timeout=None)
        try:
            fd = os.open("file", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=priv_fd)
        except OSError as e:
            raise NbdBackupError(f"{path}: guestfish's download left no file ({e.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NbdBackupError(f"{path}: guestfish's download did not give a regular file")
            os.fchmod(fd, stat.S_IMODE(entry.mode) & MODE_MASK)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        _move_into_place(priv_fd, "file", to_fd, name)
        return Extracted(path, dest, "file", files=1, bytes=size)
    if stat.S_ISLNK(entry.mode):
        target = entry.target or ""
        try:
            check_link_target(name, target)
        except _Refused as e:
            return Extracted(path, dest, "symlink", skipped=[str(e)])
        os.symlink(target, "link", dir_fd=priv_fd)
        _move_into_place(priv_fd, "link", to_fd, name)
        return Extracted(path, dest, "symlink")
    return Extracted(path, dest, kind, skipped=[f"{path}: a {kind} is not extracted"])


def write_tree(tf: tarfile.TarFile, root_fd: int, result: Extracted) -> None:
    """Write the members of *tf* under the directory *root_fd* (empty, private): directories,
    regular files and symlinks that stay inside the tree. Everything else (absolute names,
    "..", hard links, devices, fifos, members below a symlink, escaping symlinks) is skipped
    and reported in *result*. Directory modes and mtimes are set last, deepest first."""
    dirs: list[tuple[list[str], tarfile.TarInfo]] = []
    for member in tf:
        try:
            parts = member_parts(member.name)
            if not parts:                       # "./": the tree's own directory
                if member.isdir():
                    dirs.append((parts, member))
                continue
            if member.isdir():
                parent_fd = _open_parent(root_fd, parts, create=True)
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(parts[-1], 0o700, dir_fd=parent_fd)
                    os.close(os.open(parts[-1], _DIR_FLAGS, dir_fd=parent_fd))   # a dir, not a link
                finally:
                    os.close(parent_fd)
                dirs.append((parts, member))
            elif member.isreg():
                _write_file(tf, member, root_fd, parts)
                result.files += 1
                result.bytes += member.size
            elif member.issym():
                check_link_target("/".join(parts), member.linkname)
                parent_fd = _open_parent(root_fd, parts, create=True)
                try:
                    os.symlink(member.linkname, parts[-1], dir_fd=parent_fd)
                    os.utime(parts[-1], ns=(int(member.mtime) * 10**9,) * 2, dir_fd=parent_fd,
                             follow_symlinks=False)
                finally:
                    os.close(parent_fd)
            elif member.islnk():
                # never a host hard link: a separate copy of the archive member's data
                member_parts(member.linkname)
                _write_file(tf, member, root_fd, parts)
                result.files += 1
            else:
                raise _Refused(f"{member.name}: a {_tar_kind(member)} is not extracted")
        except _Refused as e:
            why = str(e)
            result.skipped.append(why if why.startswith(f"{member.name}: ") else f"{member.name}: {why}")
        except FileExistsError:
            result.skipped.append(f"{member.name}: a second member of that name is not extracted")
        except (KeyError, tarfile.TarError) as e:        # a hard link to no regular member
            result.skipped.append(f"{member.name}: not written ({e})")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"no space left in --to while writing {member.name}") from None
            result.skipped.append(f"{member.name}: not written ({e.strerror})")
    for parts, member in sorted(dirs, key=lambda d: -len(d[0])):
        fd = _open_path(root_fd, parts)
        try:
            os.fchmod(fd, member.mode & MODE_MASK)
            os.utime(fd, ns=(int(member.mtime) * 10**9,) * 2)
        finally:
            os.close(fd)


def member_parts(name: str) -> list[str]:
    """A member's name as path components, "." dropped; refuses absolute names and ".."."""
    if name.startswith("/") or "\0" in name:
        raise _Refused(f"{name}: an absolute name is not extracted")
    parts = [c for c in name.split("/") if c not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"{name}: a name with \"..\" is not extracted")
    return parts


def check_link_target(link: str, target: str) -> None:
    """A symlink is kept (as a symlink, never followed here) only when its target stays inside
    the extracted tree: relative, ".." only at its start and no more of them than the link's
    depth. Every directory above a link is a real one (members below a symlink are refused),
    and every link obeys this rule, so the target resolves inside the tree, whatever the links
    on the way."""
    if not target or target.startswith("/") or "\0" in target:
        raise _Refused(f"{link}: a symlink to {target!r} (absolute) is not extracted")
    comps = [c for c in target.split("/") if c not in ("", ".")]
    ups = 0
    while ups < len(comps) and comps[ups] == "..":
        ups += 1
    depth = len([c for c in link.split("/") if c not in ("", ".")]) - 1
    if ".." in comps[ups:] or ups > depth:
        raise _Refused(f"{link}: a symlink to {target!r} (leaving the extracted tree) is not extracted")


def _write_file(tf: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int, parts: list[str]) -> None:
    _need_space(root_fd, member.size, member.name)
    parent_fd = _open_parent(root_fd, parts, create=True)
    try:
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        src = tf.extractfile(member)
        while chunk := src.read(_COPY_CHUNK):
            _write_all(fd, chunk)
        os.fchmod(fd, member.mode & MODE_MASK)
        os.utime(fd, ns=(int(member.mtime) * 10**9,) * 2)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_parent(root_fd: int, parts: list[str], *, create: bool) -> int:
    """An fd of the directory holding parts[-1], walking from *root_fd* without following any
    symlink; missing directories are made (0700, narrowed later by their own member)."""
    return _open_path(root_fd, parts[:-1], create=create)


def _open_path(root_fd: int, parts: list[str], *, create: bool = False) -> int:
    fd = os.dup(root_fd)
    for i, comp in enumerate(parts):
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(comp, 0o700, dir_fd=fd)
            nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Refused(f"{'/'.join(parts[:i + 1])} is not a directory "
                               f"(a symlink or a file); nothing is written below it") from None
            raise
        os.close(fd)
        fd = nxt
    return fd


def _move_into_place(src_dir_fd: int, src: str, to_fd: int, name: str) -> None:
    """Rename *src* to *name* in --to. An existing *name* (only here with --force) is replaced
    whole: a file or symlink by the rename itself (rename never follows it), a directory by
    first moving it aside into the private directory and removing it there."""
    try:
        old = os.lstat(name, dir_fd=to_fd)
    except FileNotFoundError:
        old = None
    new_is_dir = stat.S_ISDIR(os.lstat(src, dir_fd=src_dir_fd).st_mode)
    if old is not None and stat.S_ISDIR(old.st_mode):
        os.rename(name, "old", src_dir_fd=to_fd, dst_dir_fd=src_dir_fd)
        os.rename(src, name, src_dir_fd=src_dir_fd, dst_dir_fd=to_fd)
        shutil.rmtree("old", dir_fd=src_dir_fd)
        return
    if old is not None and new_is_dir:
        os.unlink(name, dir_fd=to_fd)
    os.rename(src, name, src_dir_fd=src_dir_fd, dst_dir_fd=to_fd)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _need_space(dir_fd: int, size: int, what: str) -> None:
    st = os.fstatvfs(dir_fd)
    free = st.f_bavail * st.f_frsize      # f_bavail: root's reserved blocks stay free
    if size > free:
        raise NoSpaceError(f"{what} needs {size} bytes, the file system of --to has {free} free",
                           hint="extract to a larger file system, or fewer files at a time")


def _du_bytes(g, path: str) -> int:
    """What a directory's archive will need, from the appliance's `du` (KiB, allocated
    blocks: a sparse file counts less than tar will write; _write_file checks again per file)."""
    try:
        return int(g.call("du", path).strip() or 0) * 1024
    except (ValueError, GuestfsError):
        return 0


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.ischr():
        return "char-device"
    if member.isblk():
        return "block-device"
    if member.isfifo():
        return "fifo"
    return "special member"
