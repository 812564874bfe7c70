"""`restore --live`: instant recovery. A VM runs at once on DEST.qcow2, whose backing file
is the backup's NBD export, while qemu's own block-stream job copies the backup into it.

The pieces (sequence and faults in docs/live-restore.md):
- the export: a `nbdbackup serve` this command starts as its own process (own session, so
  a killed command does not take the VM's disk away), or the user's `--server URI`;
- DEST: a qcow2 made under a temporary name and linked into place, whose backing names the
  backup by id (never the disk-name alias, which binds at connect time and would read
  another point in time after qemu reconnects) and reconnects (`reconnect-delay`);
- the state file DEST.nbdbackup-live.json: what --resume and the user need to find and stop
  the server (no secret in it);
- the copy: `block-stream` with `on-error: report` (with `stop`, qemu 7.2 gave the guest
  wrong data for uncopied ranges while the server was down), followed by its events.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import (
    LiveCopyFailed,
    NbdBackupError,
    NotFound,
    QmpCommandError,
    SourceFailed,
    SourceUnreachable,
    UsageError,
    storage_error,
)
from ..fsutil import write_atomically
from ..progress import NoBar

log = logging.getLogger(__name__)

STATE_SUFFIX = ".nbdbackup-live.json"
STATE_FORMAT = 1
RECONNECT_DELAY = 10            # s qemu holds a request while it reconnects to a restarted server
SERVER_START_TIMEOUT = 60.0
DEFAULT_WAIT = 600.0            # s --qmp waits for a qemu with DEST open
POLL_S = 0.5
RECONNECT_GRACE = 60.0          # s a resumed copy retries while qemu has not reconnected yet
JOB_PREFIX = "nbdbackup-live-"


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
        p = state_path(dest)
        try:
            with open(p, "rb") as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            raise UsageError(f"--resume: {p} does not exist: {dest} was not made by `restore --live` "
                             "(or its copy finished and the state was removed)",
                             hint="start a new one with `restore --live BACKUP DEST.qcow2`") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume: cannot read {p}: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise UsageError(f"--resume: {p} is not a state file of this version of restore --live")
        try:
            return cls(**raw)
        except TypeError as e:
            raise UsageError(f"--resume: {p} is not a valid state file: {e}") from None


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


# --- the server ------------------------------------------------------------------------

def _pid_is_our_server(pid: int | None, socket_path: str | None) -> bool:
    """True when *pid* runs `nbdbackup serve` on *socket_path* (not a reused pid)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"serve" in argv and any(a.endswith(socket_path.encode()) for a in argv if socket_path)


def _serves(state: LiveState, timeout: float = 10.0) -> bool:
    """Whether the export answers with the backup's size."""
    from ..nbd.client import Client

    uri = (f"nbd+unix:///{state.backup}?socket={state.socket}" if state.socket
           else _uri_with_export(state.server_uri, state.backup))
    try:
        info = Client.query_info(uri, timeout=timeout)
    except (NbdBackupError, OSError) as e:
        log.info("export %s does not answer: %s", uri, e)
        return False
    if info.size != state.size:
        raise SourceUnreachable(f"the server at {uri} serves {state.backup} with {info.size} bytes, not "
                                f"{state.size}: not the same backup")
    return True


def _uri_with_export(uri: str | None, export: str) -> str:
    from ..nbd.uri import parse_uri

    return str(parse_uri(uri).with_export(export))


def server_argv(args_repo: list[str], socket_path: str, socket_group: str | None) -> list[str]:
    argv = [sys.executable, "-m", "nbdbackup", *args_repo, "serve", "--listen", f"unix:{socket_path}"]
    if socket_group:
        argv += ["--socket-group", socket_group]
    return argv


