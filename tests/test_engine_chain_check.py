"""An incremental checks that the image agrees with the parent where the bitmap says clean.

Someone clears or pauses the tool's bitmap (`qemu-img bitmap --clear`,
`--disable` ... `--enable`): the bitmap then lies, and an incremental would
inherit stale chunks forever. Base:allocation disagreeing with the parent, or a
sampled clean chunk whose hash differs, breaks the chain: a full with a warning,
or exit 13 with --no-fallback. Every fallback restores bit-exactly.
"""

import json

import pytest

from helpers import support
from helpers.engine_util import MiB, backup, bitmaps, init_repo, make_image, nbb, qio, restore_equals, snapshot_raw
from helpers.repo import new_repo


def _setup(tmp_path, size=16 * MiB):
    img = make_image(tmp_path / "vm.qcow2", size)
    qio(img, "write -q -P 0x11 0 2M")
    repo = init_repo(tmp_path / "repo", "64K")
    full = backup(repo, "full", "--image", str(img))
    return img, repo, full


def _our_bitmap(img):
    (b,) = [b["name"] for b in bitmaps(img) if b["name"].startswith("nbdbackup-")]
    return b


def _qemu_img_bitmap(img, op):
    support.run([support.require_tool("qemu-img"), "bitmap", op, str(img), _our_bitmap(img)])


