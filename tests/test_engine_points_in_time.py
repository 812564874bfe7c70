"""Every point in time of a managed qcow2 image restores bit-exact.

Full, incrementals (new data, WRITE_ZEROES, trims, data rewritten to zeros,
grow, shrink), a second full. Each backup is compared with a raw snapshot
(qemu-img convert) taken at the moment it was made.
"""

from helpers import support
from helpers.engine_util import (
    KiB,
    MiB,
    backup,
    init_repo,
    make_image,
    nbb,
    qio,
    random_file,
    restore_equals,
    snapshot_raw,
    text_file,
)


def test_points_in_time_restore_bit_exact(tmp_path):
    support.require_tool("qemu-nbd")
    img = make_image(tmp_path / "vm1.qcow2", 64 * MiB)
    repo = init_repo(tmp_path / "repo", "64K")
    rnd = random_file(tmp_path / "rnd.bin", 2 * MiB)
    txt = text_file(tmp_path / "txt.bin", 2 * MiB)
    qio(img, "write -q -P 0xaa 0 4M", f"write -q -s {rnd} 8M 2M", f"write -q -s {txt} 20M 2M",
        "write -q -P 0x5 63M 1M")
    points = []     # (backup json, raw snapshot)

    def take(kind):
        info = backup(repo, kind, "--image", str(img))
        points.append((info, snapshot_raw(img, tmp_path / f"p{len(points)}.raw")))
        return info

    full = take("full")
    assert full["kind"] == "full" and full["disk"] == "vm1" and full["size"] == 64 * MiB
    assert full["parent"] is None
    # a full reads only allocated data: 4M + 2M + 2M + 1M
    assert full["read_bytes"] == 9 * MiB

    qio(img, "write -q -P 0xcc 30M 64k", "write -q -P 0xdd 40000k 100k")
    inc1 = take("incremental")
    assert inc1["kind"] == "incremental" and inc1["parent"] == full["id"]
    # 64k aligned + 100k unaligned (touches 3 chunks of 64k): the dirty set, not the disk
    assert 64 * KiB + 100 * KiB <= inc1["read_bytes"] <= 64 * KiB + 192 * KiB

    # WRITE_ZEROES and a trim: recorded as zeros, never read
    qio(img, "write -q -z 0 1M", "discard -q 8M 512k")
    inc2 = take("incremental")
    assert inc2["parent"] == inc1["id"]
    assert inc2["read_bytes"] == 0

    # data rewritten to zeros the slow way (real writes of zero bytes)
    qio(img, "write -q -P 0 20M 1M", "write -q -P 0x77 1M 4k")
    inc3 = take("incremental")
    assert inc3["read_bytes"] <= 1 * MiB + 64 * KiB

    # grow: the new range is read in full (here: it is unallocated, so zero)
    support.run(["qemu-img", "resize", "-q", str(img), str(80 * MiB)])
    qio(img, "write -q -P 0x99 70M 128k", "write -q -P 0x42 33M 64k")
    inc4 = take("incremental")
    assert inc4["size"] == 80 * MiB and inc4["kind"] == "incremental"

    # a second full of unchanged data stores (almost) nothing new
    full2 = take("full")
    assert full2["kind"] == "full" and full2["parent"] is None
    assert full2["stored_bytes"] < 64 * KiB, full2

    # shrink, then an incremental on top of the second full
    support.run(["qemu-img", "resize", "-q", "--shrink", str(img), str(48 * MiB + 12 * KiB)])
    qio(img, "write -q -P 0x31 47M 8k")
    inc5 = take("incremental")
    assert inc5["size"] == 48 * MiB + 12 * KiB and inc5["parent"] == full2["id"]

    for info, raw in points:
        assert restore_equals(repo, info["id"], raw, tmp_path), f"{info['kind']} {info['id']} differs"

    listed = [b["id"] for b in __import__("json").loads(nbb(repo, "--json", "list").stdout)]
    assert listed == [info["id"] for info, _ in points]


def test_incremental_with_nothing_dirty_reads_nothing(tmp_path):
    img = make_image(tmp_path / "quiet.qcow2", 32 * MiB)
    repo = init_repo(tmp_path / "repo", "64K")
    qio(img, "write -q -P 0x1 0 2M")
    full = backup(repo, "full", "--image", str(img))
    inc = backup(repo, "incremental", "--image", str(img))
    assert inc["kind"] == "incremental" and inc["read_bytes"] == 0 and inc["stored_bytes"] == 0
    assert inc["parent"] == full["id"]
    raw = snapshot_raw(img, tmp_path / "now.raw")
    assert restore_equals(repo, inc["id"], raw, tmp_path)


def test_two_disks_with_same_content_share_chunks(tmp_path):
    a = make_image(tmp_path / "a.qcow2", 16 * MiB)
    rnd = random_file(tmp_path / "r.bin", 4 * MiB, seed=7)
    qio(a, f"write -q -s {rnd} 0 4M")
    b = tmp_path / "b.qcow2"
    support.run(["qemu-img", "convert", "-O", "qcow2", str(a), str(b)])
    repo = init_repo(tmp_path / "repo", "64K")
    fa = backup(repo, "full", "--image", str(a))
    fb = backup(repo, "full", "--image", str(b))
    assert fa["disk"] == "a" and fb["disk"] == "b"
    assert fa["stored_bytes"] >= 4 * MiB        # random data does not compress
    assert fb["stored_bytes"] < 64 * KiB        # every chunk already in the repository


def test_data_that_reads_as_zeros_is_stored_as_zero(tmp_path):
    from nbdbackup.repo import Repository

    img = make_image(tmp_path / "z.qcow2", 16 * MiB)
    repo = init_repo(tmp_path / "repo", "64K")
    qio(img, "write -q -P 0x5 0 4M")
    backup(repo, "full", "--image", str(img))
    qio(img, "write -q -P 0 0 1M")            # allocated, but all zero bytes
    inc = backup(repo, "incremental", "--image", str(img))
    assert inc["read_bytes"] == 1 * MiB        # it had to be read to know
    with Repository.open(str(repo)) as r:
        bimg = r.open_image(inc["id"])
        try:
            assert all(bimg.is_zero(i) for i in range(16))
            assert not any(bimg.is_zero(i) for i in range(16, 64))
        finally:
            bimg.close()
