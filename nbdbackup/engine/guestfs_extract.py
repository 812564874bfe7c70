"""`files --extract`: copy files, symlinks and directories out of a GuestfsSession's mounted
filesystem, keeping modes and mtimes, never overwriting without force, and never letting an
archive member escape the destination."""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
import tempfile

from ..errors import UsageError
from .guestfs_model import Entry, Extracted, normalize_path, type_name


def extract(g, paths: list[str], to: str, *, force: bool = False) -> list[Extracted]:
    """Copy *paths* (files, directories, symlinks) into directory *to*, each under its
    own base name, keeping modes and mtimes. Nothing existing in *to* is overwritten
    unless *force*. Every path is checked before anything is written."""
    if not os.path.isdir(to):
        raise UsageError(f"--to {to}: not a directory", hint="create it first, or give an existing directory")
    plan = []
    for p in paths:
        p = normalize_path(p)
        entry = g.stat(p)
        dest = os.path.join(to, posixpath.basename(p)) if p != "/" else to
        plan.append((p, entry, dest))
    dests = [d for _, _, d in plan]
    if len(set(dests)) != len(dests):
        raise UsageError("two --extract paths have the same base name; they would land on the same "
                         "place in --to", hint="extract them one call and directory at a time")
    if not force:
        for p, entry, dest in plan:
            if os.path.lexists(dest) and not (entry.is_dir and os.path.isdir(dest) and not os.path.islink(dest)):
                raise UsageError(f"{dest} exists; not overwriting it", hint="remove it, or pass --force")
    out = []
    for p, entry, dest in plan:
        if entry.is_dir:
            out.append(_extract_dir(g, p, dest, force, scratch=to))
        elif stat.S_ISREG(entry.mode):
            out.append(_extract_file(g, p, entry, dest))
        elif stat.S_ISLNK(entry.mode):
            _replace(dest, lambda tmp, e=entry: os.symlink(e.target, tmp))
            out.append(Extracted(p, dest, "symlink"))
        else:
            out.append(Extracted(p, dest, type_name(entry.mode),
                                 skipped=[f"{p}: a {type_name(entry.mode)} is not extracted"]))
    return out


def _extract_file(g, path: str, entry: Entry, dest: str) -> Extracted:
    def write(tmp: str) -> None:
        g.call("download", path, tmp)
        os.chmod(tmp, stat.S_IMODE(entry.mode) & 0o777)
        os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
    _replace(dest, write)
    return Extracted(path, dest, "file", files=1, bytes=entry.size)


def _extract_dir(g, path: str, dest: str, force: bool, *, scratch: str) -> Extracted:
    result = Extracted(path, dest, "directory")
    # The archive goes into --to (*scratch*), hidden: a big directory may not fit in /tmp.
    fd, tar_path = tempfile.mkstemp(prefix=".nbdbackup-files-", suffix=".tar", dir=scratch)
    os.close(fd)
    try:
        g.call("tar-out", path, tar_path, "numericowner:true")
        with tarfile.open(tar_path) as tf:
            members = tf.getmembers()
            if not force:
                existing = [m.name for m in members if not m.isdir()
                            and os.path.lexists(os.path.join(dest, m.name))]
                if existing:
                    raise UsageError(f"{len(existing)} file(s) under {dest} exist, e.g. "
                                     f"{os.path.join(dest, existing[0])}; not overwriting them",
                                     hint="remove them, or pass --force")
            os.makedirs(dest, exist_ok=True)

            def keep_modes(member: tarfile.TarInfo, dest_path: str):
                # data_filter refuses absolute names, "..", links leaving dest and device
                # nodes; what it refuses is skipped and reported, not fatal.
                try:
                    safe = tarfile.data_filter(member, dest_path)
                except tarfile.FilterError as e:
                    result.skipped.append(f"{member.name}: {e}")
                    return None
                if safe.isfile() or safe.isdir():
                    safe = safe.replace(mode=member.mode & 0o777, deep=False)   # no setuid/setgid/sticky
                if force and not safe.isdir():
                    target = os.path.join(dest_path, safe.name)
                    if os.path.lexists(target) and not os.path.isdir(target):
                        os.unlink(target)    # never write through an existing symlink
                if safe.isfile():
                    result.files += 1
                    result.bytes += safe.size
                return safe

            tf.extractall(dest, filter=keep_modes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tar_path)
    return result


def _replace(dest: str, make) -> None:
    """make(tmp) creates a temporary next to *dest*; it then replaces *dest* atomically."""
    tmp = os.path.join(os.path.dirname(dest) or ".", f".nbdbackup-files-{os.getpid()}-{os.path.basename(dest)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        make(tmp)
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise UsageError(f"{dest} is a directory; not replacing it with a file", hint="remove it first")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
