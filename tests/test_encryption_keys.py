"""Keys of encrypted repositories (issue 13): init --encryption, unlocking at open from every
passphrase source, key files, key export, key passphrase, exit 19, and secrets that never leak.

Every CLI run here has stdin on /dev/null unless it is about the prompt, so a test can never hang
on a passphrase question; scrypt runs with 8 MiB (--kdf-memory 8) to keep the tests fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import select
import stat
import subprocess
import time

import pytest

from helpers.places import object_names, read_object, stored_names
from helpers.repo import read_all, write_backup
from helpers.serve import serve
from helpers.support import nbdbackup, nbdbackup_exe, require_tool
from nbdbackup.errors import RepoDamaged
from nbdbackup.nbd.client import Client as NbdClient
from nbdbackup.repo import Repository
from nbdbackup.repo.crypto import MasterKey
from nbdbackup.repo.keys import KeySource, parse_doc, unwrap

PW = "correct horse battery staple"
# key storage is the backend's business, the index's only for locks: a directory and a bucket
LOCAL_AND_S3 = pytest.mark.parametrize("place", ["local", "s3+pg"], indirect=True)


def cli(*args, passphrase: str | None = None, check: bool = False, **env) -> subprocess.CompletedProcess:
    """The CLI with stdin on /dev/null, NBDBACKUP_PASSPHRASE=*passphrase* (when given) and *env*."""
    e = dict(env)
    if passphrase is not None:
        e["NBDBACKUP_PASSPHRASE"] = passphrase
    return nbdbackup(*map(str, args), check=check, env=e, stdin=subprocess.DEVNULL)


def init_encrypted(repo, *extra, passphrase: str = PW, **env) -> dict:
    p = cli("--repo", repo, "--json", "init", "--encryption", "--kdf-memory", "8", "--chunk-size", "64K", *extra,
            passphrase=passphrase, **env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def open_repo(repo, passphrase: str = PW, **source) -> Repository:
    return Repository.open(str(repo), key_source=KeySource(passphrase=passphrase, interactive=False, **source))


def key_object_names(repo, passphrase: str = PW, **source) -> list[str]:
    with open_repo(repo, passphrase, **source) as r:
        return object_names(r, "keys/")


def master_material(repo, passphrase: str = PW, **source) -> bytes:
    with open_repo(repo, passphrase, **source) as r:
        return r.unlocked.master.material


# --- unlocking at open: wrong passphrase, no passphrase, plaintext ------------------------------

def test_init_encryption_and_open_on_every_place(place):
    out = init_encrypted(place)
    enc = out["encryption"]
    assert enc["cipher"] == "aes-256-gcm" and enc["key"] == "repository"
    assert enc["key_object"].startswith("keys/") and enc["kdf"]["n"] == 8192
    cfg = json.loads(read_object(place, "config.json"))
    assert cfg["format"] == 2 and cfg["encryption"]["key"] == "repository"
    assert key_object_names(place) == [enc["key_object"]]
    doc = parse_doc(read_object(place, enc["key_object"]), "key")
    assert doc["repo_id"] == out["repo_id"] and doc["kdf"]["name"] == "scrypt"

    ok = cli("--repo", place, "list", "--json", passphrase=PW)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
    wrong = cli("--repo", place, "list", passphrase=PW + "!")
    assert wrong.returncode == 19 and "wrong passphrase" in wrong.stderr and "Traceback" not in wrong.stderr
    for command in (["stats"], ["verify"], ["gc"], ["key", "export", "/dev/null/x"]):
        assert cli("--repo", place, *command, passphrase="nope").returncode == 19, command
    none = cli("--repo", place, "list")
    assert none.returncode == 2 and "Traceback" not in none.stderr
    for way in ("NBDBACKUP_PASSPHRASE", "--passphrase-file", "NBDBACKUP_PASSPHRASE_COMMAND"):
        assert way in none.stderr
    js = cli("--repo", place, "--json", "list", passphrase="nope")
    assert js.returncode == 19 and json.loads(js.stdout)["exit_code"] == 19


def test_plaintext_repositories_never_ask(tmp_path):
    repo, ran = tmp_path / "plain", tmp_path / "command-ran"
    p = cli("--repo", repo, "--json", "init", "--chunk-size", "64K")
    assert p.returncode == 0 and json.loads(p.stdout)["encryption"] is None
    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["format"] == 1 and "encryption" not in cfg and not (repo / "keys").exists()
    trap = {"NBDBACKUP_PASSPHRASE_COMMAND": f"touch {ran}", "NBDBACKUP_KEY_FILE": str(tmp_path / "nope")}
    assert cli("--repo", repo, "list", **trap).returncode == 0
    assert cli("--repo", repo, "stats", "--passphrase-file", tmp_path / "missing", **trap).returncode == 0
    assert not ran.exists()
    notenc = cli("--repo", repo, "key", "export", tmp_path / "k.json")
    assert notenc.returncode == 2 and "not encrypted" in notenc.stderr
    assert cli("--repo", tmp_path / "p2", "init", "--kdf-memory", "8").returncode == 2


@pytest.mark.parametrize("bad", ["7", "12", "8192", "inf", "0", "-8", "x"])
def test_kdf_memory_is_checked(tmp_path, bad):
    for args in (["init", "--encryption", "--kdf-memory", bad], ["key", "passphrase", "--kdf-memory", bad]):
        p = cli("--repo", tmp_path / "r", *args, passphrase=PW)
        assert p.returncode == 2 and "--kdf-memory" in p.stderr and "power of two" in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()


def test_damaged_key_objects(tmp_path):
    repo = tmp_path / "r"
    name = init_encrypted(repo)["encryption"]["key_object"]
    path = repo / name
    doc = json.loads(path.read_text())
    wrapped = bytearray(base64.b64decode(doc["wrapped"]))
    wrapped[5] ^= 1
    path.write_text(json.dumps({**doc, "wrapped": base64.b64encode(wrapped).decode()}))
    assert cli("--repo", repo, "list", passphrase=PW).returncode == 19      # the AEAD tag fails
    path.write_text(json.dumps({**doc, "kdf": {**doc["kdf"], "n": 1 << 40}}))
    p = cli("--repo", repo, "list", passphrase=PW)
    assert p.returncode == 9 and "scrypt parameters" in p.stderr           # not 1 TiB of memory
    path.write_text("{not json")
    assert cli("--repo", repo, "list", passphrase=PW).returncode == 9
    path.unlink()
    p = cli("--repo", repo, "list", passphrase=PW)
    assert p.returncode == 9 and "no key object" in p.stderr and "--key-file" in p.stderr


# --- passphrase sources: file and command from a cron-like run, a prompt on a real terminal -----

def cron_like(*args, **env) -> subprocess.CompletedProcess:
    """A run the way cron starts one: its own session (no controlling terminal), stdin /dev/null."""
    e = {k: v for k, v in os.environ.items() if k != "NBDBACKUP_PASSPHRASE"}
    e.update(env)
    return subprocess.run([require_tool("setsid"), "-w", nbdbackup_exe(), *map(str, args)], env=e,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_passphrase_file_and_command_without_a_terminal(tmp_path):
    repo = tmp_path / "r"
    pwfile = tmp_path / "pass phrase"
    pwfile.write_text(PW + "\n")        # one trailing newline is not part of it
    os.chmod(pwfile, 0o600)
    p = cron_like("--repo", repo, "init", "--encryption", "--kdf-memory", "8", "--passphrase-file", pwfile)
    assert p.returncode == 0, p.stderr
    assert cron_like("--repo", repo, "list").returncode == 2
    p = cron_like("--repo", repo, "list", "--passphrase-file", pwfile)
    assert p.returncode == 0, p.stderr
    p = cron_like("--repo", repo, "list", NBDBACKUP_PASSPHRASE_COMMAND=f"cat '{pwfile}'")
    assert p.returncode == 0, p.stderr
    p = cron_like("--repo", repo, "list", NBDBACKUP_PASSPHRASE_COMMAND=f"printf '%s\\n\\n' '{PW}'")
    assert p.returncode == 19           # only ONE trailing newline goes
    (tmp_path / "wrong").write_text(PW + " ")
    p = cron_like("--repo", repo, "list", "--passphrase-file", tmp_path / "wrong")
    assert p.returncode == 19 and "may be read by other users" in p.stderr      # mode 0644
    assert "other users" not in cron_like("--repo", repo, "list", "--passphrase-file", pwfile).stderr
    # the command line option beats the environment
    p = cron_like("--repo", repo, "list", "--passphrase-file", pwfile, NBDBACKUP_PASSPHRASE="nope")
    assert p.returncode == 0, p.stderr


def test_a_failing_passphrase_command_shows_its_stderr_never_its_stdout(tmp_path):
    repo = tmp_path / "r"
    init_encrypted(repo)
    script = tmp_path / "agent"
    script.write_text(f"#!/bin/sh\necho '{PW}'\necho 'agent is locked' >&2\nexit 3\n")
    script.chmod(0o755)
    p = cron_like("--repo", repo, "list", NBDBACKUP_PASSPHRASE_COMMAND=str(script))
    assert p.returncode == 2 and "agent is locked" in p.stderr and "exit status 3" in p.stderr
    assert PW not in p.stderr + p.stdout
    p = cron_like("--repo", repo, "--json", "list", NBDBACKUP_PASSPHRASE_COMMAND=str(script))
    assert PW not in p.stderr + p.stdout and json.loads(p.stdout)["exit_code"] == 2
    p = cron_like("--repo", repo, "list", NBDBACKUP_PASSPHRASE_COMMAND=str(tmp_path / "no-such-command"))
    assert p.returncode == 2 and "not found" in p.stderr


def on_a_pty(args, answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run the CLI on a new pseudo-terminal (its controlling terminal, as in a login shell),
    typing each of *answers* after a prompt ending in ': ' appears; (exit status, what it printed)."""
    pid, fd = pty.fork()
    if pid == 0:                        # the child: exec at once, nothing else
        os.execv(nbdbackup_exe(), [nbdbackup_exe(), *map(str, args)])
    out, pending, deadline = b"", list(answers), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    data = os.read(fd, 4096)
                except OSError:         # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
                if pending and out.rstrip(b" ").endswith(b":"):
                    os.write(fd, pending.pop(0).encode() + b"\n")
                    out += b"\n"
        else:
            os.kill(pid, 9)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_prompts_on_a_terminal(tmp_path, monkeypatch):
    repo = tmp_path / "r"
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE", raising=False)
    rc, out = on_a_pty(["--repo", repo, "init", "--encryption", "--kdf-memory", "8"], [PW, PW + "x"])
    assert rc == 2 and "differ" in out and not repo.exists()
    rc, out = on_a_pty(["--repo", repo, "init", "--encryption", "--kdf-memory", "8"], [PW, PW])
    assert rc == 0 and "new passphrase of repository" in out and "the same again" in out, out
    assert PW not in out                # no echo
    rc, out = on_a_pty(["--repo", repo, "list"], [PW])
    assert rc == 0 and "(no backups)" in out, out
    rc, out = on_a_pty(["--repo", repo, "list"], ["a", "b", "c"])
    assert rc == 19 and out.count("try again") == 2, out
    rc, out = on_a_pty(["--repo", repo, "list"], ["a", PW])
    assert rc == 0 and "(no backups)" in out, out


