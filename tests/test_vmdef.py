"""VM definitions stored with a set (issue 14): written through run_backup from a real NBD source,
read back bit-exact, deduplicated, kept by gc, read by verify, kept by rebuild-index, carried by
copy, hidden in an encrypted repository, authenticated by the manifests; migration 0003 -> 0004.

The only double is the libvirt side: a Source that serves real raw images with qemu-nbd (through
NbdUriSource) and returns a VmDefinition, as LibvirtSource will; the engine, repository, gc,
verify, rebuild-index and copy are the real ones.
"""

from __future__ import annotations

import json
import os
import random
import re
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import update

from helpers.places import object_names, patch_object
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, read_all
from helpers.support import nbdbackup, qemu_nbd
from nbdbackup.engine.backup import BackupOptions, run_backup
from nbdbackup.errors import RepoDamaged
from nbdbackup.repo import Repository, vmstore
from nbdbackup.repo import manifest as M
from nbdbackup.repo.forget import forget
from nbdbackup.repo.gc import collect
from nbdbackup.repo.info import BackupInfo
from nbdbackup.repo.packs import pack_object_name
from nbdbackup.repo.schema import backups
from nbdbackup.repo.verify import verify
from nbdbackup.repo.vmdef import VmDefinition
from nbdbackup.sources.base import Source
from nbdbackup.sources.nbd_uri import NbdUriSource

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"
XML_MARKER = "nbdbackup-vm-marker-3f9a-secret-domain"


def domain_xml(name: str, extra: str = "") -> str:
    return (f"<domain type='kvm'>\n  <name>{name}</name>\n  <description>{XML_MARKER} {extra}</description>\n"
            f"  <os><type arch='x86_64' machine='q35'>hvm</type>\n"
            f"    <nvram>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram></os>\n"
            + "".join(f"  <!-- ü filler line {i} -->\n" for i in range(200)) + "</domain>\n")


def nvram_blob(seed: int) -> bytes:
    """528 KiB like an OVMF variable store: random bytes, a run of 0xff and a whole zero chunk."""
    rng = random.Random(seed)
    return rng.randbytes(300 * 1024) + b"\xff" * (100 * 1024) + bytes(CS) + rng.randbytes(64 * 1024)


def vm_def(name: str, seed: int = 1, nvram: bool = True) -> VmDefinition:
    return VmDefinition(domain=name, xml=domain_xml(name, str(seed)), nvram=nvram_blob(seed) if nvram else None,
                        nvram_path=f"/var/lib/libvirt/qemu/nvram/{name}_VARS.fd" if nvram else None)


class VmDouble(Source):
    """The libvirt side only: every disk a real NBD export (qemu-nbd), plus a VM definition."""

    def __init__(self, uris: dict[str, str], vm: VmDefinition | None):
        self.inner = [NbdUriSource(uri, disk) for disk, uri in uris.items()]
        self.vm = vm
        self.asked = 0

    def prepare(self, repo, kind, no_fallback):
        return [p for s in self.inner for p in s.prepare(repo, "full", no_fallback)]

    def vm_definition(self):
        self.asked += 1
        return self.vm


@contextmanager
def served(tmp_path: Path, disks: dict[str, bytes]):
    """qemu-nbd (raw) for each disk: {disk: nbd uri}."""
    with ExitStack() as stack:
        uris = {}
        for disk, data in disks.items():
            img = tmp_path / f"{disk}.raw"
            img.write_bytes(data)
            uris[disk] = stack.enter_context(qemu_nbd(img, tmp_path / f"{disk}.sock", fmt="raw"))
        yield uris


def backup(repo, uris, vm) -> list[BackupInfo]:
    src = VmDouble(uris, vm)
    res = run_backup(repo, src, "full", BackupOptions(connections=2))
    assert src.asked == 1
    return [r.info for r in res]


def disk(seed: int, nchunks: int = 6) -> bytes:
    return random.Random(seed).randbytes(nchunks * CS - 1536)     # whole sectors: qemu-nbd rounds up


def open_place(place) -> Repository:
    return Repository.open(place.spec)


