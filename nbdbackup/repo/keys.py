"""An encrypted repository's master key: wrapped by a passphrase, stored, unlocked, re-wrapped.

The MasterKey (repo/crypto.py) is never stored in clear. It is wrapped with
AES-256-GCM under a key-encryption key (KEK) that scrypt derives from the
passphrase; the scrypt parameters and salt are recorded beside the wrapped key,
in one JSON document (format below, docs/design.md "Keys and passphrases").
The document lives either in the repository as a create-only object
`keys/<32 hex>.json` (any backend: directory or S3, so rebuild-index needs
nothing else), or only in a key file outside it (--key-file). config.json's
`encryption.key_check` proves at open that the unwrapped key is this
repository's: a wrong passphrase, or another repository's key, is KeyRefused
(exit 19) before anything is read.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, replace

from ..errors import KeyRefused, RepoDamaged, RepoFormatError, UsageError
from ..fsutil import fsync_path
from .codec import CIPHER, ID_HASH, encryption_config
from .config import ENCRYPTED_FORMAT
from .crypto import MasterKey
from .keydoc import MAX_KEY_DOC, KdfParams, doc_bytes, parse_doc, unwrap, wrap
from .passphrase import KeySource

__all__ = ["KeySource", "KdfParams", "UnlockedKey", "wrap", "unwrap", "unlock"]

KEYS_PREFIX = "keys/"
KEY_IN_REPOSITORY, KEY_IN_FILE = "repository", "key-file"


# -- where the key document lives ------------------------------------------------

def key_object_name() -> str:
    return f"{KEYS_PREFIX}{uuid.uuid4().hex}.json"


def put_key_object(backend, doc: dict) -> str:
    """Store *doc* as a new create-only key object; its name."""
    name = key_object_name()
    data = doc_bytes(doc)
    backend.put(name, [data])
    if backend.get(name) != data:       # before anyone relies on it (key passphrase deletes the old one next)
        raise RepoDamaged(f"the key object {name} just written reads back differently")
    return name


MAX_KEY_OBJECTS = 8      # tried per open, newest first: each costs one scrypt run


def key_objects(backend, where: str) -> list[tuple[str, dict | RepoDamaged]]:
    """(name, document, or the RepoDamaged saying why it is none) of the repository's key objects,
    the newest MAX_KEY_OBJECTS first (objects planted to make every open slow are not all tried);
    one that vanished between list and get (a `key passphrase` elsewhere replaced it) is skipped,
    and the listing repeated once."""
    for _attempt in range(2):
        names = [n for n in backend.list(KEYS_PREFIX) if n.endswith(".json")]
        out: list = []
        for name in names:
            try:
                data = backend.get(name, 0, MAX_KEY_DOC)
            except FileNotFoundError:
                continue
            try:
                out.append((name, parse_doc(data, f"{where}/{name}")))
            except RepoDamaged as e:     # one damaged object must not hide a good one
                out.append((name, e))
        if out or not names:
            break
    out.sort(key=lambda nd: str(nd[1].get("created", "")) if isinstance(nd[1], dict) else "", reverse=True)
    return out[:MAX_KEY_OBJECTS]


def read_key_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_DOC)
    except OSError as e:
        raise UsageError(f"cannot read the key file {path}: {e.strerror}") from None
    return parse_doc(data, f"key file {path}", error=UsageError)


def write_key_file(path: str, doc: dict, *, replace: bool = False) -> None:
    """*doc* into *path* (mode 0600, fsync'ed): create-only, or with *replace* atomically
    replacing the file (a temporary file beside it, renamed over it)."""
    path = os.path.abspath(path)
    target = f"{path}.{uuid.uuid4().hex[:8]}.tmp" if replace else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; refusing to overwrite a key file",
                         hint="choose another file name (key export --force replaces it)") from None
    except OSError as e:
        raise UsageError(f"cannot create the key file {path}: {e.strerror}") from None
    try:
        try:
            os.write(fd, doc_bytes(doc))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(target, path)
        fsync_path(os.path.dirname(path), directory=True)
    except BaseException:
        if replace or target == path:
            try:
                os.unlink(target)
            except OSError:
                pass
        raise


def check_key_file_creatable(path: str) -> None:
    """UsageError now, before a repository is made, if init could not create *path* later."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        raise UsageError(f"{path} exists; refusing to overwrite a key file", hint="choose another file name")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create the key file {path}: its directory is missing or not writable")


# -- config.json and unlocking -----------------------------------------------------