def _expect_broken_chain(repo, img, tmp_path, reason, *args):
    """--no-fallback: exit 13 naming *reason*; then the fallback full, restored bit-exactly."""
    p = nbb(repo, "incremental", "--no-fallback", "--image", str(img), *args, check=False)
    assert p.returncode == 13, (p.returncode, p.stderr)
    assert "cannot take an incremental" in p.stderr and reason in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = nbb(repo, "--json", "incremental", "--image", str(img), *args)
    info = json.loads(p.stdout)
    assert info["kind"] == "full" and info["parent"] is None, info
    assert info["chain_check"]["result"] == "mismatch"
    assert "taking a full backup instead" in p.stderr and reason in p.stderr, p.stderr
    assert restore_equals(repo, info["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)
    # the chain is sound again afterwards
    qio(img, "write -q -P 0x77 9M 64k")
    inc = backup(repo, "incremental", "--image", str(img))
    assert inc["kind"] == "incremental" and inc["parent"] == info["id"]
    assert inc["chain_check"]["result"] == "ok"
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now2.raw"), tmp_path)
    return info


def test_sound_chain_passes_and_the_summary_says_what_was_sampled(tmp_path):
    img, repo, _ = _setup(tmp_path)
    qio(img, "write -q -P 0x22 4M 64k", "write -q -z 64k 64k")     # tracked by the bitmap
    p = nbb(repo, "incremental", "--image", str(img))
    # 2 MiB of data at 64 KiB: 31 clean data chunks after the write-zeroes; 0.5 % -> at least 1
    assert "chain check: 1 of 31 clean chunks sampled (64.0 KiB, 0.5 %), all match the parent" in p.stderr, \
        p.stderr
    qio(img, "write -q -P 0x23 5M 64k")
    inc = backup(repo, "incremental", "--image", str(img), "--check-clean", "100")
    assert inc["kind"] == "incremental"
    # the 31, and the chunk at 4M the first incremental stored
    assert inc["chain_check"] == {"percent": 100.0, "clean_chunks": 32, "sampled_chunks": 32,
                                  "sampled_bytes": 32 * 64 * 1024, "suspect_chunks": 0,
                                  "confirmed_chunks": 0, "result": "ok"}
    assert inc["read_bytes"] == 64 * 1024
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)


def test_cleared_bitmap_overwritten_data_is_caught_by_the_sample(tmp_path):
    """All data rewritten, bitmap cleared: only the sample can see it; any sampled chunk differs."""
    img, repo, _ = _setup(tmp_path)
    qio(img, "write -q -P 0x33 0 2M")
    _qemu_img_bitmap(img, "--clear")
    _expect_broken_chain(repo, img, tmp_path, "sampled by --check-clean")


def test_cleared_bitmap_write_into_zero_range_is_caught_by_allocation(tmp_path):
    """A write where the parent had zeros, bitmap cleared: caught even with the sample off."""
    img, repo, _ = _setup(tmp_path)
    qio(img, "write -q -P 0x44 8M 64k")
    _qemu_img_bitmap(img, "--clear")
    _expect_broken_chain(repo, img, tmp_path, "recorded zeros there", "--check-clean", "0")


@pytest.mark.parametrize("change, needle", [
    ("write -q -P 0x55 12M 128k", "recorded zeros there"),     # data where the parent had zeros
    ("write -q -z -u 1M 256k", "reads as zero there"),         # zero clusters where it had data
], ids=["data-into-zeros", "zeros-over-data"])
def test_allocation_changed_while_the_bitmap_was_disabled(tmp_path, change, needle):
    """Bitmap disabled, the image changed, bitmap enabled again: it looks sound but is not.
    base:allocation gives it away in both directions, with the sample off."""
    img, repo, _ = _setup(tmp_path)
    _qemu_img_bitmap(img, "--disable")
    qio(img, change)
    _qemu_img_bitmap(img, "--enable")
    _expect_broken_chain(repo, img, tmp_path, needle, "--check-clean", "0")


def test_allocated_zeros_are_not_a_false_alarm(tmp_path):
    """Zeros written as data (allocated, read as zero) where the parent recorded zero: confirmed by
    reading, not called broken."""
    img = make_image(tmp_path / "vm.qcow2", 16 * MiB)
    qio(img, "write -q -P 0x11 0 1M", "write -q -P 0 4M 512k")     # -P 0: allocated, all zero bytes
    repo = init_repo(tmp_path / "repo", "64K")
    backup(repo, "full", "--image", str(img))
    qio(img, "write -q -P 0x66 2M 64k")
    inc = backup(repo, "incremental", "--image", str(img), "--no-fallback")
    assert inc["kind"] == "incremental"
    assert inc["chain_check"]["suspect_chunks"] == 8 and inc["chain_check"]["confirmed_chunks"] == 8
    assert inc["chain_check"]["result"] == "ok"
    assert restore_equals(repo, inc["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)


def test_cleared_bitmap_from_an_nbd_source_with_bitmap(tmp_path):
    """--source with --bitmap (the caller's bitmap) is checked too."""
    from helpers.support import qemu_nbd

    img = make_image(tmp_path / "vm.qcow2", 16 * MiB)
    qio(img, "write -q -P 0x11 0 2M")
    support.run(["qemu-img", "bitmap", "--add", str(img), "b0"])
    repo = init_repo(tmp_path / "repo", "64K")
    sock = tmp_path / "s.sock"
    uri = f"nbd+unix:///?socket={sock}"
    with qemu_nbd(img, sock):
        backup(repo, "full", "--source", uri, "--disk", "vm")
    qio(img, "write -q -P 0x12 0 2M")
    support.run(["qemu-img", "bitmap", "--clear", str(img), "b0"])
    with qemu_nbd(img, sock, bitmaps=("b0",)):
        p = nbb(repo, "incremental", "--no-fallback", "--source", uri, "--disk", "vm", "--bitmap", "b0",
                check=False)
        assert p.returncode == 13 and "sampled by --check-clean" in p.stderr, p.stderr
        info = backup(repo, "incremental", "--source", uri, "--disk", "vm", "--bitmap", "b0")
    assert info["kind"] == "full"
    assert restore_equals(repo, info["id"], snapshot_raw(img, tmp_path / "now.raw"), tmp_path)


def test_check_clean_rejects_bad_percentages(tmp_path):
    img, repo, _ = _setup(tmp_path)
    for bad in ("nan", "inf", "-1", "100.5", "x"):
        p = nbb(repo, "incremental", "--image", str(img), "--check-clean", bad, check=False)
        assert p.returncode == 2 and "--check-clean" in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr)


def test_cleared_bitmap_of_a_live_vm_over_qmp(tmp_path, monkeypatch):
    """--qmp: someone clears one disk's bitmap in qemu; that disk falls back to a full, the other
    stays incremental (one set), both restore exactly; with --no-fallback: ChainBroken."""
    from helpers.qmp_vm import Vm
    from nbdbackup.engine.backup import BackupOptions, run_backup
    from nbdbackup.errors import ChainBroken
    from nbdbackup.sources.qmp import QmpSource

    monkeypatch.setenv("NBDBACKUP_STATE_DIR", str(tmp_path / "state"))
    vm = Vm(tmp_path, {"vda": 8 * MiB, "vdb": 4 * MiB})
    try:
        with new_repo(tmp_path / "repo") as repo:
            def run(kind, **kw):
                return run_backup(repo, QmpSource(vm.qmp_sock, list(vm.disks)), kind,
                                  BackupOptions(connections=2, check_clean=0, **kw))

            vm.write("vda", 0, 1 * MiB, 0x11)
            vm.write("vdb", 0, 1 * MiB, 0x21)
            full = run("full")
            vm.write("vda", 5 * MiB, 70_000, 0x44)      # where the full recorded zeros
            vm.write("vdb", 2 * MiB, 4096, 0x22)
            (ours,) = [n for n in vm.bitmaps("vda") if n.startswith("nbdbackup-")]
            vm.cmd("block-dirty-bitmap-clear", node=vm.node("vda"), name=ours)
            expected = vm.snapshot()
            with pytest.raises(ChainBroken, match="recorded zeros there"):
                run("incremental", no_fallback=True)
            vm.assert_clean()
            res = {r.info.disk: r for r in run("incremental")}
            assert res["vda"].info.kind == "full" and "recorded zeros there" in res["vda"].fallback_reason
            assert res["vdb"].info.kind == "incremental" and res["vdb"].info.parent == full[1].info.id
            assert res["vda"].info.set_id == res["vdb"].info.set_id
            # the fleecing export reports allocation through its backing disk: no false suspects
            assert res["vdb"].stats.chain_check.suspect_chunks == 0
            for disk, r in res.items():
                with repo.open_image(r.info) as img:
                    assert img.read(0, r.info.size) == expected[disk], disk
            vm.assert_clean()
    finally:
        vm.stop()
