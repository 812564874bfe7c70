"""Fleecing inside a running qemu: scratch overlays, the NBD server, exports,
and taking all of it down again (also what a killed run left behind).

Teardown order matters: an export holds the overlay node, the backup job
holds the overlay as its target, and the overlay file goes last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Callable

from ..errors import QmpCommandError, SourceFailed, UsageError
from .qmp_state import Names, StateFile

if TYPE_CHECKING:
    from .qmp_conn import Qmp

log = logging.getLogger(__name__)

WAIT_TIMEOUT = 30.0
NBDMAGIC = b"NBDMAGIC"


def _wait(what: str, done: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SourceFailed(f"qemu did not finish {what} within {timeout:.0f}s")
        time.sleep(0.02)


def _try(qmp: Qmp, name: str, args: dict) -> bool:
    """Run a cleanup command; an error only means the thing is already gone."""
    try:
        qmp.cmd(name, args)
        return True
    except QmpCommandError as e:
        log.debug("cleanup %s %s: %s", name, args, e.desc)
        return False


# --- scratch overlays ----------------------------------------------------------

def create_overlay_file(path: str, size: int) -> None:
    """An empty qcow2 of *size*; its backing node is given at blockdev-add."""
    exe = shutil.which("qemu-img") or "/usr/bin/qemu-img"
    try:
        p = subprocess.run([exe, "create", "-q", "-f", "qcow2", path, str(size)],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceFailed(f"cannot run qemu-img (Debian package qemu-utils) to create the scratch "
                           f"overlay {path}: {e}") from None
    if p.returncode != 0:
        raise UsageError(f"cannot create the scratch overlay {path}: {p.stderr.strip()}",
                         hint="--scratch-dir must be a writable directory with room for the "
                              "blocks the guest rewrites during the backup")


def add_overlay_node(qmp: Qmp, names: Names, i: int, path: str, backing: str) -> None:
    qmp.cmd("blockdev-add", {
        "driver": "qcow2", "node-name": names.node(i), "backing": backing,
        "file": {"driver": "file", "node-name": names.file_node(i), "filename": path},
    })


# --- the NBD server ---------------------------------------------------------------

def server_alive(sock_path: str, timeout: float = 2.0) -> bool:
    """Whether an NBD server answers on *sock_path* (it greets with NBDMAGIC)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sock_path)
            return s.recv(8, socket.MSG_WAITALL) == NBDMAGIC
        except OSError:
            return False


SERVER_RUNNING_HINT = ("e.g. --nbd-server nbd+unix:///?socket=/path/to/sock or nbd://host:10809 (the "
                       "address given to nbd-server-start); the tool adds its export to that server")


def start_private_server(qmp: Qmp, state: StateFile) -> str:
    """nbd-server-start on a private unix socket; return the socket path.

    Recorded in the state file before starting, so a killed run's server is
    found and stopped by the next run.
    """
    rec = state.data.get("server")
    if rec and server_alive(rec.get("socket", "")):
        return rec["socket"]       # ours from an earlier run, kept for someone else's exports
    if rec:
        forget_server(state)
    d = tempfile.mkdtemp(prefix="nbdbackup-qmp-")
    sock = os.path.join(d, "nbd.sock")
    state.data["server"] = {"dir": d, "socket": sock}
    state.save()
    try:
        qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    except QmpCommandError as e:
        forget_server(state)
        if "already running" in e.desc:
            raise UsageError("qemu already runs an NBD server, and qemu 7.2 cannot tell where it "
                             "listens: pass its address with --nbd-server URI",
                             hint=SERVER_RUNNING_HINT) from None
        raise
    return sock


def forget_server(state: StateFile) -> None:
    rec = state.data.pop("server", None)
    state.save()
    if rec and rec.get("dir"):
        shutil.rmtree(rec["dir"], ignore_errors=True)


def stop_private_server(qmp: Qmp, names: Names, state: StateFile) -> None:
    """Stop the server recorded in the state file, if it is still ours and unused."""
    rec = state.data.get("server")
    if not rec:
        return
    if server_alive(rec.get("socket", "")):
        others = [e["id"] for e in qmp.cmd("query-block-exports")
                  if e.get("type") == "nbd" and not names.ours(e["id"])]
        if others:      # keep the record: the next run reuses (and again tries to stop) it
            log.warning("leaving our NBD server in qemu running: it now also serves %s", ", ".join(others))
            return
        _try(qmp, "nbd-server-stop", {})
    forget_server(state)


# --- exports, jobs, nodes -----------------------------------------------------------

def add_export(qmp: Qmp, names: Names, i: int, bitmap: str | None, bitmap_node: str) -> str:
    name = names.export(i)
    args = {"type": "nbd", "id": name, "node-name": names.node(i), "name": name, "writable": False}
    if bitmap:
        args["bitmaps"] = [{"node": bitmap_node, "name": bitmap}]
    qmp.cmd("block-export-add", args)
    return name


def remove_exports(qmp: Qmp, names: Names) -> None:
    ids = [e["id"] for e in qmp.cmd("query-block-exports") if names.ours(e["id"])]
    for eid in ids:
        _try(qmp, "block-export-del", {"id": eid, "mode": "hard"})
    if ids:
        _wait("removing NBD exports",
              lambda: not any(e["id"] in ids for e in qmp.cmd("query-block-exports")))


def cancel_jobs(qmp: Qmp, names: Names) -> None:
    ids = [j["device"] for j in qmp.cmd("query-block-jobs") if names.ours(j["device"])]
    for jid in ids:
        _try(qmp, "block-job-cancel", {"device": jid, "force": True})
    if ids:
        def gone():
            jobs = {j["id"]: j for j in qmp.cmd("query-jobs") if j["id"] in ids}
            for jid, j in jobs.items():     # a concluded job that was told not to vanish
                if j.get("status") == "concluded":
                    _try(qmp, "job-dismiss", {"id": jid})
            return not jobs
        _wait("cancelling the fleecing jobs", gone)


def remove_nodes(qmp: Qmp, names: Names) -> None:
    # The overlay nodes own their file nodes: deleting them removes both.
    for n in qmp.cmd("query-named-block-nodes", {"flat": True}):
        if names.ours(n["node-name"]) and n["node-name"].startswith(names.tag + "-fl"):
            _try(qmp, "blockdev-del", {"node-name": n["node-name"]})
    left = [n["node-name"] for n in qmp.cmd("query-named-block-nodes", {"flat": True})
            if names.ours(n["node-name"])]
    if left:
        raise SourceFailed(f"could not remove block nodes {', '.join(left)} from qemu")


def remove_read_bitmaps(qmp: Qmp, names: Names) -> None:
    for n in qmp.cmd("query-named-block-nodes", {"flat": True}):
        for b in n.get("dirty-bitmaps") or []:
            if names.is_read_bitmap(b.get("name", "")):
                _try(qmp, "block-dirty-bitmap-remove", {"node": n["node-name"], "name": b["name"]})


def remove_files(state: StateFile) -> None:
    for path in list(state.data.get("files", [])):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        state.discard("files", path)
    for d in list(state.data.get("dirs", [])):
        shutil.rmtree(d, ignore_errors=True)
        state.discard("dirs", d)


def teardown(qmp: Qmp, names: Names, state: StateFile) -> None:
    """Remove every export, job, node, scratch file and read bitmap of this
    repository from qemu; also what a killed run left. Idempotent."""
    remove_exports(qmp, names)
    cancel_jobs(qmp, names)
    remove_nodes(qmp, names)
    remove_read_bitmaps(qmp, names)
    remove_files(state)