# --- key files, key export -----------------------------------------------------------------

@LOCAL_AND_S3
def test_init_with_a_key_file_keeps_nothing_in_the_repository(place, tmp_path):
    kf = tmp_path / "repo.key"
    out = init_encrypted(place, "--key-file", kf)
    assert out["encryption"]["key"] == "key-file" and out["encryption"]["key_file"] == str(kf)
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert key_object_names(place, key_file=str(kf)) == []
    cfg = json.loads(read_object(place, "config.json"))
    assert cfg["encryption"]["key"] == "key-file"
    wrapped = json.loads(kf.read_text())["wrapped"]
    with open_repo(place, key_file=str(kf)) as r:
        for name in r.backend.list(""):     # every object of the repository, on any backend
            assert wrapped.encode() not in r.backend.get(name), name
    p = cli("--repo", place, "list", passphrase=PW)
    assert p.returncode == 2 and "outside the repository" in p.stderr and "--key-file" in p.stderr
    assert cli("--repo", place, "list", "--key-file", kf, passphrase=PW).returncode == 0
    assert cli("--repo", place, "list", passphrase=PW, NBDBACKUP_KEY_FILE=str(kf)).returncode == 0
    assert cli("--repo", place, "list", "--key-file", kf, passphrase="nope").returncode == 19