def cli(place, *args, check=True):
    return nbdbackup("--repo", place, *args, check=check)


# --- the encoding and the manifest bytes (no repository needed) --------------------------------

def test_encoding_round_trips_and_refuses_malformed_bytes():
    for vm in (vm_def("web1"), vm_def("web1", nvram=False),
               VmDefinition("x", "", nvram=b"", nvram_path="/p"), VmDefinition("ü-dom", "<d>é</d>")):
        raw = vm.encode()
        assert raw[:8] == b"NBDVMDEF" and VmDefinition.decode(raw) == vm
    vm = vm_def("web1")
    raw = vm.encode()
    assert vm.nvram in raw            # binary, not base64: the blob is in the encoding as it is
    assert len(raw) < len(vm.nvram) + len(vm.xml.encode()) + 300
    assert vm_def("web1").encode() == raw    # deterministic: unchanged VM, same records
    bad = [raw[:-1], raw + b"\0", b"NBDVMDEX" + raw[8:], raw[:8] + b"\x02" + raw[9:], raw[:20],
           raw[:24] + b"x" + raw[25:], raw.replace(b"\"xml_bytes\":", b"\"xml_bytez\":")]
    for b in bad:
        with pytest.raises(ValueError):
            VmDefinition.decode(b)
    with pytest.raises(ValueError):
        VmDefinition("", "<domain/>").encode()
    assert "528" not in repr(vm) and XML_MARKER not in repr(vm)    # repr never dumps the XML


def _worked_example() -> tuple[dict, bytes]:
    """design.md's worked example manifest: its fields, and its exact bytes."""
    text = DESIGN.read_text()
    block = text[text.index("## Worked example") if "## Worked example" in text else text.index("### Worked example"):]
    raw = block.split("```\n{", 1)[1].split("\n```", 1)[0]
    raw = ("{" + raw).replace("\n", "").encode()
    return json.loads(raw), raw


def test_worked_example_still_holds_and_a_backup_without_vm_encodes_as_before(tmp_path):
    doc, raw = _worked_example()
    assert len(raw) == 385
    info = BackupInfo.from_json(doc["info"])
    assert info.domain is None and info.vm is None
    refs = [bytes.fromhex(s) for s in doc["segments"]]
    assert M.encode(info, doc["segment_len"], refs) == raw       # byte-identical: old manifests still match
    assert "domain" not in info.to_json() and "vm" not in info.to_json()
    with_vm = BackupInfo(**{**info.__dict__, "domain": "web1", "vm": "ab" * 32})
    enc = M.encode(with_vm, 1024, refs)
    assert enc.startswith(raw[:raw.index(b',"source":"example"}')]) and b'"domain":"web1"' in enc
    assert M.decode(enc).info == with_vm and M.decode(raw).info == info

    # the real writer, as the example says: vda's pack is 793 bytes, its manifest 385
    created = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    with new_repo(tmp_path / "r", chunk_size=65536) as repo:
        w = repo.writer("vda", kind="full", size=3 * 65536, source="example")
        w.put(0, w.prepare(b"A" * 65536))
        w.put_zero(1)
        w.put(2, w.prepare(b"A" * 65536))
        b = w.commit(read_bytes=131072, duration_s=0.25, created=created)
        assert b.stored_bytes == 170 and b.domain is None and b.vm is None
        mine = M.encode(b, 1024, repo.segment_refs(b.id))
        assert mine == raw.replace(b"20261201T090000000Z-c51e", b.id.encode())
        [pack] = object_names(repo)
        # the manifest names the backup's id, whose last 4 hex digits are random: its zstd size
        # moves by a few bytes with them (the example's is 363); every other record is fixed
        from nbdbackup.repo.packs import REC_MANIFEST, read_records
        [manifest] = [r for r in read_records(repo.backend, pack.rsplit("/", 1)[-1].removesuffix(".pack"))
                      if r.type == REC_MANIFEST]
        assert manifest.raw_len == 385
        assert repo.backend.size(pack) == 793 - 363 + manifest.stored_len


