"""restore --libvirt: a domain brought back from a set, on a real libvirtd (virsh, qemu:///system).

- The XML rewrite (engine/vm_xml.py) on what `virsh dumpxml --inactive` really gives for a
  domain with two disks, a CD-ROM, NVRAM and two interfaces; libvirt itself must accept the
  result (defined here, then inspected).
- The command on sets stored with a VM definition: here backed up from a shut-off domain's
  images through ImageSource, with a Source that only adds the domain's definition (a double
  of the libvirt side only; the engine, the repository and restore are the real ones).
- End to end with `full|incremental --libvirt` of a running domain (L's source).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import libvirt as lv
from helpers import support
from helpers.engine_util import MiB, init_repo, make_image, nbb, qio, same_file
from helpers.libvirt import disk_now, guest_write, make_domain, virsh
from nbdbackup.engine.backup import run_backup
from nbdbackup.engine.options import BackupOptions
from nbdbackup.engine.vm_xml import DomainXmlError, RestoredDisk, rewrite_domain_xml
from nbdbackup.repo.repository import Repository
from nbdbackup.repo.vmdef import VmDefinition
from nbdbackup.sources.base import Source
from nbdbackup.sources.image import ImageSource

libvirtd, libvirt_domain = lv.libvirtd, lv.libvirt_domain       # the fixtures

IFACES = ("<interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>",
          "<interface type='network'><source network='default'/><model type='e1000'/></interface>")


def _attach_interfaces(dom) -> None:
    for i, iface in enumerate(IFACES):
        f = dom.dir / f"iface{i}.xml"
        f.write_text(iface)
        virsh("attach-device", dom.name, str(f), "--config")


def _inactive_xml(name: str) -> str:
    return virsh("dumpxml", "--inactive", name).stdout


def _macs(xml: str) -> list[str]:
    return [m.get("address") for m in ET.fromstring(xml).iterfind("devices/interface/mac")]


def _sources(xml: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    """target -> (disk type, source file or dev, driver type)."""
    out = {}
    for d in ET.fromstring(xml).iterfind("devices/disk"):
        src, drv = d.find("source"), d.find("driver")
        out[d.find("target").get("dev")] = (d.get("type"), None if src is None else (src.get("file") or src.get("dev")),
                                            None if drv is None else drv.get("type"))
    return out


def _nvram(xml: str) -> str | None:
    el = ET.fromstring(xml).find("os/nvram")
    return None if el is None else (el.text or "").strip()


@pytest.fixture
def undefine():
    """Names of domains a test defined itself (restored copies): undefined afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        virsh("destroy", n, check=False)
        virsh("undefine", n, "--nvram", "--checkpoints-metadata", check=False)


# --- the XML rewrite, on libvirt's own XML --------------------------------------------------

@pytest.fixture(scope="module")
def real_domain(libvirtd):
    """A defined, shut-off domain with vda+vdb (qcow2), a CD-ROM, NVRAM, two interfaces."""
    dom = make_domain(disks=[("qcow2", 8 * MiB), ("qcow2", 8 * MiB)], cdrom=True, nvram=True, persistent=True,
                      running=False, tag="xml")
    try:
        _attach_interfaces(dom)
        yield dom, _inactive_xml(dom.name)
    finally:
        dom.remove()


def test_rewrite_for_a_copy_libvirt_accepts_it(real_domain, tmp_path, undefine):
    dom, xml = real_domain
    assert len(_macs(xml)) == 2 and _nvram(xml) == str(dom.nvram)
    d = tmp_path / "restored"
    restored = {"vda": RestoredDisk(f"{d}/copy-vda.qcow2", "qcow2"), "vdb": RestoredDisk(f"{d}/copy-vdb.raw", "raw")}
    new_uuid = str(uuid.uuid4())
    r = rewrite_domain_xml(xml, restored, new_name=f"{dom.name}-copy", uuid=new_uuid, nvram_path=f"{d}/copy_VARS.fd")
    assert r.name == f"{dom.name}-copy" and r.uuid == new_uuid and r.macs_removed == 2
    assert r.restored == ["vda", "vdb"] and r.kept == [f"hdc (cdrom) keeps {dom.dir}/cd.iso"]
    assert _macs(r.xml) == []
    src = _sources(r.xml)
    assert src["vda"] == ("file", f"{d}/copy-vda.qcow2", "qcow2")
    assert src["vdb"] == ("file", f"{d}/copy-vdb.raw", "raw")
    assert src["hdc"] == ("file", f"{dom.dir}/cd.iso", "raw")
    assert _nvram(r.xml) == f"{d}/copy_VARS.fd"

    # libvirt takes it beside the original, with its own new MACs
    f = tmp_path / "copy.xml"
    f.write_text(r.xml)
    virsh("define", "--validate", str(f))
    undefine.append(r.name)
    got = _inactive_xml(r.name)
    assert ET.fromstring(got).findtext("uuid") == new_uuid != ET.fromstring(xml).findtext("uuid")
    assert len(_macs(got)) == 2 and not set(_macs(got)) & set(_macs(xml))
    assert _sources(got)["vda"][1] == f"{d}/copy-vda.qcow2" and _nvram(got) == f"{d}/copy_VARS.fd"
    assert _inactive_xml(dom.name) == xml         # the original is untouched


