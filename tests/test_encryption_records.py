"""Encrypted records (issue 13): the codec, and every read and write path of an encrypted repository.

Encrypted repositories are made through the library here (Repository.init(master_key=...));
test_encryption_cli.py drives the same through `init --encryption`. Each repository-level
test runs on local+SQLite, local+PostgreSQL and S3+PostgreSQL (the `place` fixture).
"""

from __future__ import annotations

import os
import random
import subprocess

import blake3
import pytest

from helpers.encryption import haystacks, marked_disk, needles, qemu_io_read
from helpers.places import object_names, patch_object, read_object
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, read_all, write_backup
from helpers.serve import serve_in_process
from helpers.support import require_tool
from nbdbackup.engine.restore import restore
from nbdbackup.errors import ChunkCorrupt, KeyRefused, UsageError
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P
from nbdbackup.repo.chunks import ZERO_REF, DecodeError
from nbdbackup.repo.codec import PLAIN, SealedCodec, codec_for
from nbdbackup.repo.crypto import MasterKey
from nbdbackup.repo.forget import forget
from nbdbackup.repo.gc import collect
from nbdbackup.repo.rebuild import rebuild_index
from nbdbackup.repo.verify import verify


def sealed_repo(place, key: MasterKey, **kw) -> Repository:
    return new_repo(place.spec, master_key=key, **place.init_options(), **kw)


def opened(place, key: MasterKey | None, **kw) -> Repository:
    return Repository.open(place.spec, master_key=key, **kw)


# --- the codec alone ------------------------------------------------------------------------

