"""`nbdbackup key export FILE` and `nbdbackup key passphrase`: an encrypted repository's key."""

from __future__ import annotations

import argparse

from .init import add_kdf_memory, warn_weak_kdf

NAME = "key"
HELP = "export an encrypted repository's key, or change its passphrase"
DESCRIPTION = (
    "key export FILE: writes the repository's master key, wrapped under its current\n"
    "passphrase, to FILE (mode 0600; an existing FILE only with --force). With FILE and\n"
    "the passphrase the repository opens even when its own key object is lost:\n"
    "`--key-file FILE` (or $NBDBACKUP_KEY_FILE) on any command.\n"
    "\n"
    "key passphrase: wraps the same master key under a new passphrase, from\n"
    "--new-passphrase-file, $NBDBACKUP_NEW_PASSPHRASE, or typed twice on the terminal.\n"
    "No pack or index data is rewritten. In the repository a new key object is\n"
    "written first and the old one deleted after it; with --key-file that file is\n"
    "replaced atomically (other exported copies keep the old passphrase).\n"
    "The master key stays the same: whoever kept an old passphrase and an old key\n"
    "document can still decrypt. To rotate the key, `copy` into a new encrypted\n"
    "repository.\n"
    "\n"
    "Both need the current passphrase, given as for every command (--passphrase-file,\n"
    "$NBDBACKUP_PASSPHRASE, $NBDBACKUP_PASSPHRASE_COMMAND, or a prompt).\n"
    "A lost passphrase (and key) means lost backups: nobody can recover them."
)
NEW_PASSPHRASE_ENV = "NBDBACKUP_NEW_PASSPHRASE"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="key_command", metavar="SUBCOMMAND", required=True)
    exp = sub.add_parser("export", help="write the (wrapped) key to FILE",
                         description="Writes the repository's master key, wrapped under its passphrase, to FILE.")
    exp.add_argument("file", metavar="FILE", help="where to write the key (created with mode 0600)")
    exp.add_argument("--force", action="store_true", help="replace FILE if it exists (atomically)")
    pw = sub.add_parser("passphrase", help="change the passphrase (no data rewritten)",
                        description="Wraps the master key under a new passphrase; no data is rewritten.")
    pw.add_argument("--new-passphrase-file", metavar="FILE", default=None,
                    help=f"read the new passphrase from FILE (else ${NEW_PASSPHRASE_ENV}, else typed twice)")
    add_kdf_memory(pw, default_help="that of the current key")
    p.subcommand_parsers = [exp, pw]     # main gives them the common options


def run(args) -> int:
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        if repo.unlocked is None:
            from ...errors import UsageError

            raise UsageError(f"{repo.path} is not encrypted: it has no key",
                             hint="`nbdbackup init --encryption` makes an encrypted repository")
        if args.key_command == "export":
            return _export(args, repo)
        return _passphrase(args, repo)


def _export(args, repo) -> int:
    import os

    from ...repo.keys import write_key_file
    from ..output import print_json, summary

    path = os.path.abspath(args.file)
    write_key_file(path, repo.unlocked.doc, replace=args.force and os.path.exists(path))
    if args.json:
        print_json({"key_file": path, "repo_id": repo.repo_id, "from": repo.unlocked.origin})
    else:
        summary(args, f"exported the key of {repo.path} to {path} (wrapped under the current passphrase); "
                      "keep it and the passphrase apart from the repository")
    return 0


def _passphrase(args, repo) -> int:
    from ...repo.keys import KdfParams, change_passphrase
    from ..output import print_json, summary
    from ..repoargs import key_source

    old = repo.unlocked
    if args.kdf_memory is not None:
        warn_weak_kdf(args.kdf_memory)
        params = KdfParams.for_memory(args.kdf_memory)
    else:
        kdf = old.doc["kdf"]
        params = KdfParams(kdf["n"], kdf["r"], kdf["p"])
    new = key_source(args).new_passphrase(repo.path, new_file=args.new_passphrase_file, env_name=NEW_PASSPHRASE_ENV)
    # one change at a time: two runs must not delete each other's new key object
    lk = repo.lock("keys", exclusive=True, purpose="changing the passphrase")
    try:
        done = change_passphrase(repo.backend, old, new, repo.repo_id, params)
    finally:
        lk.release()
    if args.json:
        print_json({"repo_id": repo.repo_id, **done, "kdf": {"name": "scrypt", "n": params.n, "r": params.r,
                                                             "p": params.p}})
    else:
        if "key_file" in done:
            where = f"the key file {done['key_file']}; the old passphrase no longer opens that file"
        else:
            where = f"the key object {done['key_object']}; the old passphrase no longer opens the repository"
        summary(args, f"changed the passphrase of {repo.path} ({where})")
    return 0
