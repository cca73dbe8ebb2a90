"""Joiners are admitted only at a round boundary, after the leaders' vote (docs/membership.md).

Three provider groups as thread leaders (``ProviderGroup``, one rank each, real gloo over a
real in-memory membership store). a and b run rounds; c starts mid-run. b is slow between
its rounds (it reaches every boundary 0.2 s after a), so the view that admits c becomes
visible to one leader's boundary and not yet to the other's in almost every round: only the
vote (one all-reduce at each boundary) makes both switch after the same round. Without it
the two run a round in different groups, the round fails and the roll call drops someone.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch

from resilient_train.membership import MemoryKVStore
from resilient_train.recovery.provider_group import ProviderGroup

pytestmark = pytest.mark.timeout(120)

AFTER_JOIN = 5
"""Rounds run after c has joined (the stop step is set then, several rounds ahead of everyone)."""
TO = timedelta(seconds=30)


class _State:
    """The replicated state of a group: one number per round, and the step."""

    def __init__(self) -> None:
        self.step = 0
        self.total = torch.zeros(1)

    def flat(self) -> torch.Tensor:
        return self.total.clone()

    def meta_bytes(self) -> bytes:
        return json.dumps({"step": self.step}).encode()

    def apply(self, flat: torch.Tensor, meta: bytes) -> None:
        self.total = flat.clone()
        self.step = int(json.loads(meta)["step"])


class _Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.items.append((event, fields))


def test_a_joiner_is_admitted_at_one_round_boundary_by_every_leader():
    kv = MemoryKVStore()
    groups, states, events, results = {}, {}, {}, {g: {} for g in "abc"}
    for g in "abc":
        states[g], events[g] = _State(), _Events()
        groups[g] = ProviderGroup(g, kv, "fp", states[g], group_rank=0, group_size=1, heartbeat_interval_s=0.05,
                                  heartbeat_timeout_s=10.0, round_deadline_s=5.0, start_groups=2, join_timeout_s=60,
                                  events=events[g])
    errors: dict[str, BaseException] = {}
    stop: list[int | None] = [None]  # set once c has joined: nobody stops before c is in

    def run(g: str) -> None:
        pg, st = groups[g], states[g]
        try:
            pg.start()
            pg.join()
            if g == "c":
                stop[0] = st.step + AFTER_JOIN
            while stop[0] is None or st.step < stop[0]:
                out = pg.allreduce_sum(torch.ones(1)).wait(TO)
                results[g][st.step] = (float(out[0]), pg.view.epoch, pg.view.members)
                st.total += out
                st.step += 1
                if g == "b":
                    time.sleep(0.2)  # b reaches every boundary late
                pg.after_round()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[g] = exc

    threads = {g: threading.Thread(target=run, args=(g,), name=f"leader-{g}", daemon=True) for g in "ab"}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + 60
    while len(results["a"]) < 3:  # c starts once a and b are well into the run
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.01)
    threads["c"] = threading.Thread(target=run, args=("c",), name="leader-c", daemon=True)
    threads["c"].start()
    for t in threads.values():
        t.join(90)
    try:
        assert not errors, errors
        for g in "ab":
            assert groups[g].recoveries == [], (g, groups[g].recoveries)  # no round failed, nobody dropped
            assert not [e for e, _ in events[g].items if e == "reconfigured"], events[g].items
        # a and b saw the same members in every round: c came in after one round, for both
        assert results["a"] == results["b"], (results["a"], results["b"])
        first_c, last = min(results["c"]), stop[0]
        assert first_c >= 3 and sorted(results["c"]) == list(range(first_c, last))
        assert all(results["a"][s] == results["c"][s] for s in range(first_c, last))
        assert {v[0] for s, v in results["a"].items() if s < first_c} == {2.0}
        assert {v[0] for s, v in results["a"].items() if s >= first_c} == {3.0}
        assert torch.equal(states["a"].total, states["c"].total) and torch.equal(states["a"].total, states["b"].total)
    finally:
        for pg in groups.values():
            pg.close()


def test_two_providers_join_take_the_most_advanced_state_and_allgather():
    """Providers a (fresh) and b (at step 7) start together: after ``join`` a holds b's state
    and step (the most advanced member serves the fresh start), and an all-gather returns both
    providers' buffers, in the same order on both (found by ``make mutate``: allgather ran in no
    fast test)."""
    kv = MemoryKVStore()
    states = {g: _State() for g in "ab"}
    states["b"].step, states["b"].total = 7, torch.full((1,), 5.0)
    events = {g: _Events() for g in "ab"}
    out: dict[str, object] = {}
    errors: dict[str, BaseException] = {}
    groups = {g: ProviderGroup(g, kv, "fp", states[g], group_rank=0, group_size=1, heartbeat_interval_s=0.05,
                               heartbeat_timeout_s=10.0, round_deadline_s=20.0, start_groups=2, join_timeout_s=60,
                               events=events[g]) for g in "ab"}

    def run(g: str) -> None:
        pg = groups[g]
        try:
            pg.start()
            step = pg.join()
            joined = (step, states[g].step, states[g].total.clone())
            gathered = [t.clone() for t in pg.allgather(torch.full((2,), 10.0 if g == "a" else 20.0)).wait(TO)]
            out[g] = (joined, gathered)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[g] = exc

    threads = [threading.Thread(target=run, args=(g,), daemon=True) for g in "ab"]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not errors, errors
        assert set(out) == {"a", "b"}, out
        for g, (joined, gathered) in out.items():
            assert joined[:2] == (7, 7) and torch.equal(joined[2], torch.full((1,), 5.0)), (g, joined)
            assert [t.tolist() for t in gathered] == [[10.0, 10.0], [20.0, 20.0]], (g, gathered)  # rank order: a, b
        joined_a = [f for e, f in events["a"].items if e == "joined"]
        assert len(joined_a) == 1 and joined_a[0]["step"] == 7 and joined_a[0]["state_from"] == "b", joined_a
    finally:
        for pg in groups.values():
            pg.close()
