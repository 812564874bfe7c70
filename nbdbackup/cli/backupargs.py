"""Options shared by `full` and `incremental`, and the choice of source.

Exactly one source option is given: --source URI (any NBD export),
--image PATH (an offline qcow2 the tool manages), --qmp SOCKET (a running
qemu) or --libvirt DOMAIN (a whole libvirt domain). Other sources add their
option here and a branch in build_source().
"""

from __future__ import annotations

import argparse

from . import numbers

DEFAULT_CONNECTIONS = 4
connections_type = numbers.integer(1, 64, noun="number of connections")
DEFAULT_CHECK_CLEAN = 0.5     # the same as BackupOptions.check_clean (not imported: --help stays light)


def add_backup_arguments(p: argparse.ArgumentParser, *, incremental: bool) -> None:
    src = p.add_argument_group("source (give exactly one)")
    src.add_argument("--source", metavar="URI",
                     help="any NBD export, e.g. nbd+unix:///vda?socket=/run/x.sock or nbd://host/export")
    src.add_argument("--image", metavar="PATH",
                     help="an offline qcow2 image: the tool runs qemu-nbd and keeps its own dirty bitmaps")
    src.add_argument("--format", choices=("qcow2", "raw"),
                     help="with --image: its format (default: probed by qemu-img; a file without a header it "
                          "recognises is backed up as raw, with a warning)")
    src.add_argument("--qmp", metavar="SOCKET",
                     help="a running qemu's QMP unix socket: live backup of the --node disks by fleecing")
    src.add_argument("--libvirt", metavar="DOMAIN",
                     help="a libvirt domain by name: all its disks as one set (running: libvirt's backup "
                          "job in pull mode with checkpoints; shut off: from its images)")
    p.add_argument("--disk", metavar="NAME", action="append",
                   help="disk name in the repository (required with --source; with --qmp one per --node, "
                        "default the NODE; default with --image: "
                        "the image's file name without extension; with --libvirt TARGET=NAME, repeatable, "
                        "default DOMAIN-TARGET)")
    p.add_argument("--connections", type=connections_type, default=DEFAULT_CONNECTIONS, metavar="N",
                   help=f"parallel NBD connections when the export allows it (default {DEFAULT_CONNECTIONS})")
    p.add_argument("--compress-all", action="store_true",
                   help="compress every chunk, even when that makes the backup CPU-bound (default: adaptive, "
                        "a chunk is stored raw when all cores are busy)")
    add_qmp_arguments(p)     # --- QMP live-VM options (owner: sources/qmp) ---
    add_libvirt_arguments(p)  # --- libvirt domain options (owner: sources/libvirt) ---
    if incremental:
        p.add_argument("--bitmap", metavar="BITMAP",
                       help="with --source: read changes from the export's qemu:dirty-bitmap:BITMAP")
        p.add_argument("--since", metavar="BACKUP",
                       help="with --source: the backup the bitmap's changes are relative to "
                            "(default: the disk's latest backup)")
        p.add_argument("--no-fallback", action="store_true",
                       help="fail (exit 13) instead of taking a full backup when the incremental "
                            "cannot be trusted (missing or inconsistent bitmap, parent gone, or the "
                            "image contradicts the bitmap)")
        p.add_argument("--check-clean", type=numbers.real(0, 100, noun="percentage", suffix="%"),
                       default=DEFAULT_CHECK_CLEAN, metavar="PERCENT",
                       help="read this share of the chunks the bitmap says are clean (at least one, at most "
                            f"1 GiB) and compare them with the parent backup (default {DEFAULT_CHECK_CLEAN:g}; "
                            "0 turns the sample off); a mismatch is handled like a missing bitmap")