def test_sealed_codec_round_trip_and_every_edit_fails():
    key = MasterKey.generate()
    c = SealedCodec(key)
    text = (b"compressible " * 6000)[:CS]
    noise = os.urandom(CS)
    for data in (text, noise):
        p = c.prepare(memoryview(data), -3)
        assert p.flags == P.FLAG_SEALED and p.hash == c.hash(data) != blake3.blake3(data).digest()
        if data is noise:
            assert p.compression == P.COMP_NONE and len(p.payload) == len(data) + 28
        else:       # compressed, then sealed
            assert p.compression == P.COMP_ZSTD and len(p.payload) < len(data) // 4
        assert data not in bytes(p.payload)
        assert c.decode(P.REC_CHUNK, p.compression, p.raw_len, p.hash, p.payload, flags=P.FLAG_SEALED) == data
        for where in (0, 11, 12, len(p.payload) // 2, len(p.payload) - 1):     # nonce, ciphertext, tag
            bad = bytearray(p.payload)
            bad[where] ^= 0x01
            with pytest.raises(DecodeError, match="authentication failed"):
                c.decode(P.REC_CHUNK, p.compression, p.raw_len, p.hash, bad)
        # the header is the AAD: a record read as another type, compression, length or id fails,
        # even where the index was changed to agree with an edited header
        for args in ((P.REC_SEGMENT, p.compression, p.raw_len, p.hash),
                     (P.REC_CHUNK, 1 - p.compression, p.raw_len, p.hash),
                     (P.REC_CHUNK, p.compression, p.raw_len - 1, p.hash),
                     (P.REC_CHUNK, p.compression, p.raw_len, bytes(32 - 1) + b"\1")):
            with pytest.raises(DecodeError, match="authentication failed"):
                c.decode(*args, p.payload)
        with pytest.raises(DecodeError, match="not encrypted"):
            c.decode(P.REC_CHUNK, p.compression, p.raw_len, p.hash, p.payload, flags=0)
        with pytest.raises(DecodeError, match="is encrypted"):
            PLAIN.decode(P.REC_CHUNK, p.compression, p.raw_len, p.hash, p.payload, flags=P.FLAG_SEALED)
        with pytest.raises(DecodeError, match="authentication failed"):     # another key's record
            SealedCodec(MasterKey.generate()).decode(P.REC_CHUNK, p.compression, p.raw_len, p.hash, p.payload)
    a, b = c.prepare(text, -3), c.prepare(text, -3)
    assert a.hash == b.hash and bytes(a.payload)[:12] != bytes(b.payload)[:12]      # fresh nonce each time
    assert c.prepare(bytes(CS), -3).hash == ZERO_REF and c.ref(bytes(CS)) == ZERO_REF
    assert c.ref(text) == c.hash(text)
    h, comp, payload = c.encode_blob(P.REC_MANIFEST, b'{"x": 1}' * 50, 3)
    assert c.decode(P.REC_MANIFEST, comp, 400, h, payload) == b'{"x": 1}' * 50
    with pytest.raises(DecodeError):
        c.decode(P.REC_SEGMENT, comp, 400, h, payload)


def test_master_key_derivations_and_secrecy():
    key = MasterKey.generate()
    assert len(key.material) == 64 and len(key.record_key) == len(key.id_key) == 32
    assert len({key.material[:32], key.record_key, key.id_key}) == 3
    assert key.record_key == MasterKey(key.material).record_key       # derived, deterministic
    assert key.key_check("a" * 32) != key.key_check("b" * 32)
    assert key.material.hex() not in repr(key) + str(key) and "secret" in repr(key)
    with pytest.raises(ValueError):
        MasterKey(b"short")


# --- repositories -----------------------------------------------------------------------------

def test_full_incremental_round_trip_and_keys(place):
    key = MasterKey.generate()
    data = marked_disk(2)
    with sealed_repo(place, key) as repo:
        assert repo.codec.encrypted and repo.config.encryption["cipher"] == "aes-256-gcm"
        full = write_backup(repo, "vda", data, zero_holes=True)
        changed = bytearray(data)
        changed[3 * CS + 5:3 * CS + 9] = b"EDIT"
        changed[21 * CS:22 * CS] = os.urandom(CS)
        inc = write_backup(repo, "vda", bytes(changed), parent=full, changed=[3, 21])
    with pytest.raises(UsageError):
        opened(place, None)
    with pytest.raises(KeyRefused):
        opened(place, MasterKey.generate())
    with opened(place, key) as repo:
        assert read_all(repo, full.id) == data
        assert read_all(repo, inc.id) == bytes(changed)
        assert inc.kind == "incremental" and inc.parent == full.id
        assert verify(repo).ok
        # dedup holds inside the repository: the incremental stored its two chunks and a segment
        assert inc.stored_bytes < 3 * (CS + 48 + 28)


def test_restore_and_qemu_through_serve(place, tmp_path):
    qemu_img = require_tool("qemu-img")
    key = MasterKey.generate()
    data = marked_disk(3)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    with sealed_repo(place, key) as repo:
        b = write_backup(repo, "vm1", data, zero_holes=True)
        restore(repo, b.id, str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == data
    with serve_in_process(place.spec, tmp_path, repo_options={"master_key": key}) as s:
        subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), s.uri("vm1")],
                       check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plaintext-control"])
def test_marker_and_plaintext_hashes_are_nowhere(place, encrypted):
    key = MasterKey.generate() if encrypted else None
    data = marked_disk(4)
    with new_repo(place.spec, master_key=key, **place.init_options()) as repo:
        b = write_backup(repo, "vda", data, zero_holes=True)
        inc = write_backup(repo, "vda", data[:CS * 8] + os.urandom(CS) + data[CS * 9:], parent=b, changed=[8])
        assert inc.parent == b.id
        stacks = haystacks(place, repo)
    assert any(n.endswith(".pack") for n in stacks) and any("config.json" in n for n in stacks)
    found = {(what, where) for what, needle in needles(data).items() for where, hay in stacks.items()
             if needle in hay}
    if encrypted:
        assert not found, sorted(found)[:20]
    else:
        # the control: the same search finds what a plaintext repository shows (so it can fail)
        names = {what for what, _ in found}
        assert "marker" in names and all(f"blake3(chunk {i})" in names for i in range(16)), sorted(names)


def _chunk_record(repo, info, index: int):
    with repo.open_image(info) as img:
        h = img.chunk_ref(index)
    loc = repo.store.chunk_locations([h])[h]
    return P.pack_object_name(loc.pack), loc