def test_rewrite_keeping_the_name_keeps_identity(real_domain):
    dom, xml = real_domain
    r = rewrite_domain_xml(xml, {"vda": RestoredDisk("/r/vda.qcow2", "qcow2"),
                                 "vdb": RestoredDisk("/r/vdb.qcow2", "qcow2")}, nvram_path="/r/VARS.fd")
    root, orig = ET.fromstring(r.xml), ET.fromstring(xml)
    assert root.findtext("name") == dom.name and root.findtext("uuid") == orig.findtext("uuid") == r.uuid
    assert _macs(r.xml) == _macs(xml) and r.macs_removed == 0
    assert _sources(r.xml)["vdb"] == ("file", "/r/vdb.qcow2", "qcow2") and _nvram(r.xml) == "/r/VARS.fd"


def test_rewrite_without_stored_nvram(real_domain, tmp_path, undefine):
    """No NVRAM bytes stored: the same domain keeps its store, a copy gets a fresh one (libvirt's
    default path), never the original's."""
    dom, xml = real_domain
    disks = {"vda": RestoredDisk("/r/vda.qcow2", "qcow2"), "vdb": RestoredDisk("/r/vdb.qcow2", "qcow2")}
    assert _nvram(rewrite_domain_xml(xml, disks).xml) == str(dom.nvram)
    r = rewrite_domain_xml(xml, disks, new_name=f"{dom.name}-fresh")
    assert r.nvram is None and _nvram(r.xml) == ""
    f = tmp_path / "fresh.xml"
    f.write_text(r.xml)
    virsh("define", str(f))
    undefine.append(r.name)
    got = _nvram(_inactive_xml(r.name))
    assert got and got != str(dom.nvram) and got.endswith(f"{r.name}_VARS.fd"), got


def test_rewrite_drops_storage_and_live_leftovers(real_domain):
    dom, xml = real_domain
    root = ET.fromstring(xml)
    root.set("id", "7")
    vda = next(d for d in root.iterfind("devices/disk") if d.find("target").get("dev") == "vda")
    vda.set("type", "block")
    src = vda.find("source")
    src.attrib.clear()
    src.set("dev", "/dev/vg0/web1")
    src.set("index", "3")
    ET.SubElement(src, "slices").append(ET.Element("slice", {"type": "storage", "offset": "0", "size": "1"}))
    ET.SubElement(vda, "backingStore", {"type": "file"}).append(ET.Element("source", {"file": "/base.qcow2"}))
    ET.SubElement(vda, "mirror", {"type": "file", "file": "/mirror.qcow2", "job": "copy"})
    label = ET.SubElement(root, "seclabel", {"type": "dynamic", "model": "dac", "relabel": "yes"})
    ET.SubElement(label, "label").text = "+64055:+64055"
    ET.SubElement(label, "imagelabel").text = "+64055:+64055"
    sysinfo = ET.SubElement(root, "sysinfo", {"type": "smbios"})
    ET.SubElement(ET.SubElement(sysinfo, "system"), "entry", {"name": "uuid"}).text = root.findtext("uuid")
    r = rewrite_domain_xml(ET.tostring(root, encoding="unicode"),
                           {"vda": RestoredDisk("/r/vda.qcow2", "qcow2"), "vdb": RestoredDisk("/r/vdb.raw", "raw")},
                           new_name="copy")
    out = ET.fromstring(r.xml)
    assert "id" not in out.attrib and out.find("uuid") is None and r.uuid is None
    disk = next(d for d in out.iterfind("devices/disk") if d.find("target").get("dev") == "vda")
    assert disk.get("type") == "file" and disk.find("backingStore") is None and disk.find("mirror") is None
    assert disk.find("source").attrib == {"file": "/r/vda.qcow2"} and disk.find("source/slices") is None
    assert [c.tag for c in out.find("seclabel")] == []
    assert out.find("sysinfo/system/entry") is None


