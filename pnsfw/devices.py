"""`--device auto`: one answer for every stage (cuda when torch sees a GPU, else cpu)."""

import os
import sys

GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL: one exists where torch may see a GPU


def auto_device() -> str:
    """cuda when torch sees a GPU, else cpu. A Linux machine with no GPU device node is cpu without importing
    torch (over a second and ~700 MB of start-up)."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules and not any(map(os.path.exists, GPU_NODES)):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
