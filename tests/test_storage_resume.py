"""A multipart upload that fails mid-way is resumed, not sent again (S3, issue 22).

Real parts: the S3 emulator (moto) behind :class:`FaultProxy`, which cuts the connections once
a given number of bytes has reached the server and stays down until the test brings it up.
Every step waits on an event (the cut, the failed attempt), never on a sleep. Bytes are
counted by the proxy (what the network carried) and parts are listed on the server.
"""

from __future__ import annotations

import hashlib
import random
import uuid

import pytest

from resilient_train.errors import StorageError
from resilient_train.storage import FsspecStore, RetryPolicy, RetryingStore, open_store
from resilient_train.storage.multipart import parked_uploads
from resilient_train.storage.transfer import copy_file
from resilient_train.testing.proxy import FaultProxy

from .conftest import start_server

pytestmark = [pytest.mark.timeout(180)]

PART = 5 << 20  # S3's smallest part
SIZE = 4 * PART + (3 << 20)  # 5 parts, the last one short
HEADERS = 256 << 10  # generous bound on the HTTP requests' headers and XML bodies of one attempt
POLICY = RetryPolicy(max_attempts=2, max_total_s=5.0, base_wait_s=0.05, max_wait_s=0.2, call_timeout_s=20.0, breaker_cooldown_s=0.0)
BUCKET = "rt-resume"


@pytest.fixture
def s3(servers):
    if "s3" not in servers:
        servers["s3"] = start_server("s3")
        servers["s3"].create_bucket("rt-tests")  # what make_store expects of a server it did not start
    srv = servers["s3"]
    if not srv.filesystem().exists(BUCKET):
        srv.create_bucket(BUCKET)
    return srv


def _data() -> bytes:
    return random.Random(22).randbytes(SIZE)


def _store(srv, proxy: FaultProxy, prefix: str) -> FsspecStore:
    opts = dict(srv.storage_options, endpoint_url=proxy.endpoint)
    return FsspecStore(srv.uri(BUCKET, prefix), opts, name="s3", single_put_bytes=PART, block_size_bytes=PART)


def _uploads(srv, key: str) -> list[str]:
    """UploadIds the server holds for ``key`` (listed directly, not through the proxy)."""
    resp = srv.filesystem().call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=key)
    return [u["UploadId"] for u in resp.get("Uploads", []) if u["Key"] == key]


def _parts(srv, key: str, upload_id: str) -> dict[int, int]:
    resp = srv.filesystem().call_s3("list_parts", Bucket=BUCKET, Key=key, UploadId=upload_id)
    return {int(p["PartNumber"]): int(p["Size"]) for p in resp.get("Parts", [])}


def _write(store, data: bytes) -> None:
    with store.open_write("f.bin") as f:
        f.write(data)


def _cut_at(proxy: FaultProxy, nbytes: int, upload) -> None:
    """The proxy cuts the connection once ``nbytes`` have passed and stays down: ``upload``
    fails with StorageError, after the cut (an event, not a sleep)."""
    proxy.cut_after(nbytes, then_down=True)
    with pytest.raises(StorageError):
        upload()
    assert proxy.cut_done.is_set()

def test_copy_after_a_cut_sends_only_the_parts_the_server_lacks(tmp_path, s3):
    """The replication path (copy_file over a RetryingStore): the provider goes down after 2.5
    parts and stays down through the whole retry budget; the next copy (a catch-up) resumes the
    parked upload: it sends about the file minus the 2 committed parts, and the object is
    byte-identical. (Files up to chunk_bytes are one PUT; these stream.)"""
    data = _data()
    src = open_store(str(tmp_path / "src"), name="local")
    src.write_bytes("f.bin", data)
    digest = hashlib.sha256(data).hexdigest()
    prefix = f"copy-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/f.bin"
    with FaultProxy(s3.port) as proxy:
        dst = RetryingStore(_store(s3, proxy, prefix), POLICY)
        _cut_at(proxy, 2 * PART + PART // 2,
                lambda: copy_file(src, "f.bin", dst, size_bytes=SIZE, sha256=digest, chunk_bytes=PART))
        assert not s3.filesystem().exists(f"{BUCKET}/{key}")  # nothing visible before completion
        (uid,) = _uploads(s3, key)
        assert _parts(s3, key, uid) == {1: PART, 2: PART}  # the part cut mid-way was not stored
        assert parked_uploads(dst.inner.fs) == {f"{BUCKET}/{key}": uid}

        proxy.up()
        before = proxy.bytes_to_server
        n, got = copy_file(src, "f.bin", dst, size_bytes=SIZE, sha256=digest, chunk_bytes=PART)
        resent = proxy.bytes_to_server - before
    assert (n, got) == (SIZE, digest)
    assert SIZE - 2 * PART <= resent < SIZE - 2 * PART + HEADERS, resent  # the 2 committed parts were not sent again
    assert s3.filesystem().cat_file(f"{BUCKET}/{key}") == data
    assert _uploads(s3, key) == []  # completed, nothing left behind
    assert parked_uploads(dst.inner.fs) == {}


