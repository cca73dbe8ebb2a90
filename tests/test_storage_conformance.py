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
