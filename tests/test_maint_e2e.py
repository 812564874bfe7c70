"""End to end with real qemu tools: image backups, verify, prune/forget, gc, restore compared by qemu-img."""

from __future__ import annotations

import json

from helpers.support import nbdbackup, require_tool, run


def test_backup_forget_gc_restore_with_qemu(tmp_path):
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    require_tool("qemu-nbd")
    disk, repo = tmp_path / "vm1.qcow2", tmp_path / "repo"
    run([qemu_img, "create", "-q", "-f", "qcow2", disk, "24M"])
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x41 0 4M", "-c", "write -P 0x42 8M 2M", disk])
    nbdbackup("init", "--repo", repo, "--chunk-size", "64K", "-q")
    snapshots = []
    for step, cmds in enumerate((None, ["write -P 0x43 1M 1M", "write -z 8M 1M"],
                                 ["discard 0 512K", "write -P 0x44 20M 3M"])):
        if cmds:
            run([qemu_io, "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], disk])
        kind = "full" if step == 0 else "incremental"
        info = json.loads(nbdbackup(kind, "--repo", repo, "--image", disk, "--json").stdout)
        raw = tmp_path / f"point{step}.raw"
        run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", disk, raw])
        snapshots.append((info["id"], raw))
    nbdbackup("verify", "--repo", repo)
    # keep only the newest: prune forgets the two older backups, gc reclaims them
    out = json.loads(nbdbackup("prune", "--repo", repo, "--keep-last", "1", "--json").stdout)
    assert out["removed"] == 2
    gc = json.loads(nbdbackup("gc", "--repo", repo, "--json").stdout)
    assert gc["bytes_reclaimed"] > 0
    nbdbackup("verify", "--repo", repo)
    newest, raw = snapshots[-1]
    target = tmp_path / "restored.raw"
    nbdbackup("restore", "--repo", repo, newest, target, "-q")
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", raw, target])
    # the next incremental still works after its predecessors were pruned and collected
    run([qemu_io, "-f", "qcow2", "-c", "write -P 0x45 2M 1M", disk])
    info = json.loads(nbdbackup("incremental", "--repo", repo, "--image", disk, "--json").stdout)
    target2 = tmp_path / "restored2.raw"
    nbdbackup("restore", "--repo", repo, info["id"], target2, "-q")
    run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", disk, target2])
