"""Providers, replication policy, residency and the pure placement decision."""

from __future__ import annotations

import pytest

from resilient_train.errors import ConfigError
from resilient_train.storage.providers import HealthBook, Placement, Provider, ReplicationPolicy, place


def prov(name, region, cost=0.0):
    return Provider(name, f"memory://placement/{name}", region, egress_cost_per_gb=cost)


PROVIDERS = [prov("aws-eu", "eu-west-1", 0.09), prov("gcp-eu", "europe-west4", 0.12), prov("az-us", "eastus", 0.02), prov("local", "eu-central-1", 0.0)]


def test_writes_go_to_first_allowed_healthy_providers():
    d = place(PROVIDERS, ReplicationPolicy(copies=2, allowed_regions=("eu-*", "europe-*")))
    assert d.write_targets == ("aws-eu", "gcp-eu")
    assert "az-us" not in d.read_order
    assert "outside allowed regions" in d.reason and "az-us" in d.reason


def test_read_order_is_health_then_preference_then_cost():
    pol = ReplicationPolicy(copies=2)
    assert place(PROVIDERS, pol).read_order == ("local", "az-us", "aws-eu", "gcp-eu")
    assert place(PROVIDERS, pol, {"local": False}).read_order == ("az-us", "aws-eu", "gcp-eu", "local")
    pol = ReplicationPolicy(copies=2, prefer=("gcp-eu",))
    assert place(PROVIDERS, pol).read_order[0] == "gcp-eu"
    assert place(PROVIDERS, pol, {"gcp-eu": False}).read_order[-1] == "gcp-eu"


def test_residency_is_never_broken_even_when_degraded():
    pol = ReplicationPolicy(copies=2, allowed_regions=("eu-west-1", "europe-west4"))
    d = place(PROVIDERS, pol, {"aws-eu": False})
    assert d.write_targets == ("gcp-eu",)  # not az-us nor local, though they are healthy
    assert "DEGRADED" in d.reason
    d = place(PROVIDERS, pol, {"aws-eu": False, "gcp-eu": False})
    assert d.write_targets == ()


def test_policy_that_cannot_be_met_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as ei:
        Placement(PROVIDERS, ReplicationPolicy(copies=3, allowed_regions=("eu-west-1", "europe-west4")))
    msg = str(ei.value)
    assert "3 copies" in msg and "az-us (eastus)" in msg and "lower copies" in msg
    with pytest.raises(ConfigError, match="unique"):
        Placement([prov("a", "r"), prov("a", "r")])
    with pytest.raises(ConfigError, match="prefer"):
        Placement(PROVIDERS, ReplicationPolicy(copies=1, prefer=("nope",)))
    with pytest.raises(ConfigError):
        ReplicationPolicy(copies=0)
    with pytest.raises(ConfigError, match="not one string"):
        ReplicationPolicy(allowed_regions="eu-west-1")
    with pytest.raises(ConfigError):
        Provider("bad name!", "memory://x", "r")
    with pytest.raises(ConfigError):
        Provider("p", "memory://x", "r", egress_cost_per_gb=-1)


def test_health_book_uses_the_clock_it_is_given():
    hb = HealthBook(cooldown_s=10)
    hb.failed("aws-eu", now=100.0)
    assert hb.snapshot(["aws-eu", "gcp-eu"], now=105.0) == {"aws-eu": False, "gcp-eu": True}
    assert hb.snapshot(["aws-eu"], now=111.0) == {"aws-eu": True}
    hb.failed("aws-eu", now=120.0)
    hb.succeeded("aws-eu")
    assert hb.snapshot(["aws-eu"], now=121.0) == {"aws-eu": True}


def test_placement_opens_stores_lazily_with_provider_names():
    pl = Placement(PROVIDERS, ReplicationPolicy(copies=2))
    st = pl.store("gcp-eu")
    assert st.name == "gcp-eu" and pl.store("gcp-eu") is st
    with pytest.raises(ConfigError):
        pl.store("nope")
