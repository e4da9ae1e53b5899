"""Keep freed activation memory in the process heap (glibc) so inference does not page-fault.

PyTorch's CPU tensors come from malloc. With glibc's default, adaptive thresholds, a forward pass
with large activations frees megabytes at the top of the heap, glibc hands them back to the kernel
(trim) or serves them by mmap, and the next forward touches fresh pages again: an optimize()d
MobileNetV2 at batch 8 (224x224) takes 3,200-8,000 minor page faults per forward with the defaults
(in most runs: the adaptive thresholds sometimes settle) and 0 tuned, measured on the project
machine (tests/test_heap.py). ONNX Runtime does not pay this: it has its own arena. `tune_malloc()` sets two fixed thresholds instead:
blocks up to 32 MiB (glibc's maximum) come from the heap, and up to 256 MiB of free heap is
kept instead of trimmed. It is process-wide and cannot be undone (mallopt has no getter), which is
why `optimize()` says it does it and takes `tune_malloc=False`.
"""
import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20

_tuned = None  # None: not tried yet; then whether mallopt accepted both settings


def tune_malloc():
    """Apply the heap thresholds once per process; True when they are in effect (glibc only)."""
    global _tuned
    if _tuned is None:
        _tuned = _apply()
    return _tuned


def malloc_tuned():
    """Whether tune_malloc() has been applied in this process."""
    return bool(_tuned)


def _apply():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
