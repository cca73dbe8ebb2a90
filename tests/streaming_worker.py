"""One provider of the streaming-with-groups tests (tests/test_streaming_groups.py,
tests/test_overlap_groups.py; launched by tests/streaming_harness.py): a real
``rt.wrap(group=..., membership=tcp://...)`` trainer with DiLoCo split into ``fragments``
(streaming), one process per rank (no torchrun), AdamW inside, checkpoints
in its group's own folder.

What a worker does at a chosen point (``Case.fault``, for the group ``Case.victim``; the round
counter is the engine's, so with K fragments and ``sync_every`` H, round r is at step r H / K):

* ``kill-exchange``: SIGKILL itself inside round ``fault_round``'s cross-provider exchange;
* ``kill-vote``: SIGKILL itself in the vote on the view after round ``fault_round``;
* ``leave-before``: ``trainer.close()`` right before the step that launches round
  ``fault_round`` (the clean-leave reference of ``kill-exchange``);
* ``leave-after``: ``trainer.close()`` right after round ``fault_round`` and its vote (the
  clean-leave reference of ``kill-vote``);
* ``hold``: every group stops training at ``stop_step`` and waits to be killed (a whole job
  killed between checkpoints; the relaunch resumes from the groups' own checkpoints);
* ``nan``: the pseudo-gradient of round ``fault_round`` is not finite on the victim (one
  element of the fragment's first parameter is NaN while the round launches, on rank 0, which
  holds that element with FSDP2 too; on every rank of a DDP group, whose ranks hold one
  model); the weights are put back right after the launch, so only the round sees it.

With ``overlap`` = d > 0 a round launched at step t runs in the background (its exchange on a
thread of its own) and is applied at t + d, where its vote follows: ``kill-exchange`` then
dies as the exchange of the round launched at ``fault_round``'s step starts (while the
survivors take their d overlapped steps), and ``leave-after`` leaves after that round's apply
step and vote. Every exchange is logged (``exchange``: the step that launched it, the trainer's
step when it started, whether it ran on the training thread).

Batches are a function of (step, group), so a resumed or joining group follows the step.
Every worker appends JSON lines to ``<out>/w-<group>.jsonl`` (tests/failure_worker.py's log)
Each ``step`` line carries ``global``: a CRC32 of the rank's global state (every fragment's
global weights and outer momentum) after the step. At the end it writes ``<out>/final-<group>.safetensors``: its local weights (``model.*``), each
fragment's global weights and outer momentum (``global``, :meth:`DiLoCo.global_flat`), and its
step.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file

import resilient_train as rt
from tests.failure_worker import Log, _batch, _die, _model, read

torch.set_num_threads(1)


@dataclass(frozen=True)
class Case:
    groups: tuple[str, ...] = ("a", "b", "c")
    victim: str = "b"
    fault: str = "none"  # none | kill-exchange | kill-vote | leave-before | leave-after | hold | nan
    codec: str = "int8"
    mode: str = "diloco"
    sync_every: int = 4
    fragments: int = 2
    overlap: int = 0  # overlap_steps d: each round applied d steps after its launch
    fault_round: int = 5
    stop_step: int = 24
    every: int = 8
    width: int = 64
    ranks: int = 1  # ranks per provider (processes with RANK/WORLD_SIZE set, as torchrun would)
    fsdp: bool = False  # shard the model over a provider's ranks with FSDP2 (lanes)
    joiner: str | None = None  # launched after the founders reach join_after_step
    join_after_step: int = 9
    round_deadline_s: float = 30.0

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def load(raw: str) -> "Case":
        return Case(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(raw).items()})


class _LockedLog(Log):
    """tests/failure_worker.py's log, one line at a time: the exchange thread logs too."""

    _lock = threading.Lock()

    def __call__(self, ev: str, **fields) -> None:
        with self._lock:
            super().__call__(ev, **fields)


def _batch_of(step: int, group: str, rank: int) -> torch.Tensor:
    return _batch(step, group) if rank == 0 else torch.randn(8, 64, generator=torch.Generator().manual_seed(7919 * step + 131 * ord(group) + rank))


def _shard(model: torch.nn.Module) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().contiguous() for k, v in model.state_dict().items()}


def _crc(sync) -> int:
    """CRC32 of the global weights and outer momentum (not of a round in flight, whose result
    may or may not be known yet when the step ends)."""
    tensors = sync.global_state_dict(copy=False)["tensors"]
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32((t.to_local() if hasattr(t, "to_local") else t).detach().contiguous().numpy().tobytes(), crc)
    return crc


