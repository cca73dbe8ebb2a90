"""Run a training script under torchrun with a real fault and a report, without editing it.

    torchrun ... tests/torchrun_harness.py SCRIPT [ARGS...]

Environment: ``RT_KILL_AT``/``RT_KILL_RANK``: SIGKILL that rank right after ``trainer.step()``
reaches that step, on the first attempt only. ``RT_REPORT_DIR``: each rank writes
``report-rank{R}-attempt{A}.json`` at ``trainer.close()`` (steps run in this attempt, the step
it resumed from, the step it ended at).
"""

import json
import os
import runpy
import signal
import sys

from resilient_train.trainer import Trainer

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
KILL_AT = int(os.environ.get("RT_KILL_AT", "0") or 0)
KILL_RANK = int(os.environ.get("RT_KILL_RANK", "1"))
REPORT_DIR = os.environ.get("RT_REPORT_DIR")
steps_here = 0
_step, _close = Trainer.step, Trainer.close


def step(self):
    global steps_here
    _step(self)
    steps_here += 1
    if KILL_AT and ATTEMPT == 0 and self.rank == KILL_RANK and self.step_count == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def close(self, *a, **kw):
    _close(self, *a, **kw)
    if REPORT_DIR:
        with open(os.path.join(REPORT_DIR, f"report-rank{self.rank}-attempt{ATTEMPT}.json"), "w") as f:
            json.dump({"steps_run": steps_here, "resumed_from": self.resumed_from, "step": self.step_count, "world": self.world_size}, f)


Trainer.step, Trainer.close = step, close
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
