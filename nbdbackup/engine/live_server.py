"""restore --live's serve process (own session; its pid checked by command line and owner
before it is signalled) and the end that the QMP and libvirt copies share: the restart hint,
the failure, the final checks. The state file and run directories are live_state's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import time

from ..errors import LiveCopyFailed, NbdBackupError, SourceFailed, SourceUnreachable
from .live_state import (
    PYTHON_M,
    SERVER_START_TIMEOUT,
    LiveCopyResult,
    LiveState,
    check_run_dir,
    grant_run_dir,
    remove_run_dir,
)

log = logging.getLogger("nbdbackup.engine.live_restore")


def pid_is_our_server(pid: int | None, socket_path: str | None) -> bool:
    """True when *pid* is ours (euid) and runs `nbdbackup serve --listen unix:SOCKET` on
    exactly *socket_path* (not a reused pid, nor another user's decoy)."""
    if not pid or not socket_path:
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    want = [b"serve", b"--listen", f"unix:{socket_path}".encode()]
    return any(argv[i:i + 3] == want for i in range(len(argv) - 2))


def find_server_pid(socket_path: str | None) -> int | None:
    """The pid of a `nbdbackup serve` on *socket_path* (one the user started again with the
    command the hint gave), found by command line; None when there is none."""
    if not socket_path:
        return None
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and pid_is_our_server(int(name), socket_path):
            return int(name)
    return None


def serves(state: LiveState, timeout: float = 10.0) -> bool:
    """Whether the export answers with the backup's size."""
    from ..nbd.client import Client

    uri = (f"nbd+unix:///{state.backup}?socket={state.socket}" if state.socket
           else uri_with_export(state.server_uri, state.backup))
    try:
        info = Client.query_info(uri, timeout=timeout)
    except (NbdBackupError, OSError) as e:
        log.info("export %s does not answer: %s", uri, e)
        return False
    if not info.read_only:
        # a --writable serve shares one overlay among its clients and drops it on restart:
        # the guest's base would change under it
        raise SourceUnreachable(f"the server at {uri} exports {state.backup} writable: DEST's backing must "
                                "not change", hint="serve it read-only (without --writable)")
    if info.size != state.size:
        raise SourceUnreachable(f"the server at {uri} serves {state.backup} with {info.size} bytes, not "
                                f"{state.size}: not the same backup")
    return True


def uri_with_export(uri: str | None, export: str) -> str:
    from ..nbd.uri import parse_uri

    return str(parse_uri(uri).with_export(export))


def server_argv(args_repo: list[str], socket_path: str, socket_group: str | None, backup: str) -> list[str]:
    """The serve we start: only *backup* exported (qemu's group must not read every other
    backup), read-only. Always built from validated fields, never read back from a file."""
    argv = [*PYTHON_M, *args_repo, "serve", "--listen", f"unix:{socket_path}", "--export", backup]
    if socket_group:
        argv += ["--socket-group", socket_group]
    return argv


def start_server(state: LiveState, repo_argv: list[str], environment: dict[str, str]) -> None:
    """Start `nbdbackup serve` as its own process (new session: neither a killed command nor
    the terminal's SIGINT/SIGHUP reaches it), wait until the export answers, record its pid."""
    from ..nbd.server import clear_stale_socket

    state.server_argv = server_argv(repo_argv, state.socket, state.socket_group, state.backup)
    if check_run_dir(state.run_dir, create=True):     # gone after a reboot (tmpfs): made again
        grant_run_dir(state.run_dir, state.socket_group)
    clear_stale_socket(state.socket)
    logf = os.fdopen(os.open(state.server_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600), "ab")
    try:
        proc = subprocess.Popen(state.server_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=logf, env=environment, start_new_session=True, close_fds=True, cwd="/")
    finally:
        logf.close()
    state.server_pid = proc.pid
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state.server_pid = None
            raise SourceUnreachable(f"the NBD server for {state.backup} exited at start with {proc.returncode}: "
                                    f"{log_tail(state.server_log)}")
        if os.path.exists(state.socket) and serves(state, timeout=5.0):
            return
        time.sleep(0.1)
    stop_pid(proc.pid)
    state.server_pid = None
    raise SourceUnreachable(f"the NBD server for {state.backup} did not answer within "
                            f"{SERVER_START_TIMEOUT:.0f}s: {log_tail(state.server_log)}")


def log_tail(path: str | None, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip() or "(no output)"
    except (OSError, TypeError):
        return "(no log)"


def stop_pid(pid: int, timeout: float = 30.0, socket_path: str | None = None) -> None:
    """SIGTERM, then SIGKILL after *timeout*, through a pidfd taken while the pid was checked
    (a pid reused meanwhile is never signalled); with *socket_path* it is checked again
    before the SIGKILL."""
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return
    try:
        if socket_path and not pid_is_our_server(pid, socket_path):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            try:
                signal.pidfd_send_signal(pidfd, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)
        if socket_path is None or pid_is_our_server(pid, socket_path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def stop_server(state: LiveState) -> bool:
    """Stop the serve we started (checked by its command line first), remove its directory."""
    stopped = False
    pid = state.server_pid if pid_is_our_server(state.server_pid, state.socket) else find_server_pid(state.socket)
    if pid:
        stop_pid(pid, socket_path=state.socket)
        state.server_pid = pid
        stopped = True
    if state.run_dir and not find_server_pid(state.socket):      # never a live server's socket
        remove_run_dir(state.run_dir)
    return stopped


def qemu_img() -> str:
    import shutil

    path = shutil.which("qemu-img") or ("/usr/bin/qemu-img" if os.path.exists("/usr/bin/qemu-img") else None)
    if not path:
        raise SourceUnreachable("qemu-img not found", hint="install Debian's qemu-utils package")
    return path


def restart_command(state: LiveState) -> str:
    """A shell command starting our server again as start_server does: its own session, its log."""
    return (f"setsid -f {shlex.join(state.server_argv)} </dev/null >/dev/null "   # cwd-safe: python -P
            f"2>>{shlex.quote(state.server_log or '/dev/null')}")


def copy_failed(state: LiveState, qmp_socket: str, message: str) -> LiveCopyFailed:
    resume = f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --qmp {shlex.quote(qmp_socket)}"
    if state.ours:
        alive = pid_is_our_server(state.server_pid, state.socket)
        server = (f"the NBD server (pid {state.server_pid}) is still running: look at {state.server_log}"
                  if alive else f"the NBD server is not running: start it again with "
                  f"`{restart_command(state)}` with NBDBACKUP_PASSPHRASE / NBDBACKUP_INDEX_URL set as for "
                  f"this command if it needs them (the --resume below does it for you)")
    else:
        server = f"check that --server {state.server_uri} serves {state.backup}, and restart it"
    return LiveCopyFailed(
        f"qemu's copy into {state.dest} failed: {message}",
        hint=f"{server}; then `{resume}`. The guest keeps running: ranges copied and its writes are fine, "
             "ranges not yet copied read as errors until the server is back")


def check_header_no_backing(state: LiveState) -> None:
    p = subprocess.run([qemu_img(), "info", "-U", "--output=json", state.dest], stdin=subprocess.DEVNULL,
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


def finish(state: LiveState, moved: int, seconds: float, job: str, *, followed: bool, stop: bool,
           already: bool = False) -> LiveCopyResult:
    stopped = False
    if stop and state.ours:
        stopped = stop_server(state)
    forget_state(state)
    return LiveCopyResult(state, moved, seconds, job, followed, stopped, already_complete=already)


def qemu_command(state: LiveState, qmp_socket: str) -> str:
    return shlex.join(["qemu-system-x86_64", "-m", "1G", "-qmp", f"unix:{qmp_socket},server=on,wait=off",
                       "-blockdev", f"driver=file,node-name=restore-file,filename={state.dest}",
                       "-blockdev", "driver=qcow2,node-name=restore,file=restore-file",
                       "-device", "virtio-blk-pci,drive=restore"]) + " ..."


def libvirt_snippet(state: LiveState) -> str:
    return disk_snippet(state.dest)


def disk_snippet(dest: str) -> str:
    return (f"<disk type='file' device='disk'>\n  <driver name='qemu' type='qcow2'/>\n"
            f"  <source file='{dest}'/>\n  <target dev='vda' bus='virtio'/>\n</disk>")
