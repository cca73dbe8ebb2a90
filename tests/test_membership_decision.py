"""The pure membership decision, without sockets: rules by example and properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_train.membership import Heartbeat, View, coordinator, decide

pytestmark = pytest.mark.timeout(60)

T = 10.0  # timeout_s


def hb(age: float, intent: str = "member", fp: str = "fp1", now: float = 100.0) -> Heartbeat:
    return Heartbeat(now - age, intent, fp)


def test_dead_member_is_dropped_and_epoch_increments():
    v = View(3, ("a", "b", "c"), "fp1")
    d = decide(100.0, v, {"a": hb(1), "b": hb(2), "c": hb(10.5)}, timeout_s=T, min_members=1)
    assert d.view == View(4, ("a", "b"), "fp1", ())
    assert "dropped ['c']" in d.reason and "10 s" in d.reason
    assert coordinator(d.view) == "a"


def test_silence_exactly_at_the_timeout_is_still_alive():
    v = View(1, ("a", "b"), "fp1")
    d = decide(100.0, v, {"a": hb(0), "b": hb(T)}, timeout_s=T, min_members=1)
    assert d.view is v and d.reason == "no change"


def test_joiner_is_admitted_only_with_an_epoch_change():
    v = View(1, ("b", "c"), "fp1")
    d = decide(100.0, v, {"b": hb(0), "c": hb(0), "a": hb(0, "join")}, timeout_s=T, min_members=1)
    assert d.view == View(2, ("a", "b", "c"), "fp1", ("a",))
    assert coordinator(d.view) == "b"  # the lowest old member publishes, not the joiner


def test_joiner_with_another_fingerprint_is_refused_and_changes_nothing():
    v = View(5, ("a", "b"), "fp1")
    d = decide(100.0, v, {"a": hb(0), "b": hb(0), "x": hb(0, "join", "fp2")}, timeout_s=T, min_members=1)
    assert d.view is v
    assert set(d.refused) == {"x"}
    assert "'fp2'" in d.refused["x"] and "'fp1'" in d.refused["x"] and "same model" in d.refused["x"]


def test_restarted_member_is_readmitted_as_joiner():
    v = View(2, ("a", "b"), "fp1")
    d = decide(100.0, v, {"a": hb(0), "b": hb(0, "join")}, timeout_s=T, min_members=1)
    assert d.view == View(3, ("a", "b"), "fp1", ("b",))
    assert "restarted" in d.reason


def test_bootstrap_takes_the_lowest_joiners_fingerprint_and_waits_for_min_members():
    empty = View(0)
    one = decide(100.0, empty, {"b": hb(0, "join")}, timeout_s=T, min_members=2)
    assert one.view is empty and "min_members=2" in one.reason
    two = decide(100.0, empty, {"b": hb(0, "join"), "a": hb(0, "join", "fpA")}, timeout_s=T, min_members=1)
    assert two.view == View(1, ("a",), "fpA", ("a",)) and set(two.refused) == {"b"}
    assert coordinator(two.view) == "a"


def test_never_shrinks_below_min_members():
    v = View(4, ("a", "b", "c"), "fp1")
    d = decide(100.0, v, {"a": hb(0), "b": hb(50), "c": hb(50)}, timeout_s=T, min_members=2)
    assert d.view is v and "min_members=2" in d.reason


def test_stale_member_intent_from_outsider_is_ignored():
    v = View(1, ("a",), "fp1")
    d = decide(100.0, v, {"a": hb(0), "z": hb(0, "member")}, timeout_s=T, min_members=1)
    assert d.view is v


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="timeout_s"):
        decide(0.0, View(0), {}, timeout_s=0, min_members=1)
    with pytest.raises(ValueError, match="min_members"):
        decide(0.0, View(0), {}, timeout_s=1, min_members=0)
    with pytest.raises(ValueError, match="sorted"):
        View(1, ("b", "a"))
    with pytest.raises(ValueError, match="intent"):
        Heartbeat(0.0, "leave", "fp")
    for epoch in (-1, True, 1.0, "1"):  # each clause of the epoch check (mutation testing)
        with pytest.raises(ValueError, match="epoch"):
            View(epoch)
    with pytest.raises(ValueError, match="unique"):
        View(1, ("a", "a"))
    for joiners in (("b",), ("b", "a"), ("a", "a")):
        with pytest.raises(ValueError, match="joiners"):
            View(1, ("a", "b") if joiners != ("b",) else ("a",), joiners=joiners)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="min_members"):
            decide(0.0, View(0), {}, timeout_s=1, min_members=bad)
    with pytest.raises(ValueError, match="timeout_s"):
        decide(0.0, View(0), {}, timeout_s=-1, min_members=1)
    assert View(2, ("a", "b", "c")).rank_of("c") == 2


NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def situations(draw):
    members = tuple(sorted(draw(st.sets(st.sampled_from(NAMES)))))
    fp = draw(st.sampled_from(["", "f1"])) if not members else "f1"
    view = View(draw(st.integers(0, 5)), members, fp)
    beats = {}
    for name in draw(st.sets(st.sampled_from(NAMES))):
        beats[name] = Heartbeat(draw(st.floats(0, 30)), draw(st.sampled_from(["member", "join"])),
                                draw(st.sampled_from(["f1", "f2"])))
    return view, beats, draw(st.floats(0, 30)), draw(st.integers(1, 4))


@settings(max_examples=400, deadline=None)
@given(situations())
def test_properties(s):
    view, beats, now, min_members = s
    d = decide(now, view, beats, timeout_s=T, min_members=min_members)
    alive = {m for m, h in beats.items() if now - h.last_seen_s <= T}
    new = d.view
    # a member silent for longer than the timeout is dropped whenever the others can go on
    dead = {m for m in view.members if m not in alive}
    keep = {m for m in view.members if m in alive and beats[m].intent == "member"}
    if dead and len(keep) >= min_members:
        assert new is not view and not dead & set(new.members), (dead, new)
    # deterministic: the order heartbeats arrive in does not matter
    assert decide(now, view, dict(reversed(list(beats.items()))), timeout_s=T, min_members=min_members) == d
    if new is view:
        assert new.epoch == view.epoch
    else:
        # the epoch increments exactly when the set changes or someone is (re)admitted
        assert new.epoch == view.epoch + 1
        assert new.members != view.members or new.joiners
        assert len(new.members) >= min_members
        assert set(new.members) <= alive  # nobody silent for longer than the timeout stays
        assert new.members == tuple(sorted(new.members))
        # the others' fingerprint never changes once set, and every joiner matches it
        if view.fingerprint:
            assert new.fingerprint == view.fingerprint
        assert all(beats[j].intent == "join" and beats[j].fingerprint == new.fingerprint for j in new.joiners)
        # every current member that is alive and asks to stay, stays
        assert {m for m in view.members if m in alive and beats[m].intent == "member"} <= set(new.members)
        assert coordinator(new) in new.members
    for m, why in d.refused.items():
        assert m not in new.joiners and beats[m].fingerprint not in ("",) and "differs" in why
    # a change that would not leave min_members is never published
    if len(set(new.members)) < min_members:
        assert new is view
