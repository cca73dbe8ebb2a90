"""Lanes at scale: store keys, connect time and abort-watch load of the shard-parallel exchange.

    python benchmarks/sim_lanes_scale.py                  # L = 1 2 4 8 16 x G = 2 3 5, TCPStore; etcd subset
    python benchmarks/sim_lanes_scale.py --lanes 1 2 --groups 2 --no-etcd --epochs 2

A sharded provider group of ``N`` ranks exchanges on ``N`` lanes (``recovery/lanes.py``): lane
``i >= 1`` is a gloo group of the ``G`` groups' rank ``i`` per membership epoch, whose rendezvous
keys live under ``rt-membership/lane-<i>/epoch-<e>`` in the membership store, and every rank
runs a watcher that reads ``abort/<epoch>`` every 20 ms while its lane has an operation in
flight. This simulation builds ``L`` lanes x ``G`` groups of real :class:`~resilient_train.recovery.lanes.Lane`
objects (each with its watcher thread) as threads of one process, against a real TCPStore (and a
real 3-member etcd), and measures per configuration:

* ``connect``: for each of ``--epochs`` epochs, every lane rank calls ``Lane.comm_for(epoch)``
  at once (a barrier), which retires the previous epoch's group and rendezvouses the new one,
  then runs one tiny all-gather on it. Seconds from the barrier to the last rank connected, and
  to the last rank's all-gather done. This is what every lane does at the first exchange of a
  new view (``ProviderGroup._lanes_collective``).
* ``keys``: what one epoch's rendezvous leaves in the store: TCPStore ``num_keys()`` before and
  after (the native path: ``TCPKVStore.torch_store``, gloo's rendezvous in C++); and on the path
  every store without a native torch Store takes (etcd: ``KVTorchStore``, which polls), the
  store calls counted by a :class:`CountingKV` wrapper: writes, distinct keys written and the
  size of each value, reads (including the rendezvous' polling of keys not yet written).
* ``abort_watch``: group ``G-1`` holds back its lanes while every other group posts its
  all-gather on every lane (all in flight), for ``--stall-s`` seconds: ``abort/<e>`` reads per
  second in total and per in-flight lane rank. Then group ``G-1``'s lane 1 fails
  (``Lane.fail``: publishes ``abort/<e>`` and releases its group): seconds until every
  in-flight rank of every lane has left its wait (lane 1's peers through the closed
  connections or the key, the other lanes' peers through the key alone).

Threads, not processes, on purpose: 16 x 5 = 80 lane ranks as processes would spend minutes
importing torch on this 2-core machine. The watchers and gloo's threads release the GIL while
they wait, but everything shares two cores with other work, so connect times are upper
bounds of what the protocol needs (the load average is in the JSON). Lane 0 of a real group is
its leader's membership epoch group (the same gloo rendezvous of ``G`` members under
``rt-membership/epoch-<e>``); the simulation's lanes are numbered 1..L and all are
:class:`Lane` objects, which is the same rendezvous and watcher.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from datetime import timedelta
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TIMEOUT_S = 30.0  # the round deadline (library default) bounds connect and every operation
ABORT_POLL_S = 0.02  # library default


class _NoNative:
    """A KVStore that hides the wrapped store's native ``torch_store``, so that gloo's rendezvous
    runs through :class:`KVTorchStore` (the etcd path) and every call it makes is countable."""

    def __init__(self, inner: Any):
        self._inner = inner

    def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
        self._inner.set(key, value, timeout=timeout)

    def get(self, key: str, *, timeout: timedelta) -> bytes | None:
        return self._inner.get(key, timeout=timeout)

    def add(self, key: str, amount: int, *, timeout: timedelta) -> int:
        return self._inner.add(key, amount, timeout=timeout)

    def compare_set(self, key: str, expected: bytes | None, desired: bytes, *, timeout: timedelta) -> bytes:
        return self._inner.compare_set(key, expected, desired, timeout=timeout)

    def clone(self) -> "_NoNative":
        return _NoNative(self._inner.clone())


def counting_class() -> type:
    """:class:`CountingKV` (sim_membership_scale) that also lists the keys written and the size
    of each value written (``sizes``, shared with its clones)."""
    from sim_membership_scale import CountingKV

    class Counting(CountingKV):
        def __init__(self, inner: Any, prefix: str, *a: Any, sizes: dict | None = None, **kw: Any):
            super().__init__(inner, prefix, *a, **kw)
            self.sizes = {} if sizes is None else sizes

        def set(self, key: str, value: bytes, *, timeout: timedelta) -> None:
            with self._lock:
                self.sizes[key] = len(value)
            super().set(key, value, timeout=timeout)

        def snapshot_written(self) -> list:
            with self._lock:
                return list(self.written)

        def clone(self) -> "Counting":
            return Counting(self._inner.clone(), self._prefix, self.counts, self._lock, None, self.written,
                            sizes=self.sizes)

    return Counting


def _lane_calls(counts: dict) -> dict:
    """Sum CountingKV's ``"<op> <family>"`` counts over the ``lane-<i>`` families, by op."""
    out: dict[str, int] = {}
    for k, v in counts.items():
        op, fam = k.split(" ", 1)
        if fam.startswith("lane-"):
            out[op] = out.get(op, 0) + v
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def run_config(kv: Any, path: str, L: int, G: int, epochs: int, stall_s: float, tag: str,
               num_keys: Any = None) -> dict:
    """One configuration: ``L`` lanes x ``G`` groups over ``kv`` (a CountingKV); see the module
    docstring. ``num_keys``: the TCPStore server's key count, or None."""
    import torch

    from resilient_train.errors import DistributedError
    from resilient_train.recovery.lanes import Lane

    prefix = f"sim-lanes/{tag}"
    timeout = timedelta(seconds=TIMEOUT_S)
    lanes = [[Lane(kv.clone(), prefix, i + 1, f"g{g}", timeout, abort_poll_s=ABORT_POLL_S) for g in range(G)]
             for i in range(L)]
    res: dict[str, Any] = {"path": path, "lanes": L, "groups": G, "lane_ranks": L * G, "epochs": []}
    try:
        for e in range(1, epochs + 1):
            k0, c0 = (num_keys() if num_keys else None), _lane_calls(kv.snapshot()[0])
            w0 = {k for k in kv.snapshot_written() if "/lane-" in k}
            start = threading.Barrier(L * G + 1)
            conn: dict[tuple, float] = {}
            done: dict[tuple, float] = {}
            errors: list[str] = []

            def rank(i: int, g: int) -> None:
                try:
                    start.wait()
                    comm = lanes[i][g].comm_for(e, g, G)
                    conn[(i, g)] = time.monotonic()
                    out = comm.allgather(torch.tensor([float(g)])).wait(timeout)
                    assert [int(t.item()) for t in out] == list(range(G))
                    done[(i, g)] = time.monotonic()
                except BaseException as exc:  # noqa: BLE001 - recorded
                    errors.append(f"lane {i + 1} g{g}: {type(exc).__name__}: {str(exc)[:200]}")

            ts = [threading.Thread(target=rank, args=(i, g), daemon=True) for i in range(L) for g in range(G)]
            for t in ts:
                t.start()
            start.wait()
            t0 = time.monotonic()
            for t in ts:
                t.join(TIMEOUT_S * 2)
            if errors or len(done) != L * G:
                raise RuntimeError(f"epoch {e}: {len(done)} of {L * G} lane ranks done; {errors[:3]}")
            calls = _delta(_lane_calls(kv.snapshot()[0]), c0)
            new_keys = [k for k in kv.snapshot_written() if "/lane-" in k and k not in w0]
            written = len(new_keys)
            sizes = [kv.sizes[k] for k in new_keys if k in kv.sizes]
            ep = {"epoch": e, "connect_s": max(conn.values()) - t0, "connect_and_allgather_s": max(done.values()) - t0,
                  "keys_added": (num_keys() - k0) if num_keys else None,
                  "counted_writes": calls.get("set", 0) + calls.get("add", 0) + calls.get("compare_set", 0),
                  "counted_reads": calls.get("get", 0) + calls.get("add0", 0), "counted_calls": calls,
                  "distinct_keys_written": written,
                  "value_bytes": {"min": min(sizes), "max": max(sizes)} if sizes else None}
            res["epochs"].append(ep)
            print(f"  {path} L={L} G={G} epoch {e}: connect {ep['connect_s']:.3f} s (+allgather "
                  f"{ep['connect_and_allgather_s']:.3f} s), keys +{ep['keys_added']}, counted writes "
                  f"{ep['counted_writes']} reads {ep['counted_reads']} keys {written}", flush=True)
        res.update(_abort_phase(kv, lanes, L, G, epochs, stall_s, timeout, DistributedError))
    finally:
        for row in lanes:
            for lane in row:
                lane.close()
    return res


