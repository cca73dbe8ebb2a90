"""In-process elastic membership across replica groups: heartbeats, views, one group per epoch.

Each replica group's leader runs one :class:`Membership`. Call order::

    m = Membership(kv, "provider-a", fingerprint, heartbeat_interval_s=1, timeout_s=10).start()
    m.wait_for_admission(timeout_s=120)         # raises MembershipRefusedError if refused
    comm = m.communicator()                     # collective: every member of the view calls it
    sync_state(comm, m.view, m.member_id, flat, step, fallback=...)   # joiners get the state
    while training:
        buf[-1] = float(m.check())              # vote: someone saw a newer view
        try:
            comm.allreduce_sum(buf).wait(timedelta(seconds=collective_timeout_s))
        except DistributedError:                # a peer died or hung: bounded by the timeout
            m.wait_for_change(timeout_s=...)    # the survivors' new view, or MembershipError
            comm = m.communicator(); sync_state(...); continue   # redo the step
        if buf[-1] > 0:                         # everyone switches after the same step
            m.wait_for_change(...); comm = m.communicator(); sync_state(...)

The protocol (keys under ``prefix`` in the :class:`~.kvstore.KVStore`; docs/membership.md):

* ``registry/n`` (counter) and ``registry/<i>`` (a member id): who has ever registered.
* ``hb/<member>``: JSON ``{token, seq, intent, fingerprint, epoch}``, rewritten every
  ``heartbeat_interval_s`` by a background thread. ``token`` is new for every process, so a
  restart under the same id is seen as a new heartbeat stream; ``epoch`` is the latest view
  the member has read: a listed member asking to "join" is a restart only if it has read the
  view that lists it (otherwise it simply has not noticed its admission yet).
* ``view/<epoch>``: JSON of the :class:`~.decision.View` of that epoch, written once with
  ``compare_set(expected=None)``: the first proposal wins and everyone adopts it.
* ``refused/<member>``: JSON ``{token, reason}`` for a refused joiner.
* ``epoch-<n>/...``: the gloo rendezvous of epoch ``n``'s process group (ranks by sorted id).
* ``abort/<n>``: JSON ``{member, error}``, written (first writer wins) by the first member that
  sees a collective of epoch ``n`` fail, before its roll call (``rollcall/<n>/<member>``).

**Failure propagation** (a failure one member sees reaches every member at once). Gloo cannot
interrupt an operation in flight, so two mechanisms work together (docs/membership.md):

1. *Connections.* A member whose collective failed releases its epoch's process group before
   the roll call, which closes its connections; every peer blocked on it fails at once
   ("connection closed by peer") and does the same, so the failure cascades along the ring.
2. *The store.* While a collective is in flight, a watcher thread reads ``abort/<epoch>`` every
   ``abort_poll_s`` (default 0.02 s) and, when it appears, cancels this member's wait
   (:meth:`ProcessGroupCommunicator.abort`): members not connected to the failure (a partition,
   a peer waiting on a send) leave the collective within one poll, independent of the round
   deadline and the heartbeat timeout. The cancelled operation stays in flight inside gloo; its
   group is kept aside and dropped as soon as the operation ends (normally at once, when the
   peers' released groups close their connections; at the latest at the group's timeout).

Every thread observes all heartbeats on its own monotonic clock (a heartbeat counts as seen
when its ``(token, seq)`` changes), runs :func:`~.decision.decide`, and publishes the result
only if it is the decision's :func:`~.decision.coordinator` (the lowest surviving member; the
lowest joiner when no member survives). A thread decides only after observing for
``timeout_s`` (so a new process does not mistake members it has not heard yet for dead ones).

Failure behaviour: nothing on the training path blocks without a timeout. Store errors in the
background thread are logged and retried on the next beat (``last_error`` keeps the latest); a
member that cannot heartbeat for ``timeout_s`` is dropped by the others and must rejoin. After
the store did not answer a member for more than ``timeout_s / 2``, that member observes for
``timeout_s`` again before it decides (an outage of the store silences every heartbeat alike).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import timedelta
from typing import Any

from ..errors import ConfigError, MembershipError, MembershipRefusedError, MembershipStoreError
from ..sync.communicator import ProcessGroupCommunicator
from .decision import Heartbeat, View, coordinator, decide
from .kvstore import KVStore, torch_store_for
from .liveness import LivenessServer, answers, probe

__all__ = ["Membership", "encode_view", "decode_view", "encode_abort_record", "decode_abort_record"]

log = logging.getLogger(__name__)


def encode_view(view: View, reason: str = "") -> bytes:
    return json.dumps({"epoch": view.epoch, "members": list(view.members), "fingerprint": view.fingerprint,
                       "joiners": list(view.joiners), "reason": reason}, sort_keys=True).encode()


def _restarted(hb: bytes | None, epoch: int) -> bool:
    """A member of ``epoch`` whose heartbeat says "join" *after* reading that view is a new
    process under the same id (a restart: a new process never counts itself admitted by a view
    published before it started). One that says "join" with an older epoch was admitted by
    ``epoch`` but has not beaten since it read it: alive, and in this round."""
    try:
        d = json.loads(hb) if hb else None
        return d is not None and str(d["intent"]) == "join" and int(d["epoch"]) >= epoch
    except (ValueError, KeyError, TypeError):
        return False


def _liveness_of(hb: bytes | None) -> tuple[str, str] | None:
    """(address, token) of the liveness port a heartbeat names (liveness.py), or None."""
    if hb is None:
        return None
    try:
        d = json.loads(hb)
        live, token = d.get("live"), d.get("token")
    except (ValueError, AttributeError):
        return None
    if not isinstance(live, str) or not isinstance(token, str):
        return None
    return live, token


def encode_abort_record(member: str, error: str) -> bytes:
    """The value of ``abort/<epoch>``: who saw a collective of that epoch fail, and what failed."""
    return json.dumps({"member": member, "error": error[:500]}).encode()


def decode_abort_record(raw: bytes) -> tuple[str, str]:
    """``(member, error)`` from an ``abort/<epoch>`` value; a value that is not such a record
    (written by another version, or damaged) still reports a failure, from "a member"."""
    try:
        d = json.loads(raw)
        return str(d.get("member")), str(d.get("error", ""))
    except (ValueError, AttributeError):
        return "a member", raw[:200].decode(errors="replace")


def decode_view(raw: bytes) -> tuple[View, str]:
    d = json.loads(raw)
    return View(int(d["epoch"]), tuple(d["members"]), str(d["fingerprint"]), tuple(d["joiners"])), str(d["reason"])


class Membership:
    """One replica group's membership handle (see the module docstring for the call order).

    ``member_id``: a stable name for the replica group (e.g. the provider); a process that
    restarts under the same id is re-admitted as a joiner. ``fingerprint``: identifies the
    model and code (joiners with another one are refused). ``timeout_s``: a member silent for
    longer is dropped; must exceed ``2 * heartbeat_interval_s``. ``min_members``: views never
    shrink below it. ``collective_timeout_s``: the bound on connecting each epoch's group (and
    the group's own default timeout). ``store_timeout_s``: each store call's bound.
    The constructor validates and does no I/O; ``start()`` registers and starts the thread."""

    def __init__(self, store: KVStore, member_id: str, fingerprint: str, *, heartbeat_interval_s: float = 1.0,
                 timeout_s: float = 10.0, min_members: int = 1, collective_timeout_s: float = 30.0,
                 store_timeout_s: float = 5.0, prefix: str = "rt-membership", first_view_after_s: float | None = None,
                 abort_poll_s: float = 0.02):
        if not isinstance(member_id, str) or not member_id or "/" in member_id:
            raise ConfigError(f"member_id must be a non-empty str without '/', got {member_id!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigError("fingerprint must be a non-empty str (e.g. model_fingerprint(model, code_version))")
        if not heartbeat_interval_s > 0:
            raise ConfigError(f"heartbeat_interval_s must be > 0, got {heartbeat_interval_s!r}")
        if not timeout_s > 2 * heartbeat_interval_s:
            raise ConfigError(f"timeout_s ({timeout_s!r}) must exceed 2 * heartbeat_interval_s "
                              f"({heartbeat_interval_s!r}), or live members are dropped between beats")
        if isinstance(min_members, bool) or not isinstance(min_members, int) or min_members < 1:
            raise ConfigError(f"min_members must be an int >= 1, got {min_members!r}")
        if not collective_timeout_s > 0 or not store_timeout_s > 0:
            raise ConfigError("collective_timeout_s and store_timeout_s must be > 0")
        if not 0 < abort_poll_s <= 1.0:
            raise ConfigError(f"abort_poll_s must be in (0, 1] seconds, got {abort_poll_s!r}")
        for name in ("set", "get", "add", "compare_set", "clone"):
            if not callable(getattr(store, name, None)):
                raise ConfigError(f"store must implement the KVStore protocol; it lacks {name}()")
        self.member_id = member_id
        self.fingerprint = fingerprint
        self.heartbeat_interval_s = float(heartbeat_interval_s)
        self.timeout_s = float(timeout_s)
        self.first_view_after_s = self.timeout_s if first_view_after_s is None else min(float(first_view_after_s), self.timeout_s)
        self.min_members = min_members
        self.collective_timeout = timedelta(seconds=collective_timeout_s)
        self.store_timeout = timedelta(seconds=store_timeout_s)
        self.prefix = prefix.rstrip("/")
        self._kv = store
        self._bg_kv: KVStore | None = None
        self._token = os.urandom(8).hex()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # written by the background thread under _cond
        self._latest = View(0)
        self._latest_reason = ""
        self._admitted = False
        self._refused: str | None = None
        self.last_error: BaseException | None = None
        # observation state (background thread only)
        self._ids: list[str] = []
        self._registry_seen = 0
        self._seen_key: dict[str, tuple[str, int]] = {}
        self._last_seen: dict[str, float] = {}
        self._info: dict[str, tuple[str, str]] = {}
        self._notified: set[tuple[str, str]] = set()
        self._seq = 0
        self._start_epoch = 0
        self.cold_epoch = 0  # the latest view whose members were all joiners: the job's latest (re)start
        self._observe_from = 0.0
        self._last_ok = 0.0  # when the background thread last read the store successfully
        self._store_failed = False  # a store call failed since then
        # adopted epoch (training thread)
        self._view = View(0)
        self._comm: ProcessGroupCommunicator | None = None
        self._adopt_lock = threading.Lock()
        self._rolling_epoch = -1
        # failure propagation (the watcher thread): groups whose operation is still in flight
        self.abort_poll_s = float(abort_poll_s)
        self._graveyard: list[ProcessGroupCommunicator] = []
        self._failed_epoch = -1  # the newest epoch whose collective failed: never connected again
        self._watcher: threading.Thread | None = None
        self._liveness: LivenessServer | None = None  # this process's liveness port (liveness.py)
        self.liveness_probe_s = 0.1  # how often a roll call re-probes a member it waits for
        # (address, token) of the members' liveness ports that answered with their token once:
        # only for those is a refused probe proof of death (a firewall that rejects would
        # otherwise look like a dead process); checked by the verifier thread
        self._live_ok: set[tuple[str, str]] = set()
        self._live_queue: "queue.Queue[tuple[str, str] | None]" = queue.Queue()
        self._live_seen: set[tuple[str, str]] = set()
        self._verifier: threading.Thread | None = None

    # ------------------------------------------------------------------ lifetime

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def start(self) -> "Membership":
        """Register, read the published views, and start heartbeating with intent "join"."""
        if self._thread is not None:
            raise ConfigError("Membership.start() called twice")
        self._bg_kv = self._kv.clone()
        self._refuse_duplicate()
        try:
            self._liveness = LivenessServer(self._token)
        except OSError as exc:  # no port: the roll call falls back to heartbeat silence for this member
            log.warning("membership %s: no liveness port (%s); a roll call will tell this member's death by "
                        "heartbeat silence only", self.member_id, exc)
        i = self._bg_kv.add(self._k("registry/n"), 1, timeout=self.store_timeout) - 1
        self._bg_kv.set(self._k(f"registry/{i}"), self.member_id.encode(), timeout=self.store_timeout)
        self._start_epoch = 1 << 62  # views published before this process started never admit it
        self._scan_views()
        self._start_epoch = self._latest.epoch
        self._observe_from = self._last_ok = time.monotonic()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"membership-{self.member_id}", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, args=(self._kv.clone(),), name=f"membership-watch-{self.member_id}",
                                         daemon=True)
        self._watcher.start()
        self._verifier = threading.Thread(target=self._verify_liveness, name=f"membership-liveness-{self.member_id}",
                                          daemon=True)
        self._verifier.start()
        return self

    def _verify_liveness(self) -> None:
        """Probe each newly published liveness port once; the ones that answer with their
        token are trusted by the roll call (a refusal from them means the process is gone)."""
        while not self._stop.is_set():
            item = self._live_queue.get()
            if item is None:
                return
            if answers(*item, timeout_s=1.0):
                self._live_ok.add(item)
            else:
                log.info("membership %s: the liveness port %s does not answer; a roll call will tell that member's "
                         "death by heartbeat silence", self.member_id, item[0])

    def _refuse_duplicate(self) -> None:
        """Another live process heartbeating under this member id (the same group name given
        to two providers) is refused here; a dead predecessor (a restart) is not."""
        key = self._k(f"hb/{self.member_id}")
        first = self._bg_kv.get(key, timeout=self.store_timeout)
        if first is None:
            return
        time.sleep(3 * self.heartbeat_interval_s + 0.05)
        if self._bg_kv.get(key, timeout=self.store_timeout) != first:
            raise ConfigError(f"member id {self.member_id!r} is already used by a live process of this job: give each "
                              "provider's replica group its own name (TrainerConfig.group)")

    def close(self) -> None:
        """Stop heartbeating (the others drop this member after ``timeout_s``). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.store_timeout.total_seconds() + self.heartbeat_interval_s + 1)
        if self._watcher is not None:
            self._watcher.join(timeout=self.store_timeout.total_seconds() + 1)
        self._live_queue.put(None)
        if self._verifier is not None:
            self._verifier.join(timeout=2.0)
        if self._liveness is not None:
            self._liveness.close()
        with self._adopt_lock:
            if self._comm is not None:
                self._retire(self._comm)
            self._comm = None
        # groups whose cancelled operation is still in flight: give them a moment to end (their
        # peers closed their connections) so that no gloo thread is left inside an operation
        # when the interpreter exits
        deadline = time.monotonic() + min(5.0, self.collective_timeout.total_seconds())
        while self._reap() and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> "Membership":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ what the trainer calls

    @property
    def view(self) -> View:
        """The adopted view: the one :meth:`communicator` last built a group for."""
        return self._view

    @property
    def latest(self) -> View:
        """The latest published view this member has seen (may be newer than :attr:`view`)."""
        with self._cond:
            return self._latest

    @property
    def latest_reason(self) -> str:
        with self._cond:
            return self._latest_reason

    def check(self) -> bool:
        """True when a view newer than the adopted one is published (never blocks)."""
        with self._cond:
            return self._latest.epoch > self._view.epoch

    def wait_for_change(self, timeout_s: float) -> View | None:
        """Block until a view newer than the adopted one is published; ``None`` after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest.epoch > self._view.epoch or self._stop.is_set(), timeout_s)
            return self._latest if self._latest.epoch > self._view.epoch else None

    def wait_for_admission(self, timeout_s: float) -> View:
        """Block until a published view admits this member and return it. Raises
        :class:`MembershipRefusedError` if refused, :class:`MembershipError` after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: self._admitted or self._refused is not None or self._stop.is_set(),
                                timeout_s)
            if self._refused is not None:
                raise MembershipRefusedError(f"{self.member_id} was refused: {self._refused}")
            if not self._admitted:
                raise MembershipError(f"{self.member_id} was not admitted within {timeout_s} s (latest view: "
                                      f"epoch {self._latest.epoch} {list(self._latest.members)}; last store "
                                      f"error: {self.last_error!r})")
            return self._latest

    def communicator(self) -> ProcessGroupCommunicator:
        """A Communicator over the latest published view's members (rank = index in the sorted
        members). Builds a new gloo group when the view changed (collective: every member of
        the view must call it; bounded by ``collective_timeout_s``), else returns the cached one.
        Raises :class:`MembershipError` if this member is not in the latest view (dropped:
        ``wait_for_admission`` again, then take the state as a joiner) or the group cannot connect
        (a member died meanwhile: ``wait_for_change`` and call again)."""
        if self._stop.is_set():
            raise MembershipError(f"{self.member_id}: this Membership is closed")
        with self._adopt_lock:
            with self._cond:
                latest, admitted = self._latest, self._admitted
            if self._comm is not None and latest.epoch == self._view.epoch:
                return self._comm
            if latest.epoch <= self._failed_epoch:
                # its rendezvous keys name the dead member's address: connecting again would only
                # wait out the connect timeout. The roll call publishes the next view.
                raise MembershipError(f"{self.member_id}: epoch {latest.epoch} failed (a collective of it was aborted); "
                                      "wait_for_change() for the next view and call communicator() again")
            if not admitted or self.member_id not in latest.members:
                raise MembershipError(f"{self.member_id} is not a member of epoch {latest.epoch} "
                                      f"{list(latest.members)}: wait_for_admission() and rejoin")
            from ..sync.threads import ConnectCancelled, connect_cancellable, make_gloo_group

            store = torch_store_for(self._kv.clone(), self._k(f"epoch-{latest.epoch}"), self.collective_timeout)
            try:
                pg = connect_cancellable(
                    lambda: make_gloo_group(store, latest.rank_of(self.member_id), len(latest.members),
                                            self.collective_timeout),
                    self._connect_cancelled(latest), abandon=getattr(store, "cancel", None))
            except ConnectCancelled as exc:
                self._failed_epoch = max(self._failed_epoch, latest.epoch)
                raise MembershipError(f"{self.member_id}: gave up connecting the group of epoch {latest.epoch} "
                                      f"{list(latest.members)}: {exc}; wait_for_change() and call communicator() "
                                      "again") from None
            except Exception as exc:  # gloo: connect timeout / refused
                raise MembershipError(f"could not connect the group of epoch {latest.epoch} "
                                      f"{list(latest.members)} within {self.collective_timeout}: {exc}; "
                                      f"wait_for_change() and call communicator() again") from exc
            if self._comm is not None:
                self._retire(self._comm)
            comm = ProcessGroupCommunicator(pg)
            with self._cond:
                self._comm = comm
                self._view = latest
            log.info("%s adopted epoch %d %s (rank %d)", self.member_id, latest.epoch, list(latest.members),
                     latest.rank_of(self.member_id))
            return self._comm

    def _connect_cancelled(self, view: View):
        """For :meth:`communicator`'s connect of ``view``'s group: a reason to give up now, or
        None. Gives up when another member already reported the epoch failed (``abort/<e>``),
        or when a member's trusted liveness port refuses (its process died after the view was
        published: it will never connect); then reports the epoch failed itself, so that the
        others give up too. Without this, both cost the connect timeout."""
        e, me = view.epoch, self.member_id
        kv = self._kv.clone()
        state = {"next_probe": 0.0}

        def cancelled() -> str | None:
            try:
                raw = kv.get(self._k(f"abort/{e}"), timeout=self.store_timeout)
                if raw is not None:
                    who, error = decode_abort_record(raw)
                    return f"{who} reported a failed collective in epoch {e}: {error[:200]}"
                now = time.monotonic()
                if now < state["next_probe"]:
                    return None
                state["next_probe"] = now + self.liveness_probe_s
                for m in view.members:
                    if m == me:
                        continue
                    lv = _liveness_of(kv.get(self._k(f"hb/{m}"), timeout=self.store_timeout))
                    if lv is not None and lv in self._live_ok and probe(*lv) == "dead":
                        why = f"{m}'s process is gone (its liveness port refuses) before it connected"
                        kv.compare_set(self._k(f"abort/{e}"), None, encode_abort_record(me, why),
                                       timeout=self.store_timeout)
                        return why
            except MembershipStoreError as exc:  # the connect's own timeout still bounds the wait
                self.last_error = exc
            return None

        return cancelled

    def report_failure(self, *, deadline_s: float, silent_after_s: float | None = None,
                       exclude: tuple[str, ...] = (), poll_s: float = 0.02, view: View | None = None,
                       error: str = "") -> View:
        """A collective of ``view``'s epoch (default: the adopted one; pass the view whose group
        could not be connected) failed: run the roll call and return the next view. Called on
        the training thread of every member that saw the failure. Rolling an epoch that the
        others never adopted would let a lone member publish a view of itself, so the epoch
        is always the one the failed operation ran in.

        Each caller writes ``rollcall/<epoch>/<member>``. Members of the failed epoch that have
        not answered are waited for while their heartbeat still advances (a live member that
        has not reached the collective yet), and dropped once it has been still for
        ``silent_after_s`` (default ``3 * heartbeat_interval_s + 0.05``): a SIGKILLed peer is
        gone after that, independent of ``timeout_s``. ``exclude`` (e.g. joiners that have not
        received the state) are never waited for. After ``deadline_s`` everyone who has not
        answered is dropped (a hung or partitioned member). The lowest member that answered
        publishes ``view/<epoch+1>`` with the members that answered (``compare_set``: a view
        published meanwhile by anyone else wins and is returned instead). Raises
        :class:`MembershipError` when fewer than ``min_members`` answered by the deadline.

        Before the roll call it propagates the failure (module docstring): it publishes
        ``abort/<epoch>`` (with ``error``, this member's view of what failed) so that every
        member's watcher cancels its wait on that epoch's collective, and releases the epoch's
        process group so that peers blocked on this member fail at once."""
        silent_after = 3 * self.heartbeat_interval_s + 0.05 if silent_after_s is None else silent_after_s
        if view is None:  # the epoch whose collective failed: the adopted one
            view = self._view
        e, kv, me = view.epoch, self._kv, self.member_id
        if me not in view.members:
            return view  # already dropped: nothing to vote on
        with self._cond:
            self._rolling_epoch = e
        self.abort_epoch(e, error)
        kv.set(self._k(f"rollcall/{e}/{me}"), self._token.encode(), timeout=self.store_timeout)
        t0 = time.monotonic()
        seen: dict[str, tuple[Any, float]] = {}
        probed: dict[str, float] = {}
        dead: set[str] = set()
        not_waited: dict[str, str] = {}  # why each member not waited for is not
        while True:
            raw = kv.get(self._k(f"view/{e + 1}"), timeout=self.store_timeout)
            if raw is not None:
                self._adopt_published(raw)
                return decode_view(raw)[0]  # the next view of *that* epoch, not a later one
            now = time.monotonic()
            answered = [m for m in view.members if m == me or kv.get(self._k(f"rollcall/{e}/{m}"), timeout=self.store_timeout) is not None]
            waiting = []
            for m in view.members:
                if m in answered:
                    continue
                if m in exclude:
                    not_waited[m] = "not synced yet"
                    continue
                hb = kv.get(self._k(f"hb/{m}"), timeout=self.store_timeout)
                prev = seen.get(m)
                if prev is None or prev[0] != hb:
                    seen[m] = (hb, now if prev is not None else t0)
                if _restarted(hb, e):
                    not_waited[m] = "restarted: a new process under that id"
                    continue  # it rejoins, it is not in this round
                if m in dead:
                    continue
                not_waited[m] = "heartbeat still"
                if now - seen[m][1] < silent_after:
                    lv = _liveness_of(hb)
                    if lv is not None and lv in self._live_ok and now - probed.get(m, -1.0) >= self.liveness_probe_s:
                        probed[m] = now
                        if probe(*lv) == "dead":
                            dead.add(m)
                            not_waited[m] = "liveness port refused"
                            log.info("%s: roll call of epoch %d: %s's process is gone (its liveness port refuses)",
                                     me, e, m)
                            continue
                    waiting.append(m)
            late = now - t0 > deadline_s
            if not waiting or late:
                members = tuple(sorted(answered))
                if len(members) < self.min_members:
                    if late:
                        raise MembershipError(f"{me}: after a failed collective in epoch {e} only {list(members)} "
                                              f"answered the roll call within {deadline_s} s (< min_members="
                                              f"{self.min_members})")
                elif members[0] == me:
                    gone = sorted(set(view.members) - set(members))
                    if late:
                        why = f"silent past the {deadline_s:g} s round deadline"
                    else:
                        why = ", ".join(f"{m}: {not_waited.get(m, '?')}" for m in gone)
                    new = View(e + 1, members, view.fingerprint, ())
                    reason = (f"epoch {e + 1}: dropped {gone} after a failed collective "
                              f"({why}; roll call {now - t0:.2f} s)")
                    kv.compare_set(self._k(f"view/{e + 1}"), None, encode_view(new, reason), timeout=self.store_timeout)
                    continue
            if now - t0 > deadline_s + max(5.0, 2 * self.store_timeout.total_seconds()):
                raise MembershipError(f"{me}: no view after epoch {e} was published within {deadline_s} s of a "
                                      f"failed collective (store error: {self.last_error!r})")
            time.sleep(poll_s)

    def abort_epoch(self, epoch: int, error: str = "") -> None:
        """Tell every member that a collective of ``epoch`` failed (``abort/<epoch>``; the first
        report wins) and, if ``epoch`` is the adopted one, cancel this member's waits on it and
        release its process group (module docstring). A store error here is logged, not
        raised: the connections closing still reach the peers, and the roll call that follows
        reports the store."""
        with self._adopt_lock:
            self._failed_epoch = max(self._failed_epoch, epoch)
        body = encode_abort_record(self.member_id, error)
        try:
            self._kv.compare_set(self._k(f"abort/{epoch}"), None, body, timeout=self.store_timeout)
        except MembershipStoreError as exc:
            self.last_error = exc
            log.warning("membership %s: could not publish the failure of epoch %d: %s", self.member_id, epoch, exc)
        with self._adopt_lock:
            if self._comm is not None and self._view.epoch == epoch:
                self._comm.abort(f"{self.member_id} saw a collective of epoch {epoch} fail: {error[:300]}")
                self._retire(self._comm)
                self._comm = None

    def _retire(self, comm: ProcessGroupCommunicator) -> None:
        """Close ``comm``'s group now, or once its operation in flight ends (the watcher)."""
        comm.abort("superseded by a newer epoch")
        if not comm.release():
            with self._cond:
                self._graveyard.append(comm)

    def _reap(self) -> int:
        """Release the retired groups whose operation has ended; returns how many remain."""
        with self._cond:
            self._graveyard = [c for c in self._graveyard if not c.release()]
            return len(self._graveyard)

    def _watch(self, kv: KVStore) -> None:
        """The watcher thread: cancel the adopted epoch's collective in flight as soon as
        ``abort/<epoch>`` appears; release retired groups whose operation ended."""
        timeout = timedelta(seconds=min(self.store_timeout.total_seconds(), 2.0))
        while not self._stop.wait(self.abort_poll_s):
            try:
                self._watch_once(kv, timeout)
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one poll
                self.last_error = exc
                log.exception("membership %s: abort watch failed; polling on", self.member_id)

    def _watch_once(self, kv: KVStore, timeout: timedelta) -> None:
        self._reap()
        with self._cond:
            comm, epoch = self._comm, self._view.epoch
        if comm is None or comm.aborted is not None or not comm.busy:
            return
        try:
            raw = kv.get(self._k(f"abort/{epoch}"), timeout=timeout)
        except MembershipStoreError as exc:
            self.last_error = exc
            log.debug("membership %s: abort watch: store call failed: %s", self.member_id, exc)
            return
        if raw is None:
            return
        who, why = decode_abort_record(raw)
        log.info("membership %s: %s reported a failed collective in epoch %d; leaving it (%s)",
                 self.member_id, who, epoch, why)
        comm.abort(f"{who} reported a failed collective in epoch {epoch}: {why}")

    def set_flag(self, name: str, value: bytes = b"1") -> None:
        """Set a job-wide flag in the store (e.g. "started": the job has taken its first step)."""
        self._kv.set(self._k(f"flag/{name}"), value, timeout=self.store_timeout)

    def flag(self, name: str) -> bool:
        return self.flag_value(name) is not None

    def flag_value(self, name: str) -> bytes | None:
        return self._kv.get(self._k(f"flag/{name}"), timeout=self.store_timeout)

    def _note_cold(self, view: View) -> None:
        """Caller holds ``_cond``."""
        if view.members and set(view.joiners) == set(view.members):
            self.cold_epoch = max(self.cold_epoch, view.epoch)

    def _in_roll_call(self, epoch: int) -> bool:
        """This member's training thread is running the roll call of ``epoch`` (it publishes
        the next view itself; the heartbeat coordinator must not race it)."""
        with self._cond:
            return self._rolling_epoch == epoch

    def _adopt_published(self, raw: bytes) -> View:
        """Record a view read on the training thread (as the background thread's scan does)."""
        view, reason = decode_view(raw)
        with self._cond:
            if view.epoch > self._latest.epoch:
                self._take(view, reason)
            return self._latest

    def _take(self, view: View, reason: str) -> None:
        """Make ``view`` the latest seen (caller holds ``_cond``; either thread)."""
        self._latest, self._latest_reason = view, reason
        self._note_cold(view)
        if self.member_id in view.joiners and view.epoch > self._start_epoch:
            self._admitted = True
        elif self.member_id not in view.members:
            self._admitted = False
        self._cond.notify_all()
        log.info("membership %s saw %s", self.member_id, reason)

    # ------------------------------------------------------------------ background thread

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self._tick()
            except MembershipStoreError as exc:
                self.last_error = exc
                self._store_failed = True
                log.warning("membership %s: store call failed, retrying next beat: %s", self.member_id, exc)
            except Exception as exc:  # noqa: BLE001 - keep heartbeating; the error is kept and logged
                self.last_error = exc
                log.exception("membership %s: beat failed", self.member_id)
        with self._cond:
            self._cond.notify_all()

    def _tick(self) -> None:
        started = time.monotonic()
        self._beat()
        now = time.monotonic()
        store_was_out = self._store_failed or now - started > self.timeout_s / 2
        if store_was_out and now - self._last_ok > self.timeout_s / 2:
            # The store did not answer this member for a while (etcd without a majority, say):
            # everyone's heartbeats may have been stuck alike, so observe afresh for timeout_s
            # before deciding, instead of dropping members whose next beat is still in flight.
            log.info("membership %s: store back after %.1f s; observing for %g s before deciding",
                     self.member_id, now - self._last_ok, self.timeout_s)
            self._observe_from = now
        self._observe(now)
        self._last_ok, self._store_failed = now, False
        self._scan_views()
        self._check_refused()
        with self._cond:
            nobody_yet = not self._latest.members
        # Observe for timeout_s before deciding, so that members not heard yet are not taken
        # for dead; before the first view there is nobody to drop, so first_view_after_s
        # (default timeout_s) may be shorter: the members that start together are gathered.
        if now - self._observe_from >= (self.first_view_after_s if nobody_yet else self.timeout_s):
            self._coordinate(now)

    def _beat(self) -> None:
        assert self._bg_kv is not None  # internal: set in start()
        self._seq += 1
        with self._cond:
            intent = "member" if self._admitted else "join"
            epoch = self._latest.epoch
        body = {"token": self._token, "seq": self._seq, "intent": intent, "fingerprint": self.fingerprint,
                "epoch": epoch}
        if self._liveness is not None:
            body["live"] = self._liveness.address
        self._bg_kv.set(self._k(f"hb/{self.member_id}"), json.dumps(body).encode(), timeout=self.store_timeout)

    def _observe(self, now: float) -> None:
        kv = self._bg_kv
        assert kv is not None
        n = kv.add(self._k("registry/n"), 0, timeout=self.store_timeout)
        while self._registry_seen < n:
            raw = kv.get(self._k(f"registry/{self._registry_seen}"), timeout=self.store_timeout)
            if raw is None:  # registered but its name is not written yet: read it next beat
                break
            if raw.decode() not in self._ids:
                self._ids.append(raw.decode())
            self._registry_seen += 1
        for mid in self._ids:
            raw = kv.get(self._k(f"hb/{mid}"), timeout=self.store_timeout)
            if raw is None:
                continue
            hb = json.loads(raw)
            key = (str(hb["token"]), int(hb["seq"]))
            if mid in self._seen_key and self._seen_key[mid] != key:
                self._last_seen[mid] = now
            self._seen_key[mid] = key
            self._info[mid] = (str(hb["intent"]), str(hb["fingerprint"]), int(hb["epoch"]))
            lv = _liveness_of(raw)
            if lv is not None and lv not in self._live_seen and mid != self.member_id:
                self._live_seen.add(lv)
                self._live_queue.put(lv)  # verified once, off this thread (liveness.py)
        self._last_seen[self.member_id] = now  # this process is alive by construction

    def _scan_views(self) -> None:
        kv = self._bg_kv
        assert kv is not None
        while True:
            with self._cond:
                latest = self._latest
            raw = kv.get(self._k(f"view/{latest.epoch + 1}"), timeout=self.store_timeout)
            if raw is None:
                return
            view, reason = decode_view(raw)
            with self._cond:
                if view.epoch > self._latest.epoch:  # the training thread may have taken it already
                    self._take(view, reason)

    def _check_refused(self) -> None:
        with self._cond:
            if self._admitted or self._refused is not None:
                return
        raw = self._bg_kv.get(self._k(f"refused/{self.member_id}"), timeout=self.store_timeout)  # type: ignore[union-attr]
        if raw is not None:
            d = json.loads(raw)
            if d["token"] == self._token:
                with self._cond:
                    self._refused = str(d["reason"])
                    self._cond.notify_all()

    def _coordinate(self, now: float) -> None:
        with self._cond:
            latest = self._latest
        hbs = {}
        for mid, seen in self._last_seen.items():
            intent, fp, hb_epoch = self._info.get(mid, ("member", self.fingerprint, latest.epoch))
            if intent == "join" and mid in latest.members and hb_epoch < latest.epoch:
                intent = "member"  # admitted by the latest view but has not read it yet: not a restart
            hbs[mid] = Heartbeat(seen, intent, fp)
        with self._cond:
            hbs[self.member_id] = Heartbeat(now, "member" if self._admitted else "join", self.fingerprint)
        d = decide(now, latest, hbs, timeout_s=self.timeout_s, min_members=self.min_members)
        if coordinator(d.view) != self.member_id:
            return
        kv = self._bg_kv
        assert kv is not None
        for mid, why in d.refused.items():
            token = self._seen_key[mid][0]
            if (mid, token) not in self._notified:
                kv.set(self._k(f"refused/{mid}"), json.dumps({"token": token, "reason": why}).encode(),
                       timeout=self.store_timeout)
                self._notified.add((mid, token))
                log.warning("membership: refused %s: %s", mid, why)
        if d.view is not latest and not self._in_roll_call(latest.epoch):
            kv.compare_set(self._k(f"view/{d.view.epoch}"), None, encode_view(d.view, d.reason),
                           timeout=self.store_timeout)
            self._scan_views()