def test_key_files_are_never_overwritten_and_belong_to_one_repository(tmp_path):
    kf = tmp_path / "a.key"
    init_encrypted(tmp_path / "a", "--key-file", kf)
    before = kf.read_bytes()
    p = cli("--repo", tmp_path / "b", "init", "--encryption", "--kdf-memory", "8", "--key-file", kf, passphrase=PW)
    assert p.returncode == 2 and "exists" in p.stderr and not (tmp_path / "b").exists()
    assert kf.read_bytes() == before
    init_encrypted(tmp_path / "b")
    p = cli("--repo", tmp_path / "b", "list", "--key-file", kf, passphrase=PW)
    assert p.returncode == 19 and "another repository" in p.stderr
    (tmp_path / "junk").write_text("hello")
    p = cli("--repo", tmp_path / "b", "list", "--key-file", tmp_path / "junk", passphrase=PW)
    assert p.returncode == 2 and "not an nbdbackup key" in p.stderr
    # a failed init leaves no key file behind
    p = cli("--repo", "/proc/nope/r", "init", "--encryption", "--kdf-memory", "8", "--key-file", tmp_path / "c.key",
            passphrase=PW)
    assert p.returncode != 0 and not (tmp_path / "c.key").exists()


@LOCAL_AND_S3
def test_key_export_then_key_file(place, tmp_path):
    init_encrypted(place)
    exported = tmp_path / "exported.key"
    p = cli("--repo", place, "--json", "key", "export", exported, passphrase=PW)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["key_file"] == str(exported)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert cli("--repo", place, "key", "export", exported, passphrase=PW).returncode == 2
    assert cli("--repo", place, "key", "export", "--force", exported, passphrase=PW).returncode == 0
    material = master_material(place)
    assert material not in exported.read_bytes() and material.hex().encode() not in exported.read_bytes()
    with open_repo(place) as r:             # the key object is lost
        for name in object_names(r, "keys/"):
            r.backend.delete(name)
    assert cli("--repo", place, "list", passphrase=PW).returncode == 9
    assert cli("--repo", place, "list", "--key-file", exported, passphrase=PW).returncode == 0
    assert master_material(place, key_file=str(exported)) == material


