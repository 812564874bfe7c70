"""radosgw stopped during a backup: the backup completes after retries or exits 17 with nothing
committed, and the repository stays consistent (verify passes, gc leaves only what the index names)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from test_many_hosts import with_repo_objects_named_by_index

from helpers.nbd_servers import slow_source
from helpers.places import make_place
from helpers.repo import new_repo_path
from helpers.support import kill_if_running, nbdbackup, nbdbackup_exe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("outage_s", [3.0, None])     # back after 3 s; gone for good
def test_radosgw_stopped_during_a_backup(request, tmp_path, ceph_s3, outage_s):
    place = make_place(request, "s3+pg", tmp_path)
    new_repo_path(place.spec, pack_size=512 * 1024, **place.init_options())   # many packs, uploaded mid-backup
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(1 << 20))
    nbdbackup("--repo", place, "full", "--image", base, "--format", "raw", "--disk", "base")
    src, uri = slow_source(tmp_path, "slow", "random", "12M", "300ms")
    try:
        proc = subprocess.Popen([nbdbackup_exe(), "--repo", place.spec, "--json", "full", "--source", uri,
                                 "--disk", "big", "--connections", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)                       # packs are being uploaded now
        assert proc.poll() is None, proc.stderr.read()
        ceph_s3.stop_rgw()
        if outage_s is not None:
            time.sleep(outage_s)
            ceph_s3.start_rgw()
        out, err = proc.communicate(timeout=600)
    finally:
        kill_if_running(src)
        if outage_s is None:
            ceph_s3.start_rgw()
    assert "Traceback" not in err, err
    if outage_s is None:
        assert proc.returncode == 17, err     # S3 unreachable after retries: nothing committed
        assert "S3" in err or "s3" in err, err
    else:
        assert proc.returncode in (0, 17), err
    listed = {b["disk"] for b in json.loads(nbdbackup("--repo", place, "--json", "list").stdout)}
    assert listed == ({"base", "big"} if proc.returncode == 0 else {"base"})
    nbdbackup("--repo", place, "verify")
    restored = tmp_path / "base.out"
    nbdbackup("--repo", place, "restore", "base", restored)
    assert restored.read_bytes() == base.read_bytes()
    nbdbackup("--repo", place, "gc", "--grace", "0")
    with_repo_objects_named_by_index(place)
