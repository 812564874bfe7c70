"""How the S3 backend's botocore client is built and how it talks (repo/s3backend.py uses it).

- The client comes from a botocore session with an S3-only model loader, not from boto3
  (boto3 adds resource models and s3transfer, which we never use, to every start-up).
- Its connections ACK responses at once (TCP_QUICKACK) and send bodies a MiB per sendall().
- Request bodies are read from the caller's pack buffers (ViewsReader), never copied whole.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import os
import re
import threading
import time
from urllib.parse import urlsplit


class ViewsReader(io.RawIOBase):
    """A read-only, seekable file over memoryviews (what boto3 sends as a body): the object's
    bytes are read from the caller's buffers, a block at a time, never copied whole."""

    def __init__(self, views: list[memoryview]):
        super().__init__()
        self._views = [v for v in views if len(v)]
        self._size = sum(len(v) for v in self._views)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1):
        """Up to *n* bytes: a memoryview into the caller's buffer when they lie in one part
        (http.client's sendall and hashlib take it as it is), else a joined copy; b"" at the end."""
        if n is None or n < 0:
            n = self._size - self._pos
        out, pos, start = [], self._pos, 0
        for v in self._views:
            end = start + len(v)
            if pos < end and n > 0:
                piece = v[pos - start:min(end, pos + n) - start]
                out.append(piece)
                pos += len(piece)
                n -= len(piece)
            start = end
        self._pos = pos
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def botocore_session(botocore_session, profile: str | None, access_key: str | None, secret_key: str | None,
                      region: str | None):
    """A botocore session that finds credentials, region and profile where boto3.Session does
    (boto3's is this plus resource models and transfer helpers we never use: importing boto3
    costs s3transfer, ~0.1 s), with a data loader that knows only the S3 models."""
    from botocore.loaders import Loader

    class S3Loader(Loader):
        def list_available_services(self, type_name):
            # botocore asks for every model it loads whether the service exists: that lists
            # ~450 service directories (2 x 50 ms); this client only ever loads S3's
            return ["s3"]

    session = botocore_session.Session(profile=profile)
    data_path = session.get_config_variable("data_path")      # AWS_DATA_PATH, kept working
    extra = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else []
    session.register_component("data_loader", S3Loader(extra_search_paths=extra))
    if access_key or secret_key:
        session.set_credentials(access_key, secret_key)
    if region:
        session.set_config_variable("region", region)
    return session


def ack_responses_at_once(client) -> None:
    """Make *client*'s connections ACK each response without TCP's delayed ACK (Linux).

    radosgw (beast, without its tcp_nodelay option, the default) writes a response's headers
    and its body separately, and Nagle's algorithm holds the body's last short segment back
    until the headers are ACKed, which the client delays by 40 ms: every GET of less than
    one segment (64 KiB on loopback: a map segment, config.json) took 48 ms instead of 5, and
    the tail of longer ones stalled now and then. TCP_QUICKACK, set once the request is sent,
    ACKs at once; it is not sticky (the kernel falls back to delayed ACKs), hence per request.
    Changes botocore's connection classes through its http session; without those
    (another botocore), requests work as before, only slower."""
    import socket

    if not hasattr(socket, "TCP_QUICKACK"):
        return
    try:
        from botocore import awsrequest

        session = client._endpoint.http_session
        manager = session._manager
    except (ImportError, AttributeError):
        return
    pools = {}
    for scheme, pool_cls in (("http", awsrequest.AWSHTTPConnectionPool), ("https", awsrequest.AWSHTTPSConnectionPool)):
        conn_cls = type(f"QuickAck{pool_cls.ConnectionCls.__name__}", (_QuickAck, pool_cls.ConnectionCls), {})
        pools[scheme] = type(f"QuickAck{pool_cls.__name__}", (pool_cls,), {"ConnectionCls": conn_cls})
    session._pool_classes_by_scheme = pools       # what proxy managers are made with
    manager.pool_classes_by_scheme = pools


_SEND_BLOCK = 1 << 20     # bytes of a request body per sendall(); urllib3's default is 16 KiB


class _QuickAck:
    """Mixin for an http.client-style connection: TCP_QUICKACK before each response is read, and a
    body sent a MiB per sendall() (a 16 MiB pack in 16 calls, not 1024: each is a trip through
    botocore, http.client and the kernel)."""

    def __init__(self, *args, **kwargs):
        kwargs["blocksize"] = _SEND_BLOCK
        super().__init__(*args, **kwargs)

    def getresponse(self, *args, **kwargs):
        import socket

        sock = getattr(self, "sock", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:         # not TCP (a proxy's unix socket, say): nothing to hurry
                pass
        return super().getresponse(*args, **kwargs)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9._~/-]+")     # needs no percent-encoding in a URL or a SigV4 path
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class NotServed(Exception):
    """The direct GET did not get the bytes (any answer but the expected 2xx, or no answer):
    the caller asks through botocore, which retries, follows redirects and names the error."""


