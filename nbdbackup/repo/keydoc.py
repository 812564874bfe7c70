"""The wrapped key document: a master key wrapped under a passphrase, as JSON.

    {"format": 1, "cipher": "aes-256-gcm", "repo_id": HEX,
     "kdf": {"name": "scrypt", "n": N, "r": R, "p": P, "salt": B64},
     "created": UTC, "nonce": B64, "wrapped": B64}

wrapped = AES-256-GCM(KEK, nonce, master key material, AAD = format, cipher, repo_id, kdf),
KEK = scrypt(NFC(passphrase), salt, n, r, p). Where documents live and how a repository is
unlocked is repo/keys.py's business (docs/design.md "Keys and passphrases").
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import unicodedata
from dataclasses import dataclass

from ..errors import RepoDamaged, RepoFormatError, UsageError
from .codec import CIPHER
from .crypto import MASTER_KEY_SIZE, MasterKey

KEY_FORMAT = 1
# scrypt: memory = 128 * r * n bytes. 128 MiB by default (about 0.6 s on a 2026 server core);
# below 8 MiB a stolen key object would be too cheap to attack, above 4 GiB nobody can open it.
SCRYPT_R, SCRYPT_P = 8, 1
KDF_MEMORY_DEFAULT_MIB, KDF_MEMORY_MIN_MIB, KDF_MEMORY_MAX_MIB = 128, 8, 4096
_SALT_LEN, _NONCE_LEN = 16, 12
MAX_KEY_DOC = 64 * 1024


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
              and self.n >= 2 and not self.n & (self.n - 1) and 1 <= self.r <= 32 and 1 <= self.p <= 4
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