# --- key passphrase ----------------------------------------------------------------------------

def _packs(repo, **source) -> dict[str, str]:
    with open_repo(repo, **source) as r:
        return {n: hashlib.sha256(r.backend.get(n)).hexdigest() for n in object_names(r, "packs/")}


@LOCAL_AND_S3
def test_key_passphrase_rewraps_without_touching_data(place, tmp_path):
    init_encrypted(place)
    data = os.urandom(3 * 65536) + b"x" * 65536
    with open_repo(place) as r:
        write_backup(r, "vda", data)
    material, packs = master_material(place), _packs(place)
    assert packs
    (old_object,) = key_object_names(place)
    p = cli("--repo", place, "--json", "key", "passphrase", passphrase=PW, NBDBACKUP_NEW_PASSPHRASE="new one")
    assert p.returncode == 0, p.stderr
    done = json.loads(p.stdout)
    assert done["removed"] == [old_object] and key_object_names(place, "new one") == [done["key_object"]]
    assert cli("--repo", place, "list", passphrase=PW).returncode == 19
    assert cli("--repo", place, "list", passphrase="new one").returncode == 0
    assert _packs(place, passphrase="new one") == packs
    assert master_material(place, "new one") == material
    with open_repo(place, "new one") as r:
        assert read_all(r, "vda") == data
    newfile = tmp_path / "third"
    newfile.write_text("third one\n")
    p = cli("--repo", place, "key", "passphrase", "--new-passphrase-file", newfile, "--kdf-memory", "16",
            passphrase="new one")
    assert p.returncode == 0, p.stderr
    assert cli("--repo", place, "list", passphrase="third one").returncode == 0
    with open_repo(place, "third one") as r:
        assert r.unlocked.doc["kdf"]["n"] == 16384
    assert cli("--repo", place, "key", "passphrase", passphrase="third one").returncode == 2    # no new one given


