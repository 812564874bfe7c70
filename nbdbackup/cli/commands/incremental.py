"""`nbdbackup incremental`: back up only what changed since the parent backup."""

from __future__ import annotations

NAME = "incremental"
HELP = "back up only the changes since the previous backup, using a dirty bitmap"
DESCRIPTION = (
    "Reads only the ranges a dirty bitmap marks as changed; every other chunk is\n"
    "taken from the parent backup's map. The result is a complete point-in-time\n"
    "backup that restores on its own.\n"
    "  --source URI --bitmap NAME: the export's qemu:dirty-bitmap:NAME must hold every\n"
    "      change since the parent (the disk's latest backup, or --since BACKUP).\n"
    "  --image PATH: the tool reads the bitmap it started at this disk's previous\n"
    "      backup into this repository; the parent is the backup that started it.\n"
    "A missing or untrustworthy bitmap, or a parent that is gone, falls back to a\n"
    "full backup with a warning; --no-fallback makes that an error (exit 13)."
)


def add_arguments(p) -> None:
    from ..backupargs import add_backup_arguments

    add_backup_arguments(p, incremental=True)


def run(args) -> int:
    from ..backupargs import run_backup_command

    return run_backup_command(args, "incremental")