def start_server(state: LiveState, environment: dict[str, str]) -> None:
    """Start `nbdbackup serve` as its own process (new session: neither a killed command nor
    the terminal's SIGINT/SIGHUP reaches it), wait until the export answers, record its pid."""
    from ..nbd.server import clear_stale_socket

    clear_stale_socket(state.socket)
    logf = os.fdopen(os.open(state.server_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab")
    try:
        proc = subprocess.Popen(state.server_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=logf, env=environment, start_new_session=True, close_fds=True)
    finally:
        logf.close()
    state.server_pid = proc.pid
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state.server_pid = None
            raise SourceUnreachable(f"the NBD server for {state.backup} exited at start with {proc.returncode}: "
                                    f"{_tail(state.server_log)}")
        if os.path.exists(state.socket) and _serves(state, timeout=5.0):
            return
        time.sleep(0.1)
    _stop_pid(proc.pid)
    state.server_pid = None
    raise SourceUnreachable(f"the NBD server for {state.backup} did not answer within "
                            f"{SERVER_START_TIMEOUT:.0f}s: {_tail(state.server_log)}")


def _tail(path: str | None, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip() or "(no output)"
    except (OSError, TypeError):
        return "(no log)"


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop_server(state: LiveState) -> bool:
    """Stop the serve we started (checked by its command line first), remove its directory."""
    stopped = False
    if _pid_is_our_server(state.server_pid, state.socket):
        _stop_pid(state.server_pid)
        stopped = True
    if state.run_dir:
        for name in os.listdir(state.run_dir) if os.path.isdir(state.run_dir) else ():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(state.run_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(state.run_dir)
    return stopped


def stop_command(state: LiveState) -> str:
    if not state.server_pid:
        return "(the server is yours: --server)"
    return f"kill {state.server_pid} && rm -r {shlex.quote(state.run_dir)}"


# --- making DEST -----------------------------------------------------------------------

def _make_run_dir(socket_group: str | None) -> str:
    """A private directory for the socket under serve's runtime directory; with a group
    (qemu as libvirt-qemu), the runtime directory and it are searchable by that group."""
    from ..nbd.server_socket import check_private_dir, runtime_dir, set_private_dir_access, socket_access

    base = runtime_dir()
    access = socket_access(None, socket_group)
    if socket_group:
        set_private_dir_access(base, access)
    else:
        check_private_dir(base)
    d = os.path.join(base, f"live-{os.urandom(4).hex()}")
    os.mkdir(d, 0o700)
    if socket_group:
        set_private_dir_access(d, access)
    return d


def _qemu_img() -> str:
    import shutil

    path = shutil.which("qemu-img") or ("/usr/bin/qemu-img" if os.path.exists("/usr/bin/qemu-img") else None)
    if not path:
        raise SourceUnreachable("qemu-img not found", hint="install Debian's qemu-utils package")
    return path


def _create_dest(state: LiveState, force: bool) -> None:
    """qemu-img create under a temporary name in DEST's directory, then linked (or, with
    --force, renamed) into place: DEST appears complete or not at all."""
    dest = state.dest
    d = os.path.dirname(dest)
    tmp = os.path.join(d, f".nbdbackup-live-{os.path.basename(dest)}-{os.urandom(4).hex()}")
    cmd = [_qemu_img(), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", state.backing, tmp, str(state.size)]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    try:
        if p.returncode != 0:
            why = (p.stderr or p.stdout).strip()
            err = storage_error(errno.ENOSPC, dest, "creating it", repository=False) \
                if "No space" in why else None
            raise err or SourceUnreachable(f"qemu-img create {dest} failed: {why}")
        os.chmod(tmp, 0o600)        # the guest's disk: its writes land here
        if force:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)      # fails on an existing DEST, even one made in between
            except FileExistsError:
                raise UsageError(f"{dest} exists; not overwriting it", hint="pass --force to replace it, or "
                                 "--resume to continue a live restore into it") from None
            os.unlink(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prepare(repo, ref: str | None, dest: str, *, server_uri: str | None, repo_argv: list[str],
            environment: dict[str, str], socket_group: str | None = None, force: bool = False,
            resume: bool = False) -> LivePrepared:
    """Fresh: resolve the backup, start (or check) the server, write the state file, create
    DEST. --resume: load the state file, check DEST's backing is ours, start the server again
    when it is not running."""
    dest = os.path.abspath(dest)
    if resume:
        return _prepare_resume(repo, ref, dest, environment)
    if os.path.lexists(dest) and not force:
        raise UsageError(f"{dest} exists; not overwriting it",
                         hint="pass --force to replace it, or --resume to continue a live restore into it")
    if not os.path.isdir(os.path.dirname(dest)):
        raise UsageError(f"{os.path.dirname(dest)} is not a directory: DEST's directory must exist")
    info = repo.resolve(ref)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if server_uri:
        from ..nbd.uri import parse_uri

        u = parse_uri(server_uri)
        if u.tls:
            raise UsageError(f"--server {server_uri}: qemu's backing over TLS needs its own tls-creds object; "
                             "restore --live uses a unix socket or plain TCP", hint="serve on a unix socket")
        state = LiveState(dest, info.id, info.disk, info.size, u.socket_path,
                          backing_string(u.socket_path, u.host, u.port, info.id), server_uri=server_uri,
                          created=now)
        if not _serves(state):
            raise SourceUnreachable(f"--server {server_uri} does not serve backup {info.id}",
                                    hint="is `nbdbackup serve` running on that repository?")
        started = False
    else:
        run_dir = _make_run_dir(socket_group)
        sock = os.path.join(run_dir, "serve.sock")
        state = LiveState(dest, info.id, info.disk, info.size, sock, backing_string(sock, None, None, info.id),
                          server_argv=server_argv(repo_argv, sock, socket_group),
                          server_log=os.path.join(run_dir, "serve.log"), run_dir=run_dir, created=now)
        try:
            start_server(state, environment)
        except BaseException:
            stop_server(state)
            raise
        started = True
    try:
        state.save()
        _create_dest(state, force)
    except BaseException:
        if started:
            stop_server(state)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state.path)
        raise
    return LivePrepared(state, resumed=False, server_started=started)


def _prepare_resume(repo, ref: str | None, dest: str, environment: dict[str, str]) -> LivePrepared:
    state = LiveState.load(dest)
    if os.path.abspath(state.dest) != dest:
        raise UsageError(f"--resume: {state.path} is about {state.dest}, not {dest}")
    if ref is not None and ref not in (state.backup, state.disk):
        raise UsageError(f"--resume: {dest} is a live restore of {state.backup} ({state.disk}), not {ref}",
                         hint="give that backup, or none")
    backing = read_backing(dest)
    if backing is None:
        return LivePrepared(state, resumed=True, server_started=False)    # the copy completed already
    if backing != state.backing:
        raise UsageError(f"--resume: {dest}'s backing file is not the export restore --live made it with: "
                         f"{backing[:200]}", hint="it was changed or made by something else; not touching it")
    if repo is not None:
        repo.get_backup(state.backup)       # NotFound when it was forgotten meanwhile
    started = False
    if _serves(state, timeout=5.0):
        pass
    elif state.server_argv:
        log.warning("the NBD server of %s (pid %s) is not running: starting it again", dest, state.server_pid)
        start_server(state, environment)
        state.save()
        started = True
    else:
        raise SourceUnreachable(f"--server {state.server_uri} does not serve {state.backup}",
                                hint="start that server again, then run the --resume again")
    return LivePrepared(state, resumed=True, server_started=started)


# --- instructions ------------------------------------------------------------------------

def qemu_command(state: LiveState, qmp_socket: str = "/path/to/qmp.sock") -> str:
    return shlex.join(["qemu-system-x86_64", "-m", "1G", "-qmp", f"unix:{qmp_socket},server=on,wait=off",
                       "-blockdev", f"driver=file,node-name=restore-file,filename={state.dest}",
                       "-blockdev", "driver=qcow2,node-name=restore,file=restore-file",
                       "-device", "virtio-blk-pci,drive=restore"]) + " ..."


def libvirt_snippet(state: LiveState) -> str:
    return (f"<disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2'/>\n"
            f"  <source file='{state.dest}'/>\n  <target dev='vda' bus='virtio'/>\n</disk>")


# --- the copy ----------------------------------------------------------------------------

def job_id(dest: str) -> str:
    import hashlib

    return JOB_PREFIX + hashlib.blake2s(os.path.abspath(dest).encode(), digest_size=6).hexdigest()


def _connect_qmp(path: str, wait_s: float):
    from ..sources.qmp_conn import Qmp

    deadline = time.monotonic() + wait_s
    last = None
    while True:
        try:
            return Qmp(path, connect_timeout=10.0)
        except SourceUnreachable as e:
            last = e
        if time.monotonic() >= deadline:
            raise SourceUnreachable(f"no qemu answered on QMP socket {path} within {wait_s:.0f}s ({last})",
                                    hint="start the VM on DEST with `-qmp unix:PATH,server=on,wait=off`, or "
                                         "give --wait more seconds") from None
        time.sleep(1.0)


def find_dest_node(qmp, dest: str) -> dict | None:
    """The qcow2 node whose file is DEST (None: this qemu does not have DEST open)."""
    real = os.path.realpath(dest)
    for n in qmp.cmd("query-named-block-nodes", {"flat": True}):
        if n.get("drv") == "qcow2" and n.get("file") and os.path.realpath(n["file"]) == real:
            return n
    return None


def _vm_gone(state: LiveState, qmp_socket: str, what: str) -> LiveCopyFailed:
    return LiveCopyFailed(
        f"the VM went away during the live restore of {state.dest} ({what})",
        hint=f"{state.dest} keeps what was copied and what the guest wrote; start the VM on it again, then "
             f"`nbdbackup restore --live --resume {shlex.quote(state.dest)} --qmp {shlex.quote(qmp_socket)}`")


def _copy_failed(state: LiveState, qmp_socket: str, message: str) -> LiveCopyFailed:
    resume = f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --qmp {shlex.quote(qmp_socket)}"
    if state.ours:
        alive = _pid_is_our_server(state.server_pid, state.socket)
        server = (f"the NBD server (pid {state.server_pid}) is still running: look at {state.server_log}"
                  if alive else f"the NBD server is not running: start it again with "
                  f"`{shlex.join(state.server_argv)}` (the --resume below also does)")
    else:
        server = f"check that --server {state.server_uri} serves {state.backup}, and restart it"
    return LiveCopyFailed(
        f"qemu's copy into {state.dest} failed: {message}",
        hint=f"{server}; then `{resume}`. The guest keeps running: ranges copied and its writes are fine, "
             "ranges not yet copied read as errors until the server is back")


def copy(state: LiveState, qmp_socket: str, *, wait_s: float = DEFAULT_WAIT, speed: int = 0,
         progress: Callable | None = None, stop_our_server: bool = True) -> LiveCopyResult:
    """Wait for a qemu with DEST open on *qmp_socket*, stream the backing into DEST (or follow
    a killed run's job), check the backing is gone, stop our server."""
    t0 = time.monotonic()
    qmp = _connect_qmp(qmp_socket, wait_s)
    try:
        node = find_dest_node(qmp, state.dest)
        if node is None:
            raise NotFound(f"the qemu on {qmp_socket} has no qcow2 node on {state.dest}",
                           hint="start the VM with DEST as its disk (e.g. -blockdev driver=qcow2,...,"
                                f"file.filename={state.dest})")
        job = job_id(state.dest)
        if not node.get("backing_file"):
            _check_no_backing(qmp, state)
            return _done(state, 0, time.monotonic() - t0, job, followed=False, stop=stop_our_server,
                         already=True)
        events = qmp.listen(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED", "SHUTDOWN"])
        running = {j["device"]: j for j in qmp.cmd("query-block-jobs")}
        followed = job in running
        if followed:
            log.info("a stream job %s of an earlier run is still running: following it", job)
            if speed:
                qmp.cmd("block-job-set-speed", {"device": job, "speed": speed})
        first = time.monotonic()
        while True:
            if not followed:
                _start_stream(qmp, state, qmp_socket, node["node-name"], job, speed)
            try:
                moved = _follow(qmp, events, state, qmp_socket, job, progress)
                break
            except _JobFailed as e:
                # qemu reconnects to a restarted server on its own, retrying with a growing
                # pause (up to 16 s in qemu 7.2); until then a new stream fails at once
                if time.monotonic() - first < RECONNECT_GRACE and _serves(state, timeout=5.0):
                    log.info("the copy failed (%s) while the server answers: qemu has not reconnected "
                             "yet; trying again", e)
                    followed = False
                    time.sleep(2.0)
                    continue
                raise _copy_failed(state, qmp_socket, str(e)) from None
        _check_no_backing(qmp, state)
        return _done(state, moved, time.monotonic() - t0, job, followed=followed, stop=stop_our_server)
    except SourceFailed as e:
        if not qmp.connected:
            raise _vm_gone(state, qmp_socket, str(e)) from None
        raise
    finally:
        qmp.close()


class _JobFailed(Exception):
    """The stream job ended with an error (its message)."""


def _start_stream(qmp, state: LiveState, qmp_socket: str, node: str, job: str, speed: int) -> None:
    stream = {"job-id": job, "device": node, "on-error": "report"}
    if speed:
        stream["speed"] = speed
    try:
        qmp.cmd("block-stream", stream)
    except QmpCommandError as e:
        raise _copy_failed(state, qmp_socket, f"block-stream refused: {e.desc}") from None


def _follow(qmp, events, state: LiveState, qmp_socket: str, job: str, progress) -> int:
    bar = progress(state.size, f"live restore {state.backup}") if progress else NoBar()
    shown = 0
    error = None
    gone_since = None
    try:
        while True:
            ev = events.get(POLL_S)
            if ev is not None:
                data = ev.get("data") or {}
                if ev["event"] == "SHUTDOWN":
                    raise _vm_gone(state, qmp_socket, "qemu shut down")
                if data.get("device") != job:
                    continue
                if ev["event"] == "BLOCK_JOB_ERROR":
                    error = f"{data.get('operation', 'I/O')} error ({data.get('action')})"
                    continue
                if ev["event"] == "BLOCK_JOB_CANCELLED":
                    raise _copy_failed(state, qmp_socket, f"the job {job} was cancelled at "
                                                          f"{data.get('offset')} of {data.get('len')} bytes")
                # BLOCK_JOB_COMPLETED
                if "error" in data or data.get("offset") != data.get("len"):
                    msg = data.get("error") or error or "the job ended early"
                    raise _JobFailed(f"{msg} at {data.get('offset')} of {data.get('len')} bytes")
                bar.update(max(0, int(data["len"]) - shown))
                return int(data["len"])
            if not qmp.connected:
                raise _vm_gone(state, qmp_socket, "its QMP connection closed")
            jobs = {j["device"]: j for j in qmp.cmd("query-block-jobs")}
            j = jobs.get(job)
            if j is None:
                # the event may still be on its way; a job gone without one for long is lost
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > 10.0:
                    raise _JobFailed(f"the job {job} vanished without a completion event")
                continue
            offset = int(j.get("offset", 0))
            if offset > shown:
                bar.update(offset - shown)
                shown = offset
    finally:
        bar.close()


def _check_no_backing(qmp, state: LiveState) -> None:
    """The copy is done only when neither qemu's node nor DEST's header names a backing."""
    node = find_dest_node(qmp, state.dest)
    if node is None or node.get("backing_file"):
        raise LiveCopyFailed(f"qemu still shows a backing file for {state.dest} after the copy",
                             hint="run the --resume again; report this if it persists")
    _check_header_no_backing(state)


def _check_header_no_backing(state: LiveState) -> None:
    p = subprocess.run([_qemu_img(), "info", "-U", "--output=json", state.dest], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SourceFailed(f"qemu-img info {state.dest} failed after the copy: {p.stderr.strip()}")
    if "backing-filename" in json.loads(p.stdout):
        raise LiveCopyFailed(f"{state.dest} still names a backing file after the copy",
                             hint="run the --resume again; report this if it persists")


def forget_state(state: LiveState) -> None:
    """DEST is an ordinary image now: nothing left to resume."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state.path)


def _done(state: LiveState, moved: int, seconds: float, job: str, *, followed: bool, stop: bool,
          already: bool = False) -> LiveCopyResult:
    stopped = False
    if stop and state.ours:
        stopped = stop_server(state)
    forget_state(state)
    return LiveCopyResult(state, moved, seconds, job, followed, stopped, already_complete=already)


# --- the copy through libvirt --------------------------------------------------------------

def _disk_of(dom, dest: str) -> tuple[str, bool] | None:
    """(target, has a backing) of the domain's disk whose source file is DEST; None: none is."""
    import xml.etree.ElementTree as ET

    real = os.path.realpath(dest)
    for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
        src, tgt = disk.find("source"), disk.find("target")
        if src is None or tgt is None or not src.get("file"):
            continue
        if os.path.realpath(src.get("file")) == real:
            backing = disk.find("backingStore")
            return tgt.get("dev"), backing is not None and backing.find("source") is not None
    return None


def copy_domain(state: LiveState, domain: str, connect_uri: str, *, start: bool = False, speed: int = 0,
                progress: Callable | None = None) -> LiveCopyResult:
    """The copy through libvirt: virDomainBlockPull (block-stream; libvirt leaves qemu's
    on-error at its default, report) on the domain's disk whose source is DEST, followed by
    virDomainGetBlockJobInfo; done when the job is gone and the disk has no backing store."""
    from ..sources.libvirt_domain import _binding, lookup_domain, open_connection

    libvirt = _binding()
    t0 = time.monotonic()
    conn = open_connection(connect_uri)
    try:
        dom = lookup_domain(conn, domain)
        if not dom.isActive():
            if not start:
                raise UsageError(f"domain {domain} is not running", hint="start it, or pass --start")
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise SourceUnreachable(f"cannot start domain {domain}: {e.get_error_message()}",
                                        hint=f"qemu runs as libvirt's user: it must reach {state.dest} and "
                                             f"{state.socket} (--socket-group libvirt-qemu)") from None
        found = _disk_of(dom, state.dest)
        if found is None:
            raise NotFound(f"domain {domain} has no disk whose source is {state.dest}",
                           hint=f"give the domain a <disk> with <source file='{state.dest}'/>")
        target, has_backing = found
        job = f"{domain}:{target}"
        if not has_backing:
            _check_header_no_backing(state)
            return _done(state, 0, time.monotonic() - t0, job, followed=False, stop=True, already=True)
        first = time.monotonic()
        try:
            followed = bool(dom.blockJobInfo(target, 0))
        except libvirt.libvirtError as e:
            raise _domain_failed(state, domain, f"blockJobInfo failed: {e.get_error_message()}") from None
        if followed:
            log.info("a block job on %s of %s is still running: following it", target, domain)
        pulling = followed
        while True:
            try:
                if not pulling:
                    dom.blockPull(target, speed, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES if speed else 0)
                elif speed:
                    dom.blockJobSetSpeed(target, speed, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
            except libvirt.libvirtError as e:
                raise _domain_failed(state, domain, f"blockPull refused: {e.get_error_message()}") from None
            _follow_domain(dom, libvirt, state, domain, target, progress)
            found = _disk_of(dom, state.dest)
            if found is not None and not found[1]:
                break
            # as in copy(): qemu may not have reconnected to a restarted server yet
            if time.monotonic() - first < RECONNECT_GRACE and _serves(state, timeout=5.0):
                log.info("the block job ended with the backing in place while the server answers: "
                         "qemu has not reconnected yet; trying again")
                pulling = False
                time.sleep(2.0)
                continue
            raise _domain_failed(state, domain, "the block job ended but the disk still has its backing store "
                                                f"(qemu's error is in /var/log/libvirt/qemu/{domain}.log)")
        _check_header_no_backing(state)
        return _done(state, state.size, time.monotonic() - t0, job, followed=followed, stop=True)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _follow_domain(dom, libvirt, state: LiveState, domain: str, target: str, progress) -> None:
    bar = progress(state.size, f"live restore {state.backup}") if progress else NoBar()
    shown = 0
    try:
        while True:
            try:
                info = dom.blockJobInfo(target, 0)
            except libvirt.libvirtError as e:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        raise _domain_failed(state, domain, e.get_error_message()) from None
                raise _domain_gone(state, domain) from None
            if not info:
                if not dom.isActive():
                    raise _domain_gone(state, domain)
                bar.update(max(0, state.size - shown))
                return
            cur = int(info.get("cur", 0))
            if cur > shown:
                bar.update(cur - shown)
                shown = cur
            time.sleep(POLL_S)
    finally:
        bar.close()


def _resume_domain_cmd(state: LiveState, domain: str) -> str:
    return f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --domain {shlex.quote(domain)}"


def _domain_gone(state: LiveState, domain: str) -> LiveCopyFailed:
    return LiveCopyFailed(f"the VM went away during the live restore of {state.dest} (domain {domain} "
                          "is not running)",
                          hint=f"{state.dest} keeps what was copied and what the guest wrote; "
                               f"`{_resume_domain_cmd(state, domain)} --start`")


def _domain_failed(state: LiveState, domain: str, message: str) -> LiveCopyFailed:
    e = _copy_failed(state, "SOCKET", message)
    return LiveCopyFailed(str(e), hint=e.hint.replace(
        f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --qmp SOCKET", _resume_domain_cmd(state, domain)))
