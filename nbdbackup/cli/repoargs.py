"""Opening the repository named on the command line (--repo / $NBDBACKUP_REPO), and copy's
destination (--to, --dest-*), with the key sources their options and environment name."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError


def repo_path(args) -> str:
    """The repository path from --repo or $NBDBACKUP_REPO (UsageError when neither is given)."""
    path = getattr(args, "repo", None)
    if not path:
        raise UsageError("no repository: pass --repo PATH (or s3://BUCKET[/PREFIX]) or set NBDBACKUP_REPO")
    return path


def storage_options(args) -> dict:
    """Repository.open()/init() keywords for where the repository's objects live."""
    return {"s3_endpoint": getattr(args, "s3_endpoint", None) or None}


def key_source(args, dest: bool = False):
    """Where this run gets the key of its repository (dest=True: of copy's destination):
    --[dest-]key-file / $NBDBACKUP_[DEST_]KEY_FILE, --[dest-]passphrase-file,
    $NBDBACKUP_[DEST_]PASSPHRASE, $NBDBACKUP_[DEST_]PASSPHRASE_COMMAND, else a prompt on a terminal.
    One per run and side, so a command that opens its repository twice asks once."""
    from ..repo.keys import KeySource

    made = vars(args).setdefault("key_sources_made", {})
    if dest not in made:
        pre = "dest_" if dest else ""
        made[dest] = KeySource.from_env(dest=dest, key_file=getattr(args, pre + "key_file", None),
                                        passphrase_file=getattr(args, pre + "passphrase_file", None))
    return made[dest]


def open_repo(args, *, check: bool = True):
    """Repository.open() with --repo, --index-url and --lock-wait applied; use as a context manager."""
    from ..repo import Repository

    return Repository.open(repo_path(args), index_url=getattr(args, "index_url", None),
                           lock_wait=float(getattr(args, "lock_wait", 0.0) or 0.0), check=check,
                           key_source=key_source(args), **storage_options(args))


def add_dest_options(p: argparse.ArgumentParser) -> None:
    """The destination's options of a command that writes into a second repository (copy)."""
    g = p.add_argument_group("destination options")
    g.add_argument("--dest-index-url", metavar="URL", default=None,
                   help="SQLAlchemy URL of the destination's index (default: $NBDBACKUP_DEST_INDEX_URL, else "
                        "the URL the destination names, else its SQLite file)")
    g.add_argument("--dest-s3-endpoint", metavar="URL", default=None,
                   help="S3 endpoint of the destination (default: $AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--dest-key-file", metavar="FILE", default=None,
                   help="the destination's key file, when its key is kept outside it "
                        "(default: $NBDBACKUP_DEST_KEY_FILE)")
    g.add_argument("--dest-passphrase-file", metavar="FILE", default=None,
                   help="read the destination's passphrase from FILE (else $NBDBACKUP_DEST_PASSPHRASE, "
                        "$NBDBACKUP_DEST_PASSPHRASE_COMMAND, or a prompt on a terminal)")


def open_dest_repo(args, path: str | None = None, *, lock_wait: float | None = None):
    """Repository.open() of the destination *path* (default: --to) with its own index URL,
    endpoint and key source (add_dest_options); use as a context manager."""
    from ..repo import Repository

    path = path or getattr(args, "to", None)
    if not path:
        raise UsageError("no destination repository: pass --to PATH (or s3://BUCKET[/PREFIX])")
    wait = float(getattr(args, "lock_wait", 0.0) or 0.0) if lock_wait is None else lock_wait
    return Repository.open(path, index_url=getattr(args, "dest_index_url", None)
                           or os.environ.get("NBDBACKUP_DEST_INDEX_URL") or None,
                           lock_wait=wait, key_source=key_source(args, dest=True),
                           s3_endpoint=getattr(args, "dest_s3_endpoint", None) or None)