# --- write, read, dedup, sets, gc, verify, CLI: on every place ----------------------------------

def test_definitions_are_stored_once_read_back_exactly_and_survive_gc(place, tmp_path):
    new_repo(place.spec, **place.init_options()).close()
    vm1, vm2 = vm_def("web1", 1), vm_def("db1", 2, nvram=False)
    data = {"web1-vda": disk(1), "web1-vdb": disk(2, 3), "db1-vda": disk(3, 2), "plain": disk(4, 2)}
    with served(tmp_path, data) as uris, open_place(place) as repo:
        web = {d: uris[d] for d in ("web1-vda", "web1-vdb")}
        s1 = backup(repo, web, vm1)
        assert [b.disk for b in s1] == ["web1-vda", "web1-vdb"]
        assert {b.vm for b in s1} == {s1[0].vm} and s1[0].vm and {b.domain for b in s1} == {"web1"}
        assert s1[0].set_id and s1[0].set_id == s1[1].set_id
        for b in s1:      # bit-exact, NVRAM included, from either member
            got = repo.vm_definition(repo.get_backup(b.id))
            assert got == vm1 and got.nvram == vm1.nvram and len(got.nvram) == 528 * 1024
        # stored once per repository: an unchanged VM's second set adds no record at all
        records = repo.stats()
        s2 = backup(repo, web, vm1)
        assert s2[0].vm == s1[0].vm and [b.stored_bytes for b in s2] == [0, 0]
        after = repo.stats()
        assert (after["chunks"], after["segments"]) == (records["chunks"], records["segments"])
        assert repo.set_members(s2[1]) == s2
        assert repo.latest_domain_set("web1") == s2
        assert repo.latest_domain_set("nope") == []

        # a single-disk run: no set id, still the domain and the definition
        [db] = backup(repo, {"db1-vda": uris["db1-vda"]}, vm2)
        assert db.set_id is None and db.domain == "db1" and db.vm != s1[0].vm
        assert repo.set_members(db) == [db] and repo.latest_domain_set("db1") == [db]
        assert repo.vm_definition(db) == vm2 and repo.vm_definition(db).nvram is None
        [plain] = backup(repo, {"plain": uris["plain"]}, None)
        assert plain.domain is None and plain.vm is None and repo.vm_definition(plain) is None

    listed = {b["id"]: b for b in json.loads(cli(place, "--json", "list").stdout)}
    assert listed[db.id]["domain"] == "db1" and listed[s1[0].id]["vm"] == s1[0].vm
    assert "domain" not in listed[plain.id] and "vm" not in listed[plain.id]
    out = cli(place, "info", s2[0].id).stdout
    assert "domain: web1" in out and "VM definition: stored (XML" in out and "NVRAM 540672 bytes" in out
    assert f"web1-vdb ({s2[1].id})" in out
    j = json.loads(cli(place, "--json", "info", "db1-vda").stdout)
    assert j["domain"] == "db1" and j["vm_definition"]["nvram_bytes"] is None
    assert "VM definition: none" in cli(place, "info", "plain").stdout

    # gc beside: forget the first set; the second's definition (the same records) stays
    with open_place(place) as repo:
        forget(repo, [s1[0].id])
        assert {b.id for b in repo.list_backups()} == {b.id for b in s2} | {db.id, plain.id}
        rep = collect(repo, grace=0)
        assert rep.live_segments >= 1
        assert repo.vm_definition(repo.get_backup(s2[1].id)) == vm1
        forget(repo, [db.id])
        collect(repo, grace=0)      # db1's definition is now unreferenced: gone from the index
        with pytest.raises(RepoDamaged):
            vmstore.load(repo.context, db.vm)
        assert repo.vm_definition(repo.get_backup(s2[0].id)) == vm1
        r = verify(repo)
        assert r.ok and r.vm_definitions_checked == 1, r.problem_lines()
        assert read_all(repo, s2[0].id) == data["web1-vda"]


