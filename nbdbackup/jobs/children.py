"""The child processes of a run: each source is `python -m nbdbackup ... --json`, started so
that it dies with the run (PR_SET_PDEATHSIG, and its own process group the run signals), its
stderr passed on line by line with the source's label in front."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..envsecrets import SECRET_ENV, env

log = logging.getLogger("nbdbackup")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)     # loaded before any fork: the child only calls it
_stderr_lock = threading.Lock()


def _die_with_parent(parent_pid: int):
    def preexec():
        # SIGTERM, not SIGKILL: the child's finally-blocks end its backup job and checkpoint
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent_pid:     # the parent died before prctl: nobody would signal us
            os._exit(126)
    return preexec


def child_environment() -> dict[str, str]:
    """os.environ plus the passphrases the CLI took out of it (envsecrets): the children get
    them the way a user gives them, through the environment, never on the command line."""
    e = dict(os.environ)
    for name in SECRET_ENV:
        value = env(name)
        if value is not None:
            e[name] = value
    return e


@dataclass
class Child:
    label: str                  # what its stderr lines start with: "image:/srv/db.qcow2"
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0        # time.time() at start and end
    ended: float = 0.0
    exit_code: int | None = None
    stdout: str = ""
    stderr_tail: list[str] = field(default_factory=list)     # its last lines, for the summary
    _readers: list[threading.Thread] = field(default_factory=list)

    def start(self, environment: dict[str, str]) -> None:
        self.started = time.time()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=environment, process_group=0,
                                     preexec_fn=_die_with_parent(os.getpid()))
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        self.stdout = self.proc.stdout.read().decode("utf-8", "replace")

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stderr_tail = (self.stderr_tail + [line])[-20:]
            with _stderr_lock:
                print(f"[{self.label}] {line}", file=sys.stderr, flush=True)

    def poll(self) -> bool:
        """True once it has exited and its output is read."""
        if self.proc is None or self.proc.poll() is None:
            return False
        for t in self._readers:
            t.join()
        if not self.ended:
            self.ended = time.time()
            rc = self.proc.returncode
            self.exit_code = rc if rc >= 0 else 128 - rc     # killed by signal N: 128+N, as a shell says
        return True

    def document(self):
        """Its --json document (None when it printed none, e.g. it crashed)."""
        try:
            return json.loads(self.stdout) if self.stdout.strip() else None
        except ValueError:
            return None

    def terminate(self) -> None:
        """SIGTERM to its whole process group (qemu-nbd and the like die with it anyway)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def run_all(children: list[Child], concurrency: int, *, grace_s: float = 90.0,
            extra_env: dict[str, str] | None = None) -> None:
    """Run *children*, at most *concurrency* at once, from this (the main) thread: the
    parent-death signal follows the thread that forked. On SIGINT/SIGTERM (KeyboardInterrupt
    or Interrupted here) every running child is told to stop, and waited for, before it goes on."""
    environment = child_environment() | (extra_env or {})
    waiting = list(children)
    running: list[Child] = []
    try:
        while waiting or running:
            while waiting and len(running) < concurrency:
                c = waiting.pop(0)
                try:
                    c.start(environment)
                except OSError as e:
                    c.exit_code, c.stderr_tail = 1, [f"cannot start: {e}"]
                    continue
                running.append(c)
            running = [c for c in running if not c.poll()]
            if running:
                time.sleep(0.05)
    except BaseException:
        for c in running:
            c.terminate()
        deadline = time.monotonic() + grace_s
        for c in running:
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                c.proc.wait()
            c.poll()
        raise


def base_argv() -> list[str]:
    """How a child is started: this interpreter, this package; -P keeps the cwd off sys.path,
    so a ./nbdbackup where the job runs is never imported instead."""
    return [sys.executable, "-P", "-m", "nbdbackup"]
