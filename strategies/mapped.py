"""Tensors over file mappings, whose pages can be given back once they have been read.

The server maps each accepted update from its payload file (copy-on-write) instead of holding it on
the heap. Pages read through a mapping stay in the process's resident memory until it is unmapped,
so checking four 256 MiB updates and then aggregating them would keep a GiB resident although
nothing needs it any more. `release(tensor)` asks the OS to reclaim the whole pages of a mapped
tensor (Linux's MADV_PAGEOUT); this never changes what the tensor holds: a clean page is dropped
and read again from the file if touched, and a page written through the mapping is kept (or
swapped). For a tensor that is not over such a mapping, or where the OS cannot do it, it does
nothing. The server releases an update after checking it; `weighted_mean` releases each input
once it has been added.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

MADV_PAGEOUT = 21  # Linux's (>= 5.4; an older kernel refuses it with EINVAL)
PAGE = mmap.PAGESIZE

_lock = threading.Lock()
_starts: list[int] = []  # start addresses of the live mappings, sorted
_lengths: dict[int, int] = {}  # start -> length


def _madvise() -> Callable[[int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise  # Python's mmap objects would each hold a file descriptor
    function.argtypes, function.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return function


_MADVISE = _madvise()
CAN_RELEASE = _MADVISE is not None


def map_file(path: Path, size: int) -> torch.Tensor:
    """The file's first `size` bytes as a uint8 tensor over a private (copy-on-write) mapping: a write
    through the tensor changes this process's copy of the page, never the file. No file descriptor
    stays open; the mapping goes when this tensor and every view of it do."""
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)  # an empty file cannot be mapped
    tensor = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    start = tensor.data_ptr()
    with _lock:
        bisect.insort(_starts, start)
        _lengths[start] = size
    weakref.finalize(tensor.untyped_storage(), _forget, start)  # every view (numpy's too) holds the storage
    return tensor


def _forget(start: int) -> None:
    with _lock:
        del _lengths[start]
        del _starts[bisect.bisect_left(_starts, start)]


def release(tensor: torch.Tensor) -> None:
    """Give back the resident pages that lie wholly inside `tensor`'s bytes, if it is over a mapping
    from `map_file`; what the tensor holds is unchanged."""
    if _MADVISE is None or tensor.nbytes < PAGE or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return  # (a tensor under a page holds no whole page)
    address, nbytes = tensor.data_ptr(), tensor.nbytes
    with _lock:
        index = bisect.bisect_right(_starts, address) - 1
        if index < 0 or address + nbytes > _starts[index] + _lengths[_starts[index]]:
            return
        first = -(-address // PAGE) * PAGE  # whole pages only: a neighbour's bytes share the edge pages
        last = (address + nbytes) // PAGE * PAGE
        if last > first:  # under the lock: the mapping cannot go meanwhile (its tensor is held here anyway)
            _MADVISE(first, last - first, MADV_PAGEOUT)  # an older kernel refuses: the pages stay until unmapped
