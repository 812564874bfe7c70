"""A real S3 server for the tests: Ceph's radosgw on a throwaway single-node cluster.

Fixtures (registered from tests/conftest.py as a pytest plugin):
  ceph_s3 (session): a CephS3 started with ../shared/tools/ceph-s3 on free ports, stopped at
      the end of the session. .endpoint, .access_key, .secret_key, .region, .dir, .env (the
      script's export lines), .stop_rgw()/.start_rgw() (radosgw only: the cluster keeps its
      data), .client() (a boto3 client), .backend(bucket, **kw) (an S3Backend on it),
      .set_env(monkeypatch) (the AWS_* variables a CLI run needs).
  s3_bucket (function): a fresh, empty bucket on ceph_s3, emptied and deleted after the test.
A missing radosgw or script FAILS the test that needs it (never a skip).

FaultProxy: a TCP proxy in front of radosgw that answers the next N requests (or all) with an
HTTP error, or swallows them unanswered, then passes connections through untouched.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

TOOL = Path(os.environ.get("CEPH_S3_TOOL") or Path(__file__).resolve().parents[3] / "shared/tools/ceph-s3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _http_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return b" 200 " in s.recv(64)
    except OSError:
        return False


class CephS3:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.env: dict[str, str] = {}
        self.rgw_port = 0

    def start(self) -> "CephS3":
        missing = [t for t in ("radosgw", "ceph-mon", "ceph-osd") if shutil.which(t) is None]
        if missing or not TOOL.exists():
            pytest.fail(f"the S3 tests need Ceph's radosgw: missing {', '.join(missing) or TOOL} "
                        "(apt-get install -y --no-install-recommends radosgw ceph-mon ceph-osd)", pytrace=False)
        for attempt in range(4):        # another engineer's server may take a port we picked
            self.rgw_port, mon = free_port(), free_port()
            env = dict(os.environ, RGW_PORT=str(self.rgw_port), MON_PORT=str(mon))
            r = subprocess.run([str(TOOL), "start", str(self.dir)], env=env, capture_output=True, text=True,
                               timeout=120)
            if r.returncode == 0:
                break
            if "already in use" not in r.stderr or attempt == 3:
                pytest.fail(f"ceph-s3 start failed ({r.returncode}):\n{r.stderr}", pytrace=False)
        for line in r.stdout.splitlines():
            if line.startswith("export "):
                for item in line[len("export "):].split():
                    k, _, v = item.partition("=")
                    self.env[k] = v
        # should this process die without its teardown (SIGKILL, a hung session killed), the
        # cluster must not outlive it: a watchdog stops it then
        self._watchdog = subprocess.Popen(
            ["sh", "-c", 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; exec "$2" stop "$3"', "watchdog",
             str(os.getpid()), str(TOOL), str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.endpoint = self.env["S3_ENDPOINT_URL"]
        self.access_key = self.env["AWS_ACCESS_KEY_ID"]
        self.secret_key = self.env["AWS_SECRET_ACCESS_KEY"]
        self.region = self.env["AWS_DEFAULT_REGION"]
        return self

    def stop(self) -> None:
        subprocess.run([str(TOOL), "stop", str(self.dir)], capture_output=True, timeout=60)
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.kill()
            self._watchdog.wait()

    # -- radosgw alone ------------------------------------------------------------------

    def _rgw_pid(self) -> int | None:
        try:
            return int((self.dir / "run/client.rgw.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def stop_rgw(self, sig: int = 15) -> None:
        """Stop radosgw (SIGTERM, or *sig*: 9 for a crash); the cluster and its data stay."""
        pid = self._rgw_pid()
        if pid is None or not _alive(pid):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                deadline += 10
            time.sleep(0.05)

    def start_rgw(self, timeout: float = 30) -> None:
        """Start radosgw again on the same port (the command line ceph-s3 uses); returns when it answers."""
        env = dict(os.environ, CEPH_CONF=str(self.dir / "ceph.conf"))
        subprocess.run(["radosgw", "-n", "client.rgw"], env=env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout
        while not _http_ok(self.rgw_port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw did not answer on port {self.rgw_port} within {timeout} s")
            time.sleep(0.05)

    # -- clients ------------------------------------------------------------------------

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required", **config))

    def backend(self, bucket: str, prefix: str = "", **kw):
        from nbdbackup.repo.s3backend import S3Backend

        kw.setdefault("endpoint_url", self.endpoint)
        kw.setdefault("access_key", self.access_key)
        kw.setdefault("secret_key", self.secret_key)
        kw.setdefault("region", self.region)
        return S3Backend(bucket, prefix, **kw)

    def set_env(self, monkeypatch) -> None:
        """The variables boto3 (and so a CLI run) finds this server by; nothing from ~/.aws."""
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(k, self.env[k])


def make_bucket(ceph: CephS3) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"
    ceph.client().create_bucket(Bucket=name)
    return name


def remove_bucket(ceph: CephS3, name: str) -> None:
    """Empty bucket *name* (objects, multipart uploads) and delete it."""
    c = ceph.client()
    for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for u in page.get("Uploads", ()):
            c.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    c.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ceph_s3(tmp_path_factory):
    ceph = CephS3(tmp_path_factory.mktemp("ceph-s3") / "cluster").start()
    try:
        yield ceph
    finally:
        ceph.stop()


@pytest.fixture
def s3_bucket(ceph_s3):
    name = make_bucket(ceph_s3)
    yield name
    if not _http_ok(ceph_s3.rgw_port):
        ceph_s3.start_rgw()         # a test stopped it: the next one needs it
    remove_bucket(ceph_s3, name)


# --- fault injection ------------------------------------------------------------------------

class FaultProxy:
    """A TCP proxy on 127.0.0.1:.port (.endpoint) in front of 127.0.0.1:*target_port*.

    fail(n, status): the next *n* requests (n=None: all, until fail(0)) are each answered with
    HTTP *status* (an S3 XML error *code*) and their connection closed; lose_answers(n): the
    next *n* requests are carried out but their answers dropped; hang(): requests are read and
    never answered. Otherwise a connection is piped through untouched. .failed counts
    the requests answered with an error. *tls*: (certificate, key) files: clients speak
    HTTPS to the proxy (.endpoint says so), which speaks plain HTTP to radosgw."""

    def __init__(self, target_port: int, tls: tuple[str, str] | None = None):
        self.target_port = target_port
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._tls = None
        if tls is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(*tls)
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._left: int | None = 0
        self._status, self._code, self._hang, self._lose, self._keep = 503, "ServiceUnavailable", False, False, 0
        self.failed = 0
        self.connections = 0                # accepted (with TLS: past the handshake)
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self, n: int | None, status: int = 503, code: str = "ServiceUnavailable") -> None:
        with self._lock:
            self._left, self._status, self._code, self._hang, self._lose = n, status, code, False, False
        self._drop_pipes()      # pooled connections opened before would bypass the faults

    def lose_answers(self, n: int, keep: int = 0) -> None:
        """The next *n* requests reach radosgw, which carries them out; its answers are cut off
        after their first *keep* bytes (0: dropped whole) and the connection closed: a client sees
        a request that may or may not have landed, or a body that breaks off."""
        with self._lock:
            self._left, self._lose, self._keep, self._hang = n, True, keep, False
        self._drop_pipes()

    def hang(self) -> None:
        with self._lock:
            self._hang = True
        self._drop_pipes()

    def passthrough(self) -> None:
        self.fail(0)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self._drop_pipes()

    def _drop_pipes(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self._tls is not None:
            try:
                conn = self._tls.wrap_socket(conn, server_side=True)
            except OSError:         # the client refused our certificate (ssl.SSLError is an OSError)
                conn.close()
                return
        with self._lock:
            self.connections += 1
            hang = self._hang
            failing = self._left is None or self._left > 0
            if failing and not hang:
                self._left = None if self._left is None else self._left - 1
                self.failed += 1
            status, code, lose, keep = self._status, self._code, self._lose, self._keep
            self._conns.append(conn)
        try:
            if hang:
                while conn.recv(65536):
                    pass
            elif failing and lose:
                self._pipe(conn, lose=True, keep=keep)
            elif failing:
                self._answer_error(conn, status, code)
            else:
                self._pipe(conn)
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _answer_error(conn: socket.socket, status: int, code: str) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        headers, _, body = head.partition(b"\r\n\r\n")
        lines = headers.decode("latin-1").lower().split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in lines if h.startswith("content-length:")), 0)
        if not any(h.startswith("expect:") and "100-continue" in h for h in lines):
            left = length - len(body)
            while left > 0:
                data = conn.recv(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
               f'<Message>injected by FaultProxy</Message></Error>').encode()
        conn.sendall(f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                     f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n".encode() + xml)

    def _pipe(self, conn: socket.socket, lose: bool = False, keep: int = 0) -> None:
        up = socket.create_connection(("127.0.0.1", self.target_port))
        with self._lock:
            self._conns.append(up)

        def copy(src, dst):
            budget = keep
            try:
                while data := src.recv(1 << 16):
                    if lose and src is up and not data.startswith(b"HTTP/1.1 100"):
                        # the answer came: the request was carried out; cut it off
                        dst.sendall(data[:budget])
                        budget -= len(data[:budget])
                        if budget <= 0:
                            break
                        continue
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=copy, args=(up, conn), daemon=True)
        t.start()
        copy(conn, up)
        t.join()
        up.close()


@pytest.fixture
def fault_proxy(ceph_s3):
    """A FaultProxy in front of ceph_s3's radosgw, passing everything through until told otherwise."""
    p = FaultProxy(ceph_s3.rgw_port)
    yield p
    p.close()
