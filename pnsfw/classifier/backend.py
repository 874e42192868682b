"""Importing Keras (training only) safely next to torch, without TensorFlow's start-up chatter."""

import importlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Any

log = logging.getLogger("pnsfw.classifier")
# absl and oneDNN lines that TensorFlow's C++ side writes to fd 2 while it loads, whatever TF_CPP_MIN_LOG_LEVEL says
CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} .*\] |"
                     r"To enable the following instructions|oneDNN custom operations)")


def _quietly(load: Any) -> Any:
    """Run load() with fd 2 captured; lines that are not known chatter are written back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return load()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not CHATTER.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
            log.debug("TensorFlow start-up: %d lines of chatter hidden", len(kept))


def import_keras() -> Any:
    """Keras, with torch and triton loaded first: triton segfaults when it is first loaded after TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    if "keras" not in sys.modules:
        _quietly(lambda: importlib.import_module("keras"))
    import keras

    return keras
