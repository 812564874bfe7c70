"""RecordCodec: how a repository turns bytes into records and back.

PlainCodec is the plaintext format (repo/chunks.py, byte for byte what it has
always been). SealedCodec is an encrypted repository's (docs/design.md
"Encryption at rest"): ids are blake3 keyed with the master key's id key, and
every record is compressed (when that pays), THEN sealed with AES-256-GCM
under the record key and a fresh random 96-bit nonce:

    stored payload = nonce (12) || ciphertext || tag (16)

The AAD is the record's whole 48-byte header (type, compression, flags, raw
length, stored length, id), rebuilt by the reader from what it expects, so a
record copied intact to another pack still opens but any edit of the header
(or of the nonce, ciphertext or tag) fails authentication: a DecodeError,
never data. The header's flags say FLAG_SEALED; each codec refuses the
other's records as damage.

Every hash, prepare, blob encoding and decode in repo/ and engine/ goes
through a codec; prepare() runs in worker threads (blake3, zstd and AES-GCM
release the GIL).
"""

from __future__ import annotations

import os
from typing import Protocol

import blake3

from . import chunks
from .chunks import ZERO_REF, DecodeError, PreparedChunk
from .crypto import MasterKey
from .packs import COMP_NONE, FLAG_SEALED, REC_CHUNK, header_bytes

NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
CIPHER = "aes-256-gcm"
ID_HASH = "blake3-keyed"


class KeyRequired(ValueError):
    """An encrypted repository was opened without its key (keys turns this into the user's error)."""


class KeyMismatch(ValueError):
    """The key given is not this repository's (its key check differs)."""


class RecordCodec(Protocol):
    encrypted: bool
    flags: int          # the record header flags of the records it writes
    id_space: bytes     # equal for two codecs exactly when they give the same bytes the same id

    def hash(self, data) -> bytes: ...
    def ref(self, data) -> bytes: ...
    def prepare(self, data, level: int, compress: bool = True) -> PreparedChunk: ...
    def encode_blob(self, rtype: int, raw: bytes, level: int) -> tuple[bytes, int, bytes]: ...
    def decode(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
               flags: int | None = None) -> bytes: ...
    def decode_into(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
                    dest: memoryview, flags: int | None = None) -> memoryview: ...


def _is_zero(data, h: bytes, zero_hash) -> bool:
    n = len(data)
    return n > 0 and not (data[0] or data[n - 1]) and h == zero_hash(n)


class PlainCodec:
    """Plaintext records: blake3 ids, zstd when it pays (today's exact bytes)."""

    encrypted = False
    flags = 0
    id_space = b"blake3"

    def hash(self, data) -> bytes:
        return chunks.hash_bytes(data)

    def ref(self, data) -> bytes:
        h = chunks.hash_bytes(data)
        return ZERO_REF if _is_zero(data, h, chunks.zero_hash) else h

    def prepare(self, data, level: int, compress: bool = True) -> PreparedChunk:
        return chunks.prepare(data, level, compress)

    def encode_blob(self, rtype: int, raw: bytes, level: int) -> tuple[bytes, int, bytes]:
        return (chunks.hash_bytes(raw), *chunks.compress_blob(raw, level))

    def decode(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
               flags: int | None = None) -> bytes:
        _check_plain(flags)
        return chunks.decode(stored, compression, raw_len, expected)

    def decode_into(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
                    dest: memoryview, flags: int | None = None) -> memoryview:
        """decode() into *dest*; *stored* None: a raw payload read into *dest* already."""
        _check_plain(flags)
        return chunks.decode_into(stored, compression, raw_len, expected, dest)

    def __repr__(self) -> str:
        return "PlainCodec()"


PLAIN = PlainCodec()


def _check_plain(flags: int | None) -> None:
    if flags is not None and flags != 0:
        raise DecodeError("record is encrypted (sealed), but this repository is not: "
                          "not this repository's record" if flags == FLAG_SEALED
                          else f"unknown record flags {flags:#x}")