def test_rewrite_keeps_disks_not_in_the_backup(real_domain):
    dom, xml = real_domain
    only_vda = {"vda": RestoredDisk("/r/vda.qcow2", "qcow2")}
    r = rewrite_domain_xml(xml, only_vda, new_name="copy")
    assert r.kept == [f"vdb (not in the backup) keeps {dom.disks['vdb']}", f"hdc (cdrom) keeps {dom.dir}/cd.iso"]
    assert r.shared_writable == ["vdb"]               # the copy would write the original's image
    assert _sources(r.xml)["vdb"] == ("file", str(dom.disks["vdb"]), "qcow2")
    assert rewrite_domain_xml(xml, only_vda).shared_writable == []    # the same domain: its own disk


def test_rewrite_of_a_transient_domains_live_xml(libvirt_domain, tmp_path, undefine):
    """A transient domain's definition is its live XML (ids, aliases, labels of this run):
    libvirt must take the rewritten copy as a persistent domain."""
    dom = libvirt_domain(disks=[("qcow2", 1 * MiB)], fill=None, tag="live-xml")
    live = virsh("dumpxml", dom.name).stdout
    assert ET.fromstring(live).get("id")
    r = rewrite_domain_xml(live, {"vda": RestoredDisk(str(tmp_path / "c-vda.qcow2"), "qcow2")},
                           new_name=f"{dom.name}-c", uuid=str(uuid.uuid4()))
    assert ET.fromstring(r.xml).get("id") is None
    f = tmp_path / "c.xml"
    f.write_text(r.xml)
    virsh("define", "--validate", str(f))
    undefine.append(r.name)
    assert _sources(_inactive_xml(r.name))["vda"] == ("file", str(tmp_path / "c-vda.qcow2"), "qcow2")


def test_rewrite_refuses_what_it_cannot_do(real_domain):
    _, xml = real_domain
    with pytest.raises(DomainXmlError, match="no disk with target vdz"):
        rewrite_domain_xml(xml, {"vdz": RestoredDisk("/r/x.qcow2", "qcow2")})
    with pytest.raises(DomainXmlError, match="not well-formed"):
        rewrite_domain_xml(xml[:200], {})
    with pytest.raises(DomainXmlError, match="not <domain>"):
        rewrite_domain_xml("<network><name>x</name></network>", {})


# --- the command, on sets stored with a definition ------------------------------------------

class DomainImages(Source):
    """The libvirt side only: a shut-off domain's images backed up as one set through
    ImageSource, with the domain's definition (and NVRAM) as the set's VM definition."""

    def __init__(self, dom):
        self.dom = dom
        self.parts = {t: ImageSource(str(p), f"{dom.name}-{t}", fmt=dom.formats[t]) for t, p in dom.disks.items()}

    def prepare(self, repo, kind, no_fallback):
        plans = []
        for target, part in self.parts.items():
            for plan in part.prepare(repo, kind, no_fallback):
                plan.extra["source"] = f"libvirt:{self.dom.name}/{target}"
                plans.append(plan)
        return plans

    def vm_definition(self):
        nvram = self.dom.nvram.read_bytes() if self.dom.nvram else None
        return VmDefinition(self.dom.name, _inactive_xml(self.dom.name), nvram,
                            str(self.dom.nvram) if self.dom.nvram else None)

    def committed(self, plans, infos):
        for part in self.parts.values():
            part.committed(plans, infos)

    def failed(self, exc):
        for part in self.parts.values():
            part.failed(exc)

    def close(self):
        for part in self.parts.values():
            part.close()


def _back_up(repo: Path, dom, kind: str = "full") -> list:
    with Repository.open(str(repo)) as r:
        return [res.info for res in run_backup(r, DomainImages(dom), kind, BackupOptions(connections=2))]


