"""Silence transformers' own logging and progress bars; editguard reports progress itself."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # accelerate logs through the standard logging module ("Some parameters are on the meta device ...")
    accelerate_log = logging.getLogger("accelerate")
    accelerate_level = accelerate_log.level
    accelerate_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        accelerate_log.setLevel(accelerate_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
