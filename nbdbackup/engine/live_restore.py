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
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable

from ..errors import (
    LiveCopyFailed,
    NotFound,
    QmpCommandError,
    SourceFailed,
    SourceUnreachable,
    UsageError,
    storage_error,
)
from ..progress import NoBar
from .live_server import (
    check_header_no_backing,
    copy_failed,
    find_server_pid,
    finish,
    pid_is_our_server,
    qemu_img,
    server_argv,
    serves,
    start_server,
    stop_server,
)
from .live_state import (
    POLL_S,
    RECONNECT_GRACE,
    SERVER_START_TIMEOUT,
    LiveCopyResult,
    LivePrepared,
    LiveState,
    backing_string,
    make_run_dir,
    read_backing,
    state_path,
)

log = logging.getLogger(__name__)

DEFAULT_WAIT = 600.0            # s --qmp waits for a qemu with DEST open
JOB_PREFIX = "nbdbackup-live-"


def _create_dest(state: LiveState, force: bool) -> None:
    """qemu-img create in a private (0700) temporary directory in DEST's directory, then
    linked (or, with --force, renamed) into place: DEST appears complete or not at all. Nobody
    else can swap the temp name there; it is still opened O_NOFOLLOW, checked and fchmodded
    by fd, and linked without following a symlink."""
    import stat
    import tempfile

    dest = state.dest
    d = os.path.dirname(dest)
    tmp_dir = tempfile.mkdtemp(prefix=".nbdbackup-live-", dir=d)
    tmp = os.path.join(tmp_dir, "new.qcow2")
    try:
        cmd = [qemu_img(), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", state.backing, tmp, str(state.size)]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            why = (p.stderr or p.stdout).strip()
            err = storage_error(errno.ENOSPC, dest, "creating it", repository=False) \
                if "No space" in why else None
            raise err or SourceUnreachable(f"qemu-img create {dest} failed: {why}")
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise SourceUnreachable(f"the new image for {dest} was replaced while it was made: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise SourceUnreachable(f"the new image for {dest} was replaced while it was made")
            os.fchmod(fd, 0o600)        # the guest's disk: its writes land here
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest, follow_symlinks=False)  # fails on an existing DEST, even one made in between
            except FileExistsError:
                raise UsageError(f"{dest} exists; not overwriting it", hint="pass --force to replace it, or "
                                 "--resume to continue a live restore into it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmp_dir)
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
        return _prepare_resume(repo, ref, dest, repo_argv, environment)
    if os.path.lexists(dest) and not force:
        raise UsageError(f"{dest} exists; not overwriting it",
                         hint="pass --force to replace it, or --resume to continue a live restore into it")
    if not os.path.isdir(os.path.dirname(dest)):
        raise UsageError(f"{os.path.dirname(dest)} is not a directory: DEST's directory must exist")
    info = repo.resolve(ref)
    if os.path.lexists(state_path(dest)) and not force:
        # DEST gone, its state left: its server may still run, and only this file finds it
        try:
            old = LiveState.load(dest)
        except UsageError:
            old = None          # not ours, or not valid: overwritten, nothing of it used
        if old is not None and old.run_dir and find_server_pid(old.socket):
            raise UsageError(f"{state_path(dest)} names a live restore whose server still runs "
                             f"(socket {old.socket})", hint="pass --force to stop it and start anew")
    if force and os.path.exists(state_path(dest)):
        # the live restore --force replaces: its server would serve nobody any more
        with contextlib.suppress(UsageError):
            old = LiveState.load(dest)
            if old.ours or old.run_dir:     # pid None: killed before it was recorded
                log.warning("stopping the server (pid %s) of the live restore into %s that --force replaces",
                            old.server_pid, dest)
                stop_server(old)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if server_uri:
        from ..nbd.uri import parse_uri

        u = parse_uri(server_uri)
        if u.tls:
            raise UsageError(f"--server {server_uri}: qemu's backing over TLS needs its own tls-creds object; "
                             "restore --live uses a unix socket or plain TCP", hint="serve on a unix socket")
        sock = os.path.abspath(u.socket_path) if u.socket_path else None     # qemu runs elsewhere
        state = LiveState(dest, info.id, info.disk, info.size, sock,
                          backing_string(sock, u.host, u.port, info.id), server_uri=server_uri,
                          created=now)
        if not serves(state):
            raise SourceUnreachable(f"--server {server_uri} does not serve backup {info.id}",
                                    hint="is `nbdbackup serve` running on that repository?")
        started = False
    else:
        run_dir = make_run_dir(socket_group)
        sock = os.path.join(run_dir, "serve.sock")
        state = LiveState(dest, info.id, info.disk, info.size, sock, backing_string(sock, None, None, info.id),
                          server_log=os.path.join(run_dir, "serve.log"), run_dir=run_dir,
                          socket_group=socket_group, created=now)
        try:
            state.save()        # before the server: a crash in between leaves a record that finds it
            start_server(state, repo_argv, environment)
        except BaseException:
            stop_server(state)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state.path)
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


def _prepare_resume(repo, ref: str | None, dest: str, repo_argv: list[str],
                    environment: dict[str, str]) -> LivePrepared:
    state = LiveState.load(dest)
    if state.run_dir:       # the restart hint shows it: rebuilt, never the recorded one
        state.server_argv = server_argv(repo_argv, state.socket, state.socket_group, state.backup)
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
    if state.ours and not pid_is_our_server(state.server_pid, state.socket):
        # started again by hand (the hint's command): adopt it, and give it time to come up
        if (pid := find_server_pid(state.socket)) is not None:
            state.server_pid = pid
            state.save()
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while pid_is_our_server(pid, state.socket) and not serves(state, timeout=5.0) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
    if serves(state, timeout=5.0):
        pass
    elif state.ours or state.run_dir:
        log.warning("the NBD server of %s (pid %s) is not running: starting it again", dest, state.server_pid)
        start_server(state, repo_argv, environment)
        state.save()
        started = True
    else:
        raise SourceUnreachable(f"--server {state.server_uri} does not serve {state.backup}",
                                hint="start that server again, then run the --resume again")
    return LivePrepared(state, resumed=True, server_started=started)


def job_id(dest: str) -> str:
    import hashlib

    return JOB_PREFIX + hashlib.blake2s(os.path.abspath(dest).encode(), digest_size=6).hexdigest()


def _connect_qmp(path: str, wait_s: float, state: LiveState):
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
                                    hint=f"start the VM on {state.dest} with `-qmp unix:{path},server=on,"
                                         f"wait=off`, then `nbdbackup restore --live --resume "
                                         f"{shlex.quote(state.dest)} --qmp {shlex.quote(path)}` (the server "
                                         "keeps serving meanwhile)") from None
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


