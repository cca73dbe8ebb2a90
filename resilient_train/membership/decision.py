"""The membership decision: heartbeats and the clock in; the member set, an epoch and a reason out.

Pure: no I/O, no clock of its own, no randomness. The service (:mod:`.service`) gathers the
heartbeats, passes its own monotonic clock, and publishes what :func:`decide` returns.

Rules, applied in this order (``decide`` documents each in its reason string):

1. A heartbeat is *alive* when ``now_s - last_seen_s <= timeout_s``. ``last_seen_s`` is the
   observer's clock when it last saw that member's heartbeat change, so clocks of different
   machines are never compared.
2. A current member stays when it is alive with intent ``"member"``. A current member that is
   not alive is dropped. A current member alive with intent ``"join"`` restarted (a new process
   under the same id): it is dropped and re-admitted in the same decision, as a joiner.
3. A joiner (alive, intent ``"join"``) whose fingerprint differs from the view's is refused:
   it is named in ``refused`` with both fingerprints and does not change the view. The view's
   fingerprint is fixed by its first members (the lowest joiner's, when the view has none).
   Heartbeats with intent ``"member"`` from ids outside the view are ignored (a dropped member
   that has not noticed yet; it will heartbeat ``"join"`` once it does).
4. When the new member set would have fewer than ``min_members`` members, the view does not
   change (a collective among the remaining members keeps failing until members return).
5. Otherwise the epoch increments exactly when something changed: a member left, or one was
   admitted (a restarted member counts as leaving and joining). Members are sorted; the
   admitted ones are listed in ``joiners`` (they need the state before taking part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

__all__ = ["View", "Heartbeat", "Decision", "decide", "coordinator", "INTENTS"]

INTENTS = ("member", "join")


@dataclass(frozen=True)
class View:
    """One epoch's membership. ``members`` is sorted; a member's rank is its index.

    ``fingerprint`` identifies the model every member trains (shapes, code version); ``""``
    until the first members are admitted. ``joiners`` (a sorted subset of ``members``) were
    admitted in this epoch and must receive the state before taking part."""

    epoch: int
    members: tuple[str, ...] = ()
    fingerprint: str = ""
    joiners: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"View.epoch must be an int >= 0, got {self.epoch!r}")
        if tuple(sorted(set(self.members))) != tuple(self.members):
            raise ValueError(f"View.members must be sorted and unique, got {self.members!r}")
        if tuple(sorted(set(self.joiners))) != tuple(self.joiners) or not set(self.joiners) <= set(self.members):
            raise ValueError(f"View.joiners must be a sorted subset of members, got {self.joiners!r}")

    def rank_of(self, member_id: str) -> int:
        """This member's rank in the epoch's process group (its index in ``members``)."""
        return self.members.index(member_id)


@dataclass(frozen=True)
class Heartbeat:
    """What the observer knows of one member: when (on the observer's clock) its heartbeat last
    changed, what it asks for (``"member"``: keep me; ``"join"``: admit me) and its model
    fingerprint."""

    last_seen_s: float
    intent: str
    fingerprint: str

    def __post_init__(self) -> None:
        if self.intent not in INTENTS:
            raise ValueError(f"Heartbeat.intent must be one of {INTENTS}, got {self.intent!r}")


class Decision(NamedTuple):
    """``view``: the view to publish (the same object as the input when nothing changes);
    ``reason``: why, in words; ``refused``: ``{member_id: reason}`` for joiners turned away."""

    view: View
    reason: str
    refused: Mapping[str, str]


def _refusal(theirs: str, ours: str) -> str:
    """Why a joiner with fingerprint ``theirs`` cannot join members with ``ours``. A trailing
    ``:lanes=N`` is how many shards a group exchanges (recovery/lanes.py), named when it alone differs."""
    t_model, _, t_lanes = theirs.partition(":lanes=")
    o_model, _, o_lanes = ours.partition(":lanes=")
    if t_model == o_model and t_lanes != o_lanes:
        return (f"the group exchanges its model in {t_lanes or 1} shard(s) and the members in {o_lanes or 1} "
                f"(fingerprints {theirs!r} and {ours!r}): shard i of every group is exchanged with shard i of the "
                f"others, so every group must be sharded alike; launch it on as many ranks, with the same "
                f"FSDP2/DDP layout, as the members")
    return (f"model fingerprint {theirs!r} differs from the members' {ours!r} "
            f"(different shapes or code version): start it with the same model and code")


def decide(now_s: float, view: View, heartbeats: Mapping[str, Heartbeat], *, timeout_s: float,
           min_members: int) -> Decision:
    """The next view given ``view`` and the heartbeats observed up to ``now_s`` (module rules)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if isinstance(min_members, bool) or not isinstance(min_members, int) or min_members < 1:
        raise ValueError(f"min_members must be an int >= 1, got {min_members!r}")
    alive = {m: hb for m, hb in heartbeats.items() if now_s - hb.last_seen_s <= timeout_s}
    current = set(view.members)
    stay = sorted(m for m in current if m in alive and alive[m].intent == "member")
    dead = sorted(m for m in current if m not in alive)
    restarted = sorted(m for m in current if m in alive and alive[m].intent == "join")
    asking = sorted(m for m, hb in alive.items() if hb.intent == "join")
    fingerprint = view.fingerprint or (alive[asking[0]].fingerprint if asking else "")
    refused = {m: _refusal(alive[m].fingerprint, fingerprint) for m in asking if alive[m].fingerprint != fingerprint}
    admitted = [m for m in asking if m not in refused]
    members = tuple(sorted(set(stay) | set(admitted)))
    if members == view.members and not admitted:
        return Decision(view, "no change" + (f"; refused {sorted(refused)}" if refused else ""), refused)
    parts = []
    if dead:
        parts.append(f"dropped {dead} (no heartbeat for more than {timeout_s:g} s)")
    if restarted:
        parts.append(f"{restarted} restarted (re-admitted as joiners)")
    if admitted:
        parts.append(f"admitted {admitted}")
    if refused:
        parts.append(f"refused {sorted(refused)}")
    if len(members) < min_members:
        return Decision(view, f"view kept: {'; '.join(parts)} would leave {len(members)} member(s) < "
                              f"min_members={min_members}", refused)
    new = View(view.epoch + 1, members, fingerprint, tuple(admitted))
    return Decision(new, f"epoch {new.epoch}: " + "; ".join(parts), refused)


def coordinator(view: View) -> str | None:
    """Who publishes ``view``: its lowest member that was already a member (not a joiner), or
    its lowest member when all are joiners. ``None`` for an empty view."""
    old = [m for m in view.members if m not in view.joiners]
    return (old or list(view.members) or [None])[0]
