"""MasterKey: the secret of an encrypted repository, and the keys derived from it.

The master key is 64 random bytes. Everything the repository uses is derived
from it with blake3's key derivation (a context string per purpose), so the
record cipher key and the chunk id key are independent: knowing chunk ids
(they are in the index) tells nothing about the cipher key.
How the master key is stored and unlocked is repo/keys.py's business.
"""

from __future__ import annotations

import hmac
import secrets

import blake3

MASTER_KEY_SIZE = 64
_RECORD_CONTEXT = "nbdbackup 2026-12 record encryption"
_ID_CONTEXT = "nbdbackup 2026-12 chunk id"
_CHECK_CONTEXT = "nbdbackup 2026-12 key check"


def _derive(context: str, material: bytes) -> bytes:
    return blake3.blake3(material, derive_key_context=context).digest()


class MasterKey:
    """The repository's secret. Never printed: repr() and str() say nothing about it."""

    __slots__ = ("material", "record_key", "id_key", "_check_key")

    def __init__(self, material: bytes):
        material = bytes(material)
        if len(material) != MASTER_KEY_SIZE:
            raise ValueError(f"a master key is {MASTER_KEY_SIZE} bytes, not {len(material)}")
        self.material = material
        self.record_key = _derive(_RECORD_CONTEXT, material)     # AES-256-GCM key of every record
        self.id_key = _derive(_ID_CONTEXT, material)             # blake3 key of chunk/segment/manifest ids
        self._check_key = _derive(_CHECK_CONTEXT, material)

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(secrets.token_bytes(MASTER_KEY_SIZE))

    def key_check(self, repo_id: str) -> str:
        """Hex of a keyed hash binding this key to *repo_id*: config.json stores it, so opening
        a repository with another repository's key (or a wrong passphrase) is refused at once
        instead of every record failing its authentication later."""
        return blake3.blake3(b"key check of repository " + repo_id.encode(), key=self._check_key).hexdigest()

    def matches(self, repo_id: str, check: str) -> bool:
        return hmac.compare_digest(self.key_check(repo_id), str(check))

    def __repr__(self) -> str:
        return "MasterKey(<secret>)"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, MasterKey) and hmac.compare_digest(self.material, other.material)

    __hash__ = None     # type: ignore[assignment]   # a secret is no dict key
