"""VM definitions: a libvirt domain's XML (and its UEFI variable store) stored with a set.

The stored form (`encode`) is binary, so NVRAM stays bytes (no base64):

    magic "NBDVMDEF" (8) | format u16 (1) | reserved u16 (0) | total length u64 |
    meta length u32 | meta (JSON: domain, nvram_path, xml_bytes, nvram_bytes or null) |
    xml (UTF-8, xml_bytes) | nvram (nvram_bytes)

integers little-endian; total length is the whole encoding's, so a reader that gets the
first piece knows how long the rest is. In the repository the encoding is split at the chunk
size and stored as ordinary chunk records listed by one map-segment record
(repo/vmstore.py); `BackupInfo.vm` names that segment.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

MAGIC = b"NBDVMDEF"
FORMAT = 1
_HEAD = struct.Struct("<8sHHQI")      # magic, format, reserved, total length, meta length
HEAD_SIZE = _HEAD.size                # 24
MAX_META = 1 << 20


class VmDefinitionError(ValueError):
    """A stored VM definition that does not parse (the message says why)."""


@dataclass(frozen=True)
class VmDefinition:
    domain: str                    # libvirt domain name when it was backed up
    xml: str                       # the domain XML libvirt gave
    nvram: bytes | None = None     # contents of the UEFI variable store, when the domain has one
    nvram_path: str | None = None  # the <os><nvram> path it was read from

    def __repr__(self) -> str:     # the XML and NVRAM can be large: never dump them in a log line
        n = "none" if self.nvram is None else f"{len(self.nvram)} bytes"
        return f"VmDefinition(domain={self.domain!r}, xml={len(self.xml)} chars, nvram={n})"

    def encode(self) -> bytes:
        if not isinstance(self.domain, str) or not self.domain:
            raise ValueError("a VM definition needs its domain name")
        xml = self.xml.encode("utf-8")
        nvram = bytes(self.nvram) if self.nvram is not None else None
        meta = json.dumps({"domain": self.domain, "nvram_path": self.nvram_path, "xml_bytes": len(xml),
                           "nvram_bytes": None if nvram is None else len(nvram)},
                          separators=(",", ":"), sort_keys=True).encode()
        total = HEAD_SIZE + len(meta) + len(xml) + (len(nvram) if nvram else 0)
        return b"".join((_HEAD.pack(MAGIC, FORMAT, 0, total, len(meta)), meta, xml, nvram or b""))

    @classmethod
    def decode(cls, raw: bytes) -> "VmDefinition":
        """Parse the stored form; VmDefinitionError (a ValueError) when it is malformed."""
        raw = bytes(raw)
        total = encoded_length(raw)
        if total != len(raw):
            raise VmDefinitionError(f"VM definition is {len(raw)} bytes, its header says {total}")
        _, _, _, _, meta_len = _HEAD.unpack_from(raw)
        if meta_len > MAX_META or HEAD_SIZE + meta_len > len(raw):
            raise VmDefinitionError("VM definition: bad meta length")
        try:
            meta = json.loads(raw[HEAD_SIZE:HEAD_SIZE + meta_len])
            domain, path = meta["domain"], meta["nvram_path"]
            xml_len, nv_len = meta["xml_bytes"], meta["nvram_bytes"]
        except (ValueError, KeyError, TypeError) as e:
            raise VmDefinitionError(f"VM definition: meta does not parse ({e.__class__.__name__})") from None
        if not isinstance(domain, str) or not domain or not (path is None or isinstance(path, str)) \
                or not _count(xml_len) or not (nv_len is None or _count(nv_len)):
            raise VmDefinitionError("VM definition: meta has a bad field")
        at = HEAD_SIZE + meta_len
        if at + xml_len + (nv_len or 0) != len(raw):
            raise VmDefinitionError("VM definition: lengths do not add up")
        try:
            xml = raw[at:at + xml_len].decode("utf-8")
        except UnicodeDecodeError:
            raise VmDefinitionError("VM definition: the XML is not UTF-8") from None
        nvram = raw[at + xml_len:] if nv_len is not None else None
        return cls(domain=domain, xml=xml, nvram=nvram, nvram_path=path)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def encoded_length(head: bytes) -> int:
    """The total length an encoding starting with *head* (at least HEAD_SIZE bytes) declares."""
    if len(head) < HEAD_SIZE:
        raise VmDefinitionError("VM definition is shorter than its header")
    magic, fmt, _reserved, total, _meta = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise VmDefinitionError("not a VM definition (bad magic)")
    if fmt != FORMAT:
        raise VmDefinitionError(f"VM definition format {fmt} is not known to this version (knows {FORMAT})")
    return total