def _abort_phase(kv: Any, lanes: list, L: int, G: int, e: int, stall_s: float, timeout: timedelta,
                 DistributedError: type) -> dict:
    import torch

    left: dict[tuple, float] = {}
    outcome: dict[tuple, str] = {}
    posted = threading.Barrier(L * (G - 1) + 1)

    def waiter(i: int, g: int) -> None:
        h = lanes[i][g].comm.allgather(torch.tensor([1.0]))
        posted.wait()
        try:
            h.wait(timeout)
            outcome[(i, g)] = "completed"
        except DistributedError as exc:
            outcome[(i, g)] = "aborted" if "reported a failed" in str(exc) else "failed"
        left[(i, g)] = time.monotonic()

    ts = [threading.Thread(target=waiter, args=(i, g), daemon=True) for i in range(L) for g in range(G - 1)]
    for t in ts:
        t.start()
    posted.wait()
    time.sleep(0.2)  # every watcher has seen its lane busy
    a0, t0 = kv.snapshot()[0].get("get abort", 0), time.monotonic()
    time.sleep(stall_s)
    reads, window = kv.snapshot()[0].get("get abort", 0) - a0, time.monotonic() - t0
    t_fail = time.monotonic()
    lanes[0][G - 1].fail(e, "sim: lane 1 of the last group failed")
    for t in ts:
        t.join(TIMEOUT_S * 2)
    in_flight = L * (G - 1)
    kinds = {k: sum(1 for v in outcome.values() if v == k) for k in ("aborted", "failed", "completed")}
    out = {"abort_reads_per_s": reads / window, "abort_reads_per_lane_rank_per_s": reads / window / in_flight,
           "lane_ranks_in_flight": in_flight, "fail_to_all_left_s": max(left.values()) - t_fail if left else None,
           "left_by": kinds, "left_count": len(left)}
    print(f"  abort watch: {out['abort_reads_per_s']:.0f} reads/s over {in_flight} lane ranks in flight "
          f"({out['abort_reads_per_lane_rank_per_s']:.1f}/s each); fail -> all {len(left)} left in "
          f"{out['fail_to_all_left_s']:.3f} s {kinds}", flush=True)
    return {"abort_watch": out}