def test_key_passphrase_after_an_interrupted_one(tmp_path):
    """A crash between writing the new key object and deleting the old leaves two: each opens with
    its own passphrase, and the next change leaves one."""
    from nbdbackup.repo.keys import KdfParams, put_key_object, wrap

    repo = tmp_path / "r"
    init_encrypted(repo)
    with open_repo(repo) as r:
        put_key_object(r.backend, wrap(r.unlocked.master, "second", r.repo_id, KdfParams.for_memory(8)))
    assert len(key_object_names(repo)) == 2
    assert cli("--repo", repo, "list", passphrase="second").returncode == 0
    assert cli("--repo", repo, "list", passphrase=PW).returncode == 0
    p = cli("--repo", repo, "key", "passphrase", passphrase="second", NBDBACKUP_NEW_PASSPHRASE="third")
    assert p.returncode == 0, p.stderr
    assert len(key_object_names(repo, "third")) == 1
    for old in (PW, "second"):
        assert cli("--repo", repo, "list", passphrase=old).returncode == 19


def test_key_passphrase_of_a_key_file(tmp_path):
    repo, kf = tmp_path / "r", tmp_path / "k"
    init_encrypted(repo, "--key-file", kf)
    material = master_material(repo, key_file=str(kf))
    p = cli("--repo", repo, "--key-file", kf, "key", "passphrase", passphrase=PW, NBDBACKUP_NEW_PASSPHRASE="n2")
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["k", "r"]          # no temporary file left beside it
    assert cli("--repo", repo, "list", "--key-file", kf, passphrase=PW).returncode == 19
    assert cli("--repo", repo, "list", "--key-file", kf, passphrase="n2").returncode == 0
    assert master_material(repo, "n2", key_file=str(kf)) == material
    assert not (repo / "keys").exists() or not os.listdir(repo / "keys")


# --- secrets never leak ----------------------------------------------------------------------

def _markers(material: bytes) -> list[bytes]:
    from nbdbackup.repo.crypto import MasterKey

    key = MasterKey(material)
    out = []
    for secret in (material, key.record_key, key.id_key):
        out += [secret, secret.hex().encode(), base64.b64encode(secret), secret[:16].hex().encode()]
    return out


def test_secrets_never_appear_in_output_logs_locks_or_the_repository(tmp_path):
    repo, log, pw = tmp_path / "r", tmp_path / "run.log", "PASSMARK-5c1e-secret"
    outputs = []

    def run(*args, **env):
        p = cli("--repo", repo, "-vv", "--log-file", log, *args, passphrase=pw, **env)
        assert p.returncode == 0, p.stderr
        outputs.append(p.stdout + p.stderr)
        return p

    run("--json", "init", "--encryption", "--kdf-memory", "8", "--chunk-size", "64K")
    with open_repo(repo, pw) as r:
        write_backup(r, "vda", b"disk data " * 20000)
    for args in (["list"], ["--json", "list"], ["stats", "--json"], ["verify", "--json"],
                 ["key", "export", "--json", tmp_path / "k"], ["gc", "--grace", "0"]):
        run(*args)
    run("--json", "key", "passphrase", NBDBACKUP_NEW_PASSPHRASE=pw + "-2")
    pw2 = pw + "-2"
    # a reader's lock holder (file and command line) while serve reads the backup for a client
    with serve(repo, tmp_path, env={"NBDBACKUP_PASSPHRASE": pw2}) as served:
        client = NbdClient.connect(served.uri("vda"))
        try:
            assert bytes(client.read(0, 4096)) == (b"disk data " * 20000)[:4096]
            holders = list((repo / "locks").glob("*.holder"))
            assert holders, "serve holds no lock while it reads"
            holder_text = b"".join(h.read_bytes() for h in holders)
        finally:
            client.close()
        served_log = served.log().encode()
    material = master_material(repo, pw2)
    secrets = [pw.encode(), pw2.encode(), *_markers(material)]
    texts = [o.encode() for o in outputs] + [log.read_bytes(), holder_text, served_log]
    for path in repo.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes())
    texts.append((tmp_path / "k").read_bytes())
    for i, text in enumerate(texts):
        for s in secrets:
            assert s not in text, (i, s[:8])
    assert b"PASSMARK" not in log.read_bytes() and log.read_bytes().count(b"run: nbdbackup") >= 8


