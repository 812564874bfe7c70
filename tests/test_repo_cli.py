"""init / migrate / list / stats through the installed CLI."""

import json
import os

from alembic import command

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import pseudo, texty, write_backup
from helpers.support import nbdbackup
from nbdbackup.repo import Repository
from nbdbackup.repo.index import alembic_config, make_engine


def _init(tmp_path, *extra):
    path = tmp_path / "repo"
    p = nbdbackup("--repo", path, "init", "--chunk-size", "64K", *extra)
    assert "initialised repository" in p.stderr
    return str(path)


def test_init_options_and_refusals(tmp_path):
    path = _init(tmp_path, "--compression-level", "-5")
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert (cfg["chunk_size"], cfg["compression_level"], cfg["format"]) == (65536, -5, 1)
    p = nbdbackup("--repo", path, "init", check=False)
    assert p.returncode == 2 and "already a repository" in p.stderr
    for bad in ("3K", "1000", "32M", "abc"):
        p = nbdbackup("--repo", tmp_path / f"b{bad}", "init", "--chunk-size", bad, check=False)
        assert p.returncode == 2 and "chunk size" in p.stderr or "invalid size" in p.stderr, p.stderr
    p = nbdbackup("init", check=False)
    assert p.returncode == 2 and "NBDBACKUP_REPO" in p.stderr
    p = nbdbackup("--json", "init", env={"NBDBACKUP_REPO": str(tmp_path / "env")})
    assert json.loads(p.stdout)["chunk_size"] == 256 * 1024


def test_list_table_and_json(tmp_path):
    path = _init(tmp_path)
    with Repository.open(path) as repo:
        a = write_backup(repo, "vda", pseudo(1, 3 * CS), bitmap="b0", checkpoint="c0")
        ws = []
        for disk in ("vda", "vdb"):
            w = repo.writer(disk, kind="full", size=2 * CS)
            w.put(0, w.prepare(texty(2, CS)))
            ws.append(w)
        s1, s2 = repo.commit_set(ws, read_bytes=[CS, CS], duration_s=[0.5, 0.5])
    items = json.loads(nbdbackup("--repo", path, "list", "--json").stdout)
    assert [i["id"] for i in items] == [a.id, s1.id, s2.id]
    first = items[0]
    for key in ("id", "disk", "kind", "parent", "created", "size", "read_bytes", "stored_bytes", "duration_s",
                "bitmap", "checkpoint", "set_id"):
        assert key in first
    assert first["created"].endswith("Z") and first["created"][19] == "." and len(first["created"]) == 24
    assert (first["size"], first["bitmap"], first["parent"]) == (3 * CS, "b0", None)
    assert items[1]["set_id"] == items[2]["set_id"] and items[1]["set_id"]
    only = json.loads(nbdbackup("--repo", path, "list", "--disk", "vdb", "--json").stdout)
    assert [i["id"] for i in only] == [s2.id]
    table = nbdbackup("--repo", path, "list").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "DISK", "KIND", "CREATED"]
    assert a.id in table[1] and "192.0 KiB" in table[1]
    assert "set 1" in table[2] and "set 1" in table[3]


def test_stats(tmp_path):
    path = _init(tmp_path)
    with Repository.open(path) as repo:
        write_backup(repo, "vda", texty(3, 8 * CS) + bytes(8 * CS))
        write_backup(repo, "vdb", texty(3, 8 * CS))
    s = json.loads(nbdbackup("--repo", path, "stats", "--json").stdout)
    assert s["backups"] == 2 and s["logical_bytes"] == 24 * CS
    assert s["chunks"] >= 1 and s["packs"] >= 2
    assert s["unique_bytes"] <= 8 * CS
    assert s["dedup_ratio"] >= 3.0 - 1e-9          # 24 logical chunks, <= 8 unique
    assert s["compression_ratio"] > 2.0            # text-like data
    out = nbdbackup("--repo", path, "stats").stdout
    assert "dedup ratio" in out and "compression ratio" in out


def test_older_index_refused_then_migrate(tmp_path):
    path = _init(tmp_path)
    idx = os.path.join(path, "index.sqlite")
    os.unlink(idx)
    eng = make_engine(f"sqlite:///{idx}")
    command.upgrade(alembic_config(eng), "0001")
    eng.dispose()
    p = nbdbackup("--repo", path, "list", check=False)
    assert p.returncode == 7 and "nbdbackup migrate" in p.stderr and "0001" in p.stderr
    p = nbdbackup("--repo", path, "migrate")
    assert "from revision 0001 to 0005" in p.stderr
    p = nbdbackup("--repo", path, "--json", "migrate")
    assert json.loads(p.stdout) == {"from": "0005", "to": "0005", "changed": False}
    assert nbdbackup("--repo", path, "list", "--json").stdout.strip() == "[]"


def test_error_exit_codes(tmp_path):
    p = nbdbackup("--repo", tmp_path / "nope", "list", check=False)
    assert p.returncode == 6 and "not an nbdbackup repository" in p.stderr and "Traceback" not in p.stderr
    path = _init(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["format"] = 3       # 2 is an encrypted repository's
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    p = nbdbackup("--repo", path, "stats", check=False)
    assert p.returncode == 7 and "newer" in p.stderr


def test_migrate_refuses_a_missing_index(tmp_path):
    path = _init(tmp_path)
    os.unlink(os.path.join(path, "index.sqlite"))
    p = nbdbackup("--repo", path, "migrate", check=False)
    assert p.returncode == 9 and "rebuild-index" in p.stderr
    assert not os.path.exists(os.path.join(path, "index.sqlite"))     # not silently recreated empty
    p = nbdbackup("--repo", path, "list", check=False)
    assert p.returncode == 9 and "missing" in p.stderr
