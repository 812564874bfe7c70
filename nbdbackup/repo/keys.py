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

import base64
import binascii
import json
import os
import secrets
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, replace

from ..errors import KeyRefused, RepoDamaged, RepoFormatError, UsageError
from ..fsutil import fsync_path
from .codec import CIPHER, ID_HASH, encryption_config
from .config import ENCRYPTED_FORMAT
from .crypto import MASTER_KEY_SIZE, MasterKey
from .passphrase import KeySource

__all__ = ["KeySource", "KdfParams", "UnlockedKey", "wrap", "unwrap", "unlock"]

KEY_FORMAT = 1
KEYS_PREFIX = "keys/"
KEY_IN_REPOSITORY, KEY_IN_FILE = "repository", "key-file"
# scrypt: memory = 128 * r * n bytes. 128 MiB by default (about 0.6 s on a 2026 server core);
# below 8 MiB a stolen key object would be too cheap to attack, above 4 GiB nobody can open it.
SCRYPT_R, SCRYPT_P = 8, 1
KDF_MEMORY_DEFAULT_MIB, KDF_MEMORY_MIN_MIB, KDF_MEMORY_MAX_MIB = 128, 8, 4096
_SALT_LEN, _NONCE_LEN = 16, 12
_MAX_KEY_DOC = 64 * 1024


@dataclass(frozen=True)
class KdfParams:
    """scrypt's cost: n (a power of two), r, p; memory_mib = 128 * r * n / MiB."""

    n: int
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def for_memory(cls, mib: int | None = None) -> "KdfParams":
        mib = KDF_MEMORY_DEFAULT_MIB if mib is None else mib
        if not isinstance(mib, int) or mib & (mib - 1) or not KDF_MEMORY_MIN_MIB <= mib <= KDF_MEMORY_MAX_MIB:
            raise UsageError(f"invalid scrypt memory {mib!r} MiB: a power of two from {KDF_MEMORY_MIN_MIB} "
                             f"to {KDF_MEMORY_MAX_MIB}")
        return cls(n=mib * (1 << 20) // (128 * SCRYPT_R))

    @property
    def memory_mib(self) -> int:
        return 128 * self.r * self.n >> 20

    def checked(self, where: str) -> "KdfParams":
        """These parameters, if a stored document may carry them (an edited object asking for
        terabytes of memory is damage, not a reason to exhaust the host)."""
        ok = (all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.r, self.p))
              and self.n >= 2 and not self.n & (self.n - 1) and 1 <= self.r <= 64 and 1 <= self.p <= 16
              and 128 * self.r * self.n <= KDF_MEMORY_MAX_MIB << 20)
        if not ok:
            raise RepoDamaged(f"{where}: scrypt parameters out of range (n={self.n!r}, r={self.r!r}, p={self.p!r})")
        return self


def _kek(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    # NFC: the same passphrase typed on terminals or in files that compose accents differently
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=params.n, r=params.r, p=params.p).derive(secret)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _aad(doc: dict) -> bytes:
    """What the wrapping authenticates besides the key: format, cipher, repository and KDF (salt
    included), so no field of the document can be swapped or edited unnoticed."""
    bound = {k: doc[k] for k in ("format", "cipher", "repo_id", "kdf")}
    return b"nbdbackup wrapped master key\0" + json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()


def wrap(master: MasterKey, passphrase: str, repo_id: str, params: KdfParams | None = None) -> dict:
    """The key document of *master*, wrapped under *passphrase* for repository *repo_id*."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    params = params or KdfParams.for_memory()
    salt, nonce = secrets.token_bytes(_SALT_LEN), secrets.token_bytes(_NONCE_LEN)
    doc = {"format": KEY_FORMAT, "cipher": CIPHER, "repo_id": repo_id,
           "kdf": {"name": "scrypt", "n": params.n, "r": params.r, "p": params.p, "salt": _b64(salt)},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    wrapped = AESGCM(_kek(passphrase, salt, params)).encrypt(nonce, master.material, _aad(doc))
    return {**doc, "nonce": _b64(nonce), "wrapped": _b64(wrapped)}


def unwrap(doc: dict, passphrase: str, where: str = "key") -> MasterKey | None:
    """The master key in *doc* (checked by parse_doc), or None when *passphrase* does not open it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kdf = doc["kdf"]
    params = KdfParams(kdf["n"], kdf["r"], kdf["p"]).checked(where)
    try:
        salt, nonce, wrapped = (base64.b64decode(x, validate=True) for x in (kdf["salt"], doc["nonce"], doc["wrapped"]))
    except (binascii.Error, ValueError):
        raise RepoDamaged(f"{where}: a field is not base64") from None
    if len(nonce) != _NONCE_LEN or len(wrapped) != MASTER_KEY_SIZE + 16:
        raise RepoDamaged(f"{where}: nonce or wrapped key of the wrong length")
    try:
        return MasterKey(AESGCM(_kek(passphrase, salt, params)).decrypt(nonce, wrapped, _aad(doc)))
    except InvalidTag:
        return None


def doc_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def parse_doc(data: bytes, where: str, *, error=RepoDamaged) -> dict:
    """The key document in *data* (from *where*); *error* (RepoDamaged for a key object,
    UsageError for a file the user named) when it is none."""
    try:
        doc = json.loads(data)
        fmt = doc["format"]
    except (ValueError, KeyError, TypeError):
        raise error(f"{where} is not an nbdbackup key (no readable key document)") from None
    if not isinstance(fmt, int) or fmt > KEY_FORMAT:
        raise RepoFormatError(f"{where} has key format {fmt!r}, newer than this tool understands",
                              hint="upgrade nbdbackup")
    kdf = doc.get("kdf")
    if (doc.get("cipher") != CIPHER or not isinstance(kdf, dict) or kdf.get("name") != "scrypt"
            or not all(isinstance(doc.get(k), str) for k in ("repo_id", "nonce", "wrapped"))
            or not all(k in kdf for k in ("n", "r", "p", "salt"))):
        raise error(f"{where} is not a complete nbdbackup key document")
    return doc


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


def key_objects(backend, where: str) -> list[tuple[str, dict]]:
    """(name, document) of the repository's key objects; one that vanished between list and get
    (a `key passphrase` elsewhere replaced it) is skipped, and the listing repeated once."""
    for _attempt in range(2):
        names = [n for n in backend.list(KEYS_PREFIX) if n.endswith(".json")]
        out = []
        for name in names:
            try:
                data = backend.get(name, 0, _MAX_KEY_DOC)
            except FileNotFoundError:
                continue
            out.append((name, parse_doc(data, f"{where}/{name}")))
        if out or not names:
            return out
    return out


def read_key_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_DOC)
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


def unlock(config, backend, source: KeySource, where: str) -> UnlockedKey | None:
    """The repository's master key, from *source* (None for a plaintext repository: nothing is
    asked). KeyRefused for a wrong passphrase or a key that is not this repository's."""
    enc = getattr(config, "encryption", None)
    if not enc:
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
        for origin, doc in docs:
            master = unwrap(doc, passphrase, f"{where}: {origin}")
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
        if not typed:
            break
    raise KeyRefused(f"wrong passphrase for {source.label} {where}"
                     + (f" (key file {docs[0][0]})" if in_file else ""),
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
                ours = f.read(_MAX_KEY_DOC) == doc_bytes(key.doc)
            if ours:
                os.unlink(key.origin)
        except OSError:
            pass
