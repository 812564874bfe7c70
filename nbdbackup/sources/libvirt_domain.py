"""libvirt plumbing shared by the libvirt source, restore --libvirt and job files.

Only this module and sources/libvirt*.py talk to libvirt, through its own Python
binding (never virsh text). The binding is an optional extra, so it is imported
inside the functions: `nbdbackup --help` and the other sources work without it.
"""

from __future__ import annotations

import fnmatch
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import NotFound, SourceUnreachable, UsageError
from .image import bitmap_prefix

DEFAULT_URI = "qemu:///system"


def _binding():
    try:
        import libvirt
    except ImportError:
        raise UsageError("the libvirt Python binding is not installed",
                         hint="pip install 'nbdbackup[libvirt]' (it builds against libvirt-dev: "
                              "apt-get install libvirt-dev pkg-config gcc)") from None
    return libvirt


def _quiet(_ctx, _err) -> None:
    """libvirt's default handler prints every error on stderr, even the ones we expect and
    handle (a missing checkpoint); our own messages say what matters."""


def open_connection(uri: str = DEFAULT_URI):
    """A read-write connection to *uri*. UsageError (2) without the binding; SourceUnreachable
    (4) with libvirt's message when the daemon does not answer."""
    libvirt = _binding()
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise SourceUnreachable(f"cannot connect to libvirt at {uri}: {e.get_error_message()}",
                                hint="is libvirtd (or virtqemud) running, and may this user use it? "
                                     "try `virsh -c " + uri + " list`") from None


def lookup_domain(conn, name: str):
    """The virDomain called *name*; NotFound (11) naming the connection."""
    libvirt = _binding()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFound(f"no libvirt domain named {name!r} on {conn.getURI()}",
                           hint=f"see `virsh -c {conn.getURI()} list --all`") from None
        raise SourceUnreachable(f"cannot look up domain {name!r} on {conn.getURI()}: "
                                f"{e.get_error_message()}") from None


def domain_names(conn, pattern: str) -> list[str]:
    """Names of all domains (running or not) matching the fnmatch *pattern*, sorted."""
    libvirt = _binding()
    try:
        names = [d.name() for d in conn.listAllDomains(0)]
    except libvirt.libvirtError as e:
        raise SourceUnreachable(f"cannot list the domains on {conn.getURI()}: {e.get_error_message()}") from None
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def checkpoint_prefix(repo_id: str) -> str:
    """Checkpoints of this repository are named prefix + BackupInfo.checkpoint; the qcow2 bitmap
    libvirt makes has the same name, which is the one ImageSource uses, so offline and running
    backups continue one chain."""
    return bitmap_prefix(repo_id)


def checkpoint_xml(name: str, all_targets: Sequence[str], bitmap_targets: Sequence[str], *,
                   description: str | None = None, created: int | None = None) -> str:
    """<domaincheckpoint> *name*: a bitmap of that name on *bitmap_targets*, checkpoint='no' on
    every other disk of the domain (libvirt would otherwise pick a default for them).
    *created* (epoch seconds) makes it the XML for REDEFINE, which also names each bitmap."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if description is not None:
        ET.SubElement(root, "description").text = description
    if created is not None:
        ET.SubElement(root, "creationTime").text = str(created)
    disks = ET.SubElement(root, "disks")
    for target in all_targets:
        if target not in bitmap_targets:
            ET.SubElement(disks, "disk", name=target, checkpoint="no")
        elif created is not None:
            ET.SubElement(disks, "disk", name=target, checkpoint="bitmap", bitmap=name)
        else:
            ET.SubElement(disks, "disk", name=target, checkpoint="bitmap")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class DomainDisk:
    target: str          # "vda"
    path: str            # source file or block device
    fmt: str             # driver type: "qcow2", "raw", ...
    disk_type: str       # "file" | "block"


def backup_disks(xml: str, exclude: Sequence[str] = ()) -> tuple[list[DomainDisk], list[str]]:
    """(disks to back up, in XML order; what was skipped and why, e.g. "hdc (cdrom)").
    UsageError when an --exclude-disk names no disk of the domain."""
    root = ET.fromstring(xml)
    chosen: list[DomainDisk] = []
    skipped: list[str] = []
    targets = []
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        target = target_el.get("dev") if target_el is not None else None
        if not target:
            continue
        targets.append(target)
        device = el.get("device", "disk")
        disk_type = el.get("type", "file")
        source = el.find("source")
        path = None
        if source is not None:
            path = source.get("file") if disk_type == "file" else source.get("dev") if disk_type == "block" else None
        driver = el.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        if target in exclude:
            skipped.append(f"{target} (--exclude-disk)")
        elif device != "disk":
            skipped.append(f"{target} ({device})")     # cdrom, floppy, lun
        elif el.find("readonly") is not None:
            skipped.append(f"{target} (read-only)")
        elif el.find("shareable") is not None:
            skipped.append(f"{target} (shareable)")
        elif disk_type not in ("file", "block"):
            # network/volume disks: no local image for the shut-off path, and untested live
            skipped.append(f"{target} ({disk_type} disk: not supported)")
        elif not path:
            skipped.append(f"{target} (no source)")
        else:
            chosen.append(DomainDisk(target=target, path=path, fmt=fmt, disk_type=disk_type))
    unknown = [t for t in exclude if t not in targets]
    if unknown:
        raise UsageError(f"--exclude-disk {', '.join(unknown)}: the domain has no such disk",
                         hint="its disks: " + (", ".join(targets) or "none"))
    return chosen, skipped


def disk_name(domain: str, target: str) -> str:
    """The repository's name of a domain's disk: "web1-vda"."""
    return f"{domain}-{target}"
