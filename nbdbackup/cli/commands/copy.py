"""`nbdbackup copy --to DEST [BACKUP...|--disk NAME|--all]`: replicate backups into another repository."""

from __future__ import annotations

import argparse

from ..repoargs import add_dest_options

NAME = "copy"
HELP = "copy backups into another repository (a second site), sending only what it lacks"
DESCRIPTION = (
    "Copies backups from the repository (--repo) into the repository --to DEST (a\n"
    "directory or s3://BUCKET[/PREFIX]; its index from --dest-index-url or\n"
    "$NBDBACKUP_DEST_INDEX_URL, else the one it names). BACKUP is a backup id or a disk\n"
    "name (its latest backup); --disk NAME copies every backup of that disk, --all every\n"
    "backup. Members of a multi-disk set are copied together, as one set.\n"
    "A copy keeps the backup's id, disk, kind, created time, parent and set; it is a\n"
    "complete backup of its own in DEST even when its parent is not there. Only the\n"
    "chunks DEST lacks are sent: each backup is read against the newest backup of its disk\n"
    "that both repositories hold, so a nightly copy reads and sends about one\n"
    "incremental's changes. Every chunk is checked (hash, and authenticated when\n"
    "encrypted) as it is read; a damaged one stops that backup's copy (named with its disk\n"
    "byte range), the others go on, and the run exits 9. Backups DEST has already are\n"
    "skipped, so running it again copies nothing. DEST must have the same chunk size.\n"
    "Either side may be encrypted: DEST's key comes from --dest-key-file,\n"
    "--dest-passphrase-file, $NBDBACKUP_DEST_PASSPHRASE or $NBDBACKUP_DEST_PASSPHRASE_COMMAND,\n"
    "and chunks are re-encrypted under it (an encrypted source into a plaintext DEST warns).\n"
    "An interrupted copy leaves nothing half-copied listed in DEST; the next run goes on\n"
    "without sending again what arrived. Retention (forget, prune, gc) is per repository."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backups", nargs="*", metavar="BACKUP", help="backup id or disk name (its latest backup)")
    p.add_argument("--to", required=True, metavar="DEST", help="destination repository: a directory or "
                   "s3://BUCKET[/PREFIX]")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--disk", metavar="NAME", help="copy every backup of disk NAME")
    which.add_argument("--all", action="store_true", help="copy every backup")
    add_dest_options(p)     # --dest-index-url, --dest-s3-endpoint, the destination's key and passphrase


def run(args) -> int:
    from ...errors import LockedError, NbdBackupError, RepoDamaged, UsageError
    from ...repo.copy import check_compatible, copy_backups, is_encrypted, select_backups
    from ..output import human_bytes, print_json, progress_bar, summary
    from ..repoargs import open_dest_repo, open_repo

    if bool(args.backups) + bool(args.disk) + bool(args.all) != 1:
        raise UsageError("name what to copy: BACKUP..., --disk NAME or --all (one of them)")
    with open_repo(args) as src:
        infos = select_backups(src, args.backups, disk=args.disk, everything=args.all)
        with open_dest_repo(args) as dst:
            check_compatible(src, dst)
            if is_encrypted(src) and not is_encrypted(dst):
                from ..output import log
                log.warning("the source repository is encrypted and the destination %s is not: "
                            "the copies are stored unencrypted", dst.path)

            def done(item) -> None:
                if args.json or args.quiet:
                    return
                info = getattr(item, "info", item)
                if item is info:
                    print(f"skipped {info.id}  {info.disk}  (the destination has it)")
                else:
                    print(f"copied  {info.id}  {info.disk}  {human_bytes(item.bytes_sent)} sent")

            result = copy_backups(src, dst, infos, on_done=done,
                                  progress=lambda total, desc: progress_bar(args, total, desc))
    if args.json:
        print_json(result.to_json())
    summary(args, f"copied {len(result.copied)} backup(s), skipped {len(result.skipped)} (already there)"
                  + (f", FAILED {sum(len(f.ids) for f in result.failed)}" if result.failed else "")
                  + f"; {human_bytes(result.bytes_read)} read, {human_bytes(result.bytes_sent)} sent, "
                  f"{result.chunks_skipped} chunk(s) skipped (already in the destination); "
                  f"{result.duration_s:.1f} s")
    if result.failed:
        # damage (9) outranks a held lock (3): it needs a person, a lock only a later run
        codes = {int(f.error.exit_code) for f in result.failed}
        cls = RepoDamaged if 9 in codes else LockedError if 3 in codes else NbdBackupError
        raise cls(f"{sum(len(f.ids) for f in result.failed)} backup(s) not copied: "
                  + "; ".join(f"{', '.join(f.ids)}: {f.error}" for f in result.failed),
                  hint=next((f.error.hint for f in result.failed if f.error.hint), None))
    return 0