@pytest.mark.parametrize("part", ["ciphertext", "nonce", "header"])
def test_tampered_record_is_damage_everywhere(place, tmp_path, part):
    key = MasterKey.generate()
    data = marked_disk(5)
    victim = 9          # a random chunk (stored raw before sealing)
    with sealed_repo(place, key) as repo:
        b = write_backup(repo, "vm1", data, zero_holes=True)
        obj, loc = _chunk_record(repo, b, victim)
    where = {"ciphertext": loc.offset + 12 + 1000, "nonce": loc.offset + 3,
             "header": loc.offset - P.HEADER_SIZE + 6}[part]       # header: the flags byte
    patch_object(place.spec, obj, where, xor=0x01)
    with opened(place, key) as repo:
        rep = verify(repo)
        assert not rep.ok and [d.ranges for d in rep.damaged] == [[(victim * CS, CS)]], rep.problem_lines()
        with pytest.raises(ChunkCorrupt) as e:
            restore(repo, b.id, str(tmp_path / "out.raw"))
        assert (e.value.offset, e.value.length) == (victim * CS, CS)
        assert e.value.exit_code == 9
        with repo.open_image(b) as img:     # the rest of the disk still reads
            assert img.read(0, victim * CS) == data[:victim * CS]
    with serve_in_process(place.spec, tmp_path, repo_options={"master_key": key}) as s:
        bad = qemu_io_read(s.uri("vm1"), victim * CS, CS)
        assert "Input/output error" in bad.stdout + bad.stderr, bad
        fine = qemu_io_read(s.uri("vm1"), 16 * CS, CS, pattern=0)
        assert fine.returncode == 0 and "error" not in fine.stdout + fine.stderr, fine


def test_rebuild_index_of_an_encrypted_repository(place):
    key = MasterKey.generate()
    data = marked_disk(6)
    with sealed_repo(place, key) as repo:
        b1 = write_backup(repo, "vda", data, zero_holes=True)
        b2 = write_backup(repo, "vdb", data[:12 * CS], zero_holes=True)
    with pytest.raises(UsageError):
        rebuild_index(place.spec, index_url=place.index_url)
    with pytest.raises(KeyRefused):
        rebuild_index(place.spec, index_url=place.index_url, master_key=MasterKey.generate())
    rep = rebuild_index(place.spec, index_url=place.index_url, master_key=key)
    assert sorted(rep.backups) == sorted([b1.id, b2.id]) and not rep.backups_lost, rep.problem_lines()
    with opened(place, key) as repo:
        assert read_all(repo, b1.id) == data and read_all(repo, b2.id) == data[:12 * CS]
        assert verify(repo).ok


def test_gc_repack_of_an_encrypted_repository_then_restore(place, tmp_path):
    key = MasterKey.generate()
    rng = random.Random(7)
    a = rng.randbytes(CS * 12)
    b = a[:CS * 3] + rng.randbytes(CS * 2)
    with sealed_repo(place, key, pack_size=4 * (CS + 128)) as repo:    # 4 sealed chunks per pack
        ba = write_backup(repo, "vda", a)
        bb = write_backup(repo, "vdb", b)
        forget(repo, [ba.id])
        packs_before = set(object_names(repo))
        rep = collect(repo, repack_threshold=1.0, grace=0)
        assert rep.packs_repacked >= 1 and rep.packs_written >= 1 and not rep.skipped_damaged, rep
        assert set(object_names(repo)) - packs_before       # a new pack holds the moved records
    with opened(place, key) as repo:
        assert read_all(repo, bb.id) == b
        restore(repo, bb.id, str(tmp_path / "out.raw"))
        assert (tmp_path / "out.raw").read_bytes() == b
        assert verify(repo).ok


