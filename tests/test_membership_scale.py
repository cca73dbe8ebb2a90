"""Membership at scale, the fast guard (docs/scale.md): benchmarks/sim_membership_scale.py with 8
groups, real TCPStore, real gloo, a real SIGKILL.

Eight replica-group leaders (threads in two worker processes, each a real ``Membership``
running tiny rounds over the epoch's gloo group) form one view; a ninth group joins from its
own process and is then SIGKILLed. Asserted:

* the roll call after the SIGKILL ends well below the round deadline: every survivor holds the
  next view within a third of it (it takes about ``3 * heartbeat_interval_s`` plus a little);
* the membership store load per group is linear in the number of groups, with the constant
  stated: at most ``N + 6`` store calls per group per heartbeat (today: one heartbeat write,
  one registry counter read, one read per registered member's heartbeat, one view read), so a
  change that makes each member's traffic grow faster (the total with the square of the groups
  or worse, e.g. reading every heartbeat twice, or per pair of members) fails;
* the abort watcher reads ``abort/<epoch>`` while rounds are in flight, and never more often
  than once per ``abort_poll_s`` per member.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.timeout(240)  # < 60 s on a quiet machine; imports of torch dominate under load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sim():
    spec = importlib.util.spec_from_file_location("sim_membership_scale",
                                                  os.path.join(ROOT, "benchmarks", "sim_membership_scale.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sim_membership_scale", mod)
    spec.loader.exec_module(mod)
    return mod


def test_eight_groups_roll_call_and_store_load(tmp_path):
    from resilient_train.membership import TCPKVStore

    sim = _sim()
    n, hb = 8, 0.5
    host = TCPKVStore.host(port=0)
    res = sim.run_once(n, f"tcp:127.0.0.1:{host.port}", cycles=1, workdir=str(tmp_path), steady_s=3.0, stall_s=1.0,
                       hb_s=hb, timeout_s=5.0, num_keys=lambda: int(host._store.num_keys()))

    # the roll call: every survivor holds the next view well before the round deadline
    (rc,) = res["rollcalls"]
    assert rc["kill_to_all_hold_next_view_s"] < sim.ROUND_DEADLINE_S / 3, rc
    assert rc["kill_to_all_rebuilt_s"] < sim.ROUND_DEADLINE_S / 3, rc
    (join,) = res["joins"]
    assert join["start_to_all_adopted_s"] < sim.ROUND_DEADLINE_S, join

    # store load per group: linear in N with a stated constant
    load = res["store_load"]
    beats = load["calls"].get("set hb", 0)
    assert beats >= n, load  # every group heartbeated in the window
    assert load["membership_calls_per_beat"] <= n + 6, load
    assert load["membership_calls_per_group_per_s"] <= (n + 6) / hb * 1.1, load
    assert load["calls"].get("get hb", 0) <= beats * n, load  # one read per registered member per beat

    # the abort watcher: reads while a round is in flight, at most once per abort_poll_s each
    aw = res["abort_watch"]
    assert aw["stalled"] and aw["abort_reads"] > 0, aw
    assert aw["abort_reads"] <= n * aw["window_s"] / aw["abort_poll_s"] * 1.05, aw
