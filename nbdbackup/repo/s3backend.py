"""The S3 storage backend: objects of a repository in a bucket, under an optional prefix.

What this relies on from the object store (AWS S3 and Ceph radosgw both give it):
- Strong read-after-write consistency: once a PUT, DELETE or LIST has answered, every later
  GET, HEAD and LIST sees its effect. The index names a pack only after its PUT returned, so
  a reader that finds the name in the index finds the object.
- A single PutObject is atomic: the object appears complete under its key, or not at all.
- Create-only PUTs: `If-None-Match: *` on a single PUT makes the server refuse (412) a key
  that exists, so two hosts writing one bucket can never clobber an object; put() raises
  FileExistsError then, like the local backend. radosgw does not honour the condition on
  CompleteMultipartUpload (it silently overwrites), which is one reason every object, a
  32 MiB pack included, goes up in ONE PUT, never as a multipart upload: the other is that an
  interrupted single PUT leaves nothing behind, while an interrupted multipart upload leaves
  parts that cost space until remove_incomplete() aborts them.

Credentials, region and endpoint come from wherever boto3 finds them (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the shared config and credentials files, AWS_ENDPOINT_URL);
*endpoint_url* (the CLI's --s3-endpoint) overrides the endpoint. Timeouts, 5xx answers and
throttling are retried by botocore ("standard" mode, exponential back-off with jitter); what
still fails is StorageUnreachable. Every call's errors go through one translation (_translate)
into the exit codes of nbdbackup.errors; no message ever contains the secret key.
"""

from __future__ import annotations

import errno
import hashlib
import time
from contextlib import contextmanager
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from ..errors import CredentialsError, NbdBackupError, NoSuchBucket, StorageUnreachable, UsageError
from ..fsutil import scatter
from .backends import ObjectInfo, StorageBackend, check_name
from .s3client import (
    BodyBrokeOff,
    DirectGets,
    NotServed,
    ReadBuffers,
    ViewsReader,
    ack_responses_at_once,
    botocore_session,
)

CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "InvalidSecurity", "AccountProblem", "AllAccessDisabled", "403"}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
BUSY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
              "ServiceUnavailable", "InternalError", "503", "500"}
CREDENTIALS_HINT = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and the shared files "
                    "~/.aws/credentials, ~/.aws/config), and that --s3-endpoint (or AWS_ENDPOINT_URL) names the "
                    "server those keys belong to")
_STREAM_RETRIES = 3


