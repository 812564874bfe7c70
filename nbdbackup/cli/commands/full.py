"""`nbdbackup full`: a full backup of one disk (every non-zero chunk read)."""

from __future__ import annotations

NAME = "full"
HELP = "take a full backup of a disk (NBD export or offline qcow2 image)"
DESCRIPTION = (
    "Reads every allocated range of the disk and stores it in the repository.\n"
    "Ranges the source reports as zero are recorded as zero without reading.\n"
    "With --image PATH the tool serves the image itself with qemu-nbd and starts\n"
    "a dirty bitmap tied to this repository, so later incrementals read only changes.\n"
    "With --json, prints the new backup's record."
)


def add_arguments(p) -> None:
    from ..backupargs import add_backup_arguments

    add_backup_arguments(p, incremental=False)


def run(args) -> int:
    from ..backupargs import run_backup_command

    return run_backup_command(args, "full")