class SealedCodec:
    """Encrypted records: keyed blake3 ids, compress then AES-256-GCM (module docstring)."""

    encrypted = True
    flags = FLAG_SEALED

    def __init__(self, key: MasterKey):
        self._id_key = key.id_key
        # a fingerprint of the id key (not the key): copy compares it to know whether ids carry over
        self.id_space = blake3.blake3(b"id space", key=key.id_key).digest()
        # imported here: a plaintext repository's commands never load cryptography (~11 ms of a restore's start)
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._invalid_tag = InvalidTag
        self._aead = AESGCM(key.record_key)
        self._zero_hashes: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return "SealedCodec(<key>)"

    def hash(self, data) -> bytes:
        return blake3.blake3(data, key=self._id_key).digest()

    def _zero_hash(self, n: int) -> bytes:
        h = self._zero_hashes.get(n)
        if h is None:
            h = self.hash(chunks.zeros(n))
            if len(self._zero_hashes) < 8:
                self._zero_hashes[n] = h
        return h

    def ref(self, data) -> bytes:
        h = self.hash(data)
        return ZERO_REF if _is_zero(data, h, self._zero_hash) else h

    def seal(self, rtype: int, compression: int, raw_len: int, h: bytes, body) -> bytearray:
        """nonce || AES-256-GCM(body) || tag, the AAD being the header this record gets."""
        stored_len = len(body) + SEAL_OVERHEAD
        out = bytearray(stored_len)
        nonce = os.urandom(NONCE_SIZE)      # random 96-bit nonces: design.md gives the bound
        out[:NONCE_SIZE] = nonce
        aad = header_bytes(rtype, compression, FLAG_SEALED, raw_len, stored_len, h)
        # straight into the record's buffer: no copy of the ciphertext to prepend the nonce
        self._aead.encrypt_into(nonce, body, aad, memoryview(out)[NONCE_SIZE:])
        return out

    def prepare(self, data, level: int, compress: bool = True) -> PreparedChunk:
        n = len(data)
        h = self.hash(data)
        if _is_zero(data, h, self._zero_hash):
            return PreparedChunk(ZERO_REF, n, COMP_NONE, b"", FLAG_SEALED)
        comp, body = chunks.compress_chunk(data, level) if compress else (COMP_NONE, data)
        return PreparedChunk(h, n, comp, self.seal(REC_CHUNK, comp, n, h, body), FLAG_SEALED)

    def encode_blob(self, rtype: int, raw: bytes, level: int) -> tuple[bytes, int, bytes]:
        h = self.hash(raw)
        comp, body = chunks.compress_blob(raw, level)
        return h, comp, bytes(self.seal(rtype, comp, len(raw), h, body))

    def decode(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
               flags: int | None = None) -> bytes:
        body = self._open(rtype, compression, raw_len, expected, stored, flags)
        return chunks.decode(body, compression, raw_len, expected, self.hash)

    def decode_into(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored,
                    dest: memoryview, flags: int | None = None) -> memoryview:
        """decode() into *dest* (AES-GCM gives the body as fresh bytes; zstd's output goes to *dest*)."""
        if stored is None:
            raise DecodeError("encrypted record read as raw")
        body = self._open(rtype, compression, raw_len, expected, stored, flags)
        return chunks.decode_into(body, compression, raw_len, expected, dest, self.hash)

    def _open(self, rtype: int, compression: int, raw_len: int, expected: bytes, stored, flags: int | None):
        """The record's body (still compressed when it was), authenticated and decrypted."""
        if flags is not None and flags != FLAG_SEALED:
            raise DecodeError("record is not encrypted, but this repository is: not this repository's record"
                              if flags == 0 else f"unknown record flags {flags:#x}")
        n = len(stored)
        if n < SEAL_OVERHEAD:
            raise DecodeError(f"encrypted record too short ({n} bytes)")
        view = memoryview(stored)
        aad = header_bytes(rtype, compression, FLAG_SEALED, raw_len, n, expected)
        try:
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except self._invalid_tag:
            raise DecodeError("authentication failed: the record or its header was altered "
                              "(or it was written with another key)") from None


def codec_for(config, key: MasterKey | None) -> RecordCodec:
    """The codec of a repository with *config* (a RepoConfig): PlainCodec when it is not
    encrypted; SealedCodec(key) when it is (KeyRequired without a key, KeyMismatch when the
    key's check differs from config.json's)."""
    enc = config.encryption
    if enc is None:
        return PLAIN
    if not isinstance(enc, dict) or enc.get("cipher") != CIPHER or enc.get("id_hash", ID_HASH) != ID_HASH:
        raise ValueError("config.json names an encryption this version does not know: "
                         f"cipher {enc.get('cipher') if isinstance(enc, dict) else enc!r}")
    if key is None:
        raise KeyRequired("the repository is encrypted: its key is needed")
    check = enc.get("key_check")
    if check is not None and not key.matches(config.repo_id, check):
        raise KeyMismatch("the key given is not this repository's key")
    return SealedCodec(key)


def encryption_config(key: MasterKey, repo_id: str, **extra) -> dict:
    """The config.json "encryption" entry of a repository sealed with *key* (keys adds its fields)."""
    return {"cipher": CIPHER, "id_hash": ID_HASH, "key_check": key.key_check(repo_id), **extra}
