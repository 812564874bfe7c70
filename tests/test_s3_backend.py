"""The S3 backend against a real radosgw: errors and their exit codes, retries, timeouts,
create-only puts whose answer was lost, prefixes, unfinished multipart uploads, secrets.

Faults come from a FaultProxy in front of radosgw (503s, dropped answers, silence) or from a
port nobody listens on; the conformance suite (test_repo_backends.py) covers the rest."""

from __future__ import annotations

import sys
import time

import pytest

from helpers.ceph import FaultProxy, free_port
from nbdbackup.errors import CredentialsError, ExitCode, NoSuchBucket, StorageUnreachable, UsageError
from nbdbackup.repo.s3backend import S3Backend

WRONG_SECRET = "wrongSecretDoNotShow0123456789abcdef"


def _no_secret(e: BaseException, *secrets: str) -> None:
    """No secret in anything a user (or a log) may be shown of *e* or its causes."""
    texts = []
    while e is not None:
        texts += [str(e), repr(e), getattr(e, "hint", None) or ""]
        if hasattr(e, "user_message"):
            texts.append(e.user_message())
        e = e.__cause__ or e.__context__
    for s in secrets:
        assert not any(s in t for t in texts), texts


def test_wrong_secret_is_a_credentials_error(ceph_s3, s3_bucket):
    b = ceph_s3.backend(s3_bucket, secret_key=WRONG_SECRET)
    for call in (b.check_bucket, lambda: b.put("o", [b"x"]), lambda: b.get("o"), lambda: list(b.list())):
        with pytest.raises(CredentialsError) as ei:
            call()
        assert ei.value.exit_code == ExitCode.CREDENTIALS == 16
        assert ceph_s3.endpoint in str(ei.value) and "AWS_SECRET_ACCESS_KEY" in ei.value.hint
        _no_secret(ei.value, WRONG_SECRET, ceph_s3.secret_key)


def test_unknown_access_key_is_a_credentials_error(ceph_s3, s3_bucket):
    b = ceph_s3.backend(s3_bucket, access_key="NOSUCHKEY123", secret_key=WRONG_SECRET)
    with pytest.raises(CredentialsError) as ei:
        b.check_bucket()
    assert "NOSUCHKEY123" in str(ei.value)          # the key id helps; it is no secret
    with pytest.raises(CredentialsError) as ei:
        b.put("packs/ab/x.pack", [b"x"])
    assert "InvalidAccessKeyId" in str(ei.value)
    _no_secret(ei.value, WRONG_SECRET)


def test_no_credentials_at_all(ceph_s3, s3_bucket, monkeypatch):
    ceph_s3.set_env(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsError) as ei:
        S3Backend(s3_bucket).check_bucket()
    assert "AWS_PROFILE" in ei.value.hint


def test_missing_bucket(ceph_s3):
    b = ceph_s3.backend("no-such-bucket-here")
    with pytest.raises(NoSuchBucket) as ei:
        b.check_bucket()
    assert ei.value.exit_code == ExitCode.NO_BUCKET == 18 and "no-such-bucket-here" in str(ei.value)
    with pytest.raises(NoSuchBucket):
        b.put("o", [b"x"])
    with pytest.raises(NoSuchBucket):
        list(b.list())


def test_unreachable_endpoint_fails_within_seconds(ceph_s3):
    port = free_port()          # nobody listens there
    b = ceph_s3.backend("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=3)
    t = time.monotonic()
    with pytest.raises(StorageUnreachable) as ei:
        b.check_bucket()
    assert time.monotonic() - t < 10
    assert ei.value.exit_code == ExitCode.STORAGE_UNREACHABLE == 17
    assert f"127.0.0.1:{port}" in str(ei.value) and "opening the bucket" in str(ei.value)
    with pytest.raises(StorageUnreachable) as ei:
        b.put("packs/ab/x.pack", [b"x"])
    assert "writing packs/ab/x.pack" in str(ei.value)
    _no_secret(ei.value, ceph_s3.secret_key)


def test_a_silent_server_times_out(ceph_s3, s3_bucket, fault_proxy):
    fault_proxy.hang()
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint, read_timeout=1, max_attempts=2)
    t = time.monotonic()
    with pytest.raises(StorageUnreachable):
        b.get("o", 0, 10)
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("status,code", [(503, "ServiceUnavailable"), (503, "SlowDown"), (500, "InternalError")])
def test_failures_then_success_are_retried(ceph_s3, s3_bucket, fault_proxy, status, code):
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    fault_proxy.fail(2, status, code)
    b.put("packs/ab/x.pack", [b"payload"])
    assert fault_proxy.failed == 2
    fault_proxy.fail(2, status, code)
    assert b.get("packs/ab/x.pack", 3) == b"load"
    assert fault_proxy.failed == 4


