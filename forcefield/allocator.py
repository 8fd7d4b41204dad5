"""Memory-allocator policy for compiled (AOTInductor) inference: keep freed memory for the next call.

Every call of a ``.pt2`` potential allocates and frees the same large temporary buffers. glibc's malloc, with its
default dynamic thresholds, hands memory of that size back to the kernel after the call (trimming the heap top
or unmapping the chunk) and asks for it again in the next one, so every MD step pays for page faults and the
zeroing of fresh pages: a native profile of the campaign's salicylic-acid MD (5 replicas, compiled) had 5 % of
its samples in ``brk`` and 23 % in the vector stores of the compiled kernels. :func:`keep_freed_memory` sets two
glibc tunables once per process: allocations up to 32 MB come from the heap (``M_MMAP_THRESHOLD``), and the heap
is not trimmed below 1 GB of free top (``M_TRIM_THRESHOLD``), so the buffers of one call are reused by the next:
1.47x the replica-steps per second. Measured with
``benchmarks/md_allocator.py`` (``oreo-md simulate --compile`` of salicylic acid, runs alternating in fresh
processes; ``benchmarks/results/md_allocator/``). Either tunable alone does not help (the mmap threshold alone
turns off glibc's dynamic trim threshold too and is slower). The compiled force-field *training* step
(``torch.compile``) measured the same with and without. QM9 property training (batches of 32 molecules of every
size) does not: after an hour, the QM9 grid's process spent 30 % of its CPU time in the kernel (4.7 M minor page
faults in 30 s); restarted with the policy, 214 faults in 30 s and 0.1 % in the kernel, and its epochs took 174-178
CPU-seconds against 215-322 before. In fresh processes of 300 steps it changes nothing (0.99x:
``benchmarks/md_allocator.py --workload qm9``, ``benchmarks/results/qm9_allocator/``): the cost grows with the
process's age. So :class:`PropertyTrainer <forcefield.pretrain.property.PropertyTrainer>` applies it too; only the
``.pt2`` loader and that trainer do.

Cost: the process keeps the memory it freed (its resident size stays near its peak), which is what a long MD
run wants. ``OREO_MALLOC=default`` leaves glibc's policy alone. On a C library other than glibc nothing changes.
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1          # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = None


def keep_freed_memory() -> bool:
    """Apply the policy (once per process); returns whether it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("OREO_MALLOC", "").strip().lower() == "default":
        return _applied
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):          # not glibc (macOS, musl without mallopt): leave it
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold first: the mmap threshold alone (it freezes glibc's dynamic trim threshold) is slower
    _applied = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _applied
