"""`nbdbackup files BACKUP [PATH]`: list and extract files of a backup, without root."""

from __future__ import annotations

NAME = "files"
HELP = "list or extract files inside a backup (libguestfs; no root, nothing mounted)"
DESCRIPTION = """\
BACKUP is a backup id, or a disk name meaning that disk's latest backup.
Without PATH: the disk's partition table, partitions and filesystems.
With PATH: the directory (or file) at PATH, like `ls -l`.
--extract PATH... --to DIR copies files, symlinks and whole directories into DIR,
each under its base name, keeping mtimes and modes & 0755 (no setuid/setgid/sticky,
no group/other write); DIR itself is never chmodded. An existing name in DIR is
refused without --force, and replaced whole with it (never merged, never written
through). Symlinks are kept as symlinks, never followed, when their target stays
inside what is extracted; absolute or escaping ones, device nodes, fifos, and
anything below a symlink are skipped and reported; hard links become copies.
Guest names are printed escaped like `ls -b`; --json keeps them exact.
When the disk holds several filesystems, --fs DEVICE (as listed, e.g. /dev/sda1 or
/dev/VG/LV) picks one. The backup is served read-only by an NBD server inside this
command, on a private unix socket, and read by libguestfs's appliance (guestfish):
no root, no kernel nbd module, nothing mounted on the host. Starting the appliance
takes 20-30 s under TCG (LIBGUESTFS_BACKEND_SETTINGS=force_tcg) and a few seconds
with KVM; when KVM fails and no backend was chosen, TCG is tried once more."""


def add_arguments(p) -> None:
    p.add_argument("backup", metavar="BACKUP", help="backup id, or disk name for its latest backup")
    p.add_argument("path", metavar="PATH", nargs="?", help="a directory or file inside the filesystem")
    p.add_argument("--fs", metavar="DEVICE", help="the filesystem PATH is in, when the disk has several")
    p.add_argument("--extract", metavar="PATH", nargs="+", help="files or directories to copy out")
    p.add_argument("--to", metavar="DIR", help="where --extract puts them (an existing directory)")
    p.add_argument("--force", action="store_true", help="replace existing names in --to (whole, never via a link)")


_C_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\a": "\\a", "\b": "\\b",
              "\f": "\\f", "\v": "\\v", "\x1b": "\\e"}


def shown(text: str | None, encoding: str | None = None) -> str:
    """A guest-chosen string (name, link target, label) made safe for a terminal, like
    `ls -b`: C0/C1 controls, DEL, format characters (bidi overrides), bytes that are not
    UTF-8 (surrogateescape'd) and characters stdout cannot encode become backslash escapes
    (\\n, \\ooo per byte); a backslash is doubled, so the escaped form is unambiguous."""
    import sys
    import unicodedata

    if text is None:
        return ""
    encoding = encoding or getattr(sys.stdout, "encoding", None) or "ascii"
    out = []
    for ch in text:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
            continue
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:                  # a non-UTF-8 byte of the guest's name
            out.append(f"\\{cp - 0xDC00:03o}")
            continue
        printable = unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
        if printable:
            try:
                ch.encode(encoding)
            except (UnicodeEncodeError, LookupError):
                printable = False
        out.append(ch if printable else "".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass")))
    return "".join(out)


def _ls_line(e) -> str:
    import datetime

    mtime = datetime.datetime.fromtimestamp(e.mtime_ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    name = shown(e.name) + (f" -> {shown(e.target)}" if e.target is not None else "")
    return f"{e.mode_string} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {e.size:>12} {mtime} {name}"


def run(args) -> int:
    import sys

    from ...engine.guestfs import GuestfsSession, check_device, served_backup
    from ...errors import UsageError
    from .. import output
    from ..repoargs import open_repo

    if args.extract and args.path:
        raise UsageError("give PATH to list, or --extract PATH... --to DIR, not both")
    if args.extract and not args.to:
        raise UsageError("--extract needs --to DIR: where the files go")
    if args.to and not args.extract:
        raise UsageError("--to goes with --extract PATH...")
    if args.force and not args.extract:
        raise UsageError("--force goes with --extract")
    if args.fs:
        check_device(args.fs)

    def warn(msg: str) -> None:
        print(f"nbdbackup files: warning: {msg}", file=sys.stderr, flush=True)

    with open_repo(args) as repo, served_backup(repo, args.backup) as served, \
            GuestfsSession(warn=warn) as g:
        g.add_nbd(served.socket, served.export)
        g.launch()
        layout = g.layout()
        info = served.info
        head = {"backup": info.id, "disk": info.disk, "launch_s": round(g.launch_s or 0.0, 1),
                "tcg_fallback": g.tcg_fallback}
        if args.path is None and not args.extract:
            if args.fs:
                g.choose(layout, args.fs)       # a wrong --fs is an error here too
            if args.json:
                output.print_json({**head, **layout.to_json()})
                return 0
            hb = output.human_bytes
            print(f"backup {info.id} (disk {info.disk}, {hb(layout.size)}): "
                  f"partition table {layout.partition_table or 'none'}")
            for f in layout.filesystems:
                extra = "".join(f"  {k} {shown(v)}" for k, v in (("label", f.label), ("uuid", f.uuid)) if v)
                size = hb(f.size) if f.size is not None else "?"
                print(f"  {shown(f.device):<20} {shown(f.type):<10} {size:>10}{extra}")
            if not layout.filesystems:
                print("  (no filesystems found)")
            return 0
        fs = g.choose(layout, args.fs)
        g.mount(fs)
        if args.extract:
            done = g.extract(args.extract, args.to, force=args.force)
            if args.json:
                output.print_json({**head, "filesystem": fs.to_json(), "extracted": [
                    {"path": x.path, "to": x.to, "type": x.type, "files": x.files, "bytes": x.bytes,
                     "skipped": x.skipped} for x in done]})
            for x in done:
                for s in x.skipped:
                    warn(f"skipped {shown(s)}")
                output.summary(args, f"extracted {shown(x.path)} ({x.type}) to {shown(x.to)}: {x.files} file(s), "
                                     f"{output.human_bytes(x.bytes)}")
            return 0
        entries = g.listdir(args.path)
        if args.json:
            output.print_json({**head, "filesystem": fs.to_json(), "path": args.path,
                               "entries": [e.to_json() for e in entries]})
            return 0
        for e in entries:
            print(_ls_line(e))
    return 0