def _restore_vm(repo: Path, *args, check=True):
    return nbb(repo, "--json", "restore", "--libvirt", *args, check=check)


@pytest.fixture
def stored_set(libvirt_domain, tmp_path):
    """A repository holding one set of a shut-off domain (vda, vdb qcow2 with different data, a
    CD-ROM, NVRAM, two interfaces), and each disk's contents as raw files."""
    dom = libvirt_domain(disks=[("qcow2", 8 * MiB), ("qcow2", 4 * MiB)], cdrom=True, nvram=True,
                         persistent=True, running=False, tag="set")
    _attach_interfaces(dom)
    qio(dom.disks["vdb"], "write -P 0x5a 1M 1M", "write -P 0x77 3M 64K")
    repo = init_repo(tmp_path / "repo")
    infos = _back_up(repo, dom)
    raw = {t: disk_now(p, tmp_path / f"{t}.raw") for t, p in dom.disks.items()}
    return repo, dom, infos, raw


def _as_list(out) -> list:
    return out if isinstance(out, list) else [out]     # one disk: the backup's record itself


def _bytes_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _restored_equal(path: Path, expected: Path, tmp: Path) -> bool:
    out = disk_now(path, tmp / f"check-{path.name}.raw")
    try:
        return same_file(out, expected)
    finally:
        out.unlink()