def encrypted_config(cfg, key: "UnlockedKey"):
    """*cfg* (a new RepoConfig) as an encrypted repository's, for *key* (new_key)."""
    where = KEY_IN_REPOSITORY if key.stored_in_repository else KEY_IN_FILE
    enc = {**encryption_config(key.master, cfg.repo_id), "key": where}
    return replace(cfg, format=ENCRYPTED_FORMAT, encryption=enc)


@dataclass(frozen=True)
class UnlockedKey:
    master: MasterKey
    origin: str         # the key object's name, or the key file's path
    doc: dict           # the (wrapped) document that opened: what `key export` writes
    in_file: bool       # origin is a key file
    given: bool = False     # the caller gave the key itself (library use): stored nowhere by us

    @property
    def stored_in_repository(self) -> bool:
        return not self.in_file and not self.given


def given_key(master: MasterKey) -> UnlockedKey:
    """A key the caller holds itself (Repository.init/open(master_key=...): tests, tools)."""
    return UnlockedKey(master, "the key given", {}, False, given=True)


def check_encryption(enc, where: str) -> str:
    if not isinstance(enc, dict) or not isinstance(enc.get("key_check"), str):
        raise RepoDamaged(f"{where}/config.json: its encryption entry is incomplete")
    if enc.get("cipher") != CIPHER or enc.get("id_hash") != ID_HASH:
        raise RepoFormatError(f"{where} is encrypted with {enc.get('cipher')!r}/{enc.get('id_hash')!r}, which "
                              "this tool does not know", hint="upgrade nbdbackup")
    if enc.get("key") not in (KEY_IN_REPOSITORY, KEY_IN_FILE):
        raise RepoDamaged(f"{where}/config.json: unknown key storage {enc.get('key')!r}")
    return enc["key_check"]


def refuse_downgrade(backend, where: str, *, key_given: str | None) -> None:
    """RepoDamaged when config.json says plaintext but the repository (or the caller) says
    otherwise. config.json is not authenticated: whoever may write the storage could strip its
    encryption entry, and the next backup would write plaintext records. Key objects under keys/,
    or a key the caller gave for this very repository, mean it is encrypted. Passphrases are not
    evidence (NBDBACKUP_PASSPHRASE may be set for a host's other repositories), nor is a key file
    of another repository. A repository whose key is kept only in a key file that nobody names
    cannot be told from a plaintext one by its storage alone (docs/design.md)."""
    if key_given:
        reason = key_given
    elif any(n.endswith(".json") for n in backend.list(KEYS_PREFIX)):
        reason = f"it holds key objects under {KEYS_PREFIX}"
    else:
        return
    raise RepoDamaged(f"config.json says {where} is not encrypted, but {reason}: config.json may have "
                      "been altered to make new backups plaintext; nothing was read or written",
                      hint="restore config.json from a copy (the key objects or key file still hold the key), "
                           "or open it without a key if it really is a plaintext repository")


def _names_this_repository(key_file: str | None, repo_id: str) -> str | None:
    """Why *key_file* says the repository *repo_id* is encrypted (it holds its key), else None."""
    if not key_file:
        return None
    try:
        doc = read_key_file(key_file)
    except (UsageError, RepoFormatError):     # missing, unreadable, not a key: no evidence either way
        return None
    if doc["repo_id"] != repo_id:
        return None
    return f"the key file {os.path.abspath(key_file)} holds its key"


def unlock_given(config, backend, master: MasterKey, where: str) -> UnlockedKey:
    """given_key(*master*) for Repository.open(master_key=...): refused on a plaintext config.json."""
    if not getattr(config, "encryption", None):
        refuse_downgrade(backend, where, key_given="a master key was given")
    return given_key(master)