def test_gc_between_storing_a_definition_and_the_commit_keeps_it(place):
    """The definition's records a writer reuses (an earlier, forgotten set's) are stamped with its
    lease's epoch: a gc that runs after the writer stored it and before its index commit keeps them."""
    from helpers.repo import write_backup

    new_repo(place.spec, **place.init_options()).close()
    vm = vm_def("web1", 30)
    with open_place(place) as repo, open_place(place) as other:
        [first] = repo.commit_set([write_backup(repo, "web1-vda", disk(30), set_writers=[])], vm=vm)
        collect(other, grace=0)         # a new epoch: the first set's records now carry an older one
        forget(repo, [first.id])        # and are referenced by nobody
        ws: list = []
        write_backup(repo, "web1-vda", disk(31), set_writers=ws)
        gcs = []
        write_manifest = ws[0].write_manifest

        def gc_first(manifest: bytes) -> bytes:     # the definition is stored by now; not committed
            gcs.append(collect(other, grace=0))
            return write_manifest(manifest)
        ws[0].write_manifest = gc_first
        [second] = repo.commit_set(ws, vm=vm)
        assert len(gcs) == 1 and second.vm == first.vm
        assert repo.vm_definition(second) == vm
        assert gcs[0].kept_in_use > 0       # kept for the writer's stamps, not for a reference
        collect(other, grace=0)
        assert repo.vm_definition(repo.get_backup(second.id)) == vm and verify(repo).ok


def test_rebuild_index_keeps_domain_and_definition(place, tmp_path):
    new_repo(place.spec, **place.init_options()).close()
    vm = vm_def("web1", 5)
    with served(tmp_path, {"web1-vda": disk(5), "web1-vdb": disk(6, 2)}) as uris, open_place(place) as repo:
        before = backup(repo, uris, vm)
    rep = json.loads(cli(place, "--json", "rebuild-index").stdout)
    assert sorted(rep["backups"]) == sorted(b.id for b in before) and not rep["backups_incomplete"]
    with open_place(place) as repo:
        after = [repo.get_backup(b.id) for b in before]
        assert after == before
        assert repo.vm_definition(after[1]) == vm
        assert repo.latest_domain_set("web1") == before
    cli(place, "verify")


def _vm_chunk_location(repo, info):
    """Where a chunk only the definition of *info* uses lives (its first piece: the header + XML)."""
    first = vmstore.chunk_ids(repo.context, info.vm)[0]
    return repo.store.chunk_locations([first])[first]