def test_parts_that_do_not_match_are_sent_again(s3):
    """A part on the server whose bytes differ from ours (same size, one byte changed) or that
    is shorter (a partial part) is not trusted: the retry sends both again and reuses only
    the part that matches; the object is byte-identical."""
    data = _data()
    prefix = f"tamper-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/f.bin"
    with FaultProxy(s3.port) as proxy:
        store = _store(s3, proxy, prefix)
        _cut_at(proxy, 3 * PART + PART // 2, lambda: _write(store, data))
        (uid,) = _uploads(s3, key)
        assert _parts(s3, key, uid) == {1: PART, 2: PART, 3: PART}
        fs = s3.filesystem()
        bad = bytearray(data[:PART])
        bad[PART // 2] ^= 0xFF
        fs.call_s3("upload_part", Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=1, Body=bytes(bad))
        fs.call_s3("upload_part", Bucket=BUCKET, Key=key, UploadId=uid, PartNumber=2, Body=data[PART: PART + PART // 2])
        assert _parts(s3, key, uid) == {1: PART, 2: PART // 2, 3: PART}

        proxy.up()
        before = proxy.bytes_to_server
        with store.open_write("f.bin") as f:
            f.write(data)
        resent = proxy.bytes_to_server - before
    assert SIZE - PART <= resent < SIZE - PART + HEADERS, resent  # parts 1 and 2 again, part 3 reused
    assert fs.cat_file(f"{BUCKET}/{key}") == data
    assert _uploads(s3, key) == []


def test_a_failure_that_is_not_transient_aborts_the_upload(s3):
    """Only transient failures park an upload: an error of the caller aborts it on the server."""

    class Boom(Exception):
        pass

    prefix = f"boom-{uuid.uuid4().hex[:8]}"
    with FaultProxy(s3.port) as proxy:
        store = _store(s3, proxy, prefix)
        with pytest.raises(Boom):
            with store.open_write("f.bin") as f:
                f.write(_data()[: 2 * PART + 1])  # two parts sent
                raise Boom()
        assert _uploads(s3, f"{prefix}/f.bin") == []
        assert parked_uploads(store.fs) == {}


# ---------------------------------------------------------------------------------- Azure


@pytest.fixture
def azure(servers):
    if "azure" not in servers:
        servers["azure"] = start_server("azure")
        servers["azure"].create_bucket("rt-tests")  # what make_store expects of a server it did not start
    srv = servers["azure"]
    if not srv.filesystem().exists(BUCKET):
        srv.create_bucket(BUCKET)
    return srv


def _azure_store(srv, proxy: FaultProxy, prefix: str) -> FsspecStore:
    opts = dict(srv.storage_options, connection_string=srv.connection_string.replace(srv.endpoint, proxy.endpoint))
    return FsspecStore(srv.uri(BUCKET, prefix), opts, name="azure", single_put_bytes=PART, block_size_bytes=PART)


def _blob(srv, name: str):
    from azure.storage.blob import BlobClient

    return BlobClient.from_connection_string(srv.connection_string, BUCKET, name)


def _uncommitted(srv, name: str) -> list[tuple[str, int]]:
    _, uncommitted = _blob(srv, name).get_block_list("uncommitted")
    return [(b.id, b.size) for b in uncommitted]


def test_azure_copy_after_a_cut_sends_only_the_blocks_the_server_lacks(tmp_path, azure):
    """Azure: the blocks staged before the cut (their ids name their bytes' MD5) are not
    staged again by the catch-up; the committed blob is byte-identical."""
    data = _data()
    src = open_store(str(tmp_path / "src"), name="local")
    src.write_bytes("f.bin", data)
    digest = hashlib.sha256(data).hexdigest()
    prefix = f"copy-{uuid.uuid4().hex[:8]}"
    with FaultProxy(azure.port) as proxy:
        dst = RetryingStore(_azure_store(azure, proxy, prefix), POLICY)
        _cut_at(proxy, 2 * PART + PART // 2,
                lambda: copy_file(src, "f.bin", dst, size_bytes=SIZE, sha256=digest, chunk_bytes=PART))
        assert not azure.filesystem().exists(f"{BUCKET}/{prefix}/f.bin")
        assert [size for _, size in _uncommitted(azure, f"{prefix}/f.bin")] == [PART, PART]

        proxy.up()
        before = proxy.bytes_to_server
        assert copy_file(src, "f.bin", dst, size_bytes=SIZE, sha256=digest, chunk_bytes=PART) == (SIZE, digest)
        resent = proxy.bytes_to_server - before
    assert SIZE - 2 * PART <= resent < SIZE - 2 * PART + HEADERS, resent
    assert azure.filesystem().cat_file(f"{BUCKET}/{prefix}/f.bin") == data
    assert _uncommitted(azure, f"{prefix}/f.bin") == []


def test_azure_a_partial_block_is_staged_again(azure):
    """A block under our id for part 2 but shorter (a partial block) is not trusted."""
    data = _data()
    prefix = f"tamper-{uuid.uuid4().hex[:8]}"
    name = f"{prefix}/f.bin"
    with FaultProxy(azure.port) as proxy:
        store = _azure_store(azure, proxy, prefix)
        _cut_at(proxy, 3 * PART + PART // 2, lambda: _write(store, data))
        blocks = _uncommitted(azure, name)
        assert [size for _, size in blocks] == [PART, PART, PART]
        _blob(azure, name).stage_block(block_id=blocks[1][0], data=data[PART: PART + PART // 2])
        assert sorted(size for _, size in _uncommitted(azure, name)) == [PART // 2, PART, PART]

        proxy.up()
        before = proxy.bytes_to_server
        with store.open_write("f.bin") as f:
            f.write(data)
        resent = proxy.bytes_to_server - before
    assert SIZE - 2 * PART <= resent < SIZE - 2 * PART + HEADERS, resent  # part 2 again, 1 and 3 reused
    assert azure.filesystem().cat_file(f"{BUCKET}/{name}") == data
