"""`nbdbackup restore BACKUP TARGET`: write a backup back out, bit-exact;
`nbdbackup restore --libvirt SET_OR_DOMAIN --to-dir DIR`: bring a libvirt domain back."""

from __future__ import annotations

from ._restore_live import DESCRIPTION as LIVE_DESCRIPTION
from ._restore_live import LIVE_ONLY
from ._restore_live import add_arguments as add_live_arguments
from ._restore_live import run as run_live

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
    "on its file, which is kept).\n"
    "\n"
    "--salvage restores everything that can be read from a damaged backup: each chunk that\n"
    "is missing or fails its check (hash, AEAD tag), and each map segment that is gone, is\n"
    "written as zeros and named (one line per merged range; --json: \"damaged\", a list of\n"
    "{offset, length}). It then exits 5, \"salvaged with N damaged ranges\", never plain\n"
    "success; with nothing damaged it exits 0 with an empty list. Without --salvage a\n"
    "restore stops at the first damage (exit 9) and names its range.\n"
    "\n"
    "--libvirt SET_OR_DOMAIN --to-dir DIR restores a whole libvirt domain from a set taken\n"
    "with `full|incremental --libvirt`. SET_OR_DOMAIN is a backup id (its set), a set id\n"
    "(`list` shows its first 8 digits; a unique prefix of 8 or more works), a domain name\n"
    "(its newest set) or a disk name (its latest backup's set). Every disk of the set is\n"
    "restored to DIR/<NAME>-<target>.<format> (qcow2 unless --format raw), the UEFI\n"
    "variables (when stored) to DIR/<NAME>_VARS.fd (mode 0600), and the domain XML,\n"
    "rewritten to use them, to DIR/<NAME>.xml. NAME is --name, else the domain's own name.\n"
    "Disks that were not backed up (CD-ROMs, read-only, shareable or excluded disks) keep\n"
    "their sources. --name gives the domain a new name, a new UUID and new MAC addresses,\n"
    "so it can run beside the original. --define defines it on --connect, --start also\n"
    "starts it. An existing domain of that name is replaced only with --force and only\n"
    "when it is shut off; a running one is never touched."
)
DESCRIPTION += LIVE_DESCRIPTION


def add_arguments(p) -> None:
    from ..backupargs import DEFAULT_CONNECTIONS, connections_type

    p.add_argument("backup", metavar="BACKUP", nargs="?", help="backup id, or disk name for its latest backup")
    p.add_argument("target", metavar="TARGET", nargs="?", help="file path, block device or NBD URI")
    p.add_argument("--format", choices=("raw", "qcow2"), default=None,
                   help="format of a file target (default raw; with --libvirt qcow2)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing file or block device (--libvirt: also replace a shut-off "
                        "domain's definition)")
    p.add_argument("--connections", type=connections_type, default=DEFAULT_CONNECTIONS, metavar="N",
                   help=f"parallel connections to an NBD target (default {DEFAULT_CONNECTIONS})")
    p.add_argument("--salvage", action="store_true",
                   help="restore what is readable, zeros where chunks or map segments are damaged; "
                        "name those ranges and exit 5")
    g = p.add_argument_group("a whole libvirt domain")
    g.add_argument("--libvirt", metavar="SET_OR_DOMAIN",
                   help="restore every disk of a --libvirt backup set and its domain definition")
    g.add_argument("--to-dir", metavar="DIR", help="directory for the restored disks, NVRAM and XML")
    g.add_argument("--name", metavar="NEW", help="a new domain name (with a new UUID and MAC addresses)")
    g.add_argument("--define", action="store_true", help="define the restored domain on --connect")
    g.add_argument("--start", action="store_true", help="define and start the restored domain")
    g.add_argument("--connect", metavar="URI", default="qemu:///system",
                   help="libvirt connection URI for --define/--start (default qemu:///system)")
    add_live_arguments(p.add_argument_group("instant recovery (--live)"))


_VM_ONLY = ("to_dir", "name", "define", "start")


def run(args) -> int:
    from ...engine.restore import restore
    from ...errors import UsageError
    from .. import output
    from ..repoargs import open_repo

    if args.live:
        return run_live(args)
    live_only = [f"--{o.replace('_', '-')}" for o in LIVE_ONLY if getattr(args, o)]
    if live_only:
        raise UsageError(f"{', '.join(live_only)} only go with --live")
    if args.libvirt is not None:
        return _run_vm(args)
    given = [f"--{o.replace('_', '-')}" for o in _VM_ONLY if getattr(args, o)]
    if given:
        raise UsageError(f"{', '.join(given)} only go with --libvirt SET_OR_DOMAIN")
    if args.backup is None or args.target is None:
        raise UsageError("restore needs BACKUP and TARGET (or --libvirt SET_OR_DOMAIN --to-dir DIR)",
                         hint="see `nbdbackup restore --help`")
    args.format = args.format or "raw"

    with open_repo(args) as repo:
        r = restore(repo, args.backup, args.target, fmt=args.format, force=args.force,
                    connections=args.connections, salvage=args.salvage,
                    progress=lambda total, desc: output.progress_bar(args, total, desc))
    if args.json:
        doc = {"backup": r.backup.to_json(), "target": r.target, "data_bytes": r.data_bytes,
               "zero_bytes": r.zero_bytes, "duration_s": round(r.duration_s, 3),
               "leftovers_removed": [{"path": p, "bytes": n} for p, n in r.leftovers_removed]}
        if args.salvage:
            doc["damaged"] = [{"offset": o, "length": n} for o, n in r.damaged]
        output.print_json(doc)
    else:
        hb = output.human_bytes
        rate = r.data_bytes / r.duration_s if r.duration_s else 0.0
        output.summary(args, f"restored {r.backup.id} ({r.backup.disk}, {hb(r.backup.size)}) to {r.target}: "
                             f"{hb(r.data_bytes)} data, {hb(r.zero_bytes)} zero, "
                             f"{r.duration_s:.1f}s ({hb(rate)}/s)")
    if args.salvage:
        return _salvaged(args, r.backup.id, r.damaged)
    return 0