def main() -> None:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--groups", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--epochs", type=int, default=3, help="epochs (views) connected per configuration")
    p.add_argument("--stall-s", type=float, default=1.5)
    p.add_argument("--etcd-lanes", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--etcd-groups", type=int, nargs="*", default=[5])
    p.add_argument("--no-etcd", action="store_true")
    p.add_argument("--out", default="lanes_scale")
    args = p.parse_args()

    import torch

    from common import machine_info, write_result

    from resilient_train.membership import TCPKVStore

    torch.set_num_threads(1)
    Counting = counting_class()

    load_start, t_start = os.getloadavg(), time.monotonic()
    runs: list[dict] = []
    host = TCPKVStore.host(port=0)
    n = [0]

    def tag() -> str:
        n[0] += 1
        return f"run{n[0]}"

    configs = [(L, G) for G in args.groups for L in args.lanes]
    for path in ("tcp-native", "tcp-kv"):
        for L, G in configs:
            inner = host.clone() if path == "tcp-native" else _NoNative(host.clone())
            t = tag()
            kv = Counting(inner, f"sim-lanes/{t}")
            try:
                runs.append(run_config(kv, path, L, G, args.epochs, args.stall_s, t,
                                       num_keys=lambda: int(host._store.num_keys())))
            except Exception as exc:  # noqa: BLE001 - recorded: the machine could not carry it
                runs.append({"path": path, "lanes": L, "groups": G, "error": f"{type(exc).__name__}: {exc}"[:800]})
                print(f"  {path} L={L} G={G}: FAILED {exc}", flush=True)
    etcd_error = None
    if not args.no_etcd and args.etcd_lanes:
        try:
            from resilient_train.membership import EtcdKVStore
            from resilient_train.testing.servers import EtcdCluster

            with EtcdCluster(3) as cluster:
                for G in args.etcd_groups:
                    for L in args.etcd_lanes:
                        t = tag()
                        kv = Counting(EtcdKVStore(cluster.url[len("etcd://"):]), f"sim-lanes/{t}")
                        try:
                            runs.append(run_config(kv, "etcd", L, G, args.epochs, args.stall_s, t))
                        except Exception as exc:  # noqa: BLE001 - recorded
                            runs.append({"path": "etcd", "lanes": L, "groups": G, "error": f"{type(exc).__name__}: {exc}"[:800]})
                            print(f"  etcd L={L} G={G}: FAILED {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the TCPStore figures stand; the JSON says why etcd is missing
            etcd_error = f"{type(exc).__name__}: {exc}"
            print("etcd part failed:", etcd_error, flush=True)
    path = write_result(args.out, {
        "machine": machine_info(), "settings": {"round_deadline_s": TIMEOUT_S, "abort_poll_s": ABORT_POLL_S,
                                                "epochs": args.epochs, "stall_s": args.stall_s},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.monotonic() - t_start,
        "summary": summarise(runs), "runs": runs, "etcd_error": etcd_error})
    print("wrote", path)


def _med(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Per path and configuration: connect times over the epochs after the first (the first
    includes the threads' and connections' warm-up; all epochs are in ``runs``), keys and calls
    per epoch per lane, abort-watch rates."""
    out: dict[str, Any] = {}
    for r in runs:
        key = f"{r['path']}-L{r['lanes']}-G{r['groups']}"
        if "error" in r:
            out[key] = {"error": r["error"]}
            continue
        eps = r["epochs"]
        later = eps[1:] or eps
        L = r["lanes"]
        out[key] = {
            "connect_s": _med([e["connect_s"] for e in later]),
            "connect_first_epoch_s": eps[0]["connect_s"],
            "connect_and_allgather_s": _med([e["connect_and_allgather_s"] for e in later]),
            "keys_added_per_lane_per_epoch": _med([e["keys_added"] / L for e in eps if e["keys_added"] is not None]),
            "counted_writes_per_lane_per_epoch": _med([e["counted_writes"] / L for e in eps]),
            "counted_reads_per_lane_per_epoch": _med([e["counted_reads"] / L for e in eps]),
            "distinct_keys_written_per_lane_per_epoch": _med([e["distinct_keys_written"] / L for e in eps]),
            "rendezvous_value_bytes": _med([b for e in eps if e.get("value_bytes") for b in e["value_bytes"].values()]),
            "abort_reads_per_s": r["abort_watch"]["abort_reads_per_s"],
            "abort_reads_per_lane_rank_per_s": r["abort_watch"]["abort_reads_per_lane_rank_per_s"],
            "fail_to_all_left_s": r["abort_watch"]["fail_to_all_left_s"],
        }
    return out


if __name__ == "__main__":
    main()
