"""resilient_train: keep PyTorch training alive across GPU clouds that fail independently."""

from __future__ import annotations

import logging

from . import errors

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["errors", "__version__"]
