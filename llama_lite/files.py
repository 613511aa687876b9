"""What every checkpoint reader shares: its JSON settings file read with one clear error, and the
pages of a memory-mapped tensor handed back once it has been copied.

Its own module because hf.py needs it and must not import checkpoint.py (which imports hf.py).
"""
from __future__ import annotations

import json
import mmap
import sys
from pathlib import Path

import torch

from .devices import CheckpointError


def read_settings(path: Path, missing: str) -> dict:
    """A checkpoint's JSON settings file (params.json, config.json) as a dict, or one clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {missing}")
    try:
        settings = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} holds a JSON {type(settings).__name__}, not an object of model "
                              "settings ({\"dim\": ..., ...}); download it again")
    return settings


def release_pages(t: torch.Tensor) -> None:
    """Hand the pages of a memory-mapped tensor back to the kernel once it has been copied.

    Pages read through a memory map stay in the process's resident set until the map goes; with
    them, host RAM would hold the file and the loaded weights at once. MADV_PAGEOUT (Linux 5.4+)
    drops the clean file pages (they are re-read from disk if touched again, so nothing is lost);
    elsewhere this does nothing and the kernel reclaims them under memory pressure."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            libc.madvise(first, last - first, 21)  # MADV_PAGEOUT; an older kernel answers EINVAL: fine
    except (OSError, AttributeError):
        pass
