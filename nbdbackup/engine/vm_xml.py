"""Rewrite a stored libvirt domain XML so that it runs on restored disks.

Pure text in, text out (ElementTree; nothing here talks to libvirt):
- every backed-up disk (by target dev) gets `<source file=RESTORED>` as a `type='file'`
  disk and `<driver type=FORMAT>`; what described the old storage goes (backing chain,
  block-job mirror, data store, slices, index): the restored file is one flat image;
- disks that were not backed up (CD-ROMs, read-only, shareable, excluded) keep their
  sources, and are reported;
- `<nvram>` points at the restored NVRAM file; a definition stored without NVRAM bytes
  keeps its path for the same domain and, for a new one, drops the path so that libvirt
  makes a fresh store from the template (never two domains on one variable store);
- leftovers of the live domain the XML may come from (a transient domain's XML is its
  live XML): the domain's id and dynamic security labels;
- a new name gets a new UUID (the given one, else none: libvirt makes one), no
  `<mac address>` (libvirt generates new ones, so the copy can run beside the original)
  and no SMBIOS system UUID (libvirt refuses one that differs from `<uuid>`).
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field

# Children of a disk that describe the old storage or a job on it, not the guest's view.
_STORAGE_LEFTOVERS = ("backingStore", "mirror")


@dataclass(frozen=True)
class RestoredDisk:
    path: str       # the restored image
    fmt: str        # its format: "qcow2" | "raw"


@dataclass
class RewrittenXml:
    xml: str
    name: str
    uuid: str | None                                  # None: libvirt will make one
    restored: list[str] = field(default_factory=list)     # targets pointed at restored files
    kept: list[str] = field(default_factory=list)         # "sda (cdrom) keeps /iso/x.iso"
    shared_writable: list[str] = field(default_factory=list)  # kept disks a copy would share writable
    macs_removed: int = 0
    nvram: str | None = None                          # what <nvram> names now (None: libvirt's default)


class DomainXmlError(ValueError):
    """The stored XML is not a domain definition this code can rewrite."""


def parse_domain(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXmlError(f"not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"the root element is <{root.tag}>, not <domain>")
    return root


def domain_uuid(xml: str) -> str | None:
    el = parse_domain(xml).find("uuid")
    return el.text.strip() if el is not None and el.text and el.text.strip() else None


def rewrite_domain_xml(xml: str, disks: Mapping[str, RestoredDisk], *, new_name: str | None = None,
                       uuid: str | None = None, nvram_path: str | None = None) -> RewrittenXml:
    """The domain of *xml* on the restored *disks* (target dev -> RestoredDisk).

    new_name: the copy's name (new UUID = *uuid* or none, MACs removed); None keeps the name
    and UUID (*uuid*, when given, replaces it: redefining over a domain that has another one).
    nvram_path: where the NVRAM was restored; None when no NVRAM bytes were stored.
    """
    _register_namespaces(xml)
    root = parse_domain(xml)
    name_el = root.find("name")
    if name_el is None or not (name_el.text or "").strip():
        raise DomainXmlError("the domain has no <name>")
    out = RewrittenXml(xml="", name=new_name or name_el.text.strip(), uuid=None)
    root.attrib.pop("id", None)          # a live domain's run number
    _drop_dynamic_labels(root)
    _rewrite_disks(root, disks, out, copy=new_name is not None)
    _rewrite_nvram(root, nvram_path, out, copy=new_name is not None)
    uuid_el = root.find("uuid")
    if new_name is not None:
        name_el.text = new_name
        out.macs_removed = _drop_macs(root)
        _drop_smbios_uuid(root)
        if uuid_el is not None:
            root.remove(uuid_el)
            uuid_el = None
    if uuid is not None:
        if uuid_el is None:
            uuid_el = ET.Element("uuid")
            uuid_el.tail = name_el.tail
            root.insert(list(root).index(name_el) + 1, uuid_el)
        uuid_el.text = uuid
        _drop_smbios_uuid(root)
    out.uuid = uuid_el.text.strip() if uuid_el is not None and uuid_el.text else None
    buf = io.StringIO()
    ET.ElementTree(root).write(buf, encoding="unicode")
    out.xml = buf.getvalue() + "\n"
    return out


def _rewrite_disks(root: ET.Element, disks: Mapping[str, RestoredDisk], out: RewrittenXml, *, copy: bool) -> None:
    seen = set()
    for disk in root.iterfind("devices/disk"):
        target_el = disk.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if target in disks:
            seen.add(target)
            _point_at(disk, disks[target])
            out.restored.append(target)
            continue
        device = disk.get("device", "disk")
        why = _why_kept(disk, device)
        source = _source_text(disk)
        out.kept.append(f"{target} ({why}) keeps {source}" if source else f"{target} ({why}, no source)")
        if copy and why == "not in the backup" and source:
            out.shared_writable.append(target)
    missing = sorted(set(disks) - seen)
    if missing:
        raise DomainXmlError(f"the definition has no disk with target {', '.join(missing)}")


def _why_kept(disk: ET.Element, device: str) -> str:
    if device != "disk":
        return device                       # cdrom, floppy, lun
    if disk.find("readonly") is not None:
        return "read-only"
    if disk.find("shareable") is not None:
        return "shareable"
    return "not in the backup"


def _source_text(disk: ET.Element) -> str | None:
    src = disk.find("source")
    if src is None:
        return None
    for attr in ("file", "dev", "dir", "volume", "name"):
        if src.get(attr):
            return src.get(attr) if attr != "volume" else f"{src.get('pool')}/{src.get(attr)}"
    return None


def _point_at(disk: ET.Element, restored: RestoredDisk) -> None:
    disk.set("type", "file")            # a block device or volume comes back as a file
    for tag in _STORAGE_LEFTOVERS:
        for el in disk.findall(tag):
            disk.remove(el)
    old = disk.find("source")
    new = ET.Element("source", {"file": restored.path})
    if old is not None:
        # Only the guest-side security label survives; slices, data stores, cookies, a pool,
        # a startup policy belonged to the old storage.
        for label in old.findall("seclabel"):
            new.append(label)
        new.tail = old.tail
        disk.insert(list(disk).index(old), new)
        disk.remove(old)
    else:
        _insert_after(disk, new, "driver")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", restored.fmt)
    driver.attrib.pop("metadata_cache", None)


def _insert_after(parent: ET.Element, el: ET.Element, tag: str) -> None:
    children = list(parent)
    after = next((i for i, c in enumerate(children) if c.tag == tag), -1)
    parent.insert(after + 1, el)


def _rewrite_nvram(root: ET.Element, nvram_path: str | None, out: RewrittenXml, *, copy: bool) -> None:
    nvram = root.find("os/nvram")
    if nvram is None:
        return
    source = nvram.find("source")           # libvirt >= 8.5 may write <nvram type='file'><source file=/>
    if nvram_path is not None:
        if source is not None:
            source.attrib.clear()
            source.set("file", nvram_path)
            nvram.set("type", "file")
        else:
            nvram.text = nvram_path
        out.nvram = nvram_path
    elif copy:
        # No stored variables: the copy must not share the original's store; without a path
        # libvirt creates <name>_VARS.fd from the template.
        nvram.text = None
        if source is not None:
            nvram.remove(source)
        nvram.attrib.pop("type", None)
        out.nvram = None
    else:
        out.nvram = source.get("file") if source is not None else (nvram.text or "").strip() or None


def _drop_macs(root: ET.Element) -> int:
    n = 0
    for iface in root.iterfind("devices/interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
            n += 1
    return n


def _drop_smbios_uuid(root: ET.Element) -> None:
    for system in root.iterfind("sysinfo/system"):
        for entry in system.findall("entry"):
            if entry.get("name") == "uuid":
                system.remove(entry)


def _drop_dynamic_labels(root: ET.Element) -> None:
    # A running domain's XML carries the labels libvirt picked for that run.
    for label in root.iter("seclabel"):
        if label.get("type") == "dynamic":
            for child in [c for c in label if c.tag in ("label", "imagelabel")]:
                label.remove(child)


def _register_namespaces(xml: str) -> None:
    # Keep the prefixes of <metadata> elements (libosinfo:, ...) instead of ns0:.
    try:
        for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
            if prefix:
                ET.register_namespace(prefix, uri)
    except (ET.ParseError, ValueError):
        pass                                # parse_domain reports malformed XML