def build_source(args, kind: str):
    """The Source object for the options given; UsageError on a bad combination."""
    from ..errors import UsageError

    chosen = [o for o in ("source", "image", "qmp", "libvirt") if getattr(args, o, None)]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --source URI, --image PATH, --qmp SOCKET or --libvirt DOMAIN")
    bitmap = getattr(args, "bitmap", None)
    since = getattr(args, "since", None)
    if args.format and not args.image:
        raise UsageError("--format is for --image")
    if args.libvirt:
        return build_libvirt_source(args, bitmap or since)
    used = [f"--{o.replace('_', '-')}" for o in LIBVIRT_ONLY if getattr(args, o, None)]
    if used:
        raise UsageError(f"{', '.join(used)}: only with --libvirt DOMAIN")
    if args.qmp:
        return build_qmp_source(args, bitmap or since)
    if args.node:
        raise UsageError("--node is for --qmp")
    if args.disk and len(args.disk) > 1:
        raise UsageError("--disk is given once (several only with --qmp, one per --node)")
    args.disk = args.disk[0] if args.disk else None
    if args.image:
        if bitmap or since:
            raise UsageError("--bitmap and --since are for --source; with --image the tool "
                             "tracks its own bitmaps and parents")
        from ..sources.image import ImageSource

        return ImageSource(args.image, args.disk, connections=args.connections, fmt=args.format)
    if not args.disk:
        raise UsageError("--disk NAME is required with --source")
    from ..nbd.uri import parse_uri
    from ..sources.nbd_uri import NbdUriSource

    parse_uri(args.source)          # UsageError on a malformed URI, before anything starts
    return NbdUriSource(args.source, args.disk, bitmap=bitmap, since=since)


# --- QMP live-VM options (owner: sources/qmp; keep this block together) ------

granularity_type = numbers.size(512, 2 ** 31, power_of_two=True, noun="bitmap granularity")


def add_qmp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live VM through QMP (with --qmp)")
    g.add_argument("--node", metavar="NODE", action="append",
                   help="block node name, drive id or device id to back up; repeat for one "
                        "consistent point in time over several disks")
    g.add_argument("--scratch-dir", metavar="DIR",
                   help="where the temporary fleecing overlays (--qmp) or libvirt's scratch files "
                        "(--libvirt; qemu's user must be able to write there) go (default: a new private "
                        "directory); needs room for what the guest rewrites during the backup")
    g.add_argument("--nbd-server", metavar="URI",
                   help="qemu already runs an NBD server (nbd-server-start was done by someone else): "
                        "its address, e.g. nbd+unix:///?socket=PATH or nbd://HOST:PORT")
    g.add_argument("--bitmap-granularity", type=granularity_type, default=64 * 1024, metavar="SIZE",
                   help="granularity of the new dirty bitmap (default 64K)")
    g.add_argument("--qga", metavar="SOCKET",
                   help="qemu guest agent socket: freeze the guest's file systems around the snapshot")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where runs record what they create, for cleanup after a crash "
                        "(default $NBDBACKUP_STATE_DIR or ~/.local/state/nbdbackup)")


def build_qmp_source(args, bitmap_or_since):
    from ..errors import UsageError
    from ..sources.qmp import QmpSource

    if bitmap_or_since:
        raise UsageError("--bitmap and --since are for --source; with --qmp the tool tracks its own "
                         "bitmaps and parents")
    if not args.node:
        raise UsageError("--qmp needs at least one --node NODE")
    return QmpSource(args.qmp, args.node, args.disk, scratch_dir=args.scratch_dir,
                     nbd_server=args.nbd_server, granularity=args.bitmap_granularity,
                     qga=args.qga, state_dir=args.state_dir)

# --- end of QMP options --------------------------------------------------------


# --- libvirt domain options (owner: sources/libvirt; keep this block together) ------

LIBVIRT_ONLY = ("connect", "exclude_disk", "quiesce")


def add_libvirt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("libvirt domain (with --libvirt)")
    g.add_argument("--connect", metavar="URI",
                   help="libvirt connection URI, as virsh -c (default qemu:///system)")
    g.add_argument("--exclude-disk", metavar="TARGET", action="append",
                   help="do not back up this disk (its target, e.g. vdb); repeatable. CD-ROMs, read-only "
                        "and shareable disks are always skipped (and named)")
    g.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's file systems through the guest agent (libvirt's fsFreeze) "
                        "for the moment the point in time is taken; always thawed afterwards")


