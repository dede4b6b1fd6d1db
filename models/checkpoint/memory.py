"""Keeping a load's resident memory at the model's size: what a consumed checkpoint tensor leaves behind.

Two things outlive the tensors that `load_state_dict` has copied or quantized, and both count in the
process's RSS (bench/big_model.py measures the peak of a 17B load):
  - the file pages read through a memory map (safetensors and `torch.load(mmap=True)` map whole files):
    resident until the whole mapping goes, i.e. up to a shard (safetensors) or the whole 35 GB
    `mp_rank_00_model_states.pt` (SAT);
  - the heap memory of freed temporaries (dtype conversions, quantization scratch), which glibc keeps for
    reuse instead of giving it back.
`release_consumed` drops the first with `madvise(MADV_DONTNEED)` on the tensors' pages (a private file
mapping then reads them from the file again if they are ever touched) and the second with glibc's
`malloc_trim`. Neither torch nor safetensors offers this (they keep a mapping whole while any tensor of it
lives), hence the libc calls through ctypes. Elsewhere than Linux/glibc both are no-ops.
"""
import ctypes
import ctypes.util
import os
import sys
from typing import Iterable, List, Optional, Tuple

import torch

_MADV_DONTNEED = 4  # Linux


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_mappings() -> List[Tuple[int, int]]:
    """(start, end) addresses of this process's mappings backed by a file (from /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # address perms offset dev inode path: inode 0 = anonymous memory (heap, stacks, torch tensors)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def release_consumed(tensors: Iterable[torch.Tensor], mappings: Optional[List[Tuple[int, int]]] = None) -> int:
    """Give back the memory of checkpoint tensors whose values are no longer needed: the file pages of
    those that are views of a memory-mapped file, then the heap's free memory. Tensors in anonymous
    memory are left as they are (their memory goes when they are freed). Returns the bytes advised away.

    Only for tensors read from a checkpoint and not written to: a dropped page of a private file mapping
    comes back from the file, not with changes made in memory.
    """
    if _LIBC is None:
        return 0
    mappings = file_mappings() if mappings is None else mappings
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        start = tensor.data_ptr()  # a strided view spans up to its last element
        end = start + (1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))) * tensor.element_size()
        if not any(low <= start and end <= high for low, high in mappings):
            continue
        first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
        if last > first and _LIBC.madvise(first, last - first, _MADV_DONTNEED) == 0:
            released += last - first
    trim_heap()
    return released


def trim_heap() -> None:
    """Return the heap's free memory to the OS (glibc `malloc_trim`; no-op elsewhere)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
