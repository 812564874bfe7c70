"""LibvirtSource against the shared libvirtd: running domains backed up in pull mode."""

from __future__ import annotations

import pytest

from helpers.libvirt import MiB, disk_now, guest_write, virsh
from nbdbackup.errors import NotFound, UsageError
from nbdbackup.sources import libvirt_domain as ld


def test_helpers_and_plumbing(libvirt_domain, libvirtd, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("raw", 8 * MiB)], cdrom=True, persistent=True)
    assert dom.is_active() and dom.checkpoints() == [] and not dom.job_running()
    guest_write(dom, "vdb", 0x55, 2 * MiB, 64 * 1024)
    raw = disk_now(dom.disks["vdb"], tmp_path / "vdb.raw").read_bytes()
    assert raw[:MiB] == b"\x11" * MiB and raw[2 * MiB:2 * MiB + 65536] == b"\x55" * 65536
    conn = ld.open_connection(libvirtd)
    d = ld.lookup_domain(conn, dom.name)
    disks, skipped = ld.backup_disks(d.XMLDesc(0))
    assert [(x.target, x.fmt, x.path) for x in disks] == [
        ("vda", "qcow2", str(dom.disks["vda"])), ("vdb", "raw", str(dom.disks["vdb"]))]
    assert skipped == ["hdc (cdrom)"]
    assert ld.backup_disks(d.XMLDesc(0), ["vdb"])[1] == ["vdb (--exclude-disk)", "hdc (cdrom)"]
    with pytest.raises(UsageError):
        ld.backup_disks(d.XMLDesc(0), ["vdz"])
    with pytest.raises(NotFound, match="qemu:///system"):
        ld.lookup_domain(conn, dom.name + "-nope")
    assert dom.name in ld.domain_names(conn, "nbdbackup-test-*")
    assert ld.domain_names(conn, dom.name) == [dom.name]
    dom.stop()
    assert not dom.is_active()
    assert virsh("domstate", dom.name).stdout.strip() == "shut off"
