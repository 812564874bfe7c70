"""Helpers shared by the bench scripts (import as `from _common import ...`:
a script run as `python bench/<name>.py` has bench/ on sys.path)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20
WORDS = (b"the of and to in is was that for on with as by at from his her an which were are this be or "
         b"had not but have it they one all their there been has when who will more no if out so said "
         b"what up its about into than them can only other new some could time these two may then do "
         b"first any my now such like our over man me even most made after also did many before must "
         b"through back years where much your way well down should because each just those people how "
         b"kernel block device backup snapshot bitmap extent export server client write read sector").split()


def nbdbackup_exe() -> str:
    """The installed CLI, as a user runs it: the console script beside this python (a venv's
    bin/, as the README installs it), else the one on PATH (which may be a slower wrapper,
    such as a pyenv shim that adds ~60 ms of its own to every run)."""
    beside = os.path.join(os.path.dirname(sys.executable), "nbdbackup")
    return beside if os.access(beside, os.X_OK) else (shutil.which("nbdbackup") or beside)


@contextmanager
def bench_workdir(keep: str | None):
    """*keep* (created, left in place), else a fresh directory in /var/tmp removed afterwards."""
    # absolute: servers started with paths in it run from other directories
    work = Path(keep or tempfile.mkdtemp(prefix="nbdbackup-bench-", dir="/var/tmp")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def wait_for_socket(proc: subprocess.Popen, sock: Path, timeout: float = 30.0) -> None:
    """Until *proc* (a server) listens on *sock*; exits with a message if it died or took too long."""
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited ({proc.returncode}) before listening on {sock}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{proc.args[0]} did not listen on {sock} within {timeout:.0f} s")
        time.sleep(0.02)


def text_like(path: Path, size: int, seed: int = 2) -> None:
    """Unique, compressible text: an 8 MiB block of random words, each copy with its own
    permutation of the letters (no two chunks repeat, the compression ratio stays)."""
    rng = random.Random(seed)
    block = bytearray()
    n = 0
    while len(block) < 8 * MiB:
        n += 1
        block += b"%09d " % n + b" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + b".\n"
    block = bytes(block[:8 * MiB])
    letters = bytes(range(ord("a"), ord("z") + 1))
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            perm = bytearray(letters)
            rng.shuffle(perm)
            f.write(block.translate(bytes.maketrans(letters, bytes(perm))).replace(b"000", b"%03d" % (i % 1000)))
