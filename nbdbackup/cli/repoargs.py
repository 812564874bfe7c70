"""Opening the repository named on the command line (--repo / $NBDBACKUP_REPO)."""

from __future__ import annotations

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


def open_repo(args, *, check: bool = True):
    """Repository.open() with --repo, --index-url and --lock-wait applied; use as a context manager."""
    from ..repo import Repository

    return Repository.open(repo_path(args), index_url=getattr(args, "index_url", None),
                           lock_wait=float(getattr(args, "lock_wait", 0.0) or 0.0), check=check,
                           **storage_options(args))
