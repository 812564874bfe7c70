"""Helpers for the engine tests: qcow2 images changed with qemu-io, raw snapshots, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import support

KiB, MiB = 1 << 10, 1 << 20


def make_image(path: Path, size: int, fmt: str = "qcow2") -> Path:
    support.require_tool("qemu-img")
    support.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])
    return path


def qio(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    """Change the (offline) image with qemu-io commands, e.g. 'write -P 0xaa 0 1M'."""
    support.require_tool("qemu-io")
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    support.run([*args, str(image)])


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        for pos in range(0, size, 64 << 20):       # randbytes() takes at most 256 MiB
            f.write(rng.randbytes(min(64 << 20, size - pos)))
    return path


def text_file(path: Path, size: int) -> Path:
    line = b"the quick brown fox %08d jumps over the lazy dog\n"
    data = b"".join(line % i for i in range(size // len(line) + 1))[:size]
    path.write_bytes(data)
    return path


def snapshot_raw(image: Path, out: Path) -> Path:
    """The image's content now, as raw bytes (qemu-img convert)."""
    support.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)])
    return out


def same_file(a: Path, b: Path) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def _passphrase_file(repo: Path) -> Path:
    return Path(f"{repo}.passphrase")


def nbb(repo: Path, *args, check=True, **kw) -> subprocess.CompletedProcess:
    """The CLI on *repo*; an encrypted one (init_repo(encrypted=True)) with its passphrase file."""
    pw = _passphrase_file(repo)
    key = ["--passphrase-file", str(pw)] if pw.exists() else []
    return support.nbdbackup("--repo", str(repo), *key, *args, check=check, **kw)


def init_repo(path: Path, chunk_size: str = "64K", *, encrypted: bool = False) -> Path:
    if encrypted:
        _passphrase_file(path).write_text("engine test passphrase\n")
        _passphrase_file(path).chmod(0o600)
    nbb(path, "init", "--chunk-size", chunk_size, *(["--encryption", "--kdf-memory", "8"] if encrypted else []))
    return path


def backup(repo: Path, kind: str, *args) -> dict:
    p = nbb(repo, "--json", kind, *args)
    return json.loads(p.stdout)


def bitmaps(image: Path) -> list[dict]:
    out = support.run(["qemu-img", "info", "-U", "--output=json", str(image)]).stdout
    return json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def restore_equals(repo: Path, backup_id: str, expected: Path, tmp: Path) -> bool:
    out = tmp / f"restored-{backup_id}.raw"
    nbb(repo, "restore", backup_id, str(out))
    ok = same_file(out, expected)
    out.unlink()
    return ok