def test_damage_and_a_tampered_index_are_caught(place, tmp_path):
    new_repo(place.spec, **place.init_options()).close()
    vm_web, vm_db, vm_app = vm_def("web1", 7), vm_def("db1", 8), vm_def("app1", 9, nvram=False)
    data = {"web1-vda": disk(7), "web1-vdb": disk(8, 2), "db1-vda": disk(9, 2), "app1-vda": disk(10, 2)}
    with served(tmp_path, data) as uris, open_place(place) as repo:
        web = backup(repo, {d: uris[d] for d in ("web1-vda", "web1-vdb")}, vm_web)
        [db] = backup(repo, {"db1-vda": uris["db1-vda"]}, vm_db)
        [app] = backup(repo, {"app1-vda": uris["app1-vda"]}, vm_app)
        loc = _vm_chunk_location(repo, web[0])
        # a tampered index: db1's domain edited, app1's definition swapped for db1's (readable!)
        with repo.index_db.begin() as conn:
            conn.execute(update(backups).where(backups.c.id == db.id).values(domain="web1"))
            conn.execute(update(backups).where(backups.c.id == app.id).values(vm=db.vm))
    patch_object(place.spec, pack_object_name(loc.pack), loc.offset + loc.stored_len // 2, xor=0x40)

    with open_place(place) as repo:
        for b in web:       # damage of the record: exit 9 where it is read, naming the backup
            with pytest.raises(RepoDamaged, match=b.id):
                repo.vm_definition(repo.get_backup(b.id))
            assert read_all(repo, b.id) == data[b.disk]       # the disks themselves are intact
        for b in (db, app):     # the manifest authenticates domain and vm: the edit is damage
            with pytest.raises(RepoDamaged, match=f"{b.id}.*disagrees"):
                repo.vm_definition(repo.get_backup(b.id))
    p = cli(place, "info", app.id, check=False)
    assert p.returncode == 9 and "vm (index" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = cli(place, "info", "web1-vdb", check=False)
    assert p.returncode == 9 and "VM definition" in p.stderr, p.stderr

    p = cli(place, "verify", check=False)
    assert p.returncode == 5, p.stdout + p.stderr
    damaged = set(re.findall(r"DAMAGED (\S+)", p.stdout + p.stderr))
    assert damaged == {web[0].id, web[1].id, db.id, app.id}, p.stdout + p.stderr
    assert "its VM definition cannot be read" in p.stdout + p.stderr
    assert "domain (index 'web1', manifest 'db1')" in p.stdout + p.stderr
    j = json.loads(cli(place, "--json", "verify", check=False).stdout)
    by_id = {d["id"]: d for d in j["damaged"]}
    assert by_id[web[0].id]["ranges"] == [] and not by_id[web[0].id]["index_rows_bad"]
    assert by_id[app.id]["index_rows_bad"] and by_id[db.id]["index_rows_bad"]


# --- encryption and copy (local: the pack files are grepped) ------------------------------------

PW = "vmdef test passphrase"


def _marked_vm(name: str) -> VmDefinition:
    nv = bytearray(nvram_blob(11))
    at = 200 * 1024     # in a piece of random bytes, which plaintext stores raw: greppable there
    nv[at:at + len(XML_MARKER)] = XML_MARKER.encode()
    return VmDefinition(name, domain_xml(name), bytes(nv), "/var/lib/libvirt/qemu/nvram/x_VARS.fd")


def _all_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


def test_encrypted_repository_seals_it_and_copy_carries_it_both_ways(tmp_path, monkeypatch):
    vm = _marked_vm("web1")
    marker = XML_MARKER.encode()
    plain, enc, back = tmp_path / "plain", tmp_path / "enc", tmp_path / "back"
    new_repo(plain).close()
    env_pw = {"NBDBACKUP_PASSPHRASE": PW}
    nbdbackup("--repo", enc, "init", "--chunk-size", "64K", "--encryption", "--kdf-memory", "8",
              env={**os.environ, **env_pw})
    with served(tmp_path, {"web1-vda": disk(12), "web1-vdb": disk(13, 2)}) as uris:
        with Repository.open(str(plain)) as repo:
            src = backup(repo, uris, vm)
        assert marker in _all_bytes(plain)      # the needle is findable where nothing is sealed
        monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PW)
        with Repository.open(str(enc)) as repo:     # a direct backup into the encrypted repository
            direct = backup(repo, {"web1-vda": uris["web1-vda"]}, vm)
            assert repo.vm_definition(direct[0]) == vm
    stored = _all_bytes(enc)
    assert marker not in stored and vm.xml.encode()[:200] not in stored and vm.nvram[:4096] not in stored

    # plaintext -> encrypted: the definition re-sealed under the destination's key
    p = nbdbackup("--repo", plain, "--json", "copy", "--to", enc, "--all",
                  env={**os.environ, "NBDBACKUP_DEST_PASSPHRASE": PW})
    assert json.loads(p.stdout)["backups_copied"] == 2
    stored = _all_bytes(enc)
    assert marker not in stored and vm.nvram[:4096] not in stored
    with Repository.open(str(enc)) as repo:
        copies = [repo.get_backup(b.id) for b in src]
        assert [(c.domain, c.set_id) for c in copies] == [("web1", src[0].set_id)] * 2
        assert copies[0].vm == copies[1].vm == direct[0].vm != src[0].vm    # DEST's keyed id, stored once
        assert repo.vm_definition(copies[1]) == vm
        assert verify(repo).ok

    # encrypted -> plaintext
    new_repo(back).close()
    p = nbdbackup("--repo", enc, "--json", "copy", "--to", back, "--all")
    assert json.loads(p.stdout)["backups_copied"] == 3
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE")
    with Repository.open(str(back)) as repo:
        got = [repo.get_backup(b.id) for b in src]
        assert got[0].vm == src[0].vm      # plain blake3 in both plaintext repositories
        assert repo.vm_definition(got[0]) == vm and repo.vm_definition(repo.get_backup(direct[0].id)) == vm


