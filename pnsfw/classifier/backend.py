"""Importing Keras safely next to torch in one process."""

import importlib
import importlib.util
import os
from typing import Any


def import_keras() -> Any:
    """Keras, with torch and triton loaded first: triton segfaults when it is first loaded after TensorFlow
    (as `pnsfw predict` or the API would do when a CLIP encoder follows a classifier)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF start-up chatter is not for users
    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    import keras

    return keras
