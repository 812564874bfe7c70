"""Pack sealing and the memory a full backup holds (docs/design.md "Bounded memory")."""

import subprocess
import sys

import pytest

from helpers.places import pack_objects
from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, new_repo_path, pseudo, read_all, texty, write_backup
from helpers.support import nbdbackup_exe
from nbdbackup.repo import packs as P
from nbdbackup.repo.sealer import PACK_MEMORY, seals_in_flight

MiB = 1 << 20


def test_a_pack_is_sealed_before_a_record_would_pass_pack_size(tmp_path):
    pack_size = 4 * CS + CS // 2      # a raw chunk fits 4 times, not 5
    with new_repo(tmp_path / "repo", pack_size=pack_size) as repo:
        data = b"".join(pseudo(i, CS) if i % 3 else texty(i, CS) for i in range(40))
        info = write_backup(repo, "vda", data)
        assert read_all(repo, info.id) == data
        names = pack_objects(tmp_path / "repo")
        assert len(names) > 5
        for name in names:
            recs = P.read_records(repo.backend, name.removeprefix("packs/")[3:-5])
            end = max(r.offset + r.stored_len for r in recs)
            # the manifest, a backup's last record, may overshoot (it never seals by itself)
            if not any(r.type == P.REC_MANIFEST for r in recs):
                assert end <= pack_size, name


@pytest.mark.parametrize("pack_size", [16 * MiB, 32 * MiB])
@pytest.mark.parametrize("chunk_size", [64 << 10, 256 << 10, 1 * MiB, 4 * MiB, 16 * MiB])
def test_pack_buffers_stay_within_pack_memory(pack_size, chunk_size):
    seals = seals_in_flight(pack_size, chunk_size)
    assert seals >= 1
    assert (seals + 1) * max(pack_size, P.HEADER_SIZE + chunk_size) <= PACK_MEMORY
    assert seals_in_flight(16 * MiB, 256 << 10) == 3     # S3: three uploads in parallel, as measured


def test_full_backup_peak_rss_is_flat_with_16m_chunks(tmp_path):
    """A disk three times the 256 MiB bound, in 16 MiB chunks (the largest), half of them
    compressible: the CLI's peak RSS stays under 256 MiB (it was 358 MiB with read buffers
    of two READs per connection and four 48 MiB pack buffers)."""
    img = tmp_path / "disk.raw"
    text = texty(1, MiB)
    with open(img, "wb") as f:
        for i in range(48):     # every chunk different (no dedup), the even ones compressible
            f.write(pseudo(i, 16 * MiB) if i % 2 else b"".join(b"%8d" % (i * 16 + k) + text[8:] for k in range(16)))
    repo = new_repo_path(tmp_path / "repo", chunk_size=16 * MiB)
    # ru_maxrss survives exec: a child forked from pytest (1.5 GiB late in a whole-suite run)
    # reports pytest's peak. A small launcher forks the CLI, so the figure is the CLI's own.
    p = subprocess.run([sys.executable, "-c", _LAUNCH, nbdbackup_exe(), "--repo", repo, "-q", "full", "--image",
                        str(img), "--disk", "vda", "--compress-all"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    peak = int(p.stdout) * 1024
    assert peak < 256 * MiB, f"peak RSS {peak // MiB} MiB"


_LAUNCH = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""
