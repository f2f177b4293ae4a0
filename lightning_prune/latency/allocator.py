"""The memory allocator CPU latency is measured under. With glibc's defaults each large freed tensor goes
back to the operating system and the next forward page-faults its activations in again: on our 2-core
CPU ResNet-50 at batch 64 took 7.7 s a forward (45% of it system time) and 3.5 s with freed memory kept,
and timings of one network varied by up to 15%. The table records the allocator and warns about that
default, since what it measures must be what the network will run under."""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
KEEP_FREED_MEMORY = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000"


def cpu_allocator() -> str:
    """What serves this process's CPU memory: the allocator libraries in ``LD_PRELOAD``, the glibc malloc
    settings of the environment (``MALLOC_*``, ``GLIBC_TUNABLES=glibc.malloc.*``), else ``"default"``."""
    preloaded = [Path(p).name for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
                 if any(name in Path(p).name for name in ALLOCATORS)]  # fmt: skip
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    return " ".join(preloaded + settings + tunables) or "default"


def warn_if_freed_memory_is_returned(device: torch.device) -> None:
    """Warn before timing on the CPU under glibc's default malloc (see the module's docstring)."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc" or cpu_allocator() != "default":
        return
    warnings.warn(
        "Measuring CPU latency under glibc's default malloc, which returns each large freed tensor to the "
        "operating system: every forward page-faults its activations in again (ResNet-50 at batch 64 ran 2.2x "
        "slower so on our CPU) and timings vary by up to 15%. Start this process, and the one the network "
        f"will run in, with {KEEP_FREED_MEMORY} (or jemalloc/tcmalloc in LD_PRELOAD); see docs/latency.md.",
        stacklevel=3,
    )
