"""One host of a fleet, for the many-hosts tests: backs up its own qcow2 disks in a loop.

    python -m helpers.fleet_host REPO HOST WORKDIR SECONDS [DISKS]

Shares nothing with the other hosts but the repository (the bucket and the
index database, from the environment): its own state, temp and lock
directories under WORKDIR. Each round changes a few chunks of each disk
with qemu-io (the same bytes go into a raw mirror, so the expected content
of every backup is known), then runs `nbdbackup incremental --image` (the
first one falls back to a full). Every committed backup is appended to
WORKDIR/backups.jsonl as {"id", "disk", "sha256"}; every run's exit code to
WORKDIR/runs.jsonl. Base content is shared by all hosts (dedup across hosts).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

CHUNK = 64 * 1024
NCHUNKS = 24
SIZE = CHUNK * NCHUNKS


def base_byte(i: int) -> int:
    return (i * 37 + 11) % 251          # the same on every host: dedup across hosts


def host_env(workdir: str) -> dict:
    """The environment of a host: private state, temp and runtime directories."""
    env = dict(os.environ)
    for var, sub in (("XDG_STATE_HOME", "state"), ("TMPDIR", "tmp"), ("XDG_RUNTIME_DIR", "run")):
        d = os.path.join(workdir, sub)
        os.makedirs(d, mode=0o700, exist_ok=True)
        env[var] = d
    env.pop("NBDBACKUP_STATE_DIR", None)
    return env


def make_disk(workdir: str, name: str) -> tuple[str, bytearray]:
    img = os.path.join(workdir, f"{name}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)], check=True)
    cmds = []
    mirror = bytearray(SIZE)
    for i in range(NCHUNKS):
        b = base_byte(i)
        cmds += ["-c", f"write -q -P {b} {i * CHUNK} {CHUNK}"]
        mirror[i * CHUNK:(i + 1) * CHUNK] = bytes([b]) * CHUNK
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True)
    return img, mirror


def change(img: str, mirror: bytearray, rng: random.Random) -> None:
    cmds = []
    for i in rng.sample(range(NCHUNKS), 3):
        b = rng.randrange(1, 256)
        off = i * CHUNK + rng.randrange(0, CHUNK // 4096) * 4096
        cmds += ["-c", f"write -q -P {b} {off} 4096"]
        mirror[off:off + 4096] = bytes([b]) * 4096
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True)


def main(argv: list[str]) -> int:
    repo, host, workdir, seconds = argv[0], argv[1], argv[2], float(argv[3])
    ndisks = int(argv[4]) if len(argv) > 4 else 2
    os.makedirs(workdir, exist_ok=True)
    env = host_env(workdir)
    exe = os.path.join(os.path.dirname(sys.executable), "nbdbackup")
    rng = random.Random(host)
    disks = {f"{host}-d{n}": make_disk(workdir, f"{host}-d{n}") for n in range(ndisks)}
    first = set(disks)
    deadline = time.monotonic() + seconds
    with open(os.path.join(workdir, "backups.jsonl"), "a") as out, \
            open(os.path.join(workdir, "runs.jsonl"), "a") as runs:
        while time.monotonic() < deadline:
            for disk, (img, mirror) in disks.items():
                change(img, mirror, rng)
                kind = "full" if disk in first else "incremental"
                p = subprocess.run([exe, "--repo", repo, "--json", "--lock-wait", "30", kind, "--image", img,
                                    "--disk", disk], env=env, capture_output=True, text=True, timeout=300)
                runs.write(json.dumps({"disk": disk, "rc": p.returncode, "stderr": p.stderr[-2000:]}) + "\n")
                runs.flush()
                if p.returncode != 0:
                    continue
                first.discard(disk)
                b = json.loads(p.stdout)
                out.write(json.dumps({"id": b["id"], "disk": disk, "kind": b["kind"],
                                      "sha256": hashlib.sha256(mirror).hexdigest()}) + "\n")
                out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
