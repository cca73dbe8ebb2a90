"""The ``resilient-train`` console script's entry point.

A Ctrl-C while the command line starts (importing the CLI, building the parser, setting up
logging: up to ~0.6 s on a loaded machine) ends it with exit 130 and one line, not a
traceback. :func:`resilient_train.cli.main` takes over Ctrl-C once it runs a command.
"""

from __future__ import annotations

import os
import signal


def _interrupted_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)  # nothing has been written yet: no clean-up to run


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from .cli import main as cli_main

    return cli_main(starting_handler=_interrupted_while_starting)
