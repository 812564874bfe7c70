"""Encrypted repositories through the CLI (issue 13): `init --encryption` with NBDBACKUP_PASSPHRASE,
then backups from qcow2 images (full and incremental through dirty bitmaps), restore, serve, verify,
rebuild-index and gc; a marker search of everything stored; a tampered record everywhere.

Every test runs on local+SQLite, local+PostgreSQL and S3+PostgreSQL (the `place` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers.encryption import haystacks, marked_disk, needles, qemu_io_read
from helpers.engine_util import make_image, qio, same_file, snapshot_raw
from helpers.places import patch_object
from helpers.repo import CHUNK_SIZE as CS
from helpers.serve import serve
from helpers.support import nbdbackup, require_tool
from nbdbackup.repo import Repository
from nbdbackup.repo import packs as P

PASSPHRASE = "tr0ub4dor & 3 -- encryption test"


@pytest.fixture
def encrypted(place, monkeypatch):
    """An encrypted repository at *place*, made by `init --encryption`; the passphrase in the
    environment of every command the test runs."""
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASSPHRASE)
    nbdbackup("--repo", place, "init", "--encryption", "--kdf-memory", "8", "--chunk-size", "64K")
    return place


def nbb(place, *args, **kw) -> subprocess.CompletedProcess:
    return nbdbackup("--repo", place, *args, **kw)


def backup(place, kind: str, *args) -> dict:
    out = json.loads(nbb(place, "--json", kind, *args).stdout)
    return out[0] if isinstance(out, list) else out


def backup_id(rep: dict) -> str:
    for k in ("id", "backup_id"):
        if k in rep:
            return rep[k]
    return rep["backups"][0]["id"]


def image_with(tmp_path, data: bytes):
    """A qcow2 image holding *data* (written by qemu-io from a file)."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(data)
    img = make_image(tmp_path / "disk.qcow2", len(data))
    qio(img, f"write -q -s {raw} 0 {len(data)}")
    return img


def test_cli_full_incremental_restore_and_nothing_in_clear(encrypted, tmp_path):
    place = encrypted
    data = marked_disk(11)
    img = image_with(tmp_path, data)
    b1 = backup(place, "full", "--image", img, "--disk", "vda")
    qio(img, f"write -q -P 0x5a {3 * CS} 4096", f"write -q -P 0x00 {9 * CS} {CS}")
    b2 = backup(place, "incremental", "--image", img, "--disk", "vda")
    listed = json.loads(nbb(place, "--json", "list").stdout)
    kinds = {b["id"]: b["kind"] for b in (listed if isinstance(listed, list) else listed["backups"])}
    assert kinds == {backup_id(b1): "full", backup_id(b2): "incremental"}, listed
    now = snapshot_raw(img, tmp_path / "now.raw")
    for bid, expected in ((backup_id(b1), data), (backup_id(b2), now.read_bytes())):
        out = tmp_path / f"{bid}.raw"
        nbb(place, "restore", bid, out)
        assert out.read_bytes() == expected
    with Repository.open(place.spec, index_url=place.index_url) as repo:     # the key from the environment
        assert repo.codec.encrypted
        stacks = haystacks(place, repo)
    found = {(what, where) for what, needle in needles(data).items() for where, hay in stacks.items()
             if needle in hay}
    assert not found, sorted(found)[:20]
    assert not any(PASSPHRASE.encode() in hay for hay in stacks.values())


def test_cli_qemu_reads_an_encrypted_backup_through_serve(encrypted, tmp_path):
    qemu_img = require_tool("qemu-img")
    place = encrypted
    data = marked_disk(12)
    img = image_with(tmp_path, data)
    b = backup(place, "full", "--image", img, "--disk", "vm1")
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    with serve(place.spec, tmp_path) as s:
        subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri("vm1")],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(raw), s.uri(backup_id(b))],
                       check=True, capture_output=True, timeout=120)


def test_cli_tampered_ciphertext(encrypted, tmp_path):
    place = encrypted
    data = marked_disk(13)
    img = image_with(tmp_path, data)
    bid = backup_id(backup(place, "full", "--image", img, "--disk", "vm1"))
    victim = 10
    with Repository.open(place.spec, index_url=place.index_url) as repo:
        with repo.open_image(bid) as im:
            h = im.chunk_ref(victim)
        loc = repo.store.chunk_locations([h])[h]
    patch_object(place.spec, P.pack_object_name(loc.pack), loc.offset + 12 + 777, xor=0x80)
    v = nbb(place, "verify", check=False)
    assert v.returncode == 5, v
    lo, hi = victim * CS, victim * CS + CS - 1
    assert f"bytes {lo}-{hi}" in v.stdout + v.stderr, v
    assert "authentication failed" in v.stdout + v.stderr, v
    r = nbb(place, "restore", bid, tmp_path / "out.raw", check=False)
    assert r.returncode == 9 and str(lo) in r.stderr, r
    with serve(place.spec, tmp_path) as s:
        bad = qemu_io_read(s.uri("vm1"), lo, CS)
        assert "Input/output error" in bad.stdout + bad.stderr, bad
        ok = qemu_io_read(s.uri("vm1"), 0, CS)
        assert ok.returncode == 0 and "error" not in ok.stdout + ok.stderr, ok


def test_cli_rebuild_index_and_gc_of_an_encrypted_repository(encrypted, tmp_path):
    place = encrypted
    data = marked_disk(14)
    img = image_with(tmp_path, data)
    b1 = backup_id(backup(place, "full", "--image", img, "--disk", "vda"))
    qio(img, f"write -q -P 0x77 0 {8 * CS}")
    b2 = backup_id(backup(place, "full", "--image", img, "--disk", "vda"))
    now = snapshot_raw(img, tmp_path / "now.raw")
    nbb(place, "rebuild-index")
    nbb(place, "verify")
    nbb(place, "forget", b1)
    nbb(place, "gc", "--repack-threshold", "1", "--grace", "0")
    nbb(place, "verify")
    out = tmp_path / "b2.raw"
    nbb(place, "restore", b2, out)
    assert same_file(out, now)
    wrong = nbb(place, "verify", check=False, env={"NBDBACKUP_PASSPHRASE": "not it"})
    assert wrong.returncode == 19, wrong
    assert os.environ["NBDBACKUP_PASSPHRASE"] == PASSPHRASE