def build_libvirt_source(args, bitmap_or_since):
    from ..errors import UsageError
    from ..sources.libvirt import LibvirtSource
    from ..sources.libvirt_domain import DEFAULT_URI

    if bitmap_or_since:
        raise UsageError("--bitmap and --since are for --source; with --libvirt the tool tracks its own "
                         "checkpoints and parents")
    for opt in ("node", "nbd_server", "qga"):
        if getattr(args, opt, None):
            raise UsageError(f"--{opt.replace('_', '-')} is for --qmp"
                             + ("; with --libvirt use --quiesce (libvirt's own guest agent)" if opt == "qga" else ""))
    names = {}
    for spec in args.disk or ():
        target, sep, name = spec.partition("=")
        if not sep or not target or not name:
            raise UsageError(f"--disk {spec!r}: with --libvirt give TARGET=NAME (e.g. --disk vda=web1-root)")
        if target in names:
            raise UsageError(f"--disk names disk {target} twice")
        names[target] = name
    return LibvirtSource(args.libvirt, args.connect or DEFAULT_URI, exclude=args.exclude_disk or (),
                         names=names, quiesce=args.quiesce, scratch_dir=args.scratch_dir,
                         connections=args.connections)

# --- end of libvirt options -------------------------------------------------------


def run_backup_command(args, kind: str) -> int:
    """Shared body of `full` and `incremental`."""
    from ..engine.backup import BackupOptions, run_backup
    from . import output
    from .repoargs import open_repo

    source = build_source(args, kind)
    with open_repo(args) as repo:
        opts = BackupOptions(connections=args.connections, adaptive=not args.compress_all,
                             no_fallback=getattr(args, "no_fallback", False),
                             check_clean=getattr(args, "check_clean", DEFAULT_CHECK_CLEAN),
                             progress=lambda total, desc: output.progress_bar(args, total, desc))
        results = run_backup(repo, source, kind, opts)
    infos = [result_json(r) for r in results]
    if args.json:
        output.print_json(infos[0] if len(infos) == 1 else infos)
    else:
        for r in results:
            output.summary(args, summary_line(r))
    return 0


def result_json(result) -> dict:
    """The backup's record, plus the incremental's chain check when one ran and the chunks
    adaptive compression left raw (with why) when there were any."""
    d = result.info.to_json()
    if getattr(result.stats, "uncompressed_chunks", 0):
        d["uncompressed_chunks"] = result.stats.uncompressed_chunks
        d["uncompressed_reason"] = result.stats.raw_reason
    check = getattr(result.stats, "chain_check", None)
    if check is not None:
        d["chain_check"] = check.to_json()
    return d


def chain_check_text(check) -> str:
    """The summary's account of the chain check ('' when none ran)."""
    from .output import human_bytes as hb

    if check is None:
        return ""
    if check.broken:
        return "; chain check: MISMATCH (see the warning), took a full backup"
    text = (f"; chain check: {check.sampled_chunks} of {check.clean_chunks} clean chunks sampled "
            f"({hb(check.sampled_bytes)}")
    text += f", {check.percent:g} %)" if check.percent else ", sample off)"
    if check.confirmed_chunks:
        text += f", {check.confirmed_chunks} allocated where the parent had zeros read"
    return text + ", all match the parent"


def summary_line(result) -> str:
    """Bytes read, new bytes stored, compression and dedup ratios, time."""
    from .output import human_bytes as hb

    info, st = result.info, result.stats
    # compression: non-zero data read -> compressed; dedup: compressed -> new bytes stored
    # (stored includes the backup's map records, so tiny backups show a low dedup ratio)
    comp = f"{st.data_bytes / st.packed_bytes:.2f}x" if st.packed_bytes else "-"
    if getattr(st, "uncompressed_chunks", 0):   # adaptive compression skipped these
        comp += f" ({st.uncompressed_chunks} chunks not compressed: {st.raw_reason or 'CPU busy'})"
    dedup = f"{st.packed_bytes / info.stored_bytes:.2f}x" if info.stored_bytes and st.packed_bytes else "-"
    rate = info.read_bytes / info.duration_s if info.duration_s else 0.0
    return (f"{info.kind} backup {info.id} of {info.disk} ({hb(info.size)}): read {hb(info.read_bytes)}, "
            f"stored {hb(info.stored_bytes)} new (incl. map); compression {comp}, dedup {dedup}; "
            f"{info.duration_s:.1f}s ({hb(rate)}/s)" + chain_check_text(getattr(st, "chain_check", None)))