def unlock(config, backend, source: KeySource, where: str) -> UnlockedKey | None:
    """The repository's master key, from *source* (None for a plaintext repository: nothing is
    asked, after refuse_downgrade). KeyRefused for a wrong passphrase or a key that is not this
    repository's."""
    enc = getattr(config, "encryption", None)
    if not enc:
        refuse_downgrade(backend, where, key_given=_names_this_repository(source.key_file, config.repo_id))
        return None
    check = check_encryption(enc, where)
    cached = source.cache.get(("key", config.repo_id, check))
    if cached is not None:
        return cached
    if source.key_file:
        path = os.path.abspath(source.key_file)
        doc = read_key_file(path)
        if doc["repo_id"] != config.repo_id:
            raise KeyRefused(f"key file {path} holds the key of another repository (id {doc['repo_id']}), "
                             f"not of {where} (id {config.repo_id})",
                             hint=f"pass the key file of this repository ({source.option_prefix}key-file)")
        docs, in_file = [(path, doc)], True
    elif enc["key"] == KEY_IN_FILE:
        raise UsageError(f"{source.label} {where} keeps its key outside the repository, in a key file",
                         hint=f"pass {source.option_prefix}key-file FILE (or set {source.env_prefix}KEY_FILE)")
    else:
        docs, in_file = key_objects(backend, where), False
        if not docs:
            raise RepoDamaged(f"{where} is encrypted but holds no key object under {KEYS_PREFIX}",
                              hint=f"pass an exported key with {source.option_prefix}key-file FILE")
    for attempt in range(3):         # three tries at a prompt, as sudo and ssh give
        if attempt:
            print("wrong passphrase, try again", file=sys.stderr)
        passphrase, typed = source.get_passphrase(where)
        damaged = []
        for origin, doc in docs:
            try:
                if isinstance(doc, RepoDamaged):
                    raise doc
                master = unwrap(doc, passphrase, f"{where}: {origin}")
            except RepoDamaged as e:
                damaged.append(e)
                continue
            if master is None:
                continue
            if not master.matches(config.repo_id, check):
                raise KeyRefused(f"the key in {origin} is not the key of {source.label} {where} "
                                 "(its key check in config.json does not match)")
            if typed:
                source.remember(passphrase)
            found = UnlockedKey(master, origin, doc, in_file)
            source.cache[("key", config.repo_id, check)] = found
            return found
        if len(damaged) == len(docs):
            raise damaged[0]
        if not typed:
            break
    raise KeyRefused(f"wrong passphrase for {source.label} {where}"
                     + (f" (key file {docs[0][0]})" if in_file else "")
                     + " (or its key object is damaged: a wrong passphrase and an altered key look the same)"
                     + (f"; {len(damaged)} damaged key object(s) skipped" if damaged else ""),
                     hint="check the passphrase (and the key file); nothing was read or changed")


def change_passphrase(backend, unlocked: UnlockedKey, new_passphrase: str, repo_id: str,
                      params: KdfParams | None = None) -> dict:
    """Wrap the same master key under *new_passphrase*; no record is rewritten. A key file is
    replaced atomically. In the repository the new key object is written (create-only, read
    back) BEFORE every older one is deleted: a crash in between leaves two objects, each opening
    with its own passphrase, and the next `key passphrase` leaves one again. The caller holds the
    `keys` lock, so two runs cannot delete each other's new object."""
    doc = wrap(unlocked.master, new_passphrase, repo_id, params)
    if unlocked.in_file:
        write_key_file(unlocked.origin, doc, replace=True)
        return {"key_file": unlocked.origin}
    old = [name for name in backend.list(KEYS_PREFIX) if name.endswith(".json")]
    new = put_key_object(backend, doc)
    for name in old:
        if name != new:
            backend.delete(name)
    return {"key_object": new, "removed": [n for n in old if n != new]}


def new_key(repo_id: str, where: str, source: KeySource, params: KdfParams | None = None) -> UnlockedKey:
    """A fresh master key for the repository being made at *where*, wrapped under the new passphrase
    (*source*'s, or typed twice). Stored by store_new_key: in *source*'s key file, else as a key object."""
    in_file = bool(source.key_file)
    if in_file:
        check_key_file_creatable(source.key_file)
    passphrase = source.new_passphrase(where)
    master = MasterKey.generate()
    doc = wrap(master, passphrase, repo_id, params)
    source.remember(passphrase)
    return UnlockedKey(master, os.path.abspath(source.key_file) if in_file else key_object_name(), doc, in_file)


def store_new_key(backend, key: UnlockedKey) -> None:
    """Store a new_key() where it belongs (create-only); init calls it before writing config.json."""
    if key.given:
        return
    if key.in_file:
        write_key_file(key.origin, key.doc)
    else:
        backend.put(key.origin, [doc_bytes(key.doc)])


def remove_new_key(key: UnlockedKey) -> None:
    """Undo store_new_key's key file after a failed init (a key object goes with the repository):
    only a file holding this very document, never one somebody else made meanwhile."""
    if key.in_file and not key.given:
        try:
            with open(key.origin, "rb") as f:
                ours = f.read(MAX_KEY_DOC) == doc_bytes(key.doc)
            if ours:
                os.unlink(key.origin)
        except OSError:
            pass