def test_key_source_and_master_key_do_not_show_secrets():
    from nbdbackup.repo.crypto import MasterKey
    from nbdbackup.repo.keys import KdfParams, wrap

    ks = KeySource(passphrase=PW, passphrase_command="pass show backup")
    ks.remember(PW)
    key = MasterKey.generate()
    for text in (repr(ks), str(ks), repr(key), str(key)):
        assert PW not in text and "pass show" not in text and key.material.hex() not in text
    doc = wrap(key, PW, "r1", KdfParams.for_memory(8))
    text = json.dumps(doc)
    assert PW not in text and key.material.hex() not in text and base64.b64encode(key.material).decode() not in text
    assert unwrap(doc, PW) == key and unwrap(doc, PW + "x") is None
    for field, value in (("repo_id", "r2"), ("kdf", {**doc["kdf"], "p": 2})):
        assert unwrap({**doc, field: value}, PW) is None        # the wrapping binds them


def test_rebuild_index_asks_for_the_passphrase_once(tmp_path):
    repo, count = tmp_path / "r", tmp_path / "asked"
    init_encrypted(repo)
    data = os.urandom(2 * 65536) + b"text " * 30000
    with open_repo(repo) as r:
        info = write_backup(r, "vda", data)
    script = tmp_path / "ask"
    script.write_text(f"#!/bin/sh\necho x >> '{count}'\nprintf '%s\\n' '{PW}'\n")
    script.chmod(0o755)
    (key_name,) = key_object_names(repo)
    key_bytes = (repo / key_name).read_bytes()
    (repo / "index.sqlite").unlink()
    p = cron_like("--repo", repo, "rebuild-index", NBDBACKUP_PASSPHRASE_COMMAND=str(script))
    assert p.returncode == 0, p.stderr
    assert count.read_text().count("x") == 1
    for maintenance in (["gc", "--grace", "0"], ["verify"]):     # they sweep and check packs/ only
        assert cli("--repo", repo, *maintenance, passphrase=PW).returncode == 0
    assert key_object_names(repo) == [key_name] and (repo / key_name).read_bytes() == key_bytes
    with open_repo(repo) as r:
        assert [b.id for b in r.list_backups()] == [info.id] and read_all(r, info.id) == data
    assert cron_like("--repo", repo, "rebuild-index", NBDBACKUP_PASSPHRASE="nope").returncode == 19


