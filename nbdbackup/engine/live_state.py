"""restore --live's state: the state file next to DEST, the serve process we start for it
(own session, its pid checked by command line before it is signalled), the checks and the
end that the QMP and libvirt copies share. Sequence in docs/live-restore.md."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import stat
import struct
import sys
from dataclasses import asdict, dataclass, field

from ..errors import UsageError
from ..fsutil import write_atomically

log = logging.getLogger("nbdbackup.engine.live_restore")

STATE_SUFFIX = ".nbdbackup-live.json"
STATE_FORMAT = 1
SERVER_START_TIMEOUT = 60.0
SOCKET_NAME, LOG_NAME = "serve.sock", "serve.log"   # the only names in a run dir
RUN_DIR_RE = re.compile(r"live-[0-9a-f]{8}")
GROUP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
# `python -P`: the caller's cwd is not put on sys.path, so a ./nbdbackup planted where the
# command runs (an image pool) is not what we run (as root, with the passphrase in the env)
PYTHON_M = [sys.executable, "-P", "-m", "nbdbackup"]
POLL_S = 0.5
RECONNECT_GRACE = 60.0          # s a resumed copy retries while qemu has not reconnected yet
RECONNECT_DELAY = 10            # s qemu holds a request while it reconnects to a restarted server


@dataclass
class LiveState:
    """The state file next to DEST: where its backing export is served, by whom."""
    dest: str                       # absolute path of DEST
    backup: str                     # the backup id DEST's backing names
    disk: str
    size: int
    socket: str | None              # the unix socket of the export (None: TCP --server)
    backing: str                    # DEST's backing string, exactly as written into it
    server_pid: int | None = None   # a serve we started (None with --server)
    server_argv: list[str] = field(default_factory=list)    # how to start it again (no secret)
    server_log: str | None = None
    server_uri: str | None = None   # --server as given
    run_dir: str | None = None      # our private directory holding the socket
    socket_group: str | None = None  # the group the socket was given to (qemu under libvirt)
    created: str = ""
    format: int = STATE_FORMAT

    @property
    def path(self) -> str:
        return state_path(self.dest)

    @property
    def ours(self) -> bool:
        return self.server_pid is not None

    def save(self) -> None:
        write_atomically(self.path, (json.dumps(asdict(self), indent=2) + "\n").encode(), 0o600)

    @classmethod
    def load(cls, dest: str) -> "LiveState":
        """The state file, trusted only when it is ours: a regular file (not a symlink) owned by
        our euid that nobody else can write, with every field of the right type and every path
        where restore --live puts it. Whoever can write DEST's directory can plant one, and we
        unlink, start and signal from it (often as root)."""
        p = state_path(dest)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"--resume: {p} does not exist: {dest} was not made by `restore --live` "
                             "(or its copy finished and the state was removed)",
                             hint="start a new one with `restore --live BACKUP DEST.qcow2`") from None
        except OSError as e:
            raise UsageError(f"--resume: cannot read {p}: {e.strerror}"
                             + (" (a symlink: not trusting it)" if e.errno == 40 else "")) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"--resume: {p} is not a regular file: not trusting it")
            if st.st_uid != os.geteuid():
                raise UsageError(f"--resume: {p} belongs to uid {st.st_uid}, not to us: not trusting it",
                                 hint="restore --live writes it 0600 as the user who runs it")
            if st.st_mode & 0o022:
                raise UsageError(f"--resume: {p} is writable by group or others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}): not trusting it")
            with os.fdopen(fd, "rb") as f:
                fd = -1
                raw = json.loads(f.read(1 << 20))
        except ValueError as e:
            raise UsageError(f"--resume: cannot read {p}: {e}") from None
        finally:
            if fd >= 0:
                os.close(fd)
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise UsageError(f"--resume: {p} is not a state file of this version of restore --live")
        try:
            state = cls(**raw)
        except TypeError as e:
            raise UsageError(f"--resume: {p} is not a valid state file: {e}") from None
        if why := state.invalid():
            raise UsageError(f"--resume: {p} is not a valid state file: {why}")
        return state

    def invalid(self) -> str | None:
        """Why the fields cannot be ours (None: they can)."""
        types = {"dest": str, "backup": str, "disk": str, "size": int, "socket": (str, type(None)),
                 "backing": str, "server_pid": (int, type(None)), "server_argv": list,
                 "server_log": (str, type(None)), "server_uri": (str, type(None)),
                 "run_dir": (str, type(None)), "socket_group": (str, type(None)), "created": str}
        for name, want in types.items():
            value = getattr(self, name)
            if not isinstance(value, want) or isinstance(value, bool):
                return f"{name} is {type(value).__name__} {str(value)[:40]!r}"
        if self.size < 0 or (self.server_pid is not None and self.server_pid <= 1):
            return "size or server_pid out of range"
        if not all(isinstance(a, str) for a in self.server_argv):
            return "server_argv is not a list of strings"
        if self.socket_group is not None and not GROUP_RE.fullmatch(self.socket_group):
            return f"socket_group {self.socket_group[:40]!r} is not a group name"
        if self.server_uri is not None:         # --server: the user's server, nothing of ours
            if self.run_dir is not None or self.server_pid is not None or self.server_log is not None:
                return "a --server state names a server of ours"
            return None
        base = live_base()
        if self.run_dir is None or os.path.dirname(self.run_dir) != base \
                or not RUN_DIR_RE.fullmatch(os.path.basename(self.run_dir)):
            return f"run_dir {str(self.run_dir)[:80]!r} is not a live-XXXXXXXX directory in {base}"
        if self.socket != os.path.join(self.run_dir, SOCKET_NAME) \
                or self.server_log != os.path.join(self.run_dir, LOG_NAME):
            return "socket or server_log is not in run_dir"
        return None


@dataclass
class LivePrepared:
    state: LiveState
    resumed: bool
    server_started: bool            # this run started (or restarted) the serve process


@dataclass
class LiveCopyResult:
    state: LiveState
    bytes: int
    duration_s: float
    job: str
    followed: bool                  # a job of a killed run was still running: we only followed it
    server_stopped: bool
    already_complete: bool = False


def state_path(dest: str) -> str:
    return os.path.abspath(dest) + STATE_SUFFIX


def backing_string(socket_path: str | None, host: str | None, port: int | None, export: str) -> str:
    """The json: backing of DEST: raw over nbd (a backing file needs a format; json:{"driver":
    "nbd"} with -F raw is refused), reconnecting to a restarted server on its own."""
    server = ({"type": "unix", "path": socket_path} if socket_path
              else {"type": "inet", "host": host, "port": str(port or 10809)})
    return "json:" + json.dumps({"driver": "raw", "file": {"driver": "nbd", "server": server, "export": export,
                                                            "reconnect-delay": RECONNECT_DELAY}},
                                separators=(",", ":"))


def read_backing(path: str) -> str | None:
    """The backing file name in a qcow2 header (None: no backing), read without opening the
    backing (qemu-img info would connect to the server)."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                raise UsageError(f"{path} is not a qcow2 image: not made by `restore --live`")
            off, size = struct.unpack_from(">QI", head, 8)
            if not off:
                return None
            f.seek(off)
            return f.read(size).decode("utf-8", "replace")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist", hint="start with `restore --live BACKUP DEST.qcow2`") from None


