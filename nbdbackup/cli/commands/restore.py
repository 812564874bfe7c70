"""`nbdbackup restore BACKUP TARGET`: write a backup back out, bit-exact."""

from __future__ import annotations

NAME = "restore"
HELP = "restore a backup to a raw/qcow2 file, a block device or an NBD export"
DESCRIPTION = (
    "BACKUP is a backup id, or a disk name meaning that disk's latest backup.\n"
    "TARGET is one of:\n"
    "  a file path       a new sparse raw image of exactly the disk's size\n"
    "                    (--format qcow2: a sparse qcow2 made with qemu-img convert)\n"
    "  a block device    written in place, zero ranges zeroed (needs --force)\n"
    "  an NBD URI        an existing writable export of the same size; zero ranges are\n"
    "                    sent as WRITE_ZEROES, over parallel connections\n"
    "An existing file is not overwritten without --force. Success is reported only\n"
    "after the data was flushed (fsync or NBD FLUSH).\n"
    "A file target is written to a hidden temporary file in the target's directory,\n"
    "named .nbdbackup-restore-<target name>-<8 hex digits>, and renamed into place when\n"
    "complete. A restore that is killed leaves it behind; the next restore to the same\n"
    "target removes such leftovers and says so (a restore still running holds a lock\n"
    "on its file, which is kept)."
)


def add_arguments(p) -> None:
    from ..backupargs import DEFAULT_CONNECTIONS, connections_type

    p.add_argument("backup", metavar="BACKUP", help="backup id, or disk name for its latest backup")
    p.add_argument("target", metavar="TARGET", help="file path, block device or NBD URI")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="format of a file target (default raw)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file or block device")
    p.add_argument("--connections", type=connections_type, default=DEFAULT_CONNECTIONS, metavar="N",
                   help=f"parallel connections to an NBD target (default {DEFAULT_CONNECTIONS})")


def run(args) -> int:
    from ...engine.restore import restore
    from .. import output
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        r = restore(repo, args.backup, args.target, fmt=args.format, force=args.force,
                    connections=args.connections,
                    progress=lambda total, desc: output.progress_bar(args, total, desc))
    if args.json:
        output.print_json({"backup": r.backup.to_json(), "target": r.target, "data_bytes": r.data_bytes,
                           "zero_bytes": r.zero_bytes, "duration_s": round(r.duration_s, 3),
                           "leftovers_removed": [{"path": p, "bytes": n} for p, n in r.leftovers_removed]})
    else:
        hb = output.human_bytes
        rate = r.data_bytes / r.duration_s if r.duration_s else 0.0
        output.summary(args, f"restored {r.backup.id} ({r.backup.disk}, {hb(r.backup.size)}) to {r.target}: "
                             f"{hb(r.data_bytes)} data, {hb(r.zero_bytes)} zero, "
                             f"{r.duration_s:.1f}s ({hb(rate)}/s)")
    return 0