class S3Backend(StorageBackend):
    """Objects under s3://*bucket*/*prefix*/. One botocore client, shared by all threads."""

    read_batch_bytes = 8 << 20      # a restore's batches (engine/restore.py): fewer, larger GETs
    read_workers = 8                # and more of them at once: each waits a round trip

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 max_attempts: int = 5, max_pool_connections: int = 32):
        try:
            import botocore.session
            from botocore.config import Config
        except ImportError:
            raise UsageError("S3 repositories need boto3 (its botocore), which is not installed",
                             hint="install nbdbackup[s3] (pip install 'nbdbackup[s3]')") from None
        self.bucket = bucket
        self._buffers = ReadBuffers()           # idle read buffers (reading())
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._secret = secret_key
        self.access_key = access_key
        self._endpoint = _shown_endpoint(endpoint_url) if endpoint_url else "(boto3's default endpoint)"
        self._error_types = _error_types()
        try:
            session = botocore_session(botocore.session, profile, access_key, secret_key, region)
            cfg = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                         response_checksum_validation="when_required", connect_timeout=connect_timeout,
                         read_timeout=read_timeout, retries={"mode": "standard", "total_max_attempts": max_attempts},
                         max_pool_connections=max(16, max_pool_connections), tcp_keepalive=True)
            self.client = session.create_client("s3", endpoint_url=endpoint_url, config=cfg,
                                                region_name=session.get_config_variable("region") or "us-east-1")
            self._endpoint = _shown_endpoint(self.client.meta.endpoint_url)
            ack_responses_at_once(self.client)
            creds = session.get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                self._secret, self.access_key = frozen.secret_key, frozen.access_key
            self._direct = DirectGets(self.client, bucket, creds, connect_timeout, read_timeout)
        except Exception as e:          # ProfileNotFound, a malformed endpoint or config file
            raise self._translate(e, "setting up the S3 client") from None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.rstrip('/')}".rstrip("/")

    def _key(self, name: str) -> str:
        check_name(name)
        return self.prefix + name

    # -- writing ------------------------------------------------------------------------

    def put(self, name: str, parts: Iterable[bytes]) -> None:
        self._put(name, [memoryview(p).cast("B") for p in parts])

    def put_aligned(self, name: str, buf, length: int) -> None:
        with memoryview(buf) as mv, mv[:length] as data:
            self._put(name, [data])     # sent from the buffer: no copy of the pack is made

    def _put(self, name: str, views: list[memoryview]) -> None:
        key = self._key(name)
        body = ViewsReader(views)
        for _conflict in range(_STREAM_RETRIES):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                return
            except self._error_types.client as e:
                code, status = _code(e), _status(e)
                if code == "ConditionalRequestConflict" or status == 409:
                    body.seek(0)
                    continue                # a concurrent conditional write: ask again, one wins
                if code == "PreconditionFailed" or status == 412:
                    retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
                    if retried and self._is_ours(key, views):
                        return              # our first attempt landed; only its answer was lost
                    raise FileExistsError(errno.EEXIST, "object exists (put never overwrites)", name) from None
                raise self._translate(e, f"writing {name}") from None
            except Exception as e:
                raise self._translate(e, f"writing {name}") from None
        raise StorageUnreachable(f"S3 at {self._endpoint} kept answering 409 Conflict while writing {name} to "
                                 f"bucket {self.bucket}")

    def _is_ours(self, key: str, views: list[memoryview]) -> bool:
        """Does *key* hold exactly our bytes? Size and ETag (the MD5 of a single PUT's body), or,
        where the ETag is no MD5 (SSE-KMS, say), the bytes themselves, read back a MiB at a time."""
        what = f"checking {key} after a retried write"
        head = self._call(what, self.client.head_object, Bucket=self.bucket, Key=key)
        if head.get("ContentLength") != sum(len(v) for v in views):
            return False
        etag = head.get("ETag", "").strip('"')
        if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()):
            md5 = hashlib.md5(usedforsecurity=False)
            for v in views:
                md5.update(v)
            return etag.lower() == md5.hexdigest()
        ours = ViewsReader(views)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return all(chunk == ours.read(len(chunk)) for chunk in body.iter_chunks(1 << 20)) \
                    and not ours.read(1)
            finally:
                body.close()
        except Exception as e:
            raise self._translate(e, what) from None

    def delete(self, name: str) -> None:
        self._call(f"deleting {name}", self.client.delete_object, Bucket=self.bucket, Key=self._key(name))

    # -- reading ------------------------------------------------------------------------

    def get(self, name: str, offset: int = 0, length: int | None = None, *, into=None) -> bytes:
        """The object's bytes (a range of them). *into* (reading()'s): a function giving a buffer
        the direct GET reads the body into; a memoryview of it is returned then."""
        key = self._key(name)
        if length is not None and length <= 0:
            self.size(name)             # FileNotFoundError for a missing object, as elsewhere
            return b""
        args = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            args["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        what = f"reading {name}"
        for attempt in range(_STREAM_RETRIES):
            if attempt == 0 and self._direct.enabled:
                try:
                    return self._direct.get(key, args.get("Range"), into)
                except NotServed:
                    pass                # the same request through botocore, as the first attempt
                except BodyBrokeOff:
                    time.sleep(0.1)
                    continue            # counts as an attempt, as a botocore body that broke off
            try:
                resp = self.client.get_object(**args)
            except self._error_types.client as e:
                if _code(e) == "InvalidRange" or _status(e) == 416:
                    return b""          # the range starts past the end
                raise self._translate(e, what, name) from None
            except Exception as e:
                raise self._translate(e, what, name) from None
            body = resp["Body"]         # StreamingBody: checks the length it was promised
            try:
                return body.read()
            except self._error_types.stream as e:   # the body broke off: botocore does not retry that
                if attempt == _STREAM_RETRIES - 1:
                    raise self._translate(e, what, name) from None
                time.sleep(0.1 * 2 ** attempt)
            finally:
                body.close()
        raise AssertionError("unreachable")

    @contextmanager
    def reading(self, name: str, offset: int, length: int):
        """get()'s bytes for the with block only: the direct GET's body read into a pooled
        buffer (no fresh 8 MiB object, so no 2048 page faults, per GET), handed back when the
        block ends; the store decodes a run's records inside it (ReadBuffers bounds what is kept)."""
        buf = self._buffers.take(length) if length > 0 and self._direct.enabled else None
        try:
            # one request: get() tries the direct GET first and falls back to botocore itself
            into = (lambda n: buf if n <= len(buf) else bytearray(n)) if buf is not None else None
            yield self.get(name, offset, length, into=into)
        finally:
            if buf is not None:
                self._buffers.give(buf)

    def get_into(self, name: str, offset: int, buffers: list) -> int:
        """Through reading()'s pooled buffer: a GET's body is read there, then spread out."""
        with self.reading(name, offset, sum(len(b) for b in buffers)) as data:
            return scatter(data, buffers)

    def _head(self, name: str) -> dict:
        return self._call(f"looking up {name}", self.client.head_object, name=name,
                          Bucket=self.bucket, Key=self._key(name))

    def size(self, name: str) -> int:
        return self._head(name)["ContentLength"]

    def exists(self, name: str) -> bool:
        try:
            self._head(name)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter([o.name for o in self.list_info(prefix)])

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        out = []
        n = len(self.prefix)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                           Prefix=self.prefix + prefix)
            for page in pages:
                for o in page.get("Contents", ()):
                    out.append(ObjectInfo(o["Key"][n:], o["Size"], o["LastModified"].timestamp()))
        except Exception as e:
            raise self._translate(e, f"listing {self.prefix + prefix}*") from None
        out.sort(key=lambda o: o.name)
        return iter(out)

    # -- maintenance --------------------------------------------------------------------

    def remove_incomplete(self, older_than: float) -> tuple[int, int]:
        """Abort the multipart uploads under the prefix initiated before *older_than* (we never
        start one; a foreign tool or an older version might): their parts hold space."""
        count = nbytes = 0
        what = "removing unfinished multipart uploads"
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                  Prefix=self.prefix)
            uploads = [u for page in pages for u in page.get("Uploads", ())
                       if u["Initiated"].timestamp() < older_than]
            for u in uploads:
                size = 0
                parts = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=u["Key"],
                                                                          UploadId=u["UploadId"])
                try:
                    size = sum(p["Size"] for page in parts for p in page.get("Parts", ()))
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                except self._error_types.client as e:
                    if _code(e) != "NoSuchUpload":
                        raise
                    continue            # completed or aborted meanwhile, by someone else
                count += 1
                nbytes += size
        except Exception as e:
            raise self._translate(e, what) from None
        return count, nbytes

    def check_bucket(self) -> None:
        """HEAD the bucket: NoSuchBucket, CredentialsError or StorageUnreachable when it cannot be used."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._error_types.client as e:
            if _status(e) == 404 or _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_bucket() from None
            raise self._translate(e, "opening the bucket") from None
        except Exception as e:
            raise self._translate(e, "opening the bucket") from None

    def close(self) -> None:
        self.client.close()

    # -- errors -------------------------------------------------------------------------

    def _call(self, what: str, fn, name: str | None = None, **kwargs):
        try:
            return fn(**kwargs)
        except Exception as e:
            raise self._translate(e, what, name) from None

    def _no_bucket(self) -> NoSuchBucket:
        return NoSuchBucket(f"the S3 bucket {self.bucket} does not exist at {self._endpoint}",
                            hint="create it (e.g. `aws s3 mb s3://BUCKET`), or check the bucket name and "
                                 "--s3-endpoint (AWS_ENDPOINT_URL)")

    def _translate(self, e: Exception, what: str, name: str | None = None) -> Exception:
        """The one translation of a boto3/botocore exception met while *what* into ours:
        FileNotFoundError (a missing object *name*), CredentialsError, NoSuchBucket,
        StorageUnreachable, or NbdBackupError for anything else. Secret-free."""
        if isinstance(e, (NbdBackupError, FileNotFoundError)):
            return e
        where = f"S3 at {self._endpoint}, bucket {self.bucket}"
        kind = type(e).__name__
        if kind in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError"):
            return CredentialsError(self._scrub(f"no usable S3 credentials for {where} ({what}): {e}"),
                                    hint=CREDENTIALS_HINT)
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code, status = _code(e), _status(e)
            msg = self._scrub(f"{code} {response['Error'].get('Message') or ''}".strip())
            if code in NOT_FOUND_CODES and name is not None:
                return FileNotFoundError(errno.ENOENT, "no such object", name)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in CREDENTIAL_CODES or status == 403:
                who = f"access key {self.access_key}" if self.access_key else "these credentials"
                return CredentialsError(f"{where} refused {who} while {what} ({msg})", hint=CREDENTIALS_HINT)
            if code in BUSY_CODES or (status or 0) >= 500:
                return StorageUnreachable(f"{where} kept failing while {what}, after retries ({msg})",
                                          hint="check that the S3 service is up, then run the command again")
            return NbdBackupError(f"{where} refused a request while {what} ({msg})")
        if kind == "SSLError":          # botocore's, after its (quick) retries: the certificate check
            return StorageUnreachable(self._scrub(f"TLS: the certificate of {where} was not accepted "
                                                  f"while {what}: {e}"), hint=TLS_HINT)
        if isinstance(e, self._error_types.unreachable):
            return StorageUnreachable(self._scrub(f"cannot reach {where} while {what}, after retries: {e}"),
                                      hint="check --s3-endpoint (AWS_ENDPOINT_URL), that the S3 service "
                                           "is up, and the network; then run the command again")
        if kind in ("ValueError", "ParamValidationError") or "Endpoint" in kind:
            return UsageError(self._scrub(f"bad S3 settings for {where}: {e}"))
        return e

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


TLS_HINT = ("if the endpoint uses a private CA, point AWS_CA_BUNDLE (or ca_bundle in ~/.aws/config) "
            "at its certificate; else check that --s3-endpoint names the host its certificate is for")


class _ErrorTypes:
    def __init__(self):
        from botocore import exceptions as bx
        from urllib3.exceptions import HTTPError as Urllib3Error  # a body that breaks off: ProtocolError

        self.client = bx.ClientError
        self.stream = (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError,
                       bx.ConnectionClosedError, Urllib3Error, ConnectionError, TimeoutError)
        self.unreachable = self.stream + (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                                          bx.ProxyConnectionError, bx.HTTPClientError)


def _error_types() -> _ErrorTypes:
    return _ErrorTypes()


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e) -> int | None:
    return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _shown_endpoint(url: str) -> str:
    """*url* without any user:password part."""
    u = urlsplit(url)
    if not u.hostname or "@" not in u.netloc:
        return url
    return f"{u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}{u.path}"