def check_run_dir(run_dir: str, *, create: bool = False) -> bool:
    """*run_dir* is a live-XXXXXXXX directory of ours in serve's runtime directory (made
    again, private, when *create* and it is gone: /run is a tmpfs)."""
    from ..nbd.server_socket import open_traverse_only_dir

    base = live_base()
    if os.path.dirname(run_dir) != base or not RUN_DIR_RE.fullmatch(os.path.basename(run_dir)):
        raise UsageError(f"{run_dir} is not a live restore's directory in {base}")
    made = False
    if create and not os.path.lexists(run_dir):
        open_traverse_only_dir(base)
        os.mkdir(run_dir, 0o700)
        made = True
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UsageError(f"{run_dir} is not a private directory of ours (a symlink, another owner, or "
                         "writable by others): not using it")
    return made


def remove_run_dir(run_dir: str) -> None:
    """Unlink the two names we put there, then the directory: never anything else."""
    try:
        check_run_dir(run_dir)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except (OSError, UsageError) as e:
        log.info("not removing %s: %s", run_dir, e)
        return
    try:
        for name in (SOCKET_NAME, LOG_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)


def stop_command(state: LiveState) -> str:
    if not state.server_pid:
        return "(the server is yours: --server)"
    return f"kill {state.server_pid} && rm -r {shlex.quote(state.run_dir)}"


def live_base() -> str:
    """Where the run dirs go: next to serve's runtime directory, never in it (serve sets that
    one's mode and group for its own socket, under a running live restore), 0711 so qemu of
    another user passes through to its run dir, which alone is granted to the group."""
    from ..nbd.server_socket import runtime_dir

    return runtime_dir() + "-live"


def make_run_dir(socket_group: str | None) -> str:
    """A private directory for the socket under live_base(); with a group (qemu as
    libvirt-qemu) it is searchable by that group, and nothing else is re-permissioned."""
    from ..nbd.server_socket import open_traverse_only_dir

    base = live_base()
    open_traverse_only_dir(base)
    d = os.path.join(base, f"live-{os.urandom(4).hex()}")
    os.mkdir(d, 0o700)
    try:
        grant_run_dir(d, socket_group)
    except BaseException:
        os.rmdir(d)         # not left behind
        raise
    return d


def grant_run_dir(run_dir: str, socket_group: str | None) -> None:
    from ..nbd.server_socket import set_private_dir_access, socket_access

    if socket_group:
        set_private_dir_access(run_dir, socket_access(None, socket_group))


