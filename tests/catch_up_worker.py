"""Provider leaders whose cross-group operations fail at different points (tests/test_catch_up.py).

Run as ``python tests/catch_up_worker.py <scenario>``; prints one JSON line with what every leader
saw. Each scenario runs in its own process because the bug it guards against (members posting
different collectives in one epoch) does not raise: gloo aborts the whole process
("op.preamble.length <= op.nbytes ... Is there a distributed collective mismatch").

Three or four ``ProviderGroup`` leaders (one rank each) on threads, real gloo groups over a real
in-memory membership store. Each round: an all-reduce of a 4096-element vector that depends on
the member and the step (the exchange), then ``after_round()`` (the vote). The fault is placed
where a real one lands only by chance (tests/test_failure_matrix.py's 4-provider mid-ring case
hit it in CI): at the transport boundary, ``_FailAfter`` lets the operation complete in gloo and
then reports it failed to this member alone, as when a member's last receive fails after its
peers have their result.

* ``exchange``: c's round-3 exchange completes everywhere but fails on c: a and b are in the
  vote when c rolls the epoch; c must take the exchange's result from them.
* ``vote``: c's round-3 vote completes everywhere but fails on c: a and b are back in training,
  then in round 4's exchange; c must take the vote's result and then join that exchange.
* ``joiner``: d is admitted while a, b, c are inside round 3's exchange and a's exchange fails
  before it posts anything: the next view holds d, whose first operation would be the vote while
  the members redo the exchange; d must be left out until the next round boundary.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import timedelta

import torch

from resilient_train.errors import DistributedError
from resilient_train.membership import MemoryKVStore
from resilient_train.recovery.provider_group import ProviderGroup
from resilient_train.sync.communicator import Handle

TO = timedelta(seconds=60)
N = 4096
ROUNDS = 6
FAULT_ROUND = 3
AFTER_JOIN = 3


class _State:
    """The replicated state of a group: a running sum of every round's result, and the step."""

    def __init__(self) -> None:
        self.step = 0
        self.total = torch.zeros(N, dtype=torch.float64)

    def flat(self) -> torch.Tensor:
        return self.total.to(torch.float32).clone()

    def meta_bytes(self) -> bytes:
        return json.dumps({"step": self.step, "total": self.total.tolist()}).encode()

    def apply(self, flat: torch.Tensor, meta: bytes) -> None:
        d = json.loads(meta)
        self.total = torch.tensor(d["total"], dtype=torch.float64)
        self.step = int(d["step"])


class _Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.items.append((event, fields))


class _FailAfter:
    """This member's communicator for one operation: the all-reduce runs in gloo (``post``) or is
    never posted, then this member alone sees it fail."""

    def __init__(self, real, post: bool):
        self._real, self._post = real, post

    def __getattr__(self, name):
        return getattr(self._real, name)

    def allreduce_sum(self, buf: torch.Tensor) -> Handle:
        h = self._real.allreduce_sum(buf) if self._post else None

        def wait(timeout: timedelta) -> None:
            if h is not None:
                h.wait(timeout)
            raise DistributedError("all-reduce failed", {self._real.rank: "injected: this member's connection failed"})

        return Handle(wait)


def _contribution(name: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1009 * step + ord(name))
    return torch.randint(-8, 8, (N,), generator=g).to(torch.float32)


def main(scenario: str) -> None:
    kv = MemoryKVStore()
    names = "abcd" if scenario == "joiner" else "abc"
    founders = "abc"
    groups, states, events = {}, {}, {}
    results: dict[str, dict[int, list]] = {g: {} for g in names}
    for g in names:
        states[g], events[g] = _State(), _Events()
        groups[g] = ProviderGroup(g, kv, "fp", states[g], group_rank=0, group_size=1, heartbeat_interval_s=0.05,
                                  heartbeat_timeout_s=10.0, round_deadline_s=30.0, start_groups=3, join_timeout_s=90,
                                  events=events[g])
    errors: dict[str, str] = {}
    # with a joiner, the founders run rounds until it is in (orchestrated on events)
    stop: list[int | None] = [None if scenario == "joiner" else ROUNDS]
    inside = {g: threading.Event() for g in founders}  # g is about to enter round 3's exchange
    joiner_admitted = threading.Event()

    def run(g: str) -> None:
        pg, st = groups[g], states[g]
        try:
            pg.start()
            pg.join()
            if g == "d":
                stop[0] = st.step + AFTER_JOIN
            while stop[0] is None or st.step < stop[0]:
                fault = st.step == FAULT_ROUND
                if fault and scenario == "exchange" and g == "c":
                    pg._comm = _FailAfter(pg._comm, post=True)
                if fault and scenario == "joiner" and g in founders:
                    inside[g].set()
                    if g == "a":  # b and c are in the exchange, waiting for a
                        joiner_admitted.wait(60)
                        pg._comm = _FailAfter(pg._comm, post=False)
                out = pg.allreduce_sum(_contribution(g, st.step)).wait(TO)
                results[g][st.step] = [float(out.sum()), pg.view.epoch, list(pg.view.members)]
                st.total += out.to(torch.float64)
                st.step += 1
                if st.step - 1 == FAULT_ROUND and scenario == "vote" and g == "c":
                    pg._comm = _FailAfter(pg._comm, post=True)
                pg.after_round()
        except BaseException as exc:  # noqa: BLE001 - reported in the output
            errors[g] = f"{type(exc).__name__}: {exc}"

    threads = {g: threading.Thread(target=run, args=(g,), name=f"leader-{g}", daemon=True) for g in founders}
    for t in threads.values():
        t.start()
    if scenario == "joiner":
        for g in founders:
            inside[g].wait(60)
        time.sleep(0.2)  # b and c are blocked in the exchange (a holds back)
        threads["d"] = threading.Thread(target=run, args=("d",), name="leader-d", daemon=True)
        threads["d"].start()
        deadline = time.monotonic() + 60
        while "d" not in groups["a"].membership.latest.joiners and time.monotonic() < deadline:
            time.sleep(0.01)
        joiner_admitted.set()
    for t in threads.values():
        t.join(120)
    out = {"errors": errors, "alive": [g for g, t in threads.items() if t.is_alive()],
           "results": {g: {str(k): v for k, v in r.items()} for g, r in results.items()},
           "totals": {g: states[g].total.tolist()[:8] + [float(states[g].total.sum())] for g in names},
           "steps": {g: states[g].step for g in names},
           "events": {g: [[e, {k: v for k, v in f.items() if k in ("epoch", "members", "seq", "op", "source", "error")}]
                          for e, f in events[g].items] for g in names}}
    print(json.dumps(out), flush=True)
    for pg in groups.values():
        pg.close()


if __name__ == "__main__":
    main(sys.argv[1])