def test_sealed_packs_copied_into_a_plaintext_repository_are_not_read(tmp_path):
    """A plaintext repository never reads a sealed record as data (nor the reverse): packs copied
    over from an encrypted repository give rebuild-index no backup there."""
    import shutil

    key = MasterKey.generate()
    with new_repo(tmp_path / "sealed", master_key=key) as sealed:
        write_backup(sealed, "vda", os.urandom(2 * CS))
    with new_repo(tmp_path / "plain") as plain:
        assert codec_for(plain.config, key) is PLAIN        # a key changes nothing for a plaintext one
        write_backup(plain, "vdb", os.urandom(2 * CS))
    shutil.copytree(tmp_path / "sealed" / "packs", tmp_path / "plain" / "packs", dirs_exist_ok=True)
    rep = rebuild_index(str(tmp_path / "plain"))
    assert [b.split("-")[0] != "" for b in rep.backups] == [True]       # vdb only
    with Repository.open(str(tmp_path / "plain")) as plain:
        assert [b.disk for b in plain.list_backups()] == ["vdb"]
    # and the other way round: the sealed repository ignores the plaintext packs' manifests
    shutil.copytree(tmp_path / "plain" / "packs", tmp_path / "sealed" / "packs", dirs_exist_ok=True)
    rep = rebuild_index(str(tmp_path / "sealed"), master_key=key)
    with Repository.open(str(tmp_path / "sealed"), master_key=key) as sealed:
        assert [b.disk for b in sealed.list_backups()] == ["vda"]
        assert len(rep.backups) == 1


def test_id_spaces():
    k = MasterKey.generate()
    assert SealedCodec(k).id_space == SealedCodec(MasterKey(k.material)).id_space != PLAIN.id_space
    assert SealedCodec(MasterKey.generate()).id_space != SealedCodec(k).id_space
    assert k.id_key not in SealedCodec(k).id_space


def test_sealing_and_opening_release_the_gil():
    """prepare() and decode() run in worker threads: with a switch interval far longer than the
    test, a second thread gets to run only if the first releases the GIL (blake3, zstd and
    AES-GCM do; a pure Python loop would starve it)."""
    import sys
    import threading

    c = SealedCodec(MasterKey.generate())
    data = [os.urandom(CS * 4) for _ in range(2)]
    sealed = [c.prepare(d, -3, compress=False) for d in data]
    for work in (lambda i: c.prepare(data[i], -3, compress=False),
                 lambda i: c.decode(P.REC_CHUNK, P.COMP_NONE, len(data[i]), sealed[i].hash, sealed[i].payload)):
        counts, stop = [0, 0], threading.Event()

        def loop(i, work=work, counts=counts, stop=stop):
            while not stop.is_set():
                work(i)
                counts[i] += 1
                if counts[i] >= 200:
                    stop.set()
        old = sys.getswitchinterval()
        sys.setswitchinterval(100)
        try:
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            sys.setswitchinterval(old)
        assert min(counts) >= 20, counts


def test_a_chunk_prepared_by_another_codec_is_refused(tmp_path):
    with new_repo(tmp_path / "r", master_key=MasterKey.generate()) as repo:
        w = repo.writer("vda", kind="full", size=CS)
        with pytest.raises(ValueError, match="another repository's codec"):
            w.put(0, PLAIN.prepare(os.urandom(CS), -3))
        w.abort()


def test_sealed_pack_with_a_damaged_footer_is_salvaged(tmp_path):
    """rebuild-index walks the record headers of a pack whose footer is damaged: the sealed flag
    comes from each header, and the records open as before."""
    key = MasterKey.generate()
    data = marked_disk(8)
    with new_repo(tmp_path / "r", master_key=key) as repo:
        b = write_backup(repo, "vda", data, zero_holes=True)
        packs = object_names(repo)
    assert len(packs) == 1
    patch_object(str(tmp_path / "r"), packs[0], len(read_object(str(tmp_path / "r"), packs[0])) - P.TRAILER_SIZE - 5,
                 xor=0xFF)
    rep = rebuild_index(str(tmp_path / "r"), master_key=key)
    assert rep.packs_salvaged and rep.backups == [b.id], rep.problem_lines()
    with Repository.open(str(tmp_path / "r"), master_key=key) as repo:
        assert read_all(repo, b.id) == data


def test_a_plaintext_repository_is_as_before(tmp_path):
    import json

    with new_repo(tmp_path / "r") as repo:
        assert repo.codec is PLAIN and not repo.codec.encrypted
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "encryption" not in cfg and cfg["format"] == 1
