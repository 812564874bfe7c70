"""Who may connect to the server's unix socket: its mode, its group, its private directory.

The default socket lives in a private runtime directory (0700, ours). Letting
another user in (qemu running as libvirt-qemu) is explicit: --socket-group
and/or --socket-mode, and the directory then becomes traversable (x, never
readable or writable) by exactly that group, or by others when the mode lets
others in.
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
import tempfile
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT_SOCKET_NAME = "serve.sock"
OWNER_ONLY = 0o600
WITH_GROUP = 0o660        # --socket-group without --socket-mode: the group can connect


@dataclass(frozen=True)
class SocketAccess:
    mode: int = OWNER_ONLY
    gid: int | None = None          # None: the server's own group, left as created
    group_name: str | None = None

    @property
    def group_can_connect(self) -> bool:
        return bool(self.mode & 0o020)      # connect() needs write permission on the socket

    @property
    def others_can_connect(self) -> bool:
        return bool(self.mode & 0o002)

    def describe(self) -> str:
        who = ["owner"] if self.mode & 0o200 else []
        if self.group_can_connect:
            who.append(f"group {self.group_name}" if self.group_name else "the server's group")
        if self.others_can_connect:
            who.append("every local user")
        return f"mode {self.mode:04o}, {' + '.join(who) or 'nobody but root'} can connect"


def socket_access(mode: int | None, group_text: str | None) -> SocketAccess:
    gid = name = None
    if group_text:
        try:
            g = grp.getgrnam(group_text)
            gid, name = g.gr_gid, g.gr_name
        except KeyError:
            if not group_text.isdigit():
                raise UsageError(f"--socket-group {group_text!r}: no such group",
                                 hint="give a group name from /etc/group (e.g. libvirt-qemu or kvm) "
                                      "or a numeric gid") from None
            gid, name = int(group_text), group_text
    if mode is None:
        mode = WITH_GROUP if gid is not None else OWNER_ONLY
    return SocketAccess(mode, gid, name)


def runtime_dir() -> str:
    """Where the default socket goes: /run/nbdbackup for root, $XDG_RUNTIME_DIR/nbdbackup
    for others, else <tmp>/nbdbackup-<uid> (checked to be ours and private before use)."""
    euid = os.geteuid()
    if euid == 0 and os.path.isdir("/run"):
        return "/run/nbdbackup"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        with contextlib.suppress(OSError):
            st = os.stat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == euid:
                return os.path.join(xdg, "nbdbackup")
    return os.path.join(tempfile.gettempdir(), f"nbdbackup-{euid}")


def _open_private_dir(path: str) -> int:
    """An fd on *path*, a real directory (not a symlink) owned by us; made 0700 if missing."""
    hint = "remove it (nothing but our socket belongs there), or choose a socket with --listen unix:PATH"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise UsageError(f"cannot use {path} for the server's socket: {e.strerror}",
                         hint="choose a socket with --listen unix:PATH") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UsageError(f"{path} belongs to uid {st.st_uid}, not to us: another user could "
                         "reach or replace the socket", hint=hint)
    if st.st_mode & 0o022:      # nobody else may add or replace names in it
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
    return fd


def check_private_dir(path: str) -> None:
    os.close(_open_private_dir(path))


def open_traverse_only_dir(path: str) -> None:
    """*path* ours (made if missing), 0711: others may pass through to a name they know but
    not list it; what lies beneath guards itself (restore --live's per-run directories)."""
    fd = _open_private_dir(path)
    try:
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)


def set_private_dir_access(path: str, access: SocketAccess) -> None:
    """0700, plus search (x) for the group or for others when the socket lets them in;
    the group is the socket's (ours unless --socket-group), so an earlier run's grant
    does not linger."""
    fd = _open_private_dir(path)
    try:
        mode = 0o700
        if access.group_can_connect:
            mode |= 0o010
        if access.others_can_connect:
            mode |= 0o001
        _chown(fd, access.gid if access.gid is not None else os.getegid(), path, access)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _chown(target, gid: int, path: str, access: SocketAccess) -> None:
    try:
        os.chown(target, -1, gid)
    except OSError as e:
        raise UsageError(f"cannot give {path} to group {access.group_name or gid}: {e.strerror}",
                         hint="only root or a member of that group can; choose one of your groups") from None


def apply_socket_access(path: str, access: SocketAccess, shown: str) -> None:
    """Group and mode of the socket file at *path* (still under its temporary name)."""
    if access.gid is not None:
        _chown(path, access.gid, shown, access)
    os.chmod(path, access.mode)


def blocking_directory(path: str, access: SocketAccess) -> str | None:
    """A parent directory of *path* that the users let in by *access* cannot search, or None
    (mode bits only; ACLs are not read)."""
    if not (access.group_can_connect or access.others_can_connect):
        return None
    gid = access.gid if access.gid is not None else os.getegid()
    d = os.path.dirname(path)
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return d
        ok = bool(st.st_mode & 0o001)
        if not ok and not access.others_can_connect:
            ok = st.st_gid == gid and bool(st.st_mode & 0o010)
        if not ok:
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