def test_restore_set_as_a_copy_and_define_it(stored_set, tmp_path, undefine):
    repo, dom, infos, raw = stored_set
    assert len(infos) == 2 and len({i.set_id for i in infos}) == 1 and all(i.domain == dom.name for i in infos)
    d = tmp_path / "out"
    copy = f"{dom.name}-copy"
    undefine.append(copy)
    out = json.loads(_restore_vm(repo, dom.name, "--to-dir", str(d), "--name", copy, "--define").stdout)
    assert out["domain"] == copy and out["source_domain"] == dom.name and out["defined"] and not out["started"]
    assert out["set_id"] == infos[0].set_id and out["macs_removed"] == 2
    assert out["kept_disks"] == [f"hdc (cdrom) keeps {dom.dir}/cd.iso"]
    assert [x["target"] for x in out["disks"]] == ["vda", "vdb"]
    for t in ("vda", "vdb"):
        f = d / f"{copy}-{t}.qcow2"
        info = json.loads(support.run(["qemu-img", "info", "--output=json", str(f)]).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == raw[t].stat().st_size
        assert _restored_equal(f, raw[t], tmp_path), t
    nv = d / f"{copy}_VARS.fd"
    assert nv.read_bytes() == dom.nvram.read_bytes() and (nv.stat().st_mode & 0o777) == 0o600
    written = (d / f"{copy}.xml").read_text()
    assert out["xml"] == str(d / f"{copy}.xml") and out["uuid"] == ET.fromstring(written).findtext("uuid")

    got = _inactive_xml(copy)
    orig = _inactive_xml(dom.name)
    assert ET.fromstring(got).findtext("uuid") == out["uuid"] != ET.fromstring(orig).findtext("uuid")
    assert len(_macs(got)) == 2 and not set(_macs(got)) & set(_macs(orig))
    assert _sources(got)["vda"] == ("file", str(d / f"{copy}-vda.qcow2"), "qcow2")
    assert _sources(got)["hdc"][1] == f"{dom.dir}/cd.iso" and _nvram(got) == str(nv)
    assert _sources(orig)["vda"][1] == str(dom.disks["vda"])          # the original is as it was


def test_restore_vm_in_every_place(place, libvirt_domain, tmp_path, undefine):
    """The definition and the disks come back from local+SQLite, local+PostgreSQL, S3+PostgreSQL."""
    dom = libvirt_domain(disks=[("qcow2", 4 * MiB), ("qcow2", 2 * MiB)], nvram=True, persistent=True,
                         running=False, tag="place")
    qio(dom.disks["vdb"], "write -P 0x5a 1M 64K")
    support.nbdbackup("--repo", place, "init", "--chunk-size", "64K")
    with Repository.open(place.spec, index_url=place.index_url) as r:
        infos = [res.info for res in run_backup(r, DomainImages(dom), "full", BackupOptions(connections=2))]
    copy = f"{dom.name}-copy"
    undefine.append(copy)
    d = tmp_path / "out"
    out = json.loads(support.nbdbackup("--repo", place, "--json", "restore", "--libvirt", dom.name,
                                       "--to-dir", str(d), "--name", copy, "--define").stdout)
    assert out["defined"] and {x["backup"]["id"] for x in out["disks"]} == {i.id for i in infos}
    for t, img in dom.disks.items():
        assert _restored_equal(d / f"{copy}-{t}.qcow2", disk_now(img, tmp_path / f"{t}.raw"), tmp_path), t
    assert (d / f"{copy}_VARS.fd").read_bytes() == dom.nvram.read_bytes()
    assert _sources(_inactive_xml(copy))["vdb"][1] == str(d / f"{copy}-vdb.qcow2")


def test_refs_raw_format_and_no_define(stored_set, tmp_path):
    """A backup id and a set id prefix name the same set; --format raw; without --define
    nothing reaches libvirt, the XML is still written."""
    repo, dom, infos, raw = stored_set
    by_id = json.loads(_restore_vm(repo, infos[1].id, "--to-dir", str(tmp_path / "a"), "--format", "raw").stdout)
    by_set = json.loads(_restore_vm(repo, infos[0].set_id[:8], "--to-dir", str(tmp_path / "b"),
                                    "--name", "other").stdout)
    by_disk = json.loads(_restore_vm(repo, f"{dom.name}-vdb", "--to-dir", str(tmp_path / "d")).stdout)
    assert {x["backup"]["id"] for x in by_id["disks"]} == {i.id for i in infos} == \
        {x["backup"]["id"] for x in by_set["disks"]} == {x["backup"]["id"] for x in by_disk["disks"]}
    assert not by_id["defined"] and by_id["domain"] == dom.name
    for t in ("vda", "vdb"):
        assert same_file(tmp_path / "a" / f"{dom.name}-{t}.raw", raw[t])
    xml = (tmp_path / "a" / f"{dom.name}.xml").read_text()
    assert _sources(xml)["vdb"] == ("file", str(tmp_path / "a" / f"{dom.name}-vdb.raw"), "raw")
    assert ET.fromstring(xml).findtext("uuid") == ET.fromstring(_inactive_xml(dom.name)).findtext("uuid")
    assert virsh("domstate", "other", check=False).returncode != 0
    # the summary a person reads: a line per disk, one for what stayed, one for the domain
    p = nbb(repo, "restore", "--libvirt", dom.name, "--to-dir", str(tmp_path / "c"))
    lines = p.stderr.splitlines()
    assert [ln.split(" (")[0] for ln in lines[:2]] == [f"restored {i.id}" for i in infos], p.stderr
    assert lines[2] == f"not restored: hdc (cdrom) keeps {dom.dir}/cd.iso", p.stderr
    assert lines[3].startswith(f"domain {dom.name}: not defined (--define)") and "_VARS.fd" in lines[3], p.stderr
    (tmp_path / "file").write_text("")
    p = _restore_vm(repo, dom.name, "--to-dir", str(tmp_path / "file"), check=False)
    assert p.returncode == 2 and "not a directory" in p.stderr, p.stderr


def test_same_name_refused_without_force_replaced_with_it(stored_set, tmp_path):
    repo, dom, infos, raw = stored_set
    before = _inactive_xml(dom.name)
    d = tmp_path / "out"
    p = _restore_vm(repo, dom.name, "--to-dir", str(d), "--define", check=False)
    assert p.returncode == 2 and f"domain {dom.name} exists" in p.stderr and "--force" in p.stderr, p.stderr
    assert not d.exists() and _inactive_xml(dom.name) == before        # refused before any work
    out = json.loads(_restore_vm(repo, dom.name, "--to-dir", str(d), "--define", "--force").stdout)
    assert out["replaced"] and out["defined"]
    now = _inactive_xml(dom.name)
    assert ET.fromstring(now).findtext("uuid") == ET.fromstring(before).findtext("uuid")
    assert _macs(now) == _macs(before)
    assert _sources(now)["vdb"] == ("file", str(d / f"{dom.name}-vdb.qcow2"), "qcow2")
    assert _restored_equal(d / f"{dom.name}-vdb.qcow2", raw["vdb"], tmp_path)
    # the files exist now: refused without --force, every one named
    p = _restore_vm(repo, dom.name, "--to-dir", str(d), check=False)
    assert p.returncode == 2 and f"{dom.name}-vda.qcow2" in p.stderr and f"{dom.name}.xml" in p.stderr, p.stderr


def test_running_domain_refused_even_with_force(stored_set, libvirt_domain, tmp_path):
    repo, dom, infos, raw = stored_set
    running = libvirt_domain(disks=[("qcow2", 1 * MiB)], fill=None, tag="busy")
    d = tmp_path / "out"
    for force in ([], ["--force"]):
        p = _restore_vm(repo, dom.name, "--to-dir", str(d), "--name", running.name, "--start", *force, check=False)
        assert p.returncode == 2 and "running" in p.stderr and "stop it first" in p.stderr, p.stderr
    assert not d.exists() and running.is_active()


def test_start_that_fails_leaves_the_domain_defined(stored_set, tmp_path, undefine):
    """pytest's tmp_path is under a 0700 directory: qemu (libvirt-qemu) cannot open the images."""
    repo, dom, infos, raw = stored_set
    copy = f"{dom.name}-nostart"
    undefine.append(copy)
    d = tmp_path / "out"
    p = _restore_vm(repo, dom.name, "--to-dir", str(d), "--name", copy, "--start", check=False)
    assert p.returncode == 1 and f"domain {copy} is defined" in p.stderr and "did not start" in p.stderr, p.stderr
    assert "qemu runs as its own user" in p.stderr and "Traceback" not in p.stderr
    assert virsh("domstate", copy).stdout.strip() == "shut off"
    assert _restored_equal(d / f"{copy}-vda.qcow2", raw["vda"], tmp_path)


def test_missing_and_non_libvirt_sets(stored_set, tmp_path):
    repo, dom, infos, raw = stored_set
    p = _restore_vm(repo, "no-such-domain", "--to-dir", str(tmp_path / "x"), check=False)
    assert p.returncode == 11 and "no-such-domain" in p.stderr, p.stderr
    img = make_image(tmp_path / "plain.qcow2", 2 * MiB)
    plain = json.loads(nbb(repo, "--json", "full", "--image", str(img)).stdout)
    p = _restore_vm(repo, plain["id"], "--to-dir", str(tmp_path / "x"), check=False)
    assert p.returncode == 11 and "not taken with --libvirt" in p.stderr and "nbdbackup restore BACKUP" in p.stderr
    assert not (tmp_path / "x").exists()


class WithoutVdb(DomainImages):
    """A definition that lacks one of the set's disks (a domain edited between XML and read)."""

    def vm_definition(self):
        vm = super().vm_definition()
        root = ET.fromstring(vm.xml)
        devices = root.find("devices")
        devices.remove(next(d for d in devices.iterfind("disk") if d.find("target").get("dev") == "vdb"))
        return VmDefinition(vm.domain, ET.tostring(root, encoding="unicode"), vm.nvram, vm.nvram_path)


def test_definition_without_a_disk_of_the_set(libvirt_domain, tmp_path):
    dom = libvirt_domain(disks=[("qcow2", 2 * MiB), ("qcow2", 2 * MiB)], persistent=True, running=False, tag="odd")
    repo = init_repo(tmp_path / "repo")
    with Repository.open(str(repo)) as r:
        run_backup(r, WithoutVdb(dom), "full", BackupOptions(connections=1))
    p = _restore_vm(repo, dom.name, "--to-dir", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and "no disk with target vdb" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments(stored_set, tmp_path):
    repo, dom, infos, raw = stored_set
    cases = [(["restore", "--libvirt", dom.name], "--to-dir"),
             (["restore", "--libvirt", dom.name, "--to-dir", str(tmp_path), "--name", "bad/name"], "invalid --name"),
             (["restore", infos[0].id, str(tmp_path / "x.raw"), "--name", "copy"], "only go with --libvirt"),
             (["restore", "--libvirt", dom.name, infos[0].id, "--to-dir", str(tmp_path)], "no BACKUP or TARGET"),
             (["restore", infos[0].id], "needs BACKUP and TARGET")]
    for args, words in cases:
        p = nbb(repo, *args, check=False)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


# --- end to end: a running domain backed up with --libvirt, brought back beside itself ------

@pytest.fixture
def qemu_dir():
    """A 0755 directory under /var/tmp: qemu (libvirt-qemu) must reach the restored images."""
    d = Path(tempfile.mkdtemp(prefix="nbdbackup-restore-vm-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_running_domain_back_as_a_running_copy(libvirt_domain, tmp_path, qemu_dir, undefine):
    dom = libvirt_domain(disks=[("qcow2", 16 * MiB), ("qcow2", 8 * MiB)], cdrom=True, nvram=True,
                         persistent=True, running=False, tag="live")
    f = dom.dir / "iface.xml"
    f.write_text(IFACES[0])
    virsh("attach-device", dom.name, str(f), "--config")
    dom.start()
    repo = init_repo(tmp_path / "repo")
    full = json.loads(nbb(repo, "--json", "full", "--libvirt", dom.name).stdout)
    assert {b["disk"] for b in full} == {f"{dom.name}-vda", f"{dom.name}-vdb"}
    guest_write(dom, "vda", 0x33, 3 * MiB, 128 * 1024)
    guest_write(dom, "vdb", 0x44, 5 * MiB, 64 * 1024)
    inc = json.loads(nbb(repo, "--json", "incremental", "--libvirt", dom.name).stdout)
    assert {b["kind"] for b in inc} == {"incremental"} and len({b["set_id"] for b in inc}) == 1
    # What the set holds, as plain restores (qemu-img convert -U of the running original may miss
    # writes whose qcow2 metadata qemu has not flushed yet); the guest's writes must be in it.
    backed_up = {}
    for b in inc:
        t = b["disk"].rsplit("-", 1)[1]
        backed_up[t] = tmp_path / f"{t}.raw"
        nbb(repo, "restore", b["id"], str(backed_up[t]))
    assert _bytes_at(backed_up["vda"], 3 * MiB, 4) == b"\x33" * 4
    assert _bytes_at(backed_up["vdb"], 5 * MiB, 4) == b"\x44" * 4

    copy = f"{dom.name}-copy"
    undefine.append(copy)
    out = json.loads(nbb(repo, "--json", "restore", "--libvirt", dom.name, "--to-dir", str(qemu_dir),
                         "--name", copy, "--start").stdout)
    assert out["started"] and out["defined"] and out["set_id"] == inc[0]["set_id"]
    assert {d["backup"]["id"] for d in out["disks"]} == {b["id"] for b in inc}
    assert out["kept_disks"] == [f"hdc (cdrom) keeps {dom.dir}/cd.iso"]
    assert virsh("domstate", copy).stdout.strip() == "running"
    assert virsh("domstate", dom.name).stdout.strip() == "running"          # the original runs on
    live, orig = virsh("dumpxml", copy).stdout, virsh("dumpxml", dom.name).stdout
    assert ET.fromstring(live).findtext("uuid") != ET.fromstring(orig).findtext("uuid")
    assert len(_macs(live)) == 1 and _macs(live) != _macs(orig)
    for t in ("vda", "vdb"):
        restored = qemu_dir / f"{copy}-{t}.qcow2"
        assert _sources(live)[t][1] == str(restored)
        assert _restored_equal(restored, backed_up[t], tmp_path), t
    nvram = qemu_dir / f"{copy}_VARS.fd"
    assert out["nvram"] == str(nvram) and _nvram(live) == str(nvram) and _nvram(orig) == str(dom.nvram)
    assert nvram.read_bytes() == dom.nvram.read_bytes()


def test_domain_restored_over_itself_backs_up_again(libvirt_domain, tmp_path, qemu_dir):
    """Disaster recovery in place: the shut-off domain's definition replaced (--force) by the
    restored one; this repository's checkpoints of the old images go, so the next incremental
    is a full of the restored disks (with a warning), not a job libvirt refuses."""
    other_ckpt = "othertool-1"
    dom = libvirt_domain(disks=[("qcow2", 8 * MiB)], persistent=True, running=True, tag="again")
    repo = init_repo(tmp_path / "repo")
    [full] = _as_list(json.loads(nbb(repo, "--json", "full", "--libvirt", dom.name).stdout))
    (dom.dir / "ck.xml").write_text(f"<domaincheckpoint><name>{other_ckpt}</name></domaincheckpoint>")
    virsh("checkpoint-create", dom.name, str(dom.dir / "ck.xml"))
    ours = [c for c in dom.checkpoints() if c != other_ckpt]
    assert len(ours) == 1
    dom.stop()
    p = nbb(repo, "--json", "restore", "--libvirt", dom.name, "--to-dir", str(qemu_dir), "--start", check=False)
    assert p.returncode == 2 and "exists" in p.stderr, p.stderr
    out = json.loads(nbb(repo, "--json", "restore", "--libvirt", dom.name, "--to-dir", str(qemu_dir),
                         "--start", "--force").stdout)
    assert out["replaced"] and out["started"] and out["checkpoints_dropped"] == ours
    assert dom.checkpoints() == [other_ckpt]                 # another tool's checkpoint is not ours
    restored = qemu_dir / f"{dom.name}-vda.qcow2"
    assert _sources(virsh("dumpxml", dom.name).stdout)["vda"][1] == str(restored)
    guest_write(dom, "vda", 0x66, 2 * MiB, 64 * 1024)
    p = nbb(repo, "--json", "incremental", "--libvirt", dom.name)
    [again] = _as_list(json.loads(p.stdout))
    assert again["kind"] == "full" and again["parent"] is None, again
    plain = tmp_path / "again.raw"
    nbb(repo, "restore", again["id"], str(plain))
    assert _bytes_at(plain, 2 * MiB, 4) == b"\x66" * 4 and _bytes_at(plain, 0, 4) == b"\x11" * 4
    assert full["id"] != again["id"]


def test_shut_off_domain_from_an_encrypted_repository(libvirt_domain, tmp_path, undefine):
    """`full --libvirt` of a shut-off domain (its images) into an encrypted repository: the
    definition and NVRAM come back from sealed records; the XML's text is in no pack."""
    dom = libvirt_domain(disks=[("qcow2", 4 * MiB), ("raw", 2 * MiB)], nvram=True, persistent=True,
                         running=False, tag="sealed")
    repo = init_repo(tmp_path / "repo", encrypted=True)
    backups = _as_list(json.loads(nbb(repo, "--json", "full", "--libvirt", dom.name).stdout))
    assert {b["domain"] for b in backups} == {dom.name}
    packs = b"".join(p.read_bytes() for p in (repo / "packs").rglob("*.pack"))
    assert dom.name.encode() not in packs and b"<domain" not in packs
    copy = f"{dom.name}-copy"
    undefine.append(copy)
    d = tmp_path / "out"
    out = json.loads(nbb(repo, "--json", "restore", "--libvirt", dom.name, "--to-dir", str(d), "--name", copy,
                         "--format", "raw", "--define").stdout)
    assert out["defined"] and [x["target"] for x in out["disks"]] == ["vda", "vdb"]
    for t, img in dom.disks.items():
        assert same_file(d / f"{copy}-{t}.raw", disk_now(img, tmp_path / f"{t}.raw")), t
    assert (d / f"{copy}_VARS.fd").read_bytes() == dom.nvram.read_bytes()
    assert _sources(_inactive_xml(copy))["vdb"] == ("file", str(d / f"{copy}-vdb.raw"), "raw")


def test_a_copy_that_would_share_a_writable_disk_is_not_defined_without_force(libvirt_domain, tmp_path,
                                                                                undefine):
    """--exclude-disk vdb: the copy keeps vdb's source, the original's image. Defining it would
    let two domains write one image: refused, naming the disk, unless --force."""
    dom = libvirt_domain(disks=[("qcow2", 4 * MiB), ("qcow2", 2 * MiB)], persistent=True, running=False,
                         tag="shared")
    repo = init_repo(tmp_path / "repo")
    nbb(repo, "full", "--libvirt", dom.name, "--exclude-disk", "vdb")
    copy = f"{dom.name}-c"
    undefine.append(copy)
    d = tmp_path / "out"
    p = _restore_vm(repo, dom.name, "--to-dir", str(d), "--name", copy, "--define", check=False)
    assert p.returncode == 2 and "disk vdb" in p.stderr and "same image" in p.stderr, p.stderr
    assert virsh("domstate", copy, check=False).returncode != 0 and not d.exists()
    out = json.loads(_restore_vm(repo, dom.name, "--to-dir", str(d), "--name", copy, "--define",
                                 "--force").stdout)
    assert out["defined"] and _sources(_inactive_xml(copy))["vdb"][1] == str(dom.disks["vdb"])
