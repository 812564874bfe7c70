"""Where a repository lives: s3://BUCKET[/PREFIX] or a directory, its index anywhere; secrets never stored."""

import json

import pytest

from helpers.places import make_place
from helpers.support import nbdbackup
from nbdbackup.errors import ExitCode, UsageError
from nbdbackup.repo.index import shown_url, url_without_password
from nbdbackup.repo.location import parse_location


@pytest.mark.parametrize("spec, display", [
    ("s3://backups", "s3://backups"),
    ("s3://backups/", "s3://backups"),
    ("s3://my.backups-1/fleet/host1/", "s3://my.backups-1/fleet/host1"),
])
def test_s3_urls_parse(spec, display):
    loc = parse_location(spec)
    assert not loc.is_local and loc.display == display and loc.bucket == display[5:].split("/")[0]


@pytest.mark.parametrize("spec", ["s3://", "s3://ab", "s3://Upper", "s3://a..b", "s3://ok-bucket/../x",
                                  "s3://ok-bucket/a//b", "s3://ok-bucket/a b", "gs://bucket", "http://x/y"])
def test_malformed_repository_urls_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_location(spec)
    p = nbdbackup("--repo", spec, "list", check=False)
    assert p.returncode == ExitCode.USAGE and "Traceback" not in p.stderr, p.stderr


def test_urls_lose_their_password():
    url = "postgresql+psycopg://bob:s3cret@db.example:5432/nbd?sslmode=require"
    assert url_without_password(url) == "postgresql+psycopg://bob@db.example:5432/nbd?sslmode=require"
    assert "s3cret" not in shown_url(url) and "bob:***@" in shown_url(url)
    assert url_without_password("sqlite:////srv/r/index.sqlite") == "sqlite:////srv/r/index.sqlite"


@pytest.mark.parametrize("mode", ["local+pg", "s3+pg"])
def test_the_index_password_is_never_stored_or_shown(request, tmp_path, mode):
    place = make_place(request, mode, tmp_path)
    password = place.env["PGPASSWORD"]
    p = nbdbackup("--repo", place, "--json", "init", "--chunk-size", "64K")
    out = json.loads(p.stdout)
    assert password not in p.stdout + p.stderr and ":***@" in out["index_url"]
    if place.on_s3:
        import boto3

        stored = boto3.client("s3").get_object(Bucket=place.spec[5:], Key="index-url")["Body"].read().decode()
    else:
        stored = (tmp_path / "repo" / "index-url").read_text()
    assert password not in stored and stored.startswith("postgresql+psycopg://"), stored
    # later commands find the index from what was stored (the password from PGPASSWORD)
    env_less = {"NBDBACKUP_INDEX_URL": ""}
    p = nbdbackup("--repo", place, "--json", "list", env=env_less)
    assert json.loads(p.stdout) == []


def test_s3_repository_needs_a_postgresql_index(request, tmp_path):
    place = make_place(request, "s3+pg", tmp_path)
    p = nbdbackup("--repo", place, "init", env={"NBDBACKUP_INDEX_URL": ""}, check=False)
    assert p.returncode == ExitCode.USAGE and "PostgreSQL" in p.stderr and "--index-url" in p.stderr, p.stderr
    p = nbdbackup("--repo", place, "init", "--index-url", f"sqlite:///{tmp_path}/i.sqlite", check=False)
    assert p.returncode == ExitCode.USAGE and "must be PostgreSQL" in p.stderr, p.stderr


def test_s3_bucket_states(request, tmp_path):
    import boto3

    place = make_place(request, "s3+pg", tmp_path)
    bucket = place.spec[5:]
    p = nbdbackup("--repo", place, "list", check=False)          # an empty bucket: no repository
    assert p.returncode == ExitCode.NOT_A_REPOSITORY and "holds no nbdbackup repository" in p.stderr, p.stderr
    boto3.client("s3").put_object(Bucket=bucket, Key="someone-elses/file", Body=b"x")
    p = nbdbackup("--repo", place, "init", check=False)           # not empty: refused, nothing written
    assert p.returncode == ExitCode.USAGE and "not empty" in p.stderr, p.stderr
    nbdbackup("--repo", f"{place.spec}/fleet", "init")            # a prefix of its own is fine
    p = nbdbackup("--repo", f"{place.spec}/fleet", "init", check=False)
    assert p.returncode == ExitCode.USAGE and "already a repository" in p.stderr, p.stderr
    p = nbdbackup("--repo", f"s3://{bucket}-missing", "list", check=False)
    assert p.returncode == ExitCode.NO_BUCKET and "Traceback" not in p.stderr, p.stderr


def test_s3_credentials_and_endpoint_errors_through_the_cli(request, tmp_path):
    place = make_place(request, "s3+pg", tmp_path)
    log = tmp_path / "nbdbackup.log"
    secret = place.env["AWS_SECRET_ACCESS_KEY"]
    nbdbackup("--repo", place, "init", "--chunk-size", "64K")
    p = nbdbackup("--repo", place, "-vv", "--log-file", log, "list")          # works, and logs at debug level
    p = nbdbackup("--repo", place, "--log-file", log, "list", env={"AWS_SECRET_ACCESS_KEY": "wrong-" + secret},
                  check=False)
    assert p.returncode == ExitCode.CREDENTIALS and "Traceback" not in p.stderr, p.stderr
    p = nbdbackup("--repo", place, "--log-file", log, "list", env={"AWS_ACCESS_KEY_ID": "nobody"}, check=False)
    assert p.returncode == ExitCode.CREDENTIALS, p.stderr
    p = nbdbackup("--repo", place, "--json", "--s3-endpoint", "http://127.0.0.1:1", "list", check=False, timeout=120)
    assert p.returncode == ExitCode.STORAGE_UNREACHABLE and json.loads(p.stdout)["exit_code"] == 17, p.stderr
    everything = p.stdout + p.stderr + log.read_text()
    assert secret not in everything and "wrong-" not in everything
