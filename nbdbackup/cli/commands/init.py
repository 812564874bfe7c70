"""`nbdbackup init`: create a repository and its index."""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "init"
HELP = "create a new repository (directory, config.json and index)"
DESCRIPTION = (
    "Creates the repository at --repo (or $NBDBACKUP_REPO): config.json, packs/,\n"
    "locks/, tmp/ and the index at its newest schema revision (SQLite file inside\n"
    "the repository, or the database at --index-url). Refuses a non-empty directory.\n"
    "With --repo s3://BUCKET[/PREFIX] the objects go to an existing bucket and the\n"
    "index must be PostgreSQL (--index-url postgresql+psycopg://USER@HOST/DB), shared\n"
    "by every host that backs up into the repository. The index URL is stored in the\n"
    "repository without its password (give it with PGPASSWORD, ~/.pgpass or\n"
    "$NBDBACKUP_INDEX_URL on later runs).\n"
    "Chunk size and compression level are fixed for the repository's life.\n"
    "\n"
    "--encryption makes an encrypted repository (AES-256-GCM records, keyed chunk ids):\n"
    "a random master key, wrapped under a passphrase (scrypt), stored in the repository\n"
    "(keys/), or with --key-file FILE only in FILE (mode 0600, created). The passphrase\n"
    "comes from --passphrase-file, $NBDBACKUP_PASSPHRASE or $NBDBACKUP_PASSPHRASE_COMMAND,\n"
    "else it is asked twice on the terminal. Every later command needs it (and the key\n"
    "file, if used). A lost passphrase (or key file) means lost backups: keep a copy\n"
    "apart from the repository (`nbdbackup key export FILE`)."
)


def _config():
    from ...repo import config  # when a value is checked: the repo package is heavy for --help

    return config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", metavar="SIZE", default=None,
                   type=numbers.size(lambda: _config().MIN_CHUNK, lambda: _config().MAX_CHUNK, power_of_two=True,
                                     noun="chunk size"),
                   help="chunk size, a power of two from 64K to 16M, e.g. 1M, 256K, 1048576 (default 256K)")
    p.add_argument("--compression-level", metavar="N", default=None,
                   type=numbers.integer(lambda: _config().MIN_LEVEL, lambda: _config().MAX_LEVEL, noun="zstd level"),
                   help="zstd level; negative levels are faster (default -3)")
    p.add_argument("--encryption", action="store_true",
                   help="encrypt the repository (default: plaintext); see above for the passphrase")
    add_kdf_memory(p)


def add_kdf_memory(p: argparse.ArgumentParser, default_help: str = "128") -> None:
    """--kdf-memory MIB (init, key passphrase)."""
    p.add_argument("--kdf-memory", metavar="MIB", default=None,
                   type=numbers.NumberType("integer", 8, 4096, power_of_two=True, unit="MiB",
                                           noun="scrypt memory (MiB)"),
                   help=f"memory scrypt needs to unlock the key, a power of two from 8 to 4096 MiB "
                        f"(default {default_help}); more is slower to guess, each open costs it")


KDF_WARN_BELOW_MIB = 64


def warn_weak_kdf(mib: int | None) -> None:
    """A key wrapped with little scrypt memory is cheap to guess: fine for tests, said out loud."""
    if mib is not None and mib < KDF_WARN_BELOW_MIB:
        import logging

        logging.getLogger("nbdbackup").warning(
            "--kdf-memory %d: a stolen key object is cheap to attack with less than %d MiB; use it for "
            "tests or very small machines only", mib, KDF_WARN_BELOW_MIB)


def run(args) -> int:
    from ...repo import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Repository
    from ...repo.index import shown_url
    from ...repo.keys import KdfParams
    from ..output import human_bytes, print_json, summary
    from ..repoargs import key_source, repo_path, storage_options

    path = repo_path(args)
    cs = args.chunk_size if args.chunk_size is not None else DEFAULT_CHUNK_SIZE
    level = args.compression_level if args.compression_level is not None else DEFAULT_LEVEL
    source = key_source(args)
    if not args.encryption and (args.key_file or args.kdf_memory):
        from ...errors import UsageError

        raise UsageError("--key-file and --kdf-memory are for an encrypted repository", hint="add --encryption")
    warn_weak_kdf(args.kdf_memory)
    with Repository.init(path, chunk_size=cs, index_url=args.index_url, compression_level=level,
                         encryption=args.encryption, key_source=source,
                         kdf=KdfParams.for_memory(args.kdf_memory), **storage_options(args)) as repo:
        out = {"path": repo.path, "repo_id": repo.repo_id, "chunk_size": repo.chunk_size,
               "compression_level": repo.compression_level, "index_url": shown_url(repo.index_url),
               "encryption": _encryption_json(repo)}
    if args.json:
        print_json(out)
        return 0
    summary(args, f"initialised repository {out['path']} (id {out['repo_id']}, "
                  f"chunk size {human_bytes(cs)}, zstd level {level}"
                  + (f", encrypted, key {_where(out['encryption'])}" if out["encryption"] else "") + ")")
    if out["encryption"]:
        summary(args, "without the passphrase" + (" and the key file" if "key_file" in out["encryption"] else "")
                + " these backups cannot be read by anyone: keep them apart from the repository"
                + ("" if "key_file" in out["encryption"] else " (`nbdbackup key export FILE`)"))
    return 0


def _encryption_json(repo) -> dict | None:
    """Whether and how the repository is encrypted, and where its (wrapped) key is; never the key."""
    enc, key = repo.config.encryption, repo.unlocked
    if not enc:
        return None
    out = {"cipher": enc["cipher"], "id_hash": enc["id_hash"], "key": enc["key"],
           "kdf": {k: key.doc["kdf"][k] for k in ("name", "n", "r", "p")}}
    out["key_file" if key.in_file else "key_object"] = key.origin
    return out


def _where(enc: dict) -> str:
    return f"in the key file {enc['key_file']}" if "key_file" in enc else f"in the repository ({enc['key_object']})"