def test_copy_into_every_place_carries_the_definition(place, tmp_path):
    """A local plaintext source copied into local+SQLite, local+PG and S3+PG (whole sets, once)."""
    from nbdbackup.repo.copy import copy_backups, select_backups

    vm = vm_def("web1", 40)
    src_path = tmp_path / "src"
    new_repo(src_path).close()
    new_repo(place.spec, **place.init_options()).close()
    with served(tmp_path, {"web1-vda": disk(40), "web1-vdb": disk(41, 2)}) as uris:
        with Repository.open(str(src_path)) as s:
            src = backup(s, uris, vm)
    with Repository.open(str(src_path)) as s, open_place(place) as d:
        r = copy_backups(s, d, select_backups(s, everything=True))
        assert not r.failed and len(r.copied) == 2
        got = [d.get_backup(b.id) for b in src]
        assert got == [c.committed for c in r.copied]
        assert [(g.domain, g.vm, g.set_id) for g in got] == [(b.domain, b.vm, b.set_id) for b in src]
        assert d.vm_definition(got[1]) == vm and d.latest_domain_set("web1") == got
        assert copy_backups(s, d, select_backups(s, everything=True)).copied == []    # idempotent


# --- migration ------------------------------------------------------------------------------------

def test_an_index_at_0003_is_refused_then_migrated(place, tmp_path):
    from alembic import command

    from nbdbackup.repo.index import alembic_config

    new_repo(place.spec, **place.init_options()).close()
    with served(tmp_path, {"old": disk(20, 2), "web1-vda": disk(21, 2)}) as uris:
        with open_place(place) as repo:
            [old] = backup(repo, {"old": uris["old"]}, None)
            command.downgrade(alembic_config(repo.index_db), "0003")   # the index an older version made
        p = cli(place, "list", check=False)
        assert p.returncode == 7 and "nbdbackup migrate" in p.stderr and "0003" in p.stderr, p.stderr
        p = cli(place, "migrate")
        assert "from revision 0003 to 0005" in p.stderr
        with open_place(place) as repo:
            assert repo.list_backups() == [old]
            [new] = backup(repo, {"web1-vda": uris["web1-vda"]}, vm_def("web1", 21))
            assert repo.vm_definition(new) == vm_def("web1", 21)
            assert repo.latest_domain_set("web1") == [new]
            assert read_all(repo, old.id) == disk(20, 2)


def test_info_of_a_backup_without_a_repository_is_a_usage_error():
    p = nbdbackup("info", "web1-vda", check=False, env={"NBDBACKUP_REPO": ""})
    assert p.returncode == 2 and "not an NBD URI" in p.stderr and "--repo REPO info BACKUP" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_definition_that_cannot_be_had_fails_the_run_and_commits_nothing(tmp_path):
    """vm_definition() is part of the run: when it fails (or gives an unnamed domain) no backup of
    the set is committed and the source hears `failed` (so it keeps its changes)."""
    from nbdbackup.errors import SourceFailed

    class Failing(VmDouble):
        def __init__(self, uris, vm, exc):
            super().__init__(uris, vm)
            self.exc, self.outcome = exc, None

        def vm_definition(self):
            if self.exc is not None:
                raise self.exc
            return self.vm

        def failed(self, exc):
            self.outcome = exc

    with served(tmp_path, {"web1-vda": disk(50, 2), "web1-vdb": disk(51, 2)}) as uris, \
            new_repo(tmp_path / "r") as repo:
        for src, want in ((Failing(uris, None, SourceFailed("libvirt went away")), SourceFailed),
                          (Failing(uris, VmDefinition("", "<domain/>"), None), ValueError)):
            with pytest.raises(want):
                run_backup(repo, src, "full", BackupOptions(connections=1))
            assert isinstance(src.outcome, want) and repo.list_backups() == []