def run(group: str, membership: str, out: str, case_json: str, joiner: bool = False, rank: int = 0, master_port: int = 0) -> None:
    case = Case.load(case_json)
    if case.ranks > 1:
        # the rendezvous store is the test process's (tests/streaming_harness.py), as torchrun's agent's is
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(case.ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                          TORCHELASTIC_USE_AGENT_STORE="True")
    me = group if rank == 0 else f"{group}.{rank}"
    log = _LockedLog(os.path.join(out, f"w-{me}.jsonl"))
    log("up", pid=os.getpid())
    model = _model(case.width)
    if case.fsdp:
        _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = rt.wrap(model, opt, rt.TrainerConfig(
        checkpoint=os.path.join(out, "ckpt"), every_n_steps=case.every, keep_last=100, async_save=False, save_on_close=False,
        sync=rt.SyncConfig(mode=case.mode, sync_every=case.sync_every, codec=case.codec, fragments=case.fragments, overlap_steps=case.overlap),
        group=group, membership=membership, start_groups=len(case.groups), round_deadline_s=case.round_deadline_s,
        join_timeout_s=120.0, heartbeat_timeout_s=10.0, event_log=os.path.join(out, f"rt-{me}.jsonl"), timeout_s=120, log="off"))
    log("wrapped", step=trainer.step_count, resumed_from=trainer.resumed_from)
    cross, victim, R = trainer.cross, group == case.victim, case.fault_round
    round_step = R * case.sync_every // case.fragments  # K divides H in these cases
    inner = cross._collective

    def collective(op: str, buf: torch.Tensor):
        launched = cross._op_step  # set when the exchange runs in the background (overlap), else None
        log("exchange", op=op, launched=launched, step=trainer.step_count, main=threading.current_thread() is threading.main_thread())
        # without overlap the exchange runs when the round is applied, in the step that launched it
        if victim and case.fault == "kill-exchange" and (launched == round_step if case.overlap else trainer.sync.rounds == R):
            _die(log, at="exchange", op=op, step=trainer.step_count, launched=launched)
        return inner(op, buf)

    cross._collective = collective
    if victim and case.fault == "kill-vote":
        after = cross.after_round

        def after_round():
            if trainer.sync.rounds == R:
                _die(log, at="vote", step=trainer.step_count)
            return after()

        cross.after_round = after_round
    if victim and case.fault == "nan" and (rank == 0 or not case.fsdp):
        launch = trainer.sync._launch

        def poisoned(frag, t):
            if t != round_step:
                return launch(frag, t)
            piece = frag.params[0].to_local() if hasattr(frag.params[0], "to_local") else frag.params[0]
            keep = piece.detach().clone()
            with torch.no_grad():
                piece.view(-1)[0] = float("nan")
            log("fault", at="nan", step=t, fragment=frag.index)
            try:
                return launch(frag, t)
            finally:
                with torch.no_grad():
                    piece.copy_(keep)

        trainer.sync._launch = poisoned
    # with a joiner, everyone trains one more period after the founders' view holds it
    stop = max(case.stop_step, trainer.step_count + case.sync_every) if joiner else case.stop_step
    while True:
        step = trainer.step_count
        if case.joiner is not None and not joiner and stop == case.stop_step and case.joiner in cross.view.members:
            stop = max(case.stop_step, step + case.sync_every)
        if case.fault == "hold" and step == case.stop_step:
            log("held", step=step)
            while True:
                time.sleep(1)
        if step >= stop and (case.joiner is None or joiner or case.joiner in cross.view.members):
            break
        if victim and (case.fault, step) in (("leave-before", round_step - 1), ("leave-after", round_step + case.overlap)):
            log("fault", at=case.fault, step=step)
            trainer.close()
            log("left", step=step)
            return
        x = _batch_of(step, group, rank)
        loss = (trainer.model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        trainer.step()
        log("step", i=step, after=trainer.step_count, members=list(cross.view.members), rounds=trainer.sync.rounds,
            **{"global": _crc(trainer.sync)})
    tensors = {f"model.{k}": v for k, v in _whole(model).items()}  # an FSDP2 model's pieces gathered (collective)
    tensors["global"] = trainer.sync.global_flat().clone()  # this rank's pieces with FSDP2
    tensors["step"] = torch.tensor([trainer.step_count])
    save_file(tensors, os.path.join(out, f"final-{me}.safetensors"))
    log("done", step=trainer.step_count, members=list(cross.view.members))
    trainer.close()


__all__ = ["Case", "run", "read"]
