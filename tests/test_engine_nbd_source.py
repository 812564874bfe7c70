"""Any NBD export by URI: full, incremental with a caller-managed bitmap, --since, fallbacks."""

import json

import pytest

from helpers import support
from helpers.engine_util import KiB, MiB, backup, init_repo, make_image, nbb, qio, restore_equals, snapshot_raw


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
def test_full_and_incremental_from_uri(tmp_path, encrypted):
    img = make_image(tmp_path / "d.qcow2", 32 * MiB)
    qio(img, "write -q -P 0xa1 0 3M", "write -q -P 0xa2 16M 1M")
    repo = init_repo(tmp_path / "repo", "64K", encrypted=encrypted)
    sock = tmp_path / "s.sock"
    with support.qemu_nbd(img, sock) as uri:
        full = backup(repo, "full", "--source", uri, "--disk", "web", "--connections", "2")
    assert full["kind"] == "full" and full["disk"] == "web" and full["size"] == 32 * MiB
    assert full["read_bytes"] == 4 * MiB and full["source"] == uri
    snap0 = snapshot_raw(img, tmp_path / "s0.raw")

    # the caller starts a bitmap at the full (libvirt would do this with a checkpoint)
    support.run(["qemu-img", "bitmap", "--add", str(img), "b1"])
    qio(img, "write -q -P 0xb1 8M 64k", "write -q -z 0 1M", "discard -q 16M 512k")
    snap1 = snapshot_raw(img, tmp_path / "s1.raw")
    with support.qemu_nbd(img, sock, bitmaps=("b1",)) as uri:
        inc = backup(repo, "incremental", "--source", uri, "--disk", "web", "--bitmap", "b1")
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"] and inc["bitmap"] == "b1"
    assert inc["read_bytes"] == 64 * KiB
    assert restore_equals(repo, full["id"], snap0, tmp_path)
    assert restore_equals(repo, inc["id"], snap1, tmp_path)

    # --since names the parent explicitly; the bitmap still holds everything since the full
    qio(img, "write -q -P 0xb2 12M 64k")
    snap2 = snapshot_raw(img, tmp_path / "s2.raw")
    with support.qemu_nbd(img, sock, bitmaps=("b1",)) as uri:
        inc2 = backup(repo, "incremental", "--source", uri, "--disk", "web", "--bitmap", "b1",
                      "--since", full["id"])
    assert inc2["parent"] == full["id"]
    assert restore_equals(repo, inc2["id"], snap2, tmp_path)
    assert ("encryption" in json.loads((repo / "config.json").read_text())) == encrypted


def test_uri_fallbacks_and_usage_errors(tmp_path):
    img = make_image(tmp_path / "d.qcow2", 8 * MiB)
    qio(img, "write -q -P 0xa1 0 1M")
    repo = init_repo(tmp_path / "repo", "64K")
    sock = tmp_path / "s.sock"
    with support.qemu_nbd(img, sock) as uri:
        # no parent yet: fall back (or exit 13 with --no-fallback)
        p = nbb(repo, "incremental", "--source", uri, "--disk", "x", "--bitmap", "b", "--no-fallback",
                check=False)
        assert p.returncode == 13 and "no backup yet" in p.stderr
        first = json.loads(nbb(repo, "--json", "incremental", "--source", uri, "--disk", "x",
                               "--bitmap", "b").stdout)
        assert first["kind"] == "full" and "taking a full backup instead" in nbb(
            repo, "incremental", "--source", uri, "--disk", "x", "--bitmap", "b", check=False).stderr
        # the export offers no such bitmap
        p = nbb(repo, "incremental", "--source", uri, "--disk", "x", "--bitmap", "nope", "--no-fallback",
                check=False)
        assert p.returncode == 13 and "qemu:dirty-bitmap:nope" in p.stderr
        # usage errors: exit 2, clear message
        for args, msg in [(("--source", uri), "--disk NAME is required"),
                          (("--source", uri, "--disk", "x", "--image", str(img)), "exactly one"),
                          (("--disk", "x"), "exactly one"),
                          (("--source", "nbd+unix:///?sockt=/x", "--disk", "x"), "")]:
            p = nbb(repo, "full", *args, check=False)
            assert p.returncode == 2, (args, p.stderr)
            assert msg in p.stderr and "Traceback" not in p.stderr
        p = nbb(repo, "incremental", "--source", uri, "--disk", "x", check=False)
        assert p.returncode == 2 and "--bitmap" in p.stderr
        p = nbb(repo, "incremental", "--image", str(img), "--since", "x", check=False)
        assert p.returncode == 2 and "tracks its own bitmaps" in p.stderr
        p = nbb(repo, "full", "--source", uri, "--disk", "x", "--connections", "0", check=False)
        assert p.returncode == 2 and "between 1 and 64" in p.stderr
        p = nbb(repo, "incremental", "--source", uri, "--disk", "x", "--bitmap", "b", "--since", "nosuch",
                check=False)
        assert p.returncode == 11
    p = nbb(repo, "full", "--source", f"nbd+unix:///?socket={tmp_path}/none.sock", "--disk", "x", check=False)
    assert p.returncode == 4 and "Traceback" not in p.stderr


def test_no_multi_conn_export_uses_one_connection(tmp_path):
    img = make_image(tmp_path / "d.qcow2", 8 * MiB)
    qio(img, "write -q -P 0xa1 0 2M")
    repo = init_repo(tmp_path / "repo", "64K")
    with support.qemu_nbd(img, tmp_path / "s.sock", connections=1) as uri:
        p = nbb(repo, "--json", "full", "--source", uri, "--disk", "one", "--connections", "4")
    info = json.loads(p.stdout)
    assert info["read_bytes"] == 2 * MiB
    assert "multi-conn" in p.stderr
    assert restore_equals(repo, info["id"], snapshot_raw(img, tmp_path / "s.raw"), tmp_path)
