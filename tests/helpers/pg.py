"""A real PostgreSQL 15 for tests: pg_server (session) and pg_url (a fresh database per test).

The server is ../shared/tools/pg-test's throwaway cluster (127.0.0.1:PORT, password auth over
TCP; trust over the unix socket in its directory). PG_TEST_TOOL names the script elsewhere.
Administration (CREATE/DROP DATABASE) goes as the superuser postgres over that socket; tests
connect as the tool's user "test" over TCP, like a real client. A test that needs PostgreSQL
FAILS when it is missing (never skips): .ci/run installs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
_CANDIDATES = (ROOT / ".ci" / "pg-test", ROOT / "tools" / "pg-test", ROOT.parent / "shared" / "tools" / "pg-test")
TEST_USER, TEST_PASSWORD = "test", "testpass"


def pg_tool() -> Path:
    """The pg-test script; pytest.fail (not skip) when it or PostgreSQL 15 is missing."""
    named = os.environ.get("PG_TEST_TOOL")
    found = [Path(named)] if named else [p for p in _CANDIDATES if p.exists()]
    if not found or not found[0].exists():
        looked = ", ".join(map(str, _CANDIDATES))
        pytest.fail(f"PostgreSQL test tool pg-test not found (looked at PG_TEST_TOOL, {looked})")
    if not (PG_BIN / "postgres").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}/postgres missing): apt-get install -y postgresql")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class PgServer:
    dir: str
    port: int
    env: dict = field(default_factory=dict)     # the tool's export lines (PGHOST, DATABASE_URL...)
    watchdog: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """Admin SQLAlchemy URL: the superuser over the unix socket (CREATE DATABASE, pg_terminate_backend)."""
        return f"postgresql+psycopg://postgres@/postgres?host={self.dir}&port={self.port}"

    @property
    def test_url(self) -> str:
        """The tool's own database "test" as the user "test" over TCP (DATABASE_URL)."""
        return self.env["DATABASE_URL"]

    def db_url(self, name: str, *, password: str = TEST_PASSWORD, user: str = TEST_USER) -> str:
        return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{self.port}/{name}"

    def admin(self):
        """A psycopg connection as the superuser (autocommit); close it after use."""
        import psycopg
        return psycopg.connect(host=self.dir, port=self.port, user="postgres", dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        with self.admin() as c:
            c.execute(f'CREATE DATABASE "{name}" OWNER "{TEST_USER}" STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')   # terminates its sessions first

    def _pg_ctl(self, *args: str) -> None:
        data = os.path.join(self.dir, "data")
        subprocess.run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", data, "-l",
                        os.path.join(self.dir, "postgres.log"), "-w", "-t", "30", *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def restart(self) -> None:
        """Restart the server (fast shutdown: sessions are cut), same port and data."""
        self._pg_ctl("-m", "fast", "restart")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def enable_tls(self, cert: Path, key: Path) -> None:
        """Serve TLS with *cert*/*key* and refuse every TCP connection without it (pg_hba)."""
        data = Path(self.dir) / "data"
        for src, name in ((cert, "server.crt"), (key, "server.key")):
            shutil.copy(src, data / name)
            os.chmod(data / name, 0o600)
            if os.geteuid() == 0:
                shutil.chown(data / name, "postgres", "postgres")
        hba = data / "pg_hba.conf"
        hba.write_text("hostnossl all all all reject\n" + hba.read_text())
        with self.admin() as c:
            c.execute("ALTER SYSTEM SET ssl = on")
            c.execute("SELECT pg_reload_conf()")

    def start(self) -> None:
        self._pg_ctl("-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}",
                     "start")


def _parse_exports(out: str) -> dict:
    env = {}
    for line in out.splitlines():
        if line.startswith("export "):
            for part in shlex.split(line[len("export "):]):
                k, _, v = part.partition("=")
                env[k] = v
    return env


def start_pg_server() -> PgServer:
    """Start a server in a new directory under /tmp (not under pytest's 0700 tmp tree: the
    postgres OS user, which runs it when the tests run as root, must reach it)."""
    tool = pg_tool()
    base = Path(tempfile.mkdtemp(prefix="nbdbackup-pg-"))
    os.chmod(base, 0o755)
    # the template (an initdb'ed data dir, copied by later starts) is keyed on the tool's text
    tpl = Path("/tmp") / f"nbdbackup-pg-template-{os.geteuid()}-{hashlib.sha256(tool.read_bytes()).hexdigest()[:12]}"
    last = None
    for _ in range(3):     # a free port can be taken by someone else before the server binds it
        port = free_port()
        d = base / f"cluster-{port}"
        env = dict(os.environ, PG_PORT=str(port), PG_TEMPLATE=str(tpl))
        start = subprocess.Popen([str(tool), "start", str(d)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        # should this process die without its teardown (SIGKILL, a hung session killed), even while
        # the server starts, the server must not outlive it: a watchdog stops it then
        watchdog = subprocess.Popen(
            ["sh", "-c", 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; '
                         'while kill -0 "$2" 2>/dev/null; do sleep 1; done; "$3" stop "$4"; rm -rf "$5"',
             "watchdog", str(os.getpid()), str(start.pid), str(tool), str(d), str(base)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        out, err = start.communicate(timeout=120)
        if start.returncode == 0:
            return PgServer(dir=str(d), port=port, env=_parse_exports(out), watchdog=watchdog)
        watchdog.kill()
        watchdog.wait()
        last = err
    shutil.rmtree(base, ignore_errors=True)
    pytest.fail(f"pg-test could not start PostgreSQL: {last}")


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL 15 server for the session (PgServer: .url admin URL, .port, .dir, .env, .restart())."""
    with running_pg_server() as server:
        yield server


@contextlib.contextmanager
def running_pg_server():
    """A fresh server of its own, stopped and removed at the end."""
    server = start_pg_server()
    try:
        yield server
    finally:
        r = subprocess.run([str(pg_tool()), "stop", server.dir], capture_output=True, text=True, timeout=60)
        if r.returncode:
            print(f"pg-test stop {server.dir} failed: {r.stderr}", file=sys.stderr)
        shutil.rmtree(os.path.dirname(server.dir), ignore_errors=True)
        if server.watchdog is not None:
            server.watchdog.kill()
            server.watchdog.wait()


@pytest.fixture
def pg_url(pg_server):
    """SQLAlchemy URL (user test, password in it) of a fresh empty database; dropped after the test."""
    name = pg_server.create_database()
    try:
        yield pg_server.db_url(name)
    finally:
        pg_server.drop_database(name)