def test_destination_key_sources_for_copy(tmp_path, monkeypatch):
    import argparse

    from nbdbackup.cli.repoargs import add_dest_options, open_dest_repo
    from nbdbackup.cli.repoargs import open_repo as open_source
    from nbdbackup.errors import KeyRefused, UsageError

    src, dst = init_encrypted(tmp_path / "src"), init_encrypted(tmp_path / "dst", passphrase="dest pw")

    def args(*argv):
        p = argparse.ArgumentParser()
        add_dest_options(p)
        p.add_argument("--to")
        a = p.parse_args(["--to", str(tmp_path / "dst"), *map(str, argv)])
        a.repo, a.key_file, a.passphrase_file, a.index_url, a.lock_wait = str(tmp_path / "src"), None, None, None, 0
        return a

    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PW)
    monkeypatch.setenv("NBDBACKUP_DEST_PASSPHRASE", "dest pw")
    a = args()
    with open_source(a) as s, open_dest_repo(a) as d:
        assert (s.repo_id, d.repo_id) == (src["repo_id"], dst["repo_id"]) and s.unlocked and d.unlocked
    monkeypatch.delenv("NBDBACKUP_DEST_PASSPHRASE")
    with pytest.raises(UsageError) as e:
        open_dest_repo(args())
    assert "destination" in str(e.value) and "NBDBACKUP_DEST_PASSPHRASE" in e.value.hint
    assert "--dest-passphrase-file" in e.value.hint
    (tmp_path / "dpw").write_text("dest pw\n")
    with open_dest_repo(args("--dest-passphrase-file", tmp_path / "dpw")) as d:
        assert d.repo_id == dst["repo_id"]
    monkeypatch.setenv("NBDBACKUP_DEST_PASSPHRASE", PW)     # the source's passphrase is not the destination's
    with pytest.raises(KeyRefused):
        open_dest_repo(args())
    exported = tmp_path / "src.key"
    assert cli("--repo", tmp_path / "src", "key", "export", exported, passphrase=PW).returncode == 0
    with pytest.raises(KeyRefused) as e:        # another repository's key file
        open_dest_repo(args("--dest-key-file", exported))
    assert "--dest-key-file" in e.value.hint


@pytest.mark.parametrize("place", ["s3+pg"], indirect=True)
def test_secrets_never_in_postgresql_lock_holders(place, tmp_path):
    """On PostgreSQL a holder is a row (command, host, pid...) that every host reads."""
    from sqlalchemy import create_engine, text

    pw, pwfile = "PGMARK-91d2-secret", tmp_path / "pw"
    pwfile.write_text(pw)
    init_encrypted(place, passphrase=pw)
    with open_repo(place, pw) as r:
        write_backup(r, "vda", b"rows " * 40000)
    eng = create_engine(place.index_url)
    try:
        for env, extra in (({"NBDBACKUP_PASSPHRASE": pw}, ()), ({}, ("--passphrase-file", str(pwfile))),
                           ({"NBDBACKUP_PASSPHRASE_COMMAND": f"cat {pwfile}"}, ())):
            with serve(place.spec, tmp_path, *extra, env=env) as served:
                client = NbdClient.connect(served.uri("vda"))
                try:
                    assert bytes(client.read(0, 5)) == b"rows "
                    with eng.connect() as conn:
                        rows = [" ".join(map(str, r)) for r in conn.execute(text("SELECT * FROM lock_holders"))]
                finally:
                    client.close()
            assert rows and any("serve" in r for r in rows), rows
            assert not any(pw in r for r in rows), rows
            assert pw not in served.log()
    finally:
        eng.dispose()


def test_a_passphrase_opens_whatever_its_unicode_composition():
    from nbdbackup.repo.crypto import MasterKey
    from nbdbackup.repo.keys import KdfParams, wrap

    key = MasterKey.generate()
    doc = wrap(key, "caf\u00e9 cr\u00e8me", "r1", KdfParams.for_memory(8))      # precomposed
    assert unwrap(doc, "cafe\u0301 cre\u0300me") == key                         # decomposed, as some keyboards send
    assert unwrap(doc, "cafe creme") is None


# --- what the storage's owner might try -----------------------------------------------------------

def _strip_encryption(spec) -> None:
    """config.json edited to say plaintext, as anyone who may write the storage could."""
    from helpers.places import write_object

    cfg = json.loads(read_object(spec, "config.json"))
    cfg.pop("encryption")
    cfg["format"] = 1
    write_object(spec, "config.json", json.dumps(cfg).encode())