def test_failing_forever_is_storage_unreachable(ceph_s3, s3_bucket, fault_proxy):
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint, max_attempts=3)
    fault_proxy.fail(None)
    with pytest.raises(StorageUnreachable) as ei:
        b.put("packs/ab/x.pack", [b"payload"])
    assert fault_proxy.failed == 3                  # every attempt, then the error
    assert fault_proxy.endpoint in str(ei.value) and "writing packs/ab/x.pack" in str(ei.value)
    assert "ServiceUnavailable" in str(ei.value)
    _no_secret(ei.value, ceph_s3.secret_key)
    fault_proxy.passthrough()
    assert not b.exists("packs/ab/x.pack")


def test_a_put_whose_answer_was_lost_succeeds_on_retry(ceph_s3, s3_bucket, fault_proxy):
    """The first PUT lands but its answer is lost; the retry gets 412: the object is ours, so
    put() succeeds (no FileExistsError for our own write)."""
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    data = bytes(range(256)) * 4096
    fault_proxy.lose_answers(1)
    b.put("packs/ab/lost.pack", [data[:1000], data[1000:]])
    assert fault_proxy.failed == 1
    assert b.get("packs/ab/lost.pack") == data


def test_a_retried_put_meeting_someone_elses_object_fails(ceph_s3, s3_bucket, fault_proxy):
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    b.put("packs/ab/theirs.pack", [b"theirs"])
    fault_proxy.fail(1)
    with pytest.raises(FileExistsError):
        b.put("packs/ab/theirs.pack", [b"ours!!"])      # same size, other bytes
    assert fault_proxy.failed == 1
    assert b.get("packs/ab/theirs.pack") == b"theirs"


@pytest.mark.parametrize("same", [True, False])
def test_a_retried_put_compares_bytes_where_the_etag_is_no_md5(ceph_s3, s3_bucket, fault_proxy, same):
    """An object made by a multipart upload has an ETag that is no MD5 ("...-1"): a retried put
    meeting it reads it back to decide whether it is ours."""
    c = ceph_s3.client()
    data = b"multipart!" * 1000
    up = c.create_multipart_upload(Bucket=s3_bucket, Key="p/o")["UploadId"]
    etag = c.upload_part(Bucket=s3_bucket, Key="p/o", UploadId=up, PartNumber=1, Body=data)["ETag"]
    c.complete_multipart_upload(Bucket=s3_bucket, Key="p/o", UploadId=up,
                                MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]})
    assert "-" in c.head_object(Bucket=s3_bucket, Key="p/o")["ETag"]
    b = ceph_s3.backend(s3_bucket, "p", endpoint_url=fault_proxy.endpoint)
    fault_proxy.fail(1)
    ours = data if same else data[:-1] + b"?"
    if same:
        b.put("o", [ours])
    else:
        with pytest.raises(FileExistsError):
            b.put("o", [ours])
    assert fault_proxy.failed == 1 and b.get("o") == data