class DirectGets:
    """GETs of objects (or byte ranges) sent straight through the client's urllib3 pool, signed
    here with SigV4, bypassing botocore's request pipeline (events, endpoint rules, parameter
    checks, response parsing): ~0.9 ms of CPU per GET instead of ~3.2 ms on radosgw over
    loopback, which for a restore's hundred 8 MiB GETs is most of what the client spends per
    request. Only a 2xx answer with the whole body counts (urllib3 checks Content-Length); any
    other answer raises NotServed and the caller repeats the request through botocore, so errors,
    retries and redirects keep botocore's behaviour. An answer suggesting the direct route is wrong
    here (a redirect, 400, 403) turns it off for good.

    Used only where the URL is certain: a path-style endpoint without a path of its own and no
    proxy, and keys that need no percent-encoding. Anything else (another botocore without
    these internals) leaves .enabled False."""

    def __init__(self, client, bucket: str, credentials, connect_timeout: float, read_timeout: float):
        self.enabled = False
        try:
            import urllib3

            http_session = client._endpoint.http_session
            base = client.meta.endpoint_url.rstrip("/")
            url = urlsplit(base)
            if (url.scheme not in ("http", "https") or url.path or credentials is None
                    or not _PLAIN_KEY.fullmatch(bucket) or http_session._proxy_config.proxy_url_for(base)):
                return
            self._manager = http_session._manager
            self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
            self._errors = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)
        except (ImportError, AttributeError):
            return
        self._base, self._host, self._bucket = base, url.netloc, bucket
        self._region = client.meta.region_name
        self._credentials = credentials
        self._keys: tuple[str, bytes] | None = None        # (day, signing key) of the last request
        self.enabled = True

    def get(self, key: str, range_header: str | None, into=None):
        """The object's bytes (*range_header*: "bytes=A-B" or None for all of it); NotServed
        when the direct route did not get them, BodyBrokeOff when the body broke off.
        *into*: a function giving a writable buffer of at least n bytes; the body is then read
        into it (no allocation: a fresh 8 MiB bytes object costs 2048 page faults, ~2 ms) and a
        memoryview of it returned."""
        if not (self.enabled and _PLAIN_KEY.fullmatch(key)):
            raise NotServed()
        path = f"/{self._bucket}/{key}"
        headers = {"Range": range_header} if range_header else {}
        try:
            resp = self._manager.urlopen("GET", self._base + path, headers=self._sign(path, headers),
                                         preload_content=False, retries=False, redirect=False,
                                         timeout=self._timeout)
        except self._errors:
            raise NotServed() from None             # botocore connects again, with its retries
        try:
            if resp.status != (206 if range_header else 200):
                if resp.status in (301, 302, 307, 400, 403):
                    self.enabled = False            # another region or signature: botocore's job
                if resp.status < 300:
                    resp.close()                    # a body we did not ask for (all of it?): unread
                else:
                    resp.drain_conn()               # a short error document: the connection stays usable
                raise NotServed()
            try:
                if into is None:
                    return resp.read()              # raises when fewer bytes than Content-Length came
                return self._read_into(resp, into)
            except (*self._errors, BodyBrokeOff) as e:
                resp.close()                        # not back into the pool half read
                raise BodyBrokeOff(str(e)) from None
        finally:
            resp.release_conn()

    @staticmethod
    def _read_into(resp, into) -> memoryview:
        length = resp.headers.get("Content-Length", "")
        if not length.isdigit():        # a chunked answer: no size to read into; botocore's job
            raise BodyBrokeOff("the answer has no Content-Length")
        n = int(length)
        view = memoryview(into(n))[:n]
        fp, got = resp._fp, 0                       # http.client's response: readinto() fills *view* itself
        while got < n:
            k = fp.readinto(view[got:])
            if not k:
                raise BodyBrokeOff(f"body ended after {got} of {n} bytes")
            got += k
        return view

    def _sign(self, path: str, headers: dict[str, str]) -> dict[str, str]:
        creds = self._credentials.get_frozen_credentials()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        day = amz_date[:8]
        h = {"host": self._host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": amz_date}
        if creds.token:
            h["x-amz-security-token"] = creds.token
        h.update((k.lower(), v) for k, v in headers.items())
        names = sorted(h)
        signed = ";".join(names)
        canonical = "\n".join(("GET", path, "", "".join(f"{n}:{h[n].strip()}\n" for n in names), signed,
                               _EMPTY_SHA256))
        scope = f"{day}/{self._region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        cached = self._keys
        if cached is None or cached[0] != day + creds.secret_key:
            k = ("AWS4" + creds.secret_key).encode()
            for part in (day, self._region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._keys = cached = (day + creds.secret_key, k)
        sig = hmac.new(cached[1], to_sign.encode(), hashlib.sha256).hexdigest()
        h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                              f"SignedHeaders={signed}, Signature={sig}")
        return h                                    # Host too: exactly what was signed


class BodyBrokeOff(Exception):
    """A direct GET's body ended before its Content-Length."""


class ReadBuffers:
    """Idle read buffers for S3Backend.reading(): at most KEEP of up to MAX bytes, whatever the
    number of threads (a restore reads 8 runs at once)."""

    UNIT = 1 << 20      # whole MiB (a restore's runs are up to 8 MiB + a header)
    MAX = 16 << 20
    KEEP = 8

    def __init__(self):
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        with self._lock:
            for k, buf in enumerate(self._free):
                if len(buf) >= n:
                    return self._free.pop(k)
        _raise_malloc_threshold()
        return bytearray(-(-n // self.UNIT) * self.UNIT)

    @property
    def idle(self) -> int:
        return len(self._free)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self.KEEP and len(buf) <= self.MAX:
                self._free.append(buf)


_malloc_threshold_raised = False


def _raise_malloc_threshold() -> None:
    """Free one 9 MiB block, once per process. glibc's malloc gives each block above its mmap
    threshold (128 KiB at start) fresh pages, zeroed and faulted in on first touch, and raises
    the threshold to the size of the largest such block freed. The freed 8 MiB GET bodies used
    to do that; with pooled read buffers nothing that large is freed, and every 256 KiB chunk a
    restore decompressed became a fresh mapping: 512 MiB from radosgw took 1.37 s of system
    time instead of 0.82 (4 runs each). Other allocators: one short-lived allocation, no harm."""
    global _malloc_threshold_raised
    if not _malloc_threshold_raised:
        _malloc_threshold_raised = True
        block = bytes(9 * ReadBuffers.UNIT)
        del block
