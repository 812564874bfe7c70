"""`nbdbackup demo`: the main job on an embedded default.

Makes a small qcow2 disk, backs it up full, changes it, backs it up
incrementally, lists, restores and compares. Every step is a real nbdbackup
command (run in-process through cli.main), shown as the user would type it.
"""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "demo"
HELP = "run a self-contained demo: qcow2 disk -> full -> incremental -> restore -> compare"
DESCRIPTION = (
    "Creates a small qcow2 image with qemu-img/qemu-io, a repository, takes a full\n"
    "backup, changes the disk (new data, zeroed and trimmed ranges), takes an\n"
    "incremental, lists the backups, restores the latest one and compares it with\n"
    "the disk using qemu-img compare. Needs qemu-utils. Uses --workdir or a\n"
    "temporary directory that is removed afterwards."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR", help="keep the demo's image, repository and restore in DIR")
    p.add_argument("--size", type=numbers.size(MIN_SIZE, 1 << 40), default="256M",
                   help="virtual size of the demo disk, at least 128M (default 256M)")


MIN_SIZE = 128 << 20     # the demo writes up to offset 102M
MARKER = ".nbdbackup-demo"   # in --workdir: the leftovers there are a demo's, safe to replace


def run(args) -> int:
    import os
    import shlex
    import shutil
    import subprocess
    import sys
    import tempfile

    from ...errors import NbdBackupError, SourceUnreachable, UsageError
    from .. import main as cli_main

    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if not shutil.which(tool):
            raise SourceUnreachable(f"{tool} not found", hint="install Debian's qemu-utils package")

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    def sh(*cmd: str) -> None:
        say("$ " + " ".join(shlex.quote(c) for c in cmd))
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise NbdBackupError(f"{cmd[0]} failed: {p.stderr.strip() or p.stdout.strip()}")

    def nbdbackup(*argv: str) -> None:
        shown = ["nbdbackup", *argv]
        say("$ " + " ".join(shlex.quote(c) for c in shown))
        common = ["--repo", repo]
        if args.quiet:
            common.append("--quiet")
        rc = cli_main.main([*argv, *common])
        if rc != 0:
            raise NbdBackupError(f"`{' '.join(shown)}` failed with exit code {rc}")

    keep = args.workdir is not None
    work = os.path.abspath(args.workdir) if keep else tempfile.mkdtemp(prefix="nbdbackup-demo-")
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot use --workdir {work}: {e.strerror}",
                         hint="give a new directory, or an existing one a previous demo made") from None
    disk = os.path.join(work, "demo-vm.qcow2")
    repo = os.path.join(work, "repo")
    restored = os.path.join(work, "restored.raw")
    text = os.path.join(work, "text.bin")
    found = [os.path.basename(p) for p in (disk, repo, restored, text) if os.path.lexists(p)]
    if found and not os.path.exists(os.path.join(work, MARKER)):
        # Never delete what the demo did not make (e.g. a real repository in DIR/repo).
        raise UsageError(f"--workdir {work} already holds {', '.join(found)}, not made by a demo; "
                         "refusing to replace it", hint="give a new or empty directory for --workdir")
    with open(os.path.join(work, MARKER), "w") as f:
        f.write("made by `nbdbackup demo`: its files here may be replaced by the next demo\n")
    try:
        for path in (disk, restored, text):
            if os.path.exists(path):
                os.unlink(path)
        if os.path.exists(repo):
            shutil.rmtree(repo)
        say(f"# working in {work}")
        sh("qemu-img", "create", "-q", "-f", "qcow2", disk, str(args.size))
        with open(text, "wb") as f:  # text-like, compressible data
            line = b"the quick brown fox jumps over the lazy dog %08d\n"
            f.write(b"".join(line % i for i in range(4 * 1024 * 1024 // 48)))
        sh("qemu-io", "-f", "qcow2", "-c", "write -q -P 0xaa 0 8M", "-c", f"write -q -s {text} 32M 4M",
           "-c", "write -q -P 0x55 100M 2M", disk)
        nbdbackup("init")
        nbdbackup("full", "--image", disk)
        say("# the guest changes its disk: new data, a zeroed range, a trim")
        sh("qemu-io", "-f", "qcow2", "-c", "write -q -P 0xcc 64M 1M", "-c", "write -q -z 0 64k",
           "-c", "discard -q 100M 1M", disk)
        nbdbackup("incremental", "--image", disk)
        nbdbackup("list")
        nbdbackup("restore", "demo-vm", restored)
        sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", restored, disk)
        say("# restored image is identical to the disk")
        nbdbackup("verify")
        say(f"# done{': files kept in ' + work if keep else ''}")
        return 0
    finally:
        if os.path.exists(text):
            os.unlink(text)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        sys.stdout.flush()
