"""Every Store backend keeps the same contract (resilient_train.testing.store_conformance)."""

from __future__ import annotations

import pytest

from resilient_train.testing.store_conformance import CHECKS

from .conftest import STORE_KINDS

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_store_conformance(make_store, kind, check):
    check(make_store(kind))


@pytest.mark.parametrize("kind", ["memory", "s3", "azure", "gcs"])
def test_streamed_upload_path(make_store, kind):
    """Objects above single_put_bytes take the backend's multipart / block upload."""
    from resilient_train.storage import FsspecStore, RetryingStore
    from resilient_train.testing.store_conformance import check_stream_write_large

    base = make_store(kind)
    inner = base.inner if isinstance(base, RetryingStore) else base
    store = FsspecStore(inner._uri, inner._options, name=inner.name, single_put_bytes=1 << 20, block_size_bytes=5 << 20)
    check_stream_write_large(store)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.open_write("aborted.bin") as f:
            f.write(b"z" * (7 << 20))  # past the spool: parts were uploaded
            raise Boom()
    assert not store.exists("aborted.bin")
