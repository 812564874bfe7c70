"""Index: Alembic revisions, the older-index refusal, migrate, format checks."""

import json
import os

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from helpers.repo import CHUNK_SIZE as CS
from helpers.repo import new_repo, pseudo, read_all, write_backup
from nbdbackup.errors import NotARepository, RepoDamaged, RepoFormatError, UsageError
from nbdbackup.repo import Repository
from nbdbackup.repo.index import KNOWN_REVISIONS, alembic_config, current_revision, make_engine, migrations_dir, upgrade
from nbdbackup.repo.schema import INDEX_REVISION, metadata


def test_code_head_equals_alembic_head(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path}/x.sqlite")
    script = ScriptDirectory.from_config(alembic_config(eng))
    assert script.get_current_head() == INDEX_REVISION == KNOWN_REVISIONS[-1]
    assert [r.revision for r in script.walk_revisions()][::-1] == list(KNOWN_REVISIONS)
    assert os.path.exists(os.path.join(migrations_dir(), "env.py"))


def test_migrated_schema_equals_code_schema(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path}/x.sqlite")
    upgrade(eng)
    insp = inspect(eng)
    for t in metadata.sorted_tables:
        got = {c["name"] for c in insp.get_columns(t.name)}
        assert got == {c.name for c in t.columns}, t.name
        got_ix = {i["name"] for i in insp.get_indexes(t.name)}
        want_ix = {i.name for i in t.indexes}
        assert want_ix <= got_ix, t.name


def _older_index_repo(tmp_path):
    """A repository whose index was created at revision 0001 (the way an old tool made it)."""
    repo = new_repo(tmp_path / "repo")
    path, url = repo.path, repo.index_url
    repo.close()
    os.unlink(url.removeprefix("sqlite:///"))
    eng = make_engine(url)
    command.upgrade(alembic_config(eng), "0001")
    eng.dispose()
    return path


def test_older_index_is_refused_naming_migrate(tmp_path):
    path = _older_index_repo(tmp_path)
    with pytest.raises(RepoFormatError) as ei:
        Repository.open(path)
    assert "0001" in str(ei.value) and "nbdbackup migrate" in ei.value.user_message()


def test_migrate_upgrades_and_data_works(tmp_path):
    path = _older_index_repo(tmp_path)
    repo = Repository.open(path, check=False)
    assert upgrade(repo.index_db) == ("0001", INDEX_REVISION)
    repo.close()
    repo = Repository.open(path)
    data = pseudo(1, 3 * CS)
    info = write_backup(repo, "vda", data, checkpoint="c1", set_id="s1")
    assert repo.find_by_checkpoint("vda", "c1") == info
    assert read_all(repo, info.id) == data


def test_newer_index_revision_is_refused(tmp_path):
    repo = new_repo(tmp_path / "repo")
    with repo.index_db.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    repo.close()
    with pytest.raises(RepoFormatError, match="newer"):
        Repository.open(repo.path)


def test_newer_repository_format_is_refused(tmp_path):
    repo = new_repo(tmp_path / "repo")
    repo.close()
    p = os.path.join(repo.path, "config.json")
    cfg = json.load(open(p))
    cfg["format"] = 99
    json.dump(cfg, open(p, "w"))
    with pytest.raises(RepoFormatError, match="format 99"):
        Repository.open(repo.path)


def test_not_a_repository(tmp_path):
    with pytest.raises(NotARepository):
        Repository.open(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARepository):
        Repository.open(str(tmp_path / "empty"))


def test_damaged_config_and_index(tmp_path):
    repo = new_repo(tmp_path / "repo")
    repo.close()
    idx = repo.index_url.removeprefix("sqlite:///")
    with open(idx, "r+b") as f:
        f.write(b"garbage garbage garbage garbage!" * 4)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(idx + suffix):
            os.unlink(idx + suffix)
    with pytest.raises(RepoDamaged):
        Repository.open(repo.path)
    os.unlink(idx)
    with pytest.raises(RepoDamaged, match="missing"):
        Repository.open(repo.path)
    with open(os.path.join(repo.path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(RepoDamaged):
        Repository.open(repo.path)


def test_init_refuses_non_empty_and_bad_options(tmp_path):
    repo = new_repo(tmp_path / "repo")
    repo.close()
    with pytest.raises(UsageError, match="already a repository"):
        Repository.init(repo.path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f").write_text("x")
    with pytest.raises(UsageError, match="non-empty"):
        Repository.init(str(tmp_path / "junk"))
    for cs in (1000, 32 * 1024, 32 << 20):
        with pytest.raises(UsageError):
            Repository.init(str(tmp_path / f"cs{cs}"), chunk_size=cs)
        assert not os.path.exists(tmp_path / f"cs{cs}")


def test_external_index_url(tmp_path):
    url = f"sqlite:///{tmp_path}/elsewhere.sqlite"
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CS, index_url=url)
    data = pseudo(2, 2 * CS)
    write_backup(repo, "vda", data)
    repo.close()
    assert not os.path.exists(tmp_path / "r" / "index.sqlite")
    with Repository.open(str(tmp_path / "r")) as again:     # the URL is remembered
        assert read_all(again, "vda") == data
    eng = make_engine(url)
    with eng.connect() as c:
        assert current_revision(c) == INDEX_REVISION