def test_prefixes_keep_repositories_apart(ceph_s3, s3_bucket):
    one, two = ceph_s3.backend(s3_bucket, "/one/"), ceph_s3.backend(s3_bucket, "one-two")
    one.put("packs/a.pack", [b"1"])
    two.put("packs/a.pack", [b"22"])
    assert list(one.list()) == ["packs/a.pack"] and one.get("packs/a.pack") == b"1"
    assert [(i.name, i.size) for i in two.list_info()] == [("packs/a.pack", 2)]
    keys = [o["Key"] for o in ceph_s3.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["one-two/packs/a.pack", "one/packs/a.pack"]
    assert one.url == f"s3://{s3_bucket}/one"


def test_remove_incomplete_aborts_multipart_uploads_under_the_prefix_only(ceph_s3, s3_bucket):
    c = ceph_s3.client()
    mine = c.create_multipart_upload(Bucket=s3_bucket, Key="repo/packs/ab/half.pack")["UploadId"]
    for n in (1, 2):
        c.upload_part(Bucket=s3_bucket, Key="repo/packs/ab/half.pack", UploadId=mine, PartNumber=n,
                      Body=b"p" * (5 << 20))
    other = c.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/x")["UploadId"]
    b = ceph_s3.backend(s3_bucket, "repo")
    assert b.remove_incomplete(time.time() - 600) == (0, 0)
    assert b.remove_incomplete(time.time() + 5) == (1, 10 << 20)
    left = [u["UploadId"] for u in c.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", ())]
    assert left == [other]


def test_credentials_and_endpoint_from_the_environment(ceph_s3, s3_bucket, monkeypatch):
    ceph_s3.set_env(monkeypatch)
    b = S3Backend(s3_bucket, "p")             # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as boto3 finds them
    b.check_bucket()
    b.put("o", [b"env"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert S3Backend(s3_bucket, "p", endpoint_url=ceph_s3.endpoint).get("o") == b"env"   # the option wins


def test_a_missing_profile_is_a_credentials_error(ceph_s3, monkeypatch):
    ceph_s3.set_env(monkeypatch)
    with pytest.raises(CredentialsError) as ei:
        S3Backend("b", profile="nosuchprofile")
    assert "nosuchprofile" in str(ei.value)


def test_without_boto3_it_says_what_to_install(monkeypatch):
    # the client is botocore's (what boto3 is built on; importing boto3 itself costs start-up)
    monkeypatch.setitem(sys.modules, "botocore", None)     # import botocore.session -> ImportError
    with pytest.raises(UsageError) as ei:
        S3Backend("b")
    assert "nbdbackup[s3]" in ei.value.hint


def test_rgw_restart_between_calls(ceph_s3, s3_bucket):
    b = ceph_s3.backend(s3_bucket)
    b.put("before", [b"1"])
    ceph_s3.stop_rgw()
    with pytest.raises(StorageUnreachable):
        ceph_s3.backend(s3_bucket, max_attempts=2).get("before")
    ceph_s3.start_rgw()
    assert b.get("before") == b"1"            # the pooled client reconnects
    b.put("after", [b"2"])
    assert list(b.list()) == ["after", "before"]


def test_fault_proxy_passes_through(ceph_s3, s3_bucket):
    p = FaultProxy(ceph_s3.rgw_port)
    try:
        b = ceph_s3.backend(s3_bucket, endpoint_url=p.endpoint)
        b.put("o", [b"x" * 100_000])
        assert b.get("o") == b"x" * 100_000 and p.failed == 0
    finally:
        p.close()


def test_a_body_that_breaks_off_is_read_again(ceph_s3, s3_bucket, fault_proxy):
    """botocore retries requests, not bodies: a GET whose body breaks off is the backend's to redo."""
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    data = bytes(range(256)) * 4096
    b.put("packs/ab/x.pack", [data])
    fault_proxy.lose_answers(2, keep=5000)          # the headers and a little of the body
    assert b.get("packs/ab/x.pack", 1000, 300_000) == data[1000:301_000]
    assert fault_proxy.failed == 2
    fault_proxy.lose_answers(3, keep=5000)          # every try breaks off: the error, not short data
    with pytest.raises(StorageUnreachable) as ei:
        b.get("packs/ab/x.pack")
    assert "reading packs/ab/x.pack" in str(ei.value)


def test_packs_go_up_from_their_buffers_without_copies(ceph_s3, s3_bucket):
    """Three 32 MiB packs uploading at once add little to the RSS: the body is read from the
    pack's own buffer (a copy of each would add 96 MiB)."""
    import mmap
    import os
    import threading

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))

    b = ceph_s3.backend(s3_bucket)
    b.put("warm", [b"x"])
    bufs = []
    for _ in range(3):
        m = mmap.mmap(-1, (32 << 20) + 4096)
        m[:32 << 20] = os.urandom(32 << 20)
        bufs.append(m)
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=b.put_aligned, args=(f"packs/0{i}/p.pack", bufs[i], 32 << 20))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    assert [b.size(f"packs/0{i}/p.pack") for i in range(3)] == [32 << 20] * 3
    assert peak[0] - base < 24 << 20, f"RSS grew by {(peak[0] - base) >> 20} MiB while uploading"


def test_a_small_get_does_not_wait_for_a_delayed_ack(ceph_s3, s3_bucket):
    # radosgw writes headers and a short body separately; without TCP_QUICKACK each such GET
    # waited for the client's delayed ACK (>= 40 ms on Linux, 48 ms measured) before the body came
    b = ceph_s3.backend(s3_bucket)
    b.put("small", [b"s" * 1000])
    assert b.get("small") == b"s" * 1000       # the connection is made and pooled
    times = []
    for _ in range(15):
        t = time.perf_counter()
        b.get("small", 10, 100)
        times.append(time.perf_counter() - t)
    assert sorted(times)[len(times) // 2] < 0.030, times


def test_gets_go_around_botocore_and_read_the_same_bytes(ceph_s3, s3_bucket):
    """Ranged GETs are sent directly (signed here, through the client's pool): botocore's
    GetObject runs only where the direct route cannot serve (past the end, a name needing
    percent-encoding, a missing object), and every answer is the one botocore gives."""
    import os

    b = ceph_s3.backend(s3_bucket)
    calls = []
    b.client.meta.events.register("before-parameter-build.s3.GetObject",
                                  lambda params, **kw: calls.append(params["Key"]))
    data = os.urandom(3 << 20)
    b.put("packs/ab/x.pack", [data])
    reads = [(0, None), (0, 1), (5, 70_000), (1 << 20, 1 << 20), (len(data) - 10, 100), (len(data) - 1, None)]
    assert [b.get("packs/ab/x.pack", o, n) for o, n in reads] == \
        [data[o:None if n is None else o + n] for o, n in reads]
    assert calls == []
    assert b.get("packs/ab/x.pack", len(data) + 1, 10) == b""          # 416: botocore says "past the end"
    b.put("odd name+ä", [b"odd"])
    assert b.get("odd name+ä") == b"odd"
    with pytest.raises(FileNotFoundError):
        b.get("packs/ab/none.pack", 0, 10)
    assert calls == ["packs/ab/x.pack", "odd name+ä", "packs/ab/none.pack"]
    direct = ceph_s3.client().get_object(Bucket=s3_bucket, Key="packs/ab/x.pack", Range="bytes=7-99")["Body"].read()
    assert b.get("packs/ab/x.pack", 7, 93) == direct == data[7:100]


def test_a_refused_direct_get_hands_over_to_botocore_for_good(ceph_s3, s3_bucket, fault_proxy):
    """A 403 (or a redirect) on the direct route: botocore asks again and names the error; later
    GETs go through botocore alone. A 503 is botocore's to retry, the direct route stays."""
    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    b.put("o", [b"0123456789"])
    fault_proxy.fail(2, 503, "SlowDown")
    assert b.get("o", 2, 3) == b"234"
    assert fault_proxy.failed == 2                  # direct, then botocore's first; its retry got it
    fault_proxy.fail(None, 403, "AccessDenied")
    with pytest.raises(CredentialsError):
        b.get("o", 0, 5)
    assert fault_proxy.failed == 4                  # direct, then botocore (a 403 is not retried)
    fault_proxy.passthrough()
    assert b.get("o", 0, 5) == b"01234"
    fault_proxy.fail(None, 403, "AccessDenied")
    with pytest.raises(CredentialsError):
        b.get("o", 0, 5)
    assert fault_proxy.failed == 5                  # botocore only now


def test_reading_reuses_a_few_buffers_and_falls_back_to_get(ceph_s3, s3_bucket, fault_proxy):
    """reading() reads a range into a pooled buffer (the same memory again once handed back, so
    no fresh pages per GET), gives exactly get()'s bytes, keeps at most 8 idle buffers, and where
    the direct GET fails (its body breaks off, a 503) yields get()'s answer, retried, instead."""
    import os
    from contextlib import ExitStack

    b = ceph_s3.backend(s3_bucket, endpoint_url=fault_proxy.endpoint)
    data = os.urandom(2 << 20)
    b.put("packs/ab/x.pack", [data])
    with b.reading("packs/ab/x.pack", 10, 1 << 20) as first:
        assert isinstance(first, memoryview) and first == data[10:10 + (1 << 20)]
        with b.reading("packs/ab/x.pack", 5, 100) as inner:     # held at once: another buffer
            assert bytes(inner) == data[5:105] and inner.obj is not first.obj
            buffers = {id(first.obj), id(inner.obj)}
    for _ in range(3):
        with b.reading("packs/ab/x.pack", 5, 100) as again:
            assert bytes(again) == data[5:105] and id(again.obj) in buffers     # handed out again
    with b.reading("packs/ab/x.pack", len(data) - 3, 10) as tail:
        assert bytes(tail) == data[-3:]
    with ExitStack() as stack:
        views = [stack.enter_context(b.reading("packs/ab/x.pack", k, 1000)) for k in range(10)]
        assert [bytes(v) for v in views] == [data[k:k + 1000] for k in range(10)]
        assert len({id(v.obj) for v in views}) == 10
    assert b._buffers.idle == 8                             # idle buffers kept: bounded
    fault_proxy.lose_answers(1, keep=5000)               # the direct body breaks off
    with b.reading("packs/ab/x.pack", 0, 1 << 20) as v:
        assert bytes(v) == data[:1 << 20]
    fault_proxy.fail(2, 503, "SlowDown")
    with b.reading("packs/ab/x.pack", 7, 1000) as v:
        assert bytes(v) == data[7:1007]
    assert fault_proxy.failed == 3
    with pytest.raises(FileNotFoundError):
        with b.reading("packs/ab/none.pack", 0, 10):
            pass


def test_after_a_pooled_read_a_restore_threads_chunks_reuse_memory(ceph_s3, s3_bucket):
    """With read buffers pooled nothing large is freed any more, which left glibc's thresholds
    low: a restore thread's batch of decompressed chunks (32 x 256 KiB), once freed, was handed
    back to the kernel and faulted in again, page by page, for the next batch. The first pooled
    read raises them (checked in a fresh process: pytest's own heap says nothing)."""
    import subprocess

    script = """
import resource, sys, threading
from nbdbackup.repo.s3backend import S3Backend
b = S3Backend({bucket!r}, endpoint_url={endpoint!r}, access_key={ak!r}, secret_key={sk!r}, region={region!r})
b.put("packs/ab/y.pack", [b"y" * 100_000])
faults = []
def restore_like():
    with b.reading("packs/ab/y.pack", 0, 100_000) as v:
        assert v == b"y" * 100_000
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for i in range(20):
        batch = [bytes([i]) * (256 << 10) for _ in range(32)]     # as zstd's outputs
        del batch
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=restore_like)
t.start()
t.join()
print(faults[0])
""".format(bucket=s3_bucket, endpoint=ceph_s3.endpoint, ak=ceph_s3.access_key, sk=ceph_s3.secret_key,
           region=ceph_s3.region)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = int(out.stdout.split()[-1])
    # the first batch faults its 8 MiB in (2048 pages); each of the 19 more did too (~28000)
    assert faults < 8000, f"{faults} page faults for 20 batches of chunks"