@LOCAL_AND_S3
def test_config_stripped_of_its_encryption_is_refused_not_opened_as_plaintext(place, tmp_path):
    init_encrypted(place)
    img = tmp_path / "disk.raw"
    img.write_bytes(b"marker of a downgrade attack " * 4096)
    _strip_encryption(place)
    for command in (["list"], ["full", "--image", img, "--format", "raw", "--disk", "vda"]):
        p = cli("--repo", place, *command, passphrase=PW)
        assert p.returncode == 9, p.stderr
        assert "config.json says" in p.stderr and "key objects" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(RepoDamaged, match="config.json says"):   # the library refuses a key for it too
        Repository.open(str(place), master_key=MasterKey.generate())
    assert stored_names(place, "packs/") == []      # nothing was written in clear


def test_config_stripped_of_a_key_file_repository_is_refused_with_its_key_file(tmp_path):
    repo, kf, other = tmp_path / "r", tmp_path / "k", tmp_path / "other"
    init_encrypted(repo, "--key-file", kf)
    init_encrypted(other, "--key-file", tmp_path / "k2")
    _strip_encryption(str(repo))
    p = cli("--repo", repo, "--key-file", kf, "list", passphrase=PW)
    assert p.returncode == 9 and f"the key file {kf} holds its key" in p.stderr, p.stderr
    # another repository's key file, or none, is no evidence: such a repository opens as plaintext
    assert cli("--repo", repo, "--key-file", tmp_path / "k2", "list", passphrase=PW).returncode == 0


def test_a_damaged_key_object_does_not_hide_a_good_one(tmp_path):
    from helpers.places import write_object

    repo = tmp_path / "r"
    init_encrypted(repo)
    write_object(str(repo), "keys/" + "0" * 32 + ".json", b"{not json")
    assert cli("--repo", repo, "list", passphrase=PW).returncode == 0
    p = cli("--repo", repo, "list", passphrase="wrong")
    assert p.returncode == 19 and "1 damaged key object(s) skipped" in p.stderr, p.stderr


def test_passphrases_in_the_environment_are_not_inherited_by_child_programs(tmp_path):
    """The destination's passphrase command runs while the source's NBDBACKUP_PASSPHRASE is known:
    the command (like qemu-nbd and qemu-img) must not see it in its environment."""
    src, dst, seen = tmp_path / "src", tmp_path / "dst", tmp_path / "env-seen"
    init_encrypted(src)
    init_encrypted(dst, passphrase="dest pw")
    script = tmp_path / "ask.sh"
    script.write_text(f"#!/bin/sh\nenv > {seen}\necho 'dest pw'\n")
    script.chmod(0o700)
    p = cli("--repo", src, "copy", "--to", dst, "--all", passphrase=PW, NBDBACKUP_DEST_PASSPHRASE_COMMAND=str(script))
    assert p.returncode == 0, p.stderr
    env_seen = seen.read_text()
    assert "NBDBACKUP_DEST_PASSPHRASE_COMMAND" in env_seen      # the command ran, with the environment
    assert PW not in env_seen and "NBDBACKUP_PASSPHRASE=" not in env_seen


def test_key_file_in_the_environment_serves_encrypted_repositories_only(tmp_path):
    """A host that sets NBDBACKUP_KEY_FILE for its encrypted repository may still make a plaintext
    one (only the --key-file flag asks for --encryption), and an encrypted init keeps the key there."""
    kf = tmp_path / "host.key"
    plain = cli("--repo", tmp_path / "plain", "init", "--chunk-size", "64K", NBDBACKUP_KEY_FILE=str(kf))
    assert plain.returncode == 0, plain.stderr
    assert not kf.exists()
    flag = cli("--repo", tmp_path / "p2", "init", "--key-file", kf)
    assert flag.returncode == 2 and "--encryption" in flag.stderr, flag.stderr
    out = init_encrypted(tmp_path / "enc", NBDBACKUP_KEY_FILE=str(kf))
    assert out["encryption"]["key"] == "key-file" and kf.exists()
    assert cli("--repo", tmp_path / "enc", "list", passphrase=PW, NBDBACKUP_KEY_FILE=str(kf)).returncode == 0