def _salvaged(args, what: str, damaged: list[tuple[int, int]]) -> int:
    """restore --salvage's verdict: the damaged ranges named, exit 5 when there are any."""
    from ...errors import VerifyFailed

    if not args.json and not args.quiet:
        for o, n in damaged:
            print(f"DAMAGED bytes {o}-{o + n - 1} (offset {o}, length {n}): written as zeros")
    if not damaged:
        return 0
    raise VerifyFailed(f"{what}: salvaged with {len(damaged)} damaged range{'s' * (len(damaged) != 1)} "
                       f"({sum(n for _, n in damaged)} bytes written as zeros)",
                       hint="`nbdbackup verify` records the damage; the next backup of the same disk "
                            "heals the chunks it reads again")


def _run_vm(args) -> int:
    from ...engine.restore_vm import restore_vm
    from ...errors import UsageError
    from .. import output
    from ..repoargs import open_repo

    if args.backup is not None:
        raise UsageError(f"--libvirt takes no BACKUP or TARGET (got {args.backup!r})",
                         hint="restore --libvirt SET_OR_DOMAIN --to-dir DIR [--name NEW] [--define] [--start]")
    if not args.to_dir:
        raise UsageError("--libvirt needs --to-dir DIR: where the disks, NVRAM and XML go")
    with open_repo(args) as repo:
        r = restore_vm(repo, args.libvirt, args.to_dir, new_name=args.name, fmt=args.format or "qcow2",
                       force=args.force, define=args.define, start=args.start, connect_uri=args.connect,
                       connections=args.connections, salvage=args.salvage,
                       progress=lambda total, desc: output.progress_bar(args, total, desc))
    if args.json:
        output.print_json({
            "domain": r.domain, "source_domain": r.source_domain, "set_id": r.set_id, "uuid": r.uuid,
            "xml": r.xml_path, "nvram": r.nvram_path, "defined": r.defined, "started": r.started,
            "replaced": r.replaced, "checkpoints_dropped": r.checkpoints_dropped,
            "macs_removed": r.macs_removed, "kept_disks": r.kept,
            "duration_s": round(r.duration_s, 3),
            "disks": [{"target": d.target, "path": d.path, "backup": d.result.backup.to_json(),
                       "data_bytes": d.result.data_bytes, "zero_bytes": d.result.zero_bytes,
                       "duration_s": round(d.result.duration_s, 3),
                       "leftovers_removed": [{"path": p, "bytes": n} for p, n in d.result.leftovers_removed],
                       **({"damaged": [{"offset": o, "length": n} for o, n in d.result.damaged]}
                          if args.salvage else {})}
                      for d in r.disks]})
        return _vm_salvaged(args, r)
    hb = output.human_bytes
    for d in r.disks:
        b = d.result.backup
        output.summary(args, f"restored {b.id} ({b.disk}, {hb(b.size)}) to {d.path}: "
                             f"{hb(d.result.data_bytes)} data, {hb(d.result.zero_bytes)} zero, "
                             f"{d.result.duration_s:.1f}s")
    for k in r.kept:
        output.summary(args, f"not restored: {k}")
    state = "defined and started" if r.started else "defined" if r.defined else "not defined (--define)"
    extra = f", UEFI variables {r.nvram_path}" if r.nvram_path else ""
    renamed = f" (backed up as {r.source_domain}, new UUID, {r.macs_removed} MAC address(es) left to libvirt)" \
        if r.domain != r.source_domain else ""
    replaced = ", replacing the shut-off domain's definition" if r.replaced else ""
    if r.checkpoints_dropped:
        replaced += f" (and this repository's {len(r.checkpoints_dropped)} checkpoint(s): the next backup is a full)"
    output.summary(args, f"domain {r.domain}{renamed}: {state} on {args.connect}{replaced}; "
                         f"XML {r.xml_path}{extra}; {r.duration_s:.1f}s")
    return _vm_salvaged(args, r)


def _vm_salvaged(args, r) -> int:
    """--libvirt --salvage: every disk's damaged ranges named; exit 5 when any disk has some."""
    if not args.salvage:
        return 0
    from ...errors import VerifyFailed

    damaged = [(d, o, n) for d in r.disks for o, n in d.result.damaged]
    if not args.json and not args.quiet:
        for d, o, n in damaged:
            print(f"DAMAGED {d.target} ({d.path}) bytes {o}-{o + n - 1} (offset {o}, length {n}): "
                  "written as zeros")
    if not damaged:
        return 0
    plural = "s" * (len(damaged) != 1)
    raise VerifyFailed(f"domain {r.domain}: salvaged with {len(damaged)} damaged range{plural} in "
                       f"{len({d.target for d, _, _ in damaged})} disk(s)",
                       hint="`nbdbackup verify` records the damage; the next backup heals the chunks it reads again")