def copy(state: LiveState, qmp_socket: str, *, wait_s: float = DEFAULT_WAIT, speed: int | None = None,
         progress: Callable | None = None, stop_our_server: bool = True) -> LiveCopyResult:
    """Wait for a qemu with DEST open on *qmp_socket*, stream the backing into DEST (or follow
    a killed run's job), check the backing is gone, stop our server."""
    t0 = time.monotonic()
    qmp = _connect_qmp(qmp_socket, wait_s, state)
    try:
        node = find_dest_node(qmp, state.dest)
        if node is None:
            raise NotFound(f"the qemu on {qmp_socket} has no qcow2 node on {state.dest}",
                           hint="start the VM with DEST as its disk (e.g. -blockdev driver=qcow2,...,"
                                f"file.filename={state.dest})")
        job = job_id(state.dest)
        if not node.get("backing_file"):
            _check_no_backing(qmp, state)
            return finish(state, 0, time.monotonic() - t0, job, followed=False, stop=stop_our_server,
                          already=True)
        # no SHUTDOWN: a guest powered off under -no-shutdown leaves qemu (and the job) running;
        # qemu itself gone is the QMP session closing
        events = qmp.listen(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"])
        running = {j["device"]: j for j in qmp.cmd("query-block-jobs")}
        followed = job in running
        if followed:
            log.info("a stream job %s of an earlier run is still running: following it", job)
            if speed is not None:       # 0: no limit
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
                if time.monotonic() - first < RECONNECT_GRACE and serves(state, timeout=5.0):
                    log.info("the copy failed (%s) while the server answers: qemu has not reconnected "
                             "yet; trying again", e)
                    followed = False
                    time.sleep(2.0)
                    continue
                raise copy_failed(state, qmp_socket, str(e)) from None
        _check_no_backing(qmp, state)
        return finish(state, moved, time.monotonic() - t0, job, followed=followed, stop=stop_our_server)
    except SourceFailed as e:
        if not qmp.connected:
            raise _vm_gone(state, qmp_socket, str(e)) from None
        raise
    finally:
        qmp.close()


class _JobFailed(Exception):
    """The stream job ended with an error (its message)."""


def _start_stream(qmp, state: LiveState, qmp_socket: str, node: str, job: str, speed: int | None) -> None:
    stream = {"job-id": job, "device": node, "on-error": "report"}
    if speed:
        stream["speed"] = speed
    try:
        qmp.cmd("block-stream", stream)
    except QmpCommandError as e:
        raise copy_failed(state, qmp_socket, f"block-stream refused: {e.desc}") from None


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
                if data.get("device") != job:
                    continue
                if ev["event"] == "BLOCK_JOB_ERROR":
                    error = f"{data.get('operation', 'I/O')} error ({data.get('action')})"
                    continue
                if ev["event"] == "BLOCK_JOB_CANCELLED":
                    raise copy_failed(state, qmp_socket, f"the job {job} was cancelled at "
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
    check_header_no_backing(state)
